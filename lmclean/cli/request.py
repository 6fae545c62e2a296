"""`lmclean request`: queue a deletion request for a store (durably, at once), or list the queue."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lmclean.cli._app import err, handle_errors, on_store, out, print_json
from lmclean.errors import ConfigError


@handle_errors
@on_store("request", lambda a: "read" if a.get("list_") else "append")
def request(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record` (it may be recording now).")],
    forget: Annotated[Optional[str], typer.Option(help="Sample ids to forget: 3,5,60-79 or @file (one id per line).")] = None,
    forget_data: Annotated[Optional[Path], typer.Option(help="JSON Lines rows to forget, matched to recorded samples by their token fingerprint.")] = None,
    reason: Annotated[Optional[str], typer.Option(help="Why, for the audit log (e.g. 'GDPR art. 17 request').")] = None,
    requested_by: Annotated[Optional[str], typer.Option(help="Who asked, for the audit log.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show every request of the store: pending, applied, refused, with times.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the request (or the list) as JSON on stdout.")] = False,
) -> None:
    """Queue a deletion request, or list the queue (--list).

    The request is checked against the store (ids it knows, not already forgotten) and written to
    STORE/requests/ atomically; it returns at once. A running `lmclean record` applies it at its
    next step boundary (config `record.unlearn`); on a finished store `lmclean unlearn STORE
    --pending` applies every pending request in one sweep.
    """
    from lmclean import requests as queue  # zarr and the store reader: imported when the command runs

    if list_:
        if forget or forget_data or reason or requested_by:
            raise ConfigError("--list shows the queue; drop --forget/--forget-data/--reason/--requested-by")
        from lmclean.store.reader import TrajectoryStore

        TrajectoryStore(store)  # "no lmclean store at ..." rather than an empty list
        reqs = queue.list_requests(store)
        if json_out:
            print_json([r.to_dict() for r in reqs])
        else:
            _render(store, reqs)
        return
    req = queue.enqueue(store, ids=forget, data=forget_data, reason=reason, requested_by=requested_by)
    if json_out:
        print_json(req.to_dict())
        return
    err.print(f"[green]queued[/] request {req.id}: {len(req.ids)} samples ({_ids(req.ids)}); a running `lmclean record` "
              f"applies it at its next step, else `lmclean unlearn {store} --pending`")


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:8])) + (f", … ({len(ids)} in all)" if len(ids) > 8 else "")


def _render(store: Path, reqs: list[Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    if not reqs:
        err.print(f"no requests in {store}")
        return
    table = Table(title=f"requests of {store}", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=max(len(r.id) for r in reqs))  # the handle users copy: whole
    for name in ("status", "samples", "queued (UTC)", "applied", "wait s", "note"):
        table.add_column(name, overflow="fold")
    colour = {"pending": "yellow", "applied": "green", "refused": "red"}
    for r in reqs:
        where = f" step {r.step}" if r.step is not None else ""
        applied = f"{(r.applied_at or '')[11:19]}{where} {r.method or ''}".strip() if r.status == "applied" else ""
        audit = f"audit {r.audit_seq}" if r.audit_seq is not None else ""
        note = "; ".join(x for x in (r.error, r.reason, audit) if x)
        table.add_row(r.id, f"[{colour[r.status]}]{r.status}[/]", escape(_ids(r.ids)), r.created[:19].replace("T", " "),
                      escape(applied), "" if r.wait_seconds is None else f"{r.wait_seconds:.1f}", escape(note))
    out.print(table)
