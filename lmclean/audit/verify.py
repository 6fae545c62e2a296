"""`audit verify` as a library call: the chain, the scrubs, and whether a model includes every request.

A model passes only when it is the store's current model: the output of the latest unlearning (or
the recorded model when there is none), reached through an unbroken chain of unlearnings. A model
produced earlier in the chain fails, naming the first request it does not include.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmclean.audit.digest import model_digest
from lmclean.audit.history import load_history
from lmclean.audit.log import AuditLog
from lmclean.store.scrub import pending_scrub, tombstones
from lmclean.errors import AuditError, InputNotFoundError, StoreError

__all__ = ["verify_store"]


def verify_store(store: Path, model: Path | None = None) -> dict[str, Any]:
    """A report dict with ``ok`` and ``problem`` (the first one, one line, or None)."""
    log = AuditLog(store)
    report: dict[str, Any] = {"store": str(store), "ok": False}
    problem = _verify(store, log, model, report)
    report["ok"] = problem is None
    report["problem"] = problem
    return report


def _verify(store: Path, log: AuditLog, model: Path | None, report: dict[str, Any]) -> str | None:
    if not log.exists():
        report.update(records=0, signatures_checked=False)
        return f"store {store} has no audit log ({log.path.name}); nothing to verify"
    result = log.verify()
    report.update(records=result.n_records, signatures_checked=result.signatures_checked,
                  n_signed=result.n_signed, note=result.note, first_bad_seq=result.first_bad_seq)
    if not result.ok:
        problem = result.problem or f"record {result.first_bad_seq} is broken"
        return problem if problem.startswith("audit log ") else f"audit log {log.path}: {problem}"
    records = log.records()
    problem = _check_pending(store)
    if problem is None:
        problem = _check_scrub(store, records, report)
    if problem is None and model is not None:
        problem = _check_model(store, records, model, report)
    return problem


def _check_pending(store: Path) -> str | None:
    from lmclean.audit.publish import PENDING_UNLEARN

    if (store / PENDING_UNLEARN).exists():
        return (f"store {store} has an interrupted unlearning pending ({PENDING_UNLEARN}); the next `lmclean unlearn` "
                "or `lmclean record --resume` on it completes or undoes it")
    return None


def _check_scrub(store: Path, records: list[dict[str, Any]], report: dict[str, Any]) -> str | None:
    """Every keep_data=false unlearning's samples are tombstoned, and every tombstone names one."""
    try:
        dead = tombstones(store)
        pending = pending_scrub(store)
    except InputNotFoundError:  # a bare log directory without the store's arrays
        report["scrub"] = {"checked": False}
        return None
    except StoreError as exc:
        report["scrub"] = {"checked": False}
        return str(exc)
    report["scrub"] = {"checked": True, "tombstoned": len(dead)}
    if pending is not None:
        return (f"store {store} has an interrupted scrub of audit record {pending.get('audit_seq')} pending "
                f"(scrub_pending.json); the next `lmclean unlearn` or `record --resume` on it completes it")
    by_seq = {r.get("seq"): r for r in records}
    for r in records:
        if r.get("kind") not in ("unlearn", "online-unlearn") or r.get("keep_data") is not False:
            continue
        missing = [int(i) for i in r.get("forget_ids") or [] if int(i) not in dead]
        if missing:
            return (f"record {r.get('seq')} (request {r.get('request_id')}) says its samples were scrubbed, but "
                    f"sample {missing[0]} is not tombstoned in the store"
                    f"{f' ({len(missing)} such samples)' if len(missing) > 1 else ''}; "
                    "the next `lmclean unlearn` on this store completes an interrupted scrub")
    for i, seq in sorted(dead.items()):
        r = by_seq.get(seq)
        if r is None or r.get("kind") not in ("unlearn", "online-unlearn") or i not in (r.get("forget_ids") or []):
            return (f"sample {i} is tombstoned by audit record {seq}, but that record "
                    f"{'does not exist' if r is None else 'does not list it as forgotten'}")
    return None


def _check_model(store: Path, records: list[dict[str, Any]], model: Path, report: dict[str, Any]) -> str | None:
    digest = model_digest(model)
    report["model"] = {"path": str(model), "digest": digest}
    try:
        history = load_history(store, records)
    except AuditError as exc:
        return str(exc)
    pos = history.position_of(digest)
    if pos is None:
        cur = history.current
        if cur is None:
            return f"model {model} (digest {digest[:12]}…): no record in the audit log of {store} wrote a model"
        return (f"model {model} has weights digest {digest[:12]}…, which no record in the audit log of {store} produced; "
                f"the store's current model is {history.current_path} ({cur.describe()}, {cur.output_digest[:12]}…)")
    link = history.chain[pos]
    report["model"].update(record_seq=link.seq, kind=link.kind, request_id=link.request_id)
    report["model"]["lineage"] = [x.seq for x in history.chain[: pos + 1]]
    missing = history.missing_after(pos)
    if missing:
        names = ", ".join(f"{m.request_id} (record {m.seq})" for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return (f"model {model} is the output of {link.describe()} but does not include the later unlearning request "
                f"{names}{more}; the store's current model is {history.current_path}")
    unrelated = [x for x in history.chain[: pos + 1] if x.base_unrelated]
    if unrelated:
        return (f"model {model} descends from {unrelated[-1].describe()}, which started from a model outside this "
                "store's chain (--base-unrelated): the log cannot prove it includes the earlier requests")
    return None
