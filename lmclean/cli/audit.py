"""`lmclean audit show|verify`: read and check a store's tamper-evident audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from lmclean.audit import KEY_ENV, AuditLog, VerifyResult, model_digest, pending_scrub, tombstones
from lmclean.cli._app import abort, err, handle_errors, out, print_json
from lmclean.errors import AuditError, InputNotFoundError, StoreError

audit_app = typer.Typer(
    name="audit",
    help=(
        "Read and check a store's audit log (STORE/audit.jsonl).\n\n"
        "Every `record`, `record --resume` and `unlearn` appends one record: who asked, which samples "
        "(ids and content fingerprints, never the text), how, and the sha256 digests of the model before "
        "and after. Records are hash-chained, and HMAC-signed when LMCLEAN_AUDIT_KEY is set.\n\n"
        "`audit show STORE` lists the records; `audit verify STORE --model DIR` proves that DIR is the "
        "model an unlearning request produced and that the log was not edited. See docs/audit.md."
    ),
    no_args_is_help=True,
)

StoreArg = Annotated[Path, typer.Argument(help="Store directory written by `lmclean record` (holds audit.jsonl).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")]

# Order of the detailed view; fields not listed follow, then the chain fields.
_FIELD_ORDER = [
    "seq", "time", "kind", "request_id", "reason", "requested_by", "forget_ids", "forget_fingerprints",
    "level", "method", "K", "hvp", "damping", "noise_sigma", "steps_touched", "curvature_products",
    "v_norm_summary", "divergence_check", "keep_data", "steps", "start_step", "excluded_ids",
    "data_path", "config_digest", "dataset_digest", "model_digest_before", "output_model_digest",
    "output_path", "lmclean_version", "wall_time_s",
]
_CHAIN_TAIL = ["prev", "signed", "digest", "hmac"]


def register(app: typer.Typer) -> None:
    """Add the `audit` command group to the main app (called by lmclean.cli.main)."""
    app.add_typer(audit_app, name="audit")


def _open_log(store: Path) -> AuditLog:
    if not store.is_dir():
        raise InputNotFoundError(f"store directory {store} does not exist; check the path")
    return AuditLog(store)


def _one_line(message: str) -> str:
    return " ".join(message.split()).replace("[", "\\[")


# -- show ----------------------------------------------------------------------------------------


@audit_app.command("show")
@handle_errors
def show(
    store: StoreArg,
    record_id: Annotated[Optional[int], typer.Option("--id", help="Show every field of the record with this seq number (the first column of the table).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the audit records of STORE: when, what kind, which request, how many samples, how.

    It also says whether the hash chain is intact; `lmclean audit verify STORE [--model DIR]`
    checks everything (signatures, scrubbed samples, a model).
    """
    log = _open_log(store)
    records = log.records()
    if record_id is not None:
        match = [r for r in records if r.get("seq") == record_id]
        if not match:
            span = f"records 0..{len(records) - 1}" if records else "no records"
            raise AuditError(f"the audit log of {store} has no record {record_id} ({span})")
        if json_out:
            print_json(match[0])
        else:
            out.print(_detail_table(match[0], store))
        return
    if json_out:
        print_json(records)
        return
    if not records:
        err.print(f"store {store} has no audit records yet (`lmclean record` and `lmclean unlearn` write them)")
        return
    out.print(_records_table(records, store))
    result = log.verify()
    if result.ok:
        sig = "signatures checked" if result.signatures_checked else "signatures not checked"
        err.print(f"[green]chain intact[/]: {result.n_records} records ({sig}); details: `lmclean audit show {store} --id N`")
    else:
        err.print(f"[bold red]chain broken[/]: {_one_line(result.problem or '')}; run `lmclean audit verify {store}`")


def _short(value: Any, n: int = 12) -> str:
    return "-" if not value else str(value)[:n]


def _fmt_float(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.3g}"


def _records_table(records: list[dict[str, Any]], store: Path) -> Table:
    table = Table(title=f"audit log of {store}", title_justify="left")
    for name, justify in [("seq", "right"), ("time (UTC)", "left"), ("kind", "left"), ("request", "left"),
                          ("samples", "right"), ("method", "left"), ("K", "right"), ("hvp", "left"),
                          ("‖v‖ last", "right"), ("output digest", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in records:
        ids = r.get("forget_ids")
        vsum = r.get("v_norm_summary") or {}
        table.add_row(
            str(r.get("seq")),
            str(r.get("time", "-")).replace("T", " ")[:19],
            str(r.get("kind", "-")),
            str(r.get("request_id") or "-"),
            str(len(ids)) if isinstance(ids, list) else "-",
            str(r.get("method") or "-"),
            "-" if r.get("K") is None else str(r.get("K")),
            str(r.get("hvp") or "-"),
            _fmt_float(vsum.get("last") if isinstance(vsum, dict) else None),
            _short(r.get("output_model_digest")),
        )
    return table


def _fmt_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        if value and all(isinstance(v, str) and len(v) > 16 for v in value):
            return "\n".join(value)
        return ", ".join(map(str, value)) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_float(v) if isinstance(v, float) else v}" for k, v in value.items())
    return str(value)


def _detail_table(record: dict[str, Any], store: Path) -> Table:
    table = Table(title=f"audit record {record.get('seq')} of {store}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")
    keys = [k for k in _FIELD_ORDER if k in record]
    keys += [k for k in record if k not in _FIELD_ORDER and k not in _CHAIN_TAIL]
    keys += [k for k in _CHAIN_TAIL if k in record]
    for k in keys:
        table.add_row(k, _fmt_value(record[k]).replace("[", "\\["))
    return table


# -- verify --------------------------------------------------------------------------------------


@audit_app.command("verify")
@handle_errors
def verify(
    store: StoreArg,
    model: Annotated[Optional[Path], typer.Option("--model", help="A model directory (safetensors) to check: its weights must be the output of the latest record that produced them, descending from the recorded run.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the audit log of STORE and, with --model, that DIR is the model the log says.

    Checks, in order: the hash chain (each record's digest and link to the previous one; the HMAC
    signatures too when LMCLEAN_AUDIT_KEY is set); that every sample an unlearning scrubbed is
    tombstoned in the store; and with --model, that DIR's weight digest is the output of a record
    whose model lineage leads back to the recorded training run. Exits 0 only when everything
    holds, else 1 with one line naming the first broken record and what differs.
    """
    log = _open_log(store)
    report: dict[str, Any] = {"store": str(store), "ok": False}
    problem = _verify(store, log, model, report)
    report["ok"] = problem is None
    report["problem"] = problem
    if json_out:
        print_json(report)
        if problem is not None:
            raise typer.Exit(1)
        return
    if problem is not None:
        abort(_one_line(problem))
    sig = ("signatures checked" if report["signatures_checked"]
           else f"signatures not checked (set {KEY_ENV} to check them)")
    line = f"ok: {report['records']} records, chain intact, {sig}"
    scrub = report.get("scrub") or {}
    if scrub.get("checked"):
        line += f"; {scrub['tombstoned']} scrubbed samples consistent with the log"
    if "model" in report:
        m = report["model"]
        line += (f"; model {model} = output of record {m['record_seq']} ({m['kind']}"
                 f"{', request ' + str(m['request_id']) if m.get('request_id') else ''}), "
                 f"lineage {' -> '.join(map(str, m['lineage']))}")
    out.print(line)
    if report.get("note"):
        err.print(f"[yellow]note[/]: {_one_line(report['note'])}")


def _verify(store: Path, log: AuditLog, model: Optional[Path], report: dict[str, Any]) -> str | None:
    """Fill ``report``; return the first problem as one line, or None when everything holds."""
    if not log.exists():
        report.update(records=0, signatures_checked=False)
        return f"store {store} has no audit log ({log.path.name}); nothing to verify"
    result: VerifyResult = log.verify()
    report.update(records=result.n_records, signatures_checked=result.signatures_checked,
                  n_signed=result.n_signed, note=result.note, first_bad_seq=result.first_bad_seq)
    if not result.ok:
        problem = result.problem or f"record {result.first_bad_seq} is broken"
        return problem if problem.startswith("audit log ") else f"audit log {log.path}: {problem}"
    records = log.records()
    problem = _check_scrub(store, records, report)
    if problem is None and model is not None:
        problem = _check_model(store, records, model, report)
    return problem


def _check_scrub(store: Path, records: list[dict[str, Any]], report: dict[str, Any]) -> str | None:
    """Every keep_data=false unlearn's samples are tombstoned, and every tombstone names such a record."""
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
        if r.get("kind") != "unlearn" or r.get("keep_data") is not False:
            continue
        missing = [int(i) for i in r.get("forget_ids") or [] if int(i) not in dead]
        if missing:
            return (f"record {r.get('seq')} (request {r.get('request_id')}) says its samples were scrubbed, but "
                    f"sample {missing[0]} is not tombstoned in the store"
                    f"{f' ({len(missing)} such samples)' if len(missing) > 1 else ''}; "
                    "the next `lmclean unlearn` on this store completes an interrupted scrub")
    for i, seq in sorted(dead.items()):
        r = by_seq.get(seq)
        if r is None or r.get("kind") != "unlearn" or i not in (r.get("forget_ids") or []):
            return (f"sample {i} is tombstoned by audit record {seq}, but that record "
                    f"{'does not exist' if r is None else 'does not list it as forgotten'}")
    return None


def _check_model(store: Path, records: list[dict[str, Any]], model: Path, report: dict[str, Any]) -> str | None:
    digest = model_digest(model)
    report["model"] = {"path": str(model), "digest": digest}
    producing = [r for r in records if r.get("output_model_digest") == digest]
    if not producing:
        writers = [r for r in records if r.get("output_model_digest")]
        if not writers:
            return f"model {model} (digest {digest[:12]}…): no record in the audit log of {store} wrote a model"
        last = writers[-1]
        return (f"model {model} has weights digest {digest[:12]}…, which no record in the audit log of {store} "
                f"produced; the latest record that wrote a model is record {last.get('seq')} ({last.get('kind')}"
                f"{', request ' + str(last['request_id']) if last.get('request_id') else ''}) with "
                f"{str(last.get('output_model_digest'))[:12]}…")
    rec = producing[-1]
    report["model"].update(record_seq=rec.get("seq"), kind=rec.get("kind"), request_id=rec.get("request_id"))
    lineage = [rec.get("seq")]
    cur = rec
    while cur.get("kind") not in ("record", "resume"):
        before = cur.get("model_digest_before")
        parents = [r for r in records if r.get("seq", -1) < cur.get("seq", -1) and r.get("output_model_digest") == before]
        if not before or not parents:
            return (f"record {cur.get('seq')} ({cur.get('kind')}): model_digest_before {_short(before)}… matches no "
                    "earlier record's output_model_digest, so the model it started from is not in the log")
        cur = parents[-1]
        lineage.append(cur.get("seq"))
    report["model"]["lineage"] = lineage[::-1]
    return None
