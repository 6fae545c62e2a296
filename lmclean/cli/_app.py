"""Shared CLI plumbing: one stderr console for messages and progress, stdout for data and --json,
and the help polish every command gets (`PolishedHelp`)."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import wraps
from types import SimpleNamespace
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperArgument, TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click import Command, Context
except ImportError:  # pragma: no cover
    from click import Command, Context  # type: ignore[assignment]

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
        except KeyboardInterrupt as exc:  # lmclean.errors.Interrupted says what is true of the store
            what = str(exc).removeprefix("interrupted").lstrip(": ") or (
                "stopped before finishing; run `lmclean inspect-log` to see what the store holds")
            err.print("[yellow]interrupted[/]: " + what.replace("[", "\\["))
            raise typer.Exit(130)

    return wrapper  # type: ignore[return-value]


def on_store(purpose: str, mode: str | Callable[[dict[str, Any]], str] = "read", sync: bool = False) -> Callable[[F], F]:
    """Run the command on a local store directory: STORE itself, or for a URL (s3://, gs://,
    memory://, ...) its staging copy, pulled before and pushed after (lmclean.store.remote).

    The one place every command's --store is resolved: the `store` parameter is typed `str` for the
    parser (a Path would fold `s3://` into `s3:/`), and the body receives a Path. `mode`: "read",
    "write", "append", or a function of the command's arguments; `sync`: push every few seconds
    while the command runs (record)."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        param = sig.parameters["store"]
        annotation = param.annotation
        if get_origin(annotation) is Annotated:
            infos = [copy.copy(i) for i in get_args(annotation)[1:]]
            for info in infos:
                if getattr(info, "help", None):
                    info.help = f"{info.help.rstrip('.')}, or a URL: s3://bucket/prefix/run.zarr, gs://, memory:// (docs/store-format.md)."
            annotation = Annotated[(str, *infos)]  # type: ignore[valid-type]
        default = str(param.default) if isinstance(param.default, Path) else param.default
        new_sig = sig.replace(parameters=[param.replace(annotation=annotation, default=default) if p.name == "store" else p
                                          for p in sig.parameters.values()])

        @wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            store = kwargs.get("store")
            if store is None or "://" not in str(store):
                return fn(**{**kwargs, "store": None if store is None else Path(store)})
            from lmclean.store.remote import SYNC_SECONDS, is_remote, open_location

            if not is_remote(store):
                return fn(**{**kwargs, "store": Path(str(store).removeprefix("file://"))})
            how = mode(kwargs) if callable(mode) else mode
            with open_location(store, purpose, how, sync_every=SYNC_SECONDS if sync else None) as local:  # type: ignore[arg-type]
                try:  # option checks that read ctx.params (check_unlearn_options) see the local copy
                    from typer._click.globals import get_current_context
                except ImportError:  # pragma: no cover
                    from click import get_current_context  # type: ignore[assignment]
                ctx = get_current_context(silent=True)
                if ctx is not None and "store" in ctx.params:
                    ctx.params["store"] = local
                try:
                    return fn(**{**kwargs, "store": local})
                except LmcleanError as exc:  # name the URL the user gave, not the staging copy
                    if str(local) not in str(exc):
                        raise
                    try:
                        renamed = type(exc)(str(exc).replace(str(local), str(store)))
                    except TypeError:  # pragma: no cover - an error class with another signature
                        raise exc from None
                    raise renamed from exc

        wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


PLAIN_PROGRESS_EVERY = 5.0  # seconds between plain progress lines on a non-terminal stderr
_clock = time.monotonic  # tests replace it


@contextmanager
def progress_bar(description: str, total: int | None, fields: str = "", enabled: bool = True,
                 lazy: bool = False) -> Iterator[Callable[..., None]]:
    """Progress on stderr; yields `advance(n=1, total=, completed=, **fields)`.

    A Rich bar on a terminal. Elsewhere (CI, logs, pipes) Rich draws nothing until the end, so a
    4-minute step would be silent: there a plain line (description, n/total, rate, elapsed, eta,
    fields) goes out every PLAIN_PROGRESS_EVERY seconds, and once at the end. Disabled with
    enabled=False (--json). lazy=True shows nothing until the first `advance`, so a command that
    fails while setting up prints only its error line.
    """
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    bar: _RichBar | _PlainProgress = _RichBar(description, total, fields) if err.is_terminal else \
        _PlainProgress(description, total, fields)
    started = False

    def advance(n: int = 1, **values: Any) -> None:
        nonlocal started
        if not started:
            bar.start()
            started = True
        if "completed" in values:  # an absolute position wins (resume starts mid-way)
            n = 0
        bar.update(n, **values)

    if not lazy:
        bar.start()
        started = True
    try:
        yield advance
    finally:
        if started:  # a bar never started prints nothing (Rich's stop() would print an empty line)
            bar.stop()


class _RichBar:
    def __init__(self, description: str, total: int | None, fields: str) -> None:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn(fields), TimeElapsedColumn(), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=err, transient=False)
        self.description, self.total, self.fields = description, total, fields
        self.task: Any = None

    def start(self) -> None:
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=self.total, **_blank_fields(self.fields))

    def update(self, n: int, **values: Any) -> None:
        self.progress.update(self.task, advance=n, **values)

    def stop(self) -> None:
        self.progress.stop()


class _PlainProgress:
    """One plain line per PLAIN_PROGRESS_EVERY seconds, and one at the end, for logs."""

    def __init__(self, description: str, total: int | None, fields: str) -> None:
        self.description, self.total, self.fields = description, total, fields
        self.values: dict[str, Any] = _blank_fields(fields)
        self.completed = 0
        self.began = self.last = 0.0
        self.base: tuple[float, float] | None = None  # (time, position) of the first update: the rate's origin

    def start(self) -> None:
        self.began = self.last = _clock()

    def update(self, n: int, total: int | None = None, completed: float | None = None, **values: Any) -> None:
        if total is not None:
            self.total = total
        self.completed = completed if completed is not None else self.completed + n
        self.values.update(values)
        now = _clock()
        if self.base is None:
            self.base = (now, self.completed)
        elif now - self.last >= PLAIN_PROGRESS_EVERY:
            self.last = now
            self.emit(now)

    def stop(self) -> None:
        self.emit(_clock())

    def emit(self, now: float) -> None:
        err.print(self.line(now), markup=False, highlight=False)

    def line(self, now: float) -> str:
        done, total = self.completed, self.total
        parts = [f"{self.description} {done:g}/{total}" + (f" ({100 * done / total:.0f}%)" if total else "")
                 if total else f"{self.description} {done:g}"]
        t0, n0 = self.base or (now, done)
        rate = (done - n0) / (now - t0) if now > t0 else 0.0
        parts.append(f"{rate:.3g}/s" if rate else "-/s")
        parts.append(f"elapsed {_clock_text(now - self.began)}")
        if total and rate > 0 and done < total:
            parts.append(f"eta {_clock_text((total - done) / rate)}")
        unset = any(isinstance(v, float) and math.isnan(v) for v in self.values.values())
        try:  # fields are shown once every one of them has a value
            text = "" if unset or not self.fields else self.fields.format(task=SimpleNamespace(fields=self.values))
        except (ValueError, TypeError, KeyError):
            text = ""
        return ", ".join(parts) + (f" | {text}" if text.strip() else "")


def _clock_text(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _blank_fields(fields: str) -> dict[str, Any]:
    return {name: float("nan") for name in re.findall(r"task\.fields\[(\w+)\]", fields)}


class PolishedHelp(TyperGroup):
    """Root group mixin: every command's `--help` reads as written, fixed once for the whole tree.

    Help texts are literal (Rich markup would swallow `θ[step]`); flags show no `<bool>` and no
    `[default: no-x]`; repeatable options show their item type (`<str>`, not `<list[str]>`);
    arguments read `STORE` / `[CONFIG]` in the usage line, not `{store}`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _polish(self)


class _PlainArgument(TyperArgument):
    def _usage_display_name(self) -> str:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return name + ("..." if self.nargs != 1 and not name.endswith("...") else "")

    def display_type_rich(self, ctx: Context) -> str | None:
        return _item_type(super().display_type_rich(ctx))


def _item_type(display: str | None) -> str | None:
    """`<list[str]>` -> `<str>`: a repeatable option or a variadic argument shows what one item is."""
    item = re.fullmatch(r"<list\[(.+)\]>", display or "")
    return f"<{item.group(1)}>" if item else display


def _polish(command: Command) -> None:
    if command.help:
        command.help = escape(command.help)
    help_option = command.get_help_option(Context(command))  # created once and cached by the command
    for param in [*command.params, *([help_option] if help_option is not None else [])]:
        if getattr(param, "help", None):
            param.help = escape(param.help)  # type: ignore[union-attr]
        if isinstance(param, TyperOption) and param.metavar is None:
            if param.is_flag:
                param.metavar = ""
                if not param.default:
                    param.show_default = False
            elif param.multiple:
                param.metavar = _item_type(param.display_type_rich(Context(command)))
        elif isinstance(param, TyperArgument) and type(param) is TyperArgument:
            param.__class__ = _PlainArgument  # only the usage line's spelling changes
            if param.metavar is None:
                param.metavar = (param.name or "").upper()
    for sub in getattr(command, "commands", {}).values():
        _polish(sub)
