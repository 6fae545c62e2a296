"""The baselines beside LMCleaner: rollback (no propagation) and replay (exact, truncated, subsampled).

Replay re-runs the recorded steps from the first affected one with F removed: the exact
counterfactual for deterministic training. `fraction` < 1 is the control-variate version of the
design note: the stored g[t] minus the forget terms is exact at θ[t], and only the difference
∇L^{−F}(θ') − ∇L^{−F}(θ[t]) is estimated on a seeded subset of the retained samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from lmclean.errors import ConfigError
from lmclean.optim import clip_gradient, clip_tangent, lr_scale_of
from lmclean.unlearn.common import ForgetSet, SweepResult, flat_grad, update_of_step
from lmclean.unlearn.request import Window
from lmclean.unlearn.trajectory import Trajectory

Progress = Callable[[int, float], None]


def rollback(traj: Trajectory, forget: ForgetSet, progress: Progress | None = None) -> SweepResult:
    """Amnesiac / TIM: subtract each affected step's share of its update, with no propagation."""
    affected = forget.affected(traj)
    tau = traj.n_steps
    delta = torch.zeros(traj.manifest.size)
    result = SweepResult(delta, "rollback", sorted(affected), (min(affected, default=tau), max(affected, default=tau - 1) + 1))
    if not affected:
        result.notes.append("no recorded step contains the forget set: nothing to do")
        return result
    for t, theta, state in traj.states(min(affected), max(affected)):
        if t not in affected:
            continue
        delta = delta.to(theta.dtype)
        info = traj.batch(t)
        if t in forget.steps:
            u, _ = update_of_step(traj, t, theta, state, info.lr)
            delta -= u
        else:  # the forget terms' share of the update, through the step's clipping and lr groups
            share = flat_grad(traj.objective(t, affected[t]), traj.manifest, theta)
            if info.clip < 1.0:
                share = clip_tangent(share, traj.stored_grad(t), info.grad_norm, info.clip)
            scale = lr_scale_of(traj.rule, traj.manifest.size)
            delta += info.lr * (share if isinstance(scale, float) and scale == 1.0 else share * scale)
            result.gradients += 1
        if progress:
            progress(t, float(torch.linalg.vector_norm(delta)))
    result.delta = delta
    return result


def replay(traj: Trajectory, forget: ForgetSet, K: int | None = None, fraction: float | None = None,
           seed: int = 0, progress: Progress | None = None) -> SweepResult:
    """Re-run steps first..stop−1 without F from θ[first]; carry θ' − θ[stop] onto θ[τ]."""
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"--fraction {fraction} must be in (0, 1]")
    affected = forget.affected(traj)
    tau = traj.n_steps
    method = "replay" if fraction is None or fraction == 1 else f"replay(f={fraction:g})"
    if not affected:
        return SweepResult(torch.zeros(traj.manifest.size), method, [], (tau, tau), notes=["nothing to do"])
    window = Window.of(list(affected), tau, "replay", K)
    first, stop = window.first, window.stop
    result = SweepResult(torch.zeros(0), method, sorted(affected), (first, stop))
    theta_cf = state_cf = None
    for t, theta, state in traj.states(first, stop):
        if theta_cf is None:
            theta_cf, state_cf = theta.clone(), {k: v.clone() for k, v in state.items()}
        if t == stop:
            result.delta = theta_cf - theta
            break
        info = traj.batch(t)
        if t in forget.steps:
            pass  # the step never happened: θ' and the optimizer state stay as they are
        else:
            retained = [int(i) for i in info.sample_ids if int(i) not in forget.sample_ids]
            if not retained:  # every sample of the step is forgotten: no data term
                g = torch.zeros_like(theta_cf)
            elif fraction is None or fraction >= 1 or len(retained) < 2:
                g = flat_grad(traj.objective(t, retained), traj.manifest, theta_cf)
                result.gradients += 1
            else:
                g = _control_variate_grad(traj, t, theta, theta_cf, retained, affected.get(t, []), fraction, seed, result)
            # the recorded run clipped its gradient: so does the counterfactual (at its own norm)
            traj.rule.step(theta_cf, clip_gradient(g, traj.max_grad_norm), info.lr, state_cf, t)
        if progress:
            progress(t, float(torch.linalg.vector_norm(theta_cf - theta)))
    if stop < tau:
        result.notes.append(f"replayed {stop - first} steps; θ' − θ carried unchanged over the last {tau - stop} steps")
    return result


def _control_variate_grad(traj: Trajectory, t: int, theta: torch.Tensor, theta_cf: torch.Tensor, retained: list[int],
                          forget_here: list[int], fraction: float, seed: int, result: SweepResult) -> torch.Tensor:
    """[g[t] − forget terms at θ[t]] + (|R|/|S'|)·[∇L_{S'}(θ') − ∇L_{S'}(θ[t])], S' ⊂ R seeded by step."""
    info = traj.batch(t)
    recorded_ids = set(int(i) for i in info.sample_ids)
    exact_at_theta = traj.stored_grad(t)
    if not traj.stored_grad_is_exact(t):
        # Tombstoned samples are inside g[t] but their tokens are gone: recompute at θ[t] instead.
        exact_at_theta = flat_grad(traj.objective(t, sorted(recorded_ids)), traj.manifest, theta)
        result.gradients += 1
    if forget_here:
        exact_at_theta = exact_at_theta - flat_grad(traj.objective(t, forget_here), traj.manifest, theta)
        result.gradients += 1
    k = max(1, math.ceil(fraction * len(retained)))
    rng = np.random.default_rng([seed, t])
    subset = sorted(int(i) for i in rng.choice(retained, size=k, replace=False))
    obj = traj.objective(t, subset)
    diff = flat_grad(obj, traj.manifest, theta_cf) - flat_grad(obj, traj.manifest, theta)
    result.gradients += 2 * k / max(1, len(info.sample_ids))
    return exact_at_theta + (len(retained) / k) * diff
