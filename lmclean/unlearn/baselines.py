"""The baselines beside LMCleaner: rollback (no propagation) and replay (exact, truncated, subsampled).

Replay re-runs the recorded steps from the first affected one with F removed: the exact
counterfactual for deterministic training. `fraction` < 1 is the control-variate version of the
design note: the stored g[t] minus the forget terms is exact at θ[t], and only the difference
∇L^{−F}(θ') − ∇L^{−F}(θ[t]) is estimated on a seeded subset of the retained samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmclean.errors import ConfigError
from lmclean.objective import Objective
from lmclean.optim import clip_factor, clip_gradient, clip_tangent, lr_scale_of
from lmclean.params import ParamManifest
from lmclean.unlearn.common import ForgetSet, SweepResult, flat_grad, update_of_step
from lmclean.unlearn.request import Window
from lmclean.unlearn.trajectory import Trajectory

Progress = Callable[[int, float], None]


def rollback(traj: Trajectory, forget: ForgetSet, progress: Progress | None = None,
             keep: frozenset[int] = frozenset()) -> SweepResult:
    """Amnesiac / TIM: subtract each affected step's share of its update, with no propagation.
    `keep`: steps before which to keep the correction so far (SweepResult.kept, for the spot check)."""
    affected = forget.affected(traj)
    tau = traj.n_steps
    delta = torch.zeros(traj.manifest.size)
    result = SweepResult(delta, "rollback", sorted(affected), (min(affected, default=tau), max(affected, default=tau - 1) + 1))
    if not affected:
        result.notes.append("no recorded step contains the forget set: nothing to do")
        return result
    for t, theta, state in traj.states(min(affected), max(affected)):
        delta = delta.to(theta.device, theta.dtype)
        if t in keep:
            result.kept[t] = (delta.clone(), {})
        if t not in affected:
            continue
        info = traj.batch(t)
        if t in forget.steps:
            u, _ = update_of_step(traj, t, theta, state, info.lr)
            delta -= u
        else:  # the forget terms' share of the update, through the step's clipping and lr groups
            share = flat_grad(traj.objective(t, affected[t], micro=True), traj.manifest, theta)
            if info.clip < 1.0:
                share = clip_tangent(share, traj.stored_grad(t), info.grad_norm, info.clip)
            scale = lr_scale_of(traj.rule, traj.manifest.size)
            delta += info.lr * (share if isinstance(scale, float) and scale == 1.0 else share * scale.to(share.device))
            result.gradients += 1
        if progress:
            progress(t, float(torch.linalg.vector_norm(delta)))
    if max(affected) + 1 in keep:
        result.kept[max(affected) + 1] = (delta.clone(), {})
    result.delta = delta
    return result


def replay(traj: Trajectory, forget: ForgetSet, K: int | None = None, fraction: float | None = None,
           seed: int = 0, progress: Progress | None = None, keep: frozenset[int] = frozenset()) -> SweepResult:
    """Re-run steps first..stop−1 without F from θ[first]; carry θ' − θ[stop] onto θ[τ].
    `keep`: steps before which to keep θ' − θ (SweepResult.kept, for the spot check)."""
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
    for step in replay_steps(traj, forget, first, stop, fraction=fraction, seed=seed, result=result,
                             affected=affected):
        if step.t in keep:
            result.kept[step.t] = (step.theta - step.recorded,
                                   {k: step.state[k] - step.recorded_state[k] for k in step.recorded_state})
        if step.t == stop:
            result.delta = step.theta - step.recorded
            result.state_delta = {k: step.state[k] - step.recorded_state[k] for k in step.recorded_state}  # carried too
        elif progress:
            progress(step.t, float(torch.linalg.vector_norm(step.theta - step.recorded)))
    if stop < tau:
        result.notes.append(f"replayed {stop - first} steps; θ' − θ carried unchanged over the last {tau - stop} steps")
    return result


@dataclass
class ReplayedStep:
    """Step t of the counterfactual run, as `replay_steps` yields it before applying the update."""

    t: int
    theta: torch.Tensor  # θ'[t] (the generator's own buffer: clone to keep it past the next step)
    state: dict[str, torch.Tensor]  # the counterfactual optimizer state before step t
    recorded: torch.Tensor  # θ[t] of the recorded run (post-jump; a reused buffer)
    recorded_state: dict[str, torch.Tensor]
    kept: list[int]  # the step's samples the counterfactual keeps, in recorded order
    grad: torch.Tensor | None  # g'[t] as applied (after clipping); None: a removed step, or t == stop
    loss: float = 0.0  # L'[t] at θ'[t] (nan for a control-variate step)
    grad_norm: float = 0.0  # ‖g'[t]‖ before clipping
    clip: float = 1.0  # the clipping factor applied to g'[t]


def replay_steps(traj: Trajectory, forget: ForgetSet, first: int, stop: int, *, fraction: float | None = None,
                 seed: int = 0, result: SweepResult | None = None,
                 affected: dict[int, list[int]] | None = None) -> Iterator[ReplayedStep]:
    """The counterfactual run without F from θ[first] (pre-jump), one step at a time: yields steps
    first..stop−1, each before its update (the caller may record it), then step `stop` (grad None)
    with the final θ'. The gradient is computed as the training run computed it (the recorded
    micro-batches, fixed weights) and clipped as it was, so with fraction None the rows are what
    retraining without F records. `result.gradients` counts the gradient evaluations."""
    result = result if result is not None else SweepResult(torch.zeros(0), "replay", [], (first, stop))
    theta_cf: torch.Tensor | None = None
    state_cf: dict[str, torch.Tensor] = {}
    for t, theta, state in traj.states(first, stop):
        if theta_cf is None:  # θ[first] before any correction event there: replay ignores the jumps
            theta_cf, state_cf = theta.clone(), {k: v.clone() for k, v in state.items()}
            _undo_jumps(traj, first, theta_cf, state_cf)
        if t == stop:
            yield ReplayedStep(t, theta_cf, state_cf, theta, state, [], None)
            return
        info = traj.batch(t)
        kept = [int(i) for i in info.sample_ids if int(i) not in forget.sample_ids]
        if t in forget.steps:  # the step never happened: θ' and the optimizer state stay as they are
            yield ReplayedStep(t, theta_cf, state_cf, theta, state, [], None)
            continue
        loss = 0.0
        if not kept:  # every sample of the step is forgotten: no data term
            g = torch.zeros_like(theta_cf)
        elif fraction is None or fraction >= 1 or len(kept) < 2:
            loss, g = _loss_and_grad(traj.objective(t, kept, micro=True), traj.manifest, theta_cf)
            result.gradients += 1
        else:
            loss = float("nan")
            g = _control_variate_grad(traj, t, theta, theta_cf, kept, (affected or {}).get(t, []), fraction, seed,
                                      result)
        norm = float(torch.linalg.vector_norm(g))
        applied = clip_gradient(g, traj.max_grad_norm)  # the recorded run clipped: so does the counterfactual
        yield ReplayedStep(t, theta_cf, state_cf, theta, state, kept, applied, loss, norm,
                           clip_factor(norm, traj.max_grad_norm))
        traj.rule.step(theta_cf, applied, info.lr, state_cf, t)


def _loss_and_grad(obj: Objective, manifest: ParamManifest, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(L(θ), ∇L(θ)): `flat_grad` that also returns the loss, which a recorded row holds (under
    torchrun both summed over the ranks' shares, as one vector: unlearn/sharded.py)."""
    from lmclean.unlearn.sharded import summed

    def loss_and_grad(part: Objective) -> torch.Tensor:
        leaf = theta.detach().clone().requires_grad_(True)
        loss = part.loss_from_outputs(part.outputs(manifest.views(leaf)))
        (g,) = torch.autograd.grad(loss, leaf)
        return torch.cat([g, loss.detach().reshape(1).to(g.dtype)])

    both = summed(obj, loss_and_grad, lambda: torch.zeros(theta.numel() + 1, dtype=theta.dtype, device=theta.device))
    return float(both[-1]), both[:-1]


def _undo_jumps(traj: Trajectory, t: int, theta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
    """θ[t] and its state as before the store's correction events at t (a store trajectory: its θ[t] is
    post-jump; lmclean/store/corrections.py), so the counterfactual starts where training was."""
    store = getattr(traj, "store", None)
    if store is None or not hasattr(store, "jumps_at"):
        return
    for dtheta, dstate in store.jumps_at(t):
        theta.sub_(dtheta.to(theta.device, theta.dtype))
        for k, d in dstate.items():
            if k in state:
                state[k].sub_(d.to(state[k].device, state[k].dtype))


def _control_variate_grad(traj: Trajectory, t: int, theta: torch.Tensor, theta_cf: torch.Tensor, retained: list[int],
                          forget_here: list[int], fraction: float, seed: int, result: SweepResult) -> torch.Tensor:
    """[g[t] − forget terms at θ[t]] + (|R|/|S'|)·[∇L_{S'}(θ') − ∇L_{S'}(θ[t])], S' ⊂ R seeded by step."""
    info = traj.batch(t)
    recorded_ids = set(int(i) for i in info.sample_ids)
    exact_at_theta = traj.stored_grad(t)
    if not traj.stored_grad_is_exact(t):
        # Tombstoned samples are inside g[t] but their tokens are gone: recompute at θ[t] instead.
        exact_at_theta = flat_grad(traj.objective(t, sorted(recorded_ids), micro=True), traj.manifest, theta)
        result.gradients += 1
    if forget_here:
        exact_at_theta = exact_at_theta - flat_grad(traj.objective(t, forget_here, micro=True), traj.manifest, theta)
        result.gradients += 1
    k = max(1, math.ceil(fraction * len(retained)))
    rng = np.random.default_rng([seed, t])
    subset = sorted(int(i) for i in rng.choice(retained, size=k, replace=False))
    obj = traj.objective(t, subset)
    diff = flat_grad(obj, traj.manifest, theta_cf) - flat_grad(obj, traj.manifest, theta)
    result.gradients += 2 * k / max(1, len(info.sample_ids))
    return exact_at_theta + (len(retained) / k) * diff
