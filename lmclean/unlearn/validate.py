"""Which `lmclean unlearn` options go together, checked before any work (also for --dry-run).

Choices and ranges of single options are declared on the CLI options, so click refuses them while
parsing. This module checks what one option cannot see alone: an option that the chosen method or
curvature would silently ignore, contradictory requests, and a rank larger than the model. It
reads at most the store's metadata and needs no model, so it runs before any work. The choices
and the (0, 1] fractions live in lmclean/cli/_options.py, which the CLI imports without torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lmclean.errors import ConfigError

__all__ = ["check_combination", "param_count"]

Chosen = Mapping[str, Any]  # option name -> value
# option (parameter name) -> (does the chosen configuration use it?, who uses it: for the message)
_USERS: dict[str, tuple[Callable[[Chosen], bool], str]] = {
    "hvp": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "damping": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "on_divergence": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "curvature_batch": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "stabilize": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "tail": (lambda c: c["method"] == "lmcleaner", "--method lmcleaner"),
    "K": (lambda c: c["method"] in ("lmcleaner", "replay"), "--method lmcleaner or replay"),
    "fraction": (lambda c: c["method"] == "replay", "--method replay"),
    "budget": (lambda c: c["method"] == "auto", "--method auto"),
    "curvature_fraction": (lambda c: _operator_uses(c, "curvature_fraction"), "--hvp ggn or exact"),
    "rank": (lambda c: _operator_uses(c, "rank"), "--hvp lowrank or --tail lowrank"),
    "refresh": (lambda c: _operator_uses(c, "refresh"), "--hvp/--tail krylov, lowrank, diag, kfac, ekfac or ekfac-rq"),
    "krylov_dim": (lambda c: _operator_uses(c, "krylov_dim"), "--hvp/--tail krylov"),
    "anchor_fraction": (lambda c: _operator_uses(c, "anchor_fraction"), "--hvp/--tail krylov, lowrank, diag, kfac, ekfac or ekfac-rq"),
}
_DEFAULTS: dict[str, Any] = {"method": "lmcleaner", "hvp": "ggn", "tail": "carry", "level": "sample"}


def _lm(chosen: Chosen) -> bool:
    return chosen["method"] == "lmcleaner"


def _operator_uses(chosen: Chosen, setting: str) -> bool:
    """Whether the chosen curvature (or tail) operator reads `setting`: asked of the operators."""
    from lmclean.unlearn.operators import operator_class

    names = [chosen["hvp"]] + ([chosen["tail"]] if chosen["tail"] != "carry" else [])
    return _lm(chosen) and any(setting in operator_class(n).uses for n in names)


def _flag(name: str) -> str:
    return "--K" if name == "K" else "--" + name.replace("_", "-")


def check_combination(chosen: Mapping[str, Any], given: Iterable[str], n_params: int | None = None) -> None:
    """Refuse (ConfigError, one line) a combination of unlearn options that cannot work as asked.

    ``chosen`` maps option names (the parameter names of `lmclean unlearn`: method, hvp, tail,
    level, steps, rank, ...) to their values, defaults included; ``given`` names the options the
    user set explicitly (an option left at its default is never refused). ``n_params`` (the
    model's parameter count, when known) bounds ``rank``.
    """
    c = {**_DEFAULTS, **chosen}
    given = set(given)
    for name in sorted(given & set(_USERS), key=list(_USERS).index):
        used, by = _USERS[name]
        if not used(c):
            now = f"--method {c['method']}" if by.startswith("--method") or not _lm(c) else (
                f"--hvp {c['hvp']} --tail {c['tail']}")
            raise ConfigError(f"{_flag(name)} is used only with {by}, not with {now}: remove it or change the choice")
    if c.get("steps") and c["level"] == "sample" and "level" in given:
        raise ConfigError("--steps forgets whole steps (batch level), but --level sample was given: drop one of them")
    rank = c.get("rank")
    if n_params is not None and isinstance(rank, int) and rank > n_params and _operator_uses(c, "rank"):
        raise ConfigError(f"--rank {rank} exceeds the model's {n_params} parameters: use --rank {n_params} or less")


def param_count(store: Path) -> int | None:
    """The store's parameter count from its metadata alone (None when unreadable: the command's own error follows)."""
    try:
        meta = json.loads((Path(store) / "zarr.json").read_text(encoding="utf-8"))["attributes"]["lmclean"]
        count = meta["param_count"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return count if isinstance(count, int) else None
