"""`lmclean audit show|verify`: read and check a store's tamper-evident audit log."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from lmclean.cli._app import abort, err, handle_errors, on_store, out, print_json
from lmclean.errors import AuditError, InputNotFoundError

if TYPE_CHECKING:  # lmclean.audit loads zarr (0.6 s): imported where used, so `lmclean --help` stays fast
    from lmclean.audit import AuditLog

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


def _open_log(store: Path) -> AuditLog:
    from lmclean.audit import AuditLog

    if not store.is_dir():
        raise InputNotFoundError(f"store directory {store} does not exist; check the path")
    return AuditLog(store)


def _one_line(message: str) -> str:
    return " ".join(message.split()).replace("[", "\\[")


# -- show ----------------------------------------------------------------------------------------


@audit_app.command("show")
@handle_errors
@on_store("audit show")
def show(
    store: StoreArg,
    record_id: Annotated[Optional[int], typer.Option("--id", help="Show every field of the record with this seq number (the first column of the table).")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="More columns (K, hvp, last ‖v‖, output digest): needs about 140 columns.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the audit records of STORE: when, what kind, which request, how many samples, how.

    Then the store's current model (the latest unlearning's output) with the chain of requests that
    produced it, and every forgotten sample. It also says whether the hash chain is intact;
    `lmclean audit verify STORE [--model DIR]` checks everything (signatures, scrubs, a model).
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
    table = _records_table(records, store, wide)
    if wide:  # at 160 columns at least, whatever the terminal (or a pipe) says: the user asked for them
        from rich.console import Console

        Console(highlight=False, soft_wrap=True, width=max(out.width, 160), file=out.file).print(table)
    else:
        out.print(table)
    _print_history(store, records)
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


def _records_table(records: list[dict[str, Any]], store: Path, wide: bool = False) -> Table:
    """One row per record; the default columns fit 80 columns, --wide adds the propagation details."""
    from rich import box

    table = Table(title=f"audit log of {store}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    columns = [("seq", "right"), ("time (UTC)", "left"), ("kind", "left"), ("request", "left"),
               ("samples", "right"), ("method", "left")]
    if wide:
        columns += [("K", "right"), ("hvp", "left"), ("‖v‖ last", "right"), ("output digest", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name != "request", overflow="fold")  # type: ignore[arg-type]
    for r in records:
        ids = r.get("forget_ids")
        vsum = r.get("v_norm_summary") or {}
        row = [
            str(r.get("seq")),
            str(r.get("time", "-")).replace("T", " ")[:16],
            str(r.get("kind", "-")),
            str(r.get("request_id") or "-"),
            str(len(ids)) if isinstance(ids, list) else "-",
            str(r.get("method") or "-"),
        ]
        if wide:
            row += ["-" if r.get("K") is None else str(r.get("K")), str(r.get("hvp") or "-"),
                    _fmt_float(vsum.get("last") if isinstance(vsum, dict) else None), _short(r.get("output_model_digest"))]
        table.add_row(*row)
    return table


def _print_history(store: Path, records: list[dict[str, Any]]) -> None:
    """The current model, the requests it includes, and every forgotten sample."""
    from rich.markup import escape

    from lmclean.audit.history import load_history

    try:
        h = load_history(store, records)
    except AuditError as exc:
        err.print(f"[bold red]current model unknown[/]: {_one_line(str(exc))}")
        return
    chain = " -> ".join(["recorded"] + [f"{link.request_id}" for link in h.unlearnings])
    out.print(f"current model: {escape(str(h.current_path))} ({chain})")
    if h.forgotten_ids:
        ids = sorted(h.forgotten_ids)
        shown = ", ".join(f"{i}{' (data kept)' if i in h.kept_data_ids else ''}" for i in ids[:12])
        out.print(f"forgotten: {len(ids)} samples: {shown}{', …' if len(ids) > 12 else ''}")


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
@on_store("audit verify")
def verify(
    store: StoreArg,
    model: Annotated[Optional[Path], typer.Option("--model", help="A model directory (safetensors) to check: its weights must be the output of the latest record that produced them, descending from the recorded run.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the audit log of STORE and, with --model, that DIR is the model the log says.

    Checks, in order: the hash chain (each record's digest and link to the previous one; the HMAC
    signatures too when LMCLEAN_AUDIT_KEY is set); that every sample an unlearning scrubbed is
    tombstoned in the store; and with --model, that DIR's weight digest is the output of a record
    whose model lineage leads back to the recorded training run and includes every later request. Exits 0 only when everything
    holds, else 1 with one line naming the first broken record and what differs. A model passes
    only when it is the store's current model: it includes every recorded unlearning.
    """
    from lmclean.audit.verify import verify_store

    _open_log(store)
    report = verify_store(store, model)
    problem = report["problem"]
    if json_out:
        print_json(report)
        if problem is not None:
            raise typer.Exit(1)
        return
    if problem is not None:
        abort(_one_line(problem))
    from lmclean.audit import KEY_ENV

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


@audit_app.command("enroll")
@handle_errors
@on_store("audit enroll", "write")
def enroll(
    store: StoreArg,
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the enrolled key by LMCLEAN_AUDIT_KEY from this record on.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Start signing the audit log of STORE with the key in LMCLEAN_AUDIT_KEY.

    Appends a signed `key-enrolled` record (with the key's fingerprint, never the key). From it on
    every record must be signed; the records before it stay covered by the hash chain, anchored by
    the signed enrolment. Needed when the key is set after recording; see docs/audit.md.
    """
    from lmclean.store.lock import StoreLock

    log = _open_log(store)
    with StoreLock(store, "audit enroll"):
        record, created = log.enroll(rotate=rotate)
    if json_out:
        print_json({"store": str(store), "created": created, "record": record})
        return
    fp = str(record.get("key_fingerprint") or "")[:12]
    if not created:
        out.print(f"already enrolled: this key (fingerprint {fp}…) signs the audit log of {store} since record {record['seq']}")
        return
    what = "rotated to" if record.get("previous_key_fingerprint") else "enrolled"
    out.print(f"{what} key {fp}… at record {record['seq']}: every record from here on is signed"
              + (f"; records 0..{record['seq'] - 1} are covered by the hash chain only" if record["seq"] else ""))
