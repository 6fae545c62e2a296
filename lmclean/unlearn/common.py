"""Pieces shared by every unlearning method: what to forget, gradients at recorded points, results."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmclean.errors import DataError
from lmclean.objective import Objective
from lmclean.params import ParamManifest
from lmclean.unlearn.trajectory import Trajectory


@dataclass
class ForgetSet:
    """Sample level: `sample_ids`; batch level: `steps` (recorded steps that "never happened")."""

    sample_ids: set[int] = field(default_factory=set)
    steps: set[int] = field(default_factory=set)
    # occurrences before this step are carried, not corrected: a windowed store (record.keep_steps)
    # no longer holds θ there, and the user accepted it (`--outside-window carry`, unlearn/request.py)
    from_step: int = 0

    @property
    def level(self) -> str:
        return "batch" if self.steps else "sample"

    def affected(self, traj: Trajectory, stop: int | None = None) -> dict[int, list[int]]:
        """step -> forget sample ids in it; a removed step (batch level) maps to its whole batch.
        Both kinds can be present (a replay that composes earlier batch- and sample-level requests)."""
        stop = traj.n_steps if stop is None else stop
        bad = sorted(t for t in self.steps if not 0 <= t < stop)
        if bad:
            raise DataError(f"step {bad[0]} is not a recorded step (0..{stop - 1})")
        out = {t: ids for t, ids in traj.occurrences(self.sample_ids).items() if t < stop} if self.sample_ids else {}
        out.update({t: [int(i) for i in traj.batch(t).sample_ids] for t in self.steps})
        return {t: ids for t, ids in sorted(out.items()) if t >= self.from_step}

    def union(self, other: ForgetSet) -> ForgetSet:
        return ForgetSet(self.sample_ids | other.sample_ids, self.steps | other.steps,
                         max(self.from_step, other.from_step))


@dataclass
class SweepResult:
    delta: Tensor  # (P,) correction: θ̂ = θ[τ] + delta
    method: str
    steps_touched: list[int]
    window: tuple[int, int]  # first step propagated, one past the last
    products: int = 0
    gradients: float = 0  # full-batch gradient evaluations (subsampled ones count fractionally)
    v_norms: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damping: float = 0.0
    divergence: str = "ok"
    clipped_steps: int = 0
    # the steps over which clipped_steps reads the run's stability (the operator is the GGN along v and
    # the stabiliser was on); None where the clips say nothing about the run (quality.stability_reading)
    stability_steps: int | None = None
    # the optimizer state that belongs to θ̂: buffer name -> (P,) change of the recorded final state
    # (missing names: unchanged). `record --continue` trains on from θ̂ with it.
    state_delta: dict[str, Tensor] = field(default_factory=dict)
    # step t -> (θ̂[t] − θ[t], Δ optimizer state) before step t, at the steps a quality spot check asked
    # the sweep to keep (lmclean/unlearn/quality.py)
    kept: dict[int, tuple[Tensor, dict[str, Tensor]]] = field(default_factory=dict)


def flat_grad(obj: Objective, manifest: ParamManifest, theta: Tensor) -> Tensor:
    """∇L(θ) (P,) for an objective at a flat parameter vector.

    Plain reverse-mode autograd: on eager Transformers models it is ~15x faster than torch.func.grad.
    Under torchrun each rank takes its share of the samples and the shares are summed (unlearn/sharded.py).
    """
    from lmclean.unlearn.sharded import summed

    def grad_of(part: Objective) -> Tensor:
        leaf = theta.detach().clone().requires_grad_(True)  # (P,)
        (g,) = torch.autograd.grad(part.loss_from_outputs(part.outputs(manifest.views(leaf))), leaf)
        return g

    return summed(obj, grad_of, lambda: torch.zeros_like(theta))


def update_of_step(traj: Trajectory, t: int, theta: Tensor, state: dict[str, Tensor], lr: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The recorded update u[t] = θ[t+1] − θ[t] and the change of each optimizer state buffer."""
    nxt, nst = theta.clone(), {k: v.clone() for k, v in state.items()}
    traj.rule.step(nxt, traj.stored_grad(t), lr, nst, t)
    return nxt - theta, {k: nst[k] - state[k] for k in state}
