"""`lmclean unlearn STORE --pending`: the command side of lmclean/unlearn/pending.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmclean.cli._app import err, print_json, progress_bar
from lmclean.errors import ConfigError


def run_pending(store: Path, options: Any, output: Any, who: Any, *, given: list[str], method: str,
                json_out: bool) -> None:
    """Check the flags, apply every pending request in one sweep, print what happened to each."""
    if given:
        raise ConfigError(f"--pending takes what to forget from the queued requests; drop {given[0]}")
    if who.request_id or who.reason or who.requested_by:
        raise ConfigError("--pending: the queued requests carry their own ids, reasons and requesters; drop "
                          "--request-id/--reason/--requested-by")
    from lmclean.unlearn.pending import unlearn_pending

    with progress_bar(f"{method}", total=None, fields="‖v‖ {task.fields[vnorm]:.3e}", enabled=not json_out, lazy=True) as advance:
        report = unlearn_pending(store, options, output, keep_data=who.keep_data,
                                 progress=lambda t, n: advance(1, vnorm=n), on_start=lambda total: advance(0, total=total))
    if json_out:
        print_json(report)
        return
    if not report["requests"] and not report["refused"]:
        err.print(f"no pending requests in {store}; queue one with `lmclean request {store} --forget IDS`")
        return
    for rid, reason in report["refused"].items():
        err.print(f"[red]refused[/] request {rid}: {reason}")
    if "audit_seq" in report:
        err.print(f"[green]applied[/] {len(report['requests'])} requests ({len(report['forget_sample_ids'])} samples) in one "
                  f"{report['method']} sweep in {report['wall_seconds']} s; model written to {report['output']}; audit record "
                  f"{report['audit_seq']} (request {report['request_id']})")
    elif report["requests"]:
        err.print(f"marked {len(report['requests'])} requests applied (their unlearning was recorded before an interruption)")
