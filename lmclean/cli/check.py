"""`lmclean check`: verify every chunk, the commit marker and θ replay of a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmclean.cli._app import abort, handle_errors, on_store, out, print_json, progress_bar


@handle_errors
@on_store("check")
def check(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    no_replay: Annotated[bool, typer.Option(
        "--no-replay", help="Skip rebuilding θ between checkpoints (chunks and commit marker only).")] = False,
) -> None:
    """Verify a store: every chunk's checksum, COMMIT.json against the arrays, and θ replayed from
    each checkpoint to the next. Exit 1 naming the first bad array and step."""
    from lmclean.store.check import check_store  # imports torch: not for `--help`
    from lmclean.unlearn.trajectory import recompute_grad

    phases: dict[str, Any] = {}
    with progress_bar("checking", None, enabled=not json_out, lazy=True) as advance:
        def progress(phase: str, done: int, total: int) -> None:
            if phases.get("phase") != phase:
                phases["phase"] = phase
                advance(description=phase, total=total, completed=done)
            elif done % 16 == 0 or done == total:
                advance(completed=done)

        report = check_store(store, progress=progress, replay=not no_replay, recompute=recompute_grad)
    if json_out:
        print_json(report.to_dict())
        if not report.ok:
            raise typer.Exit(1)
        return
    if report.ok:
        replayed = "" if no_replay else (f", θ replayed over {report.steps_replayed} steps to checkpoints "
                                         f"{report.checkpoints_matched}")
        out.print(f"store {report.store}: ok: {report.committed_steps} of {report.planned_steps} steps committed, "
                  f"{report.chunks_verified} chunks verified{replayed} ({report.seconds:.1f} s)".replace("[", "\\["))
        return
    for problem in report.problems[1:]:  # the report (data) on stdout; the first problem is the error line
        out.print(f"also: {problem.message}", markup=False)
    first = report.first
    assert first is not None
    more = f" ({len(report.problems) - 1} more listed on stdout)" if len(report.problems) > 1 else ""
    abort((first.message + more).replace("[", "\\["))
