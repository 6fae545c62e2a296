"""Option types and checks shared by the commands, importable without torch (for parse time).

Choices are ``Literal`` types (click refuses anything else while parsing, and the value stays a
plain str); ranges use typer's ``min``/``max``; a share of a batch, (0, 1], uses ``unit_fraction``.
``OneLineErrors`` makes every usage error one line and exit code 1, like the commands' own errors.
"""

from __future__ import annotations

from typing import Any, Literal

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click as typer._click; older ones use click itself
    from typer._click.exceptions import UsageError
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import UsageError, get_current_context  # type: ignore[assignment]

Method = Literal["lmcleaner", "rollback", "replay", "auto"]
Level = Literal["sample", "batch"]
Curvature = Literal["ggn", "exact", "krylov", "kfac", "ekfac", "ekfac-rq", "diag", "lowrank", "fisher"]
OnDivergence = Literal["stop", "damp"]
CurvatureBatch = Literal["retained", "full"]
Tail = Literal["carry", "krylov", "ekfac", "kfac", "lowrank", "diag"]
DEVICE_HELP = "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."


def device_spec(value: str | None) -> str | None:
    """Option callback: a device spelled as lmclean knows them (whether it exists is checked when the
    command runs, by lmclean.device.resolve_device)."""
    from lmclean.device import check_device_spec
    from lmclean.errors import ConfigError

    try:
        return None if value is None else check_device_spec(value, "")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).strip()) from None


def unit_fraction(value: float | None) -> float | None:
    """Option callback: a share of a batch, in (0, 1] (typer's ranges cannot exclude 0)."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"{value:g} is not in (0, 1]: give a share of each batch, e.g. 0.5")
    return value


def budget_spec(value: str | None) -> str | None:
    """Option callback: `--budget` as training-step equivalents (200, 200steps) or seconds (90s)."""
    if value is None:
        return None
    from lmclean.errors import ConfigError
    from lmclean.unlearn.auto import parse_budget

    try:
        parse_budget(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--budget ").strip()) from None
    return value


def check_unlearn_options() -> None:
    """Refuse a combination of `lmclean unlearn` options that cannot work, before any work.

    Call first in the command body: it reads the values and which were given explicitly from
    click's context, and the model size from the store's metadata (see lmclean.unlearn.validate).
    """
    from lmclean.unlearn.validate import check_combination, param_count

    ctx = get_current_context()
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    given = [name for name, src in sources.items() if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")]
    store = ctx.params.get("store")
    check_combination(ctx.params, given, param_count(store) if store else None)


class OneLineErrors(TyperGroup):
    """A bad option value or a missing argument prints `error: <message>` and exits 1 (not click's usage block)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            from lmclean.cli._app import abort

            command = exc.ctx.command_path if exc.ctx is not None else "lmclean"
            message = " ".join(exc.format_message().replace("Value error, ", "").split())
            abort(f"{message} (see `{command} --help`)".replace("[", "\\["))
