"""`--method auto --budget B`: pick the configuration a user can trust, from measurements, not hopes.

Each candidate configuration (exact and control-variate replay, propagation with several curvatures,
rollback) has a measured residual against exact retraining and a measured cost per swept step on
each benchmark case of `fidelity_table.json` (copied from benchmarks/README.md, with provenance).
For a request, the *expected residual* of a candidate is its worst residual over the benchmark cases
that match the request (same optimizer; sample level ↔ the "memorise" cases, batch level ↔ the
"early" ones): a user cannot tell which case their run resembles, so the promise is the worst one.
Its *projected cost*, in training-step equivalents, is the largest measured per-step cost over those
cases times the steps the configuration sweeps for this request's window. Auto takes the lowest
expected residual whose projected cost fits the budget; a candidate whose expected residual is ≥ 1
(farther from retraining than the original model) is never taken.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmclean.errors import ConfigError
from lmclean.store.projection import fidelity_table

__all__ = ["AutoChoice", "Budget", "Candidate", "RequestShape", "apply_choice", "choose", "choose_auto", "parse_budget", "project",
           "step_seconds", "swept_steps", "table"]

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(steps?|s|sec|seconds?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """What the user allows: training-step equivalents, or seconds (converted with the store's step time)."""

    value: float
    unit: str  # "steps" | "seconds"
    text: str = ""

    def __str__(self) -> str:
        return self.text or (f"{self.value:g}s" if self.unit == "seconds" else f"{self.value:g}steps")


def parse_budget(text: str) -> Budget:
    """`200`, `200steps` (training-step equivalents) or `90s` (seconds); a one-line ConfigError otherwise."""
    match = _BUDGET.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--budget {text!r} is not a budget: give training-step equivalents (200, 200steps) or "
                          "seconds (90s), above 0")
    unit = "steps" if (match.group(2) or "steps").lower().startswith("step") else "seconds"
    return Budget(float(match.group(1)), unit, str(text).strip())


def table() -> dict[str, Any]:
    """The shipped fidelity table (lmclean/unlearn/fidelity_table.json; one loader with `record --dry-run`)."""
    return fidelity_table()


@dataclass(frozen=True)
class RequestShape:
    """What the cost model needs of a resolved request: its windows, level, optimizer, what applies."""

    affected: tuple[int, ...]  # steps holding this request's forget set
    replay_affected: tuple[int, ...]  # replay removes every sample forgotten so far: its first step may be earlier
    tau: int  # recorded steps
    level: str  # sample | batch
    optimizer: str  # sgd | adamw | ...
    propagation_ok: str | None = None  # None, or why lmcleaner cannot run this request
    replay_ok: str | None = None  # None, or why replay cannot (e.g. --base given)


def swept_steps(options: dict[str, Any], shape: RequestShape) -> int:
    """Steps a configuration sweeps for this request (the unit its per-step cost multiplies)."""
    method = options["method"]
    steps = shape.replay_affected if method == "replay" else shape.affected
    if not steps:
        return 0
    first, last = steps[0], steps[-1]
    if method == "rollback":
        return last - first + 1
    K = options.get("K")
    if method == "replay" or options.get("tail", "carry") != "carry" or K is None:
        return shape.tau - first
    return min(shape.tau, last + K + 1) - first


@dataclass
class Candidate:
    name: str
    options: dict[str, Any]
    cases: list[str]  # the matching benchmark cases it was measured on
    expected_residual: float | None  # worst residual over `cases` (None: never measured on a matching case)
    per_step: float | None
    projected_cost: float | None  # training-step equivalents
    verdict: str = ""

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "expected_residual": self.expected_residual,
                "projected_cost_steps": None if self.projected_cost is None else round(self.projected_cost, 1),
                "cases": self.cases, "verdict": self.verdict}


def _matches(case: dict[str, Any], shape: RequestShape) -> bool:
    scenario = "early" if shape.level == "batch" else "memorise"
    optimizer = "adamw" if shape.optimizer == "adamw" else "sgd"
    return case["scenario"] == scenario and case["optimizer"] == optimizer


def project(shape: RequestShape) -> list[Candidate]:
    """Every configuration of the table with its expected residual and projected cost for this request."""
    data = table()
    matching = [name for name, case in data["cases"].items() if _matches(case, shape)]
    out = []
    for config in data["configs"]:
        options = config["options"]
        measured = {c: config["measured"][c] for c in matching if c in config["measured"]}
        exact = options["method"] == "replay" and "fraction" not in options
        if not measured and exact:  # exact by construction: its cost is the worst measured anywhere
            measured = {c: {"residual": 0.0, "per_step": v["per_step"]} for c, v in config["measured"].items()}
        residual = max((v["residual"] for v in measured.values()), default=None)
        per_step = max((v["per_step"] for v in measured.values()), default=None)
        cost = None if per_step is None else per_step * swept_steps(options, shape)
        out.append(Candidate(config["name"], options, sorted(measured), residual, per_step, cost))
    return out


@dataclass
class AutoChoice:
    chosen: Candidate
    budget_steps: float
    budget: str
    step_seconds: float | None
    candidates: list[Candidate] = field(default_factory=list)

    def options(self) -> dict[str, Any]:
        """The chosen configuration as UnlearnOptions / PropagationSettings / OperatorSettings fields."""
        return dict(self.chosen.options)

    def report(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "chosen": c.name, "options": self.options(), "budget": self.budget,
            "budget_steps": round(self.budget_steps, 1), "step_seconds": self.step_seconds,
            "projected_cost_steps": round(c.projected_cost or 0.0, 1), "expected_residual": c.expected_residual,
            "residual_basis": "worst case over the matching benchmark cases " + ", ".join(c.cases),
            "why": (f"lowest expected residual ({c.expected_residual:g}) among the configurations whose projected cost "
                    f"fits the budget of {self.budget_steps:.1f} training steps"),
            "alternatives": [x.summary() for x in self.candidates if x is not c],
        }


def choose(shape: RequestShape, budget: Budget | None, seconds_per_step: float | None = None) -> AutoChoice:
    """The configuration with the lowest expected residual whose projected cost fits `budget`.

    No budget: the projected cost of exact replay (which then wins: it is exact). A budget in seconds
    needs `seconds_per_step` (see `step_seconds`). Nothing fits: ConfigError naming the cheapest option.
    """
    candidates = project(shape)
    exact = next(c for c in candidates if c.name == "replay")
    if budget is None:
        steps, text = exact.projected_cost or 0.0, "exact replay's cost (no --budget)"
    elif budget.unit == "seconds":
        if not seconds_per_step:
            raise ConfigError(f"--budget {budget}: this store's audit log records no training time to convert seconds "
                              "with; give the budget in training steps (e.g. --budget 200steps)")
        steps, text = budget.value / seconds_per_step, str(budget)
    else:
        steps, text = budget.value, str(budget)
    usable = []
    for c in candidates:
        why_not = shape.replay_ok if c.options["method"] == "replay" else (
            shape.propagation_ok if c.options["method"] == "lmcleaner" else None)
        if why_not:
            c.verdict = f"not applicable: {why_not}"
        elif c.expected_residual is None or c.projected_cost is None:
            c.verdict = "not measured on a benchmark case matching this request"
        elif c.expected_residual >= 1.0:
            c.verdict = f"no better than doing nothing (worst residual {c.expected_residual:g} ≥ 1)"
        elif c.projected_cost > steps + 1e-9:
            c.verdict = f"over budget ({c.projected_cost:.1f} > {steps:.1f} steps)"
        else:
            c.verdict = "fits"
            usable.append(c)
    if not usable:
        fit = [c for c in candidates if c.verdict.startswith("over budget")]
        if not fit:
            raise ConfigError("--method auto: no configuration applies to this request; choose --method yourself")
        cheapest = min(fit, key=lambda c: (c.projected_cost, c.expected_residual))
        raise ConfigError(f"--budget {text} ({steps:.1f} training steps) fits no configuration expected to beat doing "
                          f"nothing; the cheapest, {cheapest.name}, projects {cheapest.projected_cost:.1f} steps "
                          f"(expected residual {cheapest.expected_residual:g}): raise --budget")
    best = min(usable, key=lambda c: (c.expected_residual, c.projected_cost))
    best.verdict = "chosen"
    return AutoChoice(best, steps, text, seconds_per_step, candidates)


def step_seconds(store: Path | str) -> float | None:
    """Seconds per training step from the store's audit log (record and resume events: training
    wall time, recording included, on the machine that recorded), None when it records none."""
    from lmclean.audit import AuditLog

    seconds, steps = 0.0, 0
    for rec in AuditLog(Path(store)).records():
        if rec.get("kind") not in ("record", "resume"):
            continue
        trained = int(rec.get("steps") or 0) - int(rec.get("start_step") or 0)
        wall = rec.get("wall_time_s")
        if trained > 0 and isinstance(wall, (int, float)) and wall > 0 and math.isfinite(wall):
            seconds, steps = seconds + float(wall), steps + trained
    return seconds / steps if steps else None


def choose_auto(store_path: Path | str, spec: Any, options: Any, output: Any) -> Any:
    """`options` (UnlearnOptions) with `--method auto` replaced by the chosen configuration, and
    `auto_choice` holding the report's `auto` entry; other methods are returned unchanged.
    Reads the store's metadata, sample index and audit log (no model): the service calls it first."""
    if options.method != "auto":
        return options
    from lmclean.audit import AuditLog
    from lmclean.audit.history import load_history
    from lmclean.errors import LmcleanError
    from lmclean.store.reader import TrajectoryStore
    from lmclean.unlearn.lmcleaner import require_supported
    from lmclean.unlearn.resolve import resolve_forget

    store = TrajectoryStore(store_path)
    resolved = resolve_forget(store, spec)
    history = load_history(store.path, AuditLog(store.path).records())
    earlier = set(history.forgotten_ids)

    def steps_of(ids: set[int], removed: set[int]) -> tuple[int, ...]:
        return tuple(sorted(set(store.occurrences(ids)) | removed)) if ids else tuple(sorted(removed))

    forget = resolved.forget
    try:
        require_supported(store, forget)
        propagation_ok = None
    except LmcleanError as exc:
        propagation_ok = str(exc).split(";")[0]
    shape = RequestShape(
        affected=steps_of(set(forget.sample_ids), set(forget.steps)),
        replay_affected=steps_of(set(forget.sample_ids) | earlier, set(forget.steps) | set(history.forgotten_steps)),
        tau=store.committed_steps, level=resolved.level, optimizer=store.rule.name, propagation_ok=propagation_ok,
        replay_ok="--base given (replay re-runs the recorded training)" if output.base is not None else None)
    budget = parse_budget(options.budget) if options.budget is not None else None
    choice = choose(shape, budget, step_seconds(store.path) if budget and budget.unit == "seconds" else None)
    return apply_choice(options, choice.options(), choice.report())


def apply_choice(options: Any, chosen: dict[str, Any], report: dict[str, Any] | None = None) -> Any:
    """UnlearnOptions running the table configuration `chosen` (method, K, fraction, hvp, refresh, krylov_dim, anchor_fraction,
    curvature_fraction, tail, curvature_batch); the user's seed, device, noise and check steps are kept."""
    import dataclasses

    prop = options.propagation
    operator = dataclasses.replace(prop.operator, hvp=chosen.get("hvp", prop.operator.hvp),
                                   refresh=chosen.get("refresh", prop.operator.refresh),
                                   krylov_dim=chosen.get("krylov_dim", prop.operator.krylov_dim),
                                   anchor_fraction=chosen.get("anchor_fraction", prop.operator.anchor_fraction),
                                   curvature_fraction=chosen.get("curvature_fraction", 1.0))
    prop = dataclasses.replace(prop, operator=operator, tail=chosen.get("tail", "carry"), tail_operator=None,
                               curvature_batch=chosen.get("curvature_batch", "retained"))
    return dataclasses.replace(options, method=chosen["method"], K=chosen.get("K"), fraction=chosen.get("fraction"),
                               propagation=prop, budget=None, auto_choice=report)
