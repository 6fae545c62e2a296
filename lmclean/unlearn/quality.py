"""A cheap a-posteriori quality signal for every unlearning report: a spot check of the method's trajectory.

Every method implies a counterfactual trajectory θ̂[t] = θ[t] + v[t] (with its optimizer state)
from the first affected step to the end: the states of its sweep, then its correction carried
unchanged. The exact counterfactual obeys θ̂[t+1] = step_t(θ̂[t]): one recorded update rule
applied to the gradient of step t's batch without the forget set, at θ̂[t]. At s sampled steps
the check runs that one exact step from the method's own θ̂[t] and compares:

    defect      = ‖step_t(θ̂[t]) − θ̂[t+1]‖                         (what the method got wrong)
    correction  = ‖step_t(θ̂[t]) − θ̂[t] − (θ[t+1] − θ[t])‖           (what the step should change)
    defect ratio = √ mean over those steps of (defect / correction)², estimated from the sampled ones

An exact method has ratio 0; a method that moved nothing at a step (θ̂[t+1] − θ̂[t] = the recorded
update) has ratio 1 there; above 1 the method's step is farther off than not correcting at all.
Half of the sampled steps are steps holding forget samples (where "doing nothing" is visible), half
other steps (where the propagation's curvature error is, or a carried correction's); each half
stands for its share of the steps (the sums are estimated per stratum as its size × its sampled mean). It is a one-step, local
check: it does not see errors that accumulate between sampled steps, so it flags a poor answer
without proving a good one. Also reported: the forget-set loss and the loss of a retained sample at
the starting model and at θ̂. Cost: s gradients and four forward passes.

Stability reading (free): where the curvature along v is the GGN's own (ggn, krylov), a step the
stabiliser clipped had η·λ > 1.9 along the correction: the run trains at the edge of stability
there, where small errors grow instead of dying out and no linearised correction is reliable. The
share of such steps separates the runs measured in benchmarks/README.md ("Quality spot check"),
which the local defect ratio does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmclean.optim import clip_gradient
from lmclean.unlearn.common import ForgetSet, SweepResult, flat_grad
from lmclean.unlearn.trajectory import Trajectory

__all__ = ["DEFAULT_CHECK_STEPS", "EDGE_SHARE", "check_steps", "keep_for", "quality_summary", "spot_check",
           "stability_reading"]

DEFAULT_CHECK_STEPS = 3
EDGE_SHARE = 0.05  # share of clipped steps that reads "edge of stability" (benchmarks/README.md, "Quality spot check")
_LOSS_SAMPLES = 16  # forget and retained samples whose loss is compared (seeded subset when more)


def check_steps(first: int, stop: int, affected: Iterable[int], s: int, seed: int = 0) -> list[int]:
    """Up to `s` steps t in [first, stop) to check, ⌈s/2⌉ of them holding forget samples, the rest
    not; seeded. `stop`: the last recorded step + 1 (past its window a method carries its correction
    unchanged, which the check judges too: a rollback is exact inside its window and wrong after it)."""
    if s <= 0 or stop <= first:
        return []
    window = range(first, stop)
    hit = sorted(set(affected) & set(window))
    other = sorted(set(window) - set(hit))
    rng = np.random.default_rng([seed, 15])
    want_hit = min(len(hit), max(math.ceil(s / 2), s - len(other)))
    picked = list(rng.choice(hit, size=want_hit, replace=False)) if want_hit else []
    rest = min(len(other), s - want_hit)
    picked += list(rng.choice(other, size=rest, replace=False)) if rest else []
    return sorted(int(t) for t in picked)


def keep_for(checks: Sequence[int]) -> frozenset[int]:
    """The steps before which a method must keep its perturbation (θ̂[t] and θ̂[t+1] of each check)."""
    return frozenset(checks) | frozenset(t + 1 for t in checks)


def _exact_step(traj: Trajectory, forget: ForgetSet, t: int, theta: Tensor, state: dict[str, Tensor]) -> Tensor:
    """θ̂[t+1] of the exact counterfactual from (θ̂[t], its state): the recorded rule on the retained batch."""
    new = theta.clone()
    if t in forget.steps:  # a removed step never happened
        return new
    kept = [int(i) for i in traj.batch(t).sample_ids if int(i) not in forget.sample_ids]
    g = flat_grad(traj.objective(t, kept, micro=True), traj.manifest, theta) if kept else torch.zeros_like(theta)
    traj.rule.step(new, clip_gradient(g, traj.max_grad_norm), traj.batch(t).lr, {k: v.clone() for k, v in state.items()}, t)
    return new


def _perturbation(result: SweepResult, t: int) -> tuple[Tensor, dict[str, Tensor]] | None:
    """(θ̂[t] − θ[t], Δ state) of the method's trajectory: kept during its sweep, or past the window
    the final correction, which the method carries unchanged to the last step."""
    if t in result.kept:
        return result.kept[t]
    return (result.delta, result.state_delta) if t >= result.window[1] else None


def _defects(traj: Trajectory, forget: ForgetSet, result: SweepResult, checks: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for t in checks:
        before, after = _perturbation(result, t), _perturbation(result, t + 1)
        if before is None or after is None:
            continue
        (dv0, ds0), (dv1, _) = before, after
        theta_t = hat_t = hat_next = step = recorded_update = None
        for s, theta, state in traj.states(t, t + 1):
            if s == t:
                theta_t = theta.clone()
                hat_t = theta + dv0.to(theta.device, theta.dtype)
                hat_state = {k: v + ds0[k].to(v.device, v.dtype) if k in ds0 else v.clone() for k, v in state.items()}
                if "exp_avg_sq" in hat_state:  # a linearised δs can push s below 0 where s ≈ 0: √ needs s ≥ 0
                    hat_state["exp_avg_sq"].clamp_(min=0)
                step = _exact_step(traj, forget, t, hat_t, hat_state)
            else:
                hat_next = theta + dv1.to(theta.device, theta.dtype)
                recorded_update = theta - theta_t
        assert hat_t is not None and hat_next is not None and step is not None and recorded_update is not None
        defect = float(torch.linalg.vector_norm(step - hat_next))
        correction = float(torch.linalg.vector_norm(step - hat_t - recorded_update))
        rows.append({"step": t, "defect": defect, "correction": correction,
                     "ratio": defect / correction if correction > 0 else None})
    return rows


def _window_ratio(rows: list[dict[str, Any]], affected: dict[int, list[int]], window: tuple[int, int],
                  n_steps: int) -> tuple[float | None, dict[str, Any]]:
    """The root mean square of the per-step ratios defect/correction over W = first affected step..end,
    estimated per stratum (steps holding forget samples, the others: sampled half and half, but
    rarely half of W) as its size × its sampled mean. Per step, not pooled: a pooled √Σd²/√Σc² is
    dominated by the few steps with large corrections (a removed step) and hides a method that is
    exact there and wrong everywhere after (rollback); `pooled` is reported beside it."""
    steps = range(window[0], n_steps)  # the swept window and the carried steps after it
    hit = {t for t in affected if t in steps}
    total = weight = num = den = 0.0
    strata: dict[str, Any] = {}
    for name, size, members in (("affected", len(hit), [r for r in rows if r["step"] in hit]),
                                ("other", len(steps) - len(hit), [r for r in rows if r["step"] not in hit])):
        ratios = [r["ratio"] for r in members if r["ratio"] is not None]  # None: the step needed no change
        mean2 = sum(x * x for x in ratios) / len(ratios) if ratios else None
        if mean2 is not None:
            total, weight = total + size * mean2, weight + size
        if members:
            num += size * sum(r["defect"] ** 2 for r in members) / len(members)
            den += size * sum(r["correction"] ** 2 for r in members) / len(members)
        strata[name] = {"steps": size, "sampled": len(members), "ratio": None if mean2 is None else math.sqrt(mean2)}
    strata["pooled"] = math.sqrt(num / den) if den > 0 else None  # √Σ defect² / √Σ correction²: big steps dominate
    return (math.sqrt(total / weight) if weight > 0 else None), strata


def _loss(traj: Trajectory, groups: dict[int, list[int]], theta: Tensor) -> float | None:
    """Weighted mean loss of the samples in `groups` (step -> ids), each at its recorded weight."""
    total = weight = 0.0
    with torch.no_grad():
        for t, ids in groups.items():
            info = traj.batch(t)
            w = {int(i): float(x) for i, x in zip(info.sample_ids, info.weights)}
            ids = [i for i in ids if i in w]
            if not ids:
                continue
            obj = traj.objective(t, ids)
            total += float(obj.loss_from_outputs(obj.outputs(traj.manifest.views(theta))))
            weight += sum(w[i] for i in ids)
    return total / weight if weight > 0 else None


def _sample_groups(traj: Trajectory, wanted: dict[int, list[int]], seed: int, salt: int) -> dict[int, list[int]]:
    """At most _LOSS_SAMPLES (step, id) pairs of `wanted`, seeded, one occurrence per id."""
    pairs, seen = [], set()
    for t, ids in sorted(wanted.items()):
        for i in ids:
            if i not in seen:
                seen.add(i)
                pairs.append((t, i))
    if len(pairs) > _LOSS_SAMPLES:
        rng = np.random.default_rng([seed, salt])
        pairs = [pairs[k] for k in sorted(rng.choice(len(pairs), size=_LOSS_SAMPLES, replace=False))]
    groups: dict[int, list[int]] = {}
    for t, i in pairs:
        groups.setdefault(t, []).append(i)
    return groups


def stability_reading(result: SweepResult) -> dict[str, Any] | None:
    """How many propagated steps the stabiliser clipped, where that measures the run (None elsewhere:
    another operator's clips measure its own overestimates, and without the stabiliser nothing is counted)."""
    steps = result.stability_steps
    if not steps:
        return None
    share = result.clipped_steps / steps
    return {"clipped_steps": result.clipped_steps, "steps": steps, "share": share, "edge_of_stability": share >= EDGE_SHARE}


def spot_check(traj: Trajectory, forget: ForgetSet, result: SweepResult, checks: Sequence[int],
               theta_before: Tensor, theta_after: Tensor, seed: int = 0) -> dict[str, Any]:
    """The report's `quality` entry (see the module docstring). `result.kept` holds the method's
    perturbation (θ̂[t] − θ[t], Δ optimizer state) before each step of `keep_for(checks)`;
    `theta_before` / `theta_after` are the starting and the unlearned model (flat)."""
    rows = _defects(traj, forget, result, checks)
    finite = [r for r in rows if math.isfinite(r["defect"]) and math.isfinite(r["correction"])]
    affected = forget.affected(traj)
    ratio, strata = _window_ratio(finite, affected, result.window, traj.n_steps)
    forget_groups = _sample_groups(traj, affected, seed, 1)
    window = range(result.window[0], min(result.window[1], traj.n_steps))
    retained = {t: [int(i) for i in traj.batch(t).sample_ids if int(i) not in forget.sample_ids]
                for t in (sorted(set(checks)) or list(window)[:4]) if t not in forget.steps}
    retain_groups = _sample_groups(traj, {t: ids for t, ids in retained.items() if ids}, seed, 2)
    where = getattr(traj, "device", theta_before.device)  # a store trajectory's objectives live on its device
    losses: dict[str, Any] = {}
    for name, groups in (("forget_loss", forget_groups), ("retain_loss", retain_groups)):
        before, after = (_loss(traj, groups, th.to(where)) for th in (theta_before, theta_after))
        losses[name] = {"before": before, "after": after,
                        "delta": None if before is None or after is None else after - before,
                        "samples": sum(len(v) for v in groups.values())}
    return {
        "check_steps": [r["step"] for r in rows],
        "defect_ratio": ratio,  # None: nothing to correct at the sampled steps
        "strata": strata,
        "non_finite_steps": [r["step"] for r in rows if r not in finite],
        "per_step": rows,
        **losses,
        "gradients": len(rows),
        "stability": stability_reading(result),
        "meaning": "defect ratio: one exact counterfactual step from the method's own θ̂[t] vs its θ̂[t+1], relative to "
                   "the step's correction (0 = exact, 1 = the step corrected nothing)",
    }


def quality_summary(quality: dict[str, Any]) -> dict[str, Any]:
    """The spot check's figures for the audit record (the full entry is in unlearn_report.json)."""
    return {"defect_ratio": quality.get("defect_ratio"), "check_steps": quality.get("check_steps"),
            "forget_loss_delta": (quality.get("forget_loss") or {}).get("delta"),
            "retain_loss_delta": (quality.get("retain_loss") or {}).get("delta"),
            "edge_of_stability": (quality.get("stability") or {}).get("edge_of_stability")}
