"""`lmclean reconcile STORE`: rewrite the store to exact retraining without every forgotten sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmclean.cli._app import err, handle_errors, on_store, print_json, progress_bar


@handle_errors
@on_store("reconcile", "write")
def reconcile(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
) -> None:
    """Rewrite the store to exact retraining without every forgotten sample.

    Replays the run from the first step a forgotten sample touched and swaps the store for that run: gradients, checkpoints and STORE/model become exactly what
    retraining without them records (`record --exclude`). The approximate current model it replaces
    is measured (residual ratio) and the audit log records it. Crash-safe: the old store stays valid
    until the new one is complete; the next `lmclean reconcile` finishes an interrupted swap."""
    from lmclean.unlearn.reconcile import reconcile as run  # imports torch: not for `--help`

    with progress_bar("replay", None, enabled=not json_out, lazy=True) as advance:

        def on_start(first: int, steps: int) -> None:
            err.print(f"reconciling [bold]{store}[/]: replaying {steps} steps from step {first}")

        def progress(done: int, total: int) -> None:
            advance(total=total, completed=done)

        report = run(store, progress=progress, on_start=on_start)
    if json_out:
        print_json(report)
        return
    if not report.get("reconciled"):
        err.print(f"{store}: {report['note']}")
        return
    ratio = report["residual_ratio"]
    measured = "n/a" if ratio is None else f"{ratio:.4g}"
    err.print(f"[green]reconciled[/] {store}: {report['steps_replayed']} steps replayed from step "
              f"{report['first_step']} without {len(report['forgotten_ids'])} forgotten samples in "
              f"{report['seconds']:.1f} s; the approximate model it replaces ({report['replaced_model']}) had residual "
              f"ratio {measured}; current model: {report['model']} (audit record {report['audit_seq']})")
