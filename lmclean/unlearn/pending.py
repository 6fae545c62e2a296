"""`lmclean unlearn STORE --pending`: every queued request (lmclean/requests.py) in one sweep.

The pending requests' samples are unlearned together (one ForgetSpec, their union) by the service
(lmclean/unlearn/service.py: one audited unlearning, composed with the earlier ones); each request
is then marked applied with that audit record, or refused with the one-line reason when its samples
were forgotten since it was queued. The requests are claimed under the audit request id before the
sweep, so a crash after the audit record (the commit point) is finished by the next `--pending`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmclean.errors import ConfigError, LmcleanError
from lmclean.requests import Request, claim, mark_applied, mark_refused, pending
from lmclean.unlearn.request import ForgetSpec, Requester
from lmclean.unlearn.service import OutputSpec, Progress, UnlearnOptions, unlearn

__all__ = ["unlearn_pending"]


def unlearn_pending(store: Path | str, options: UnlearnOptions, output: OutputSpec = OutputSpec(), *,
                    keep_data: bool = False, progress: Progress | None = None,
                    on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Apply every pending request of `store` (see the module docstring). Returns the service's
    report plus "requests" (applied ids), "refused" ({id: reason}); {"requests": []} when none was pending."""
    from lmclean.audit.events import check_not_tombstoned, new_request_id
    from lmclean.audit.history import load_history, refuse_forgotten
    from lmclean.audit.log import AuditLog

    from lmclean.store.reader import TrajectoryStore

    store = Path(store)
    ts = TrajectoryStore(store)  # "no lmclean store at ..." first
    if not ts.closed:
        raise ConfigError(f"store {store} is incomplete ({ts.committed_steps}/{ts.planned_steps} steps): a running "
                          f"`lmclean record` applies its pending requests itself; after a crash, `lmclean record "
                          f"--store {store} --resume` does")
    queued = pending(store)
    if not queued:
        return {"requests": [], "refused": {}}
    records = AuditLog(store).records() if AuditLog(store).exists() else []
    done = {r.get("request_id"): r for r in records if r.get("kind") == "unlearn"}
    history = load_history(store, records)
    live: list[Request] = []
    refused: dict[str, str] = {}
    finished: list[str] = []
    for r in queued:
        if r.audit_request_id in done:  # committed before a crash: only its status is missing
            rec = done[r.audit_request_id]
            mark_applied(store, r.id, audit_request_id=r.audit_request_id, audit_seq=rec.get("seq"),
                         method=str(rec.get("method")))
            finished.append(r.id)
            continue
        try:
            refuse_forgotten(history, r.ids)
            check_not_tombstoned(store, r.ids)
        except LmcleanError as exc:
            mark_refused(store, r.id, str(exc))
            refused[r.id] = " ".join(str(exc).split())
            continue
        live.append(r)
    if not live:
        return {"requests": finished, "refused": refused}
    rid = live[0].id if len(live) == 1 else new_request_id()
    for r in live:
        claim(store, r.id, audit_request_id=rid, method=options.method)
    ids = sorted({i for r in live for i in r.ids})
    who = Requester(request_id=rid, keep_data=keep_data,
                    reason="; ".join(sorted({r.reason for r in live if r.reason})) or None,
                    requested_by="; ".join(sorted({r.requested_by for r in live if r.requested_by})) or None)
    report = unlearn(store, ForgetSpec(ids=",".join(map(str, ids))), options, output, who, progress=progress,
                     on_start=on_start)
    for r in live:
        mark_applied(store, r.id, audit_request_id=rid, audit_seq=report["audit_seq"], method=report["method"])
    report["requests"] = finished + [r.id for r in live]
    report["refused"] = refused
    return report
