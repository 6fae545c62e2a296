"""Shared CLI plumbing: one stderr console for messages and progress, stdout for data and --json."""

from __future__ import annotations

import json
import os
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

err = Console(stderr=True, highlight=False)
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
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: committed work is kept; see `lmclean inspect-log`")
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def progress_bar(description: str, total: int, fields: str = "", enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A Rich progress bar on stderr; yields `advance(**fields)`. Silent when disabled or not a TTY-less CI."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(fields), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=not enabled, transient=False) as progress:
        task = progress.add_task(description, total=total, **_blank_fields(fields))

        def advance(n: int = 1, **values: Any) -> None:
            progress.update(task, advance=n, **values)

        yield advance


def _blank_fields(fields: str) -> dict[str, Any]:
    import re

    return {name: float("nan") for name in re.findall(r"task\.fields\[(\w+)\]", fields)}
