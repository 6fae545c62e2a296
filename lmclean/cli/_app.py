"""Shared CLI plumbing: one stderr console for messages and progress, stdout for data and --json."""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lmclean.errors import LmcleanError

err = Console(stderr=True, highlight=False, soft_wrap=True)  # soft wrap: an error stays one line in logs
out = Console(highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def abort(message: str) -> None:
    """Print one red line and exit 1."""
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    raise typer.Exit(1)


def handle_errors(fn: F) -> F:
    """Turn LmcleanError (and Ctrl-C) into a one-line message and exit 1; LMCLEAN_DEBUG=1 shows tracebacks."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LmcleanError as exc:
            if os.environ.get("LMCLEAN_DEBUG"):
                traceback.print_exc()
            abort(str(exc).replace("[", "\\["))
        except OSError as exc:  # disk full, permission denied, ...: the file and the reason, one line
            if os.environ.get("LMCLEAN_DEBUG"):
                traceback.print_exc()
            where = f"{exc.filename}: " if exc.filename else ""
            abort(f"{where}{exc.strerror or exc}".replace("[", "\\["))
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: committed work is kept; see `lmclean inspect-log`")
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def progress_bar(description: str, total: int | None, fields: str = "", enabled: bool = True,
                 lazy: bool = False) -> Iterator[Callable[..., None]]:
    """A Rich progress bar on stderr; yields `advance(n=1, total=, completed=, **fields)`.

    Disabled with enabled=False (--json). lazy=True draws nothing until the first `advance`, so a
    command that fails while setting up prints only its error line. On a non-terminal stderr Rich
    draws nothing live and prints the final state once when the bar stops.
    """
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(fields), TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=err, disable=not enabled, transient=False)
    task: list[Any] = []

    def start() -> None:
        progress.start()
        task.append(progress.add_task(description, total=total, **_blank_fields(fields)))

    def advance(n: int = 1, **values: Any) -> None:
        if not task:
            start()
        if "completed" in values:  # an absolute position wins (resume starts mid-way)
            n = 0
        progress.update(task[0], advance=n, **values)

    if not lazy:
        start()
    try:
        yield advance
    finally:
        progress.stop()


def _blank_fields(fields: str) -> dict[str, Any]:
    return {name: float("nan") for name in re.findall(r"task\.fields\[(\w+)\]", fields)}
