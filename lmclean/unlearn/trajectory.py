"""A recorded trajectory as the unlearning engine sees it: per step, θ[t], the batch, and objectives.

The engine is written against the small `Trajectory` protocol, so the same code runs on a Zarr store
(causal LMs) and on an in-memory run (the linear-quadratic exactness tests).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from lmclean.errors import UnsupportedError
from lmclean.objective import CausalLMObjective, MicroBatchedObjective, Objective, SquaredErrorObjective
from lmclean.params import ParamManifest
from lmclean.optim import UpdateRule, clip_factor, clip_gradient


@dataclass
class BatchInfo:
    step: int
    lr: float
    sample_ids: np.ndarray  # (b,) ids of the samples whose terms are in the recorded loss
    weights: np.ndarray  # (b,) their fixed loss weights
    clip: float = 1.0  # the recorded run scaled this step's gradient by `clip` (gradient clipping)
    grad_norm: float = float("nan")  # ‖g[t]‖ before clipping


class Trajectory(Protocol):
    manifest: ParamManifest
    rule: UpdateRule
    n_steps: int
    max_grad_norm: float | None  # the run clipped gradients to this norm (None: never)

    def batch(self, t: int) -> BatchInfo: ...

    def objective(self, t: int, sample_ids: Sequence[int], micro: bool = False) -> Objective:
        """The step-t loss restricted to `sample_ids` (recorded weights kept: fixed denominator);
        `micro`: computed micro-batch by micro-batch as the run did (for gradients)."""
        ...

    def states(self, start: int, stop: int) -> Iterator[tuple[int, Tensor, dict[str, Tensor]]]:
        """(t, θ[t], optimizer state before t) for start <= t <= stop; buffers may be reused."""
        ...

    def stored_grad(self, t: int) -> Tensor:
        """The recorded mean batch gradient g[t] = ∇L_t(θ[t]) (P,)."""
        ...

    def occurrences(self, sample_ids: set[int]) -> dict[int, list[int]]:
        """step -> forget sample ids in that step's batch."""
        ...

    def stored_grad_is_exact(self, t: int) -> bool:
        """False when g[t] holds terms of samples that are now absent (tombstoned)."""
        ...


class StoreTrajectory:
    """A causal-LM trajectory read from a store; tombstoned samples are treated as absent."""

    def __init__(self, store: "TrajectoryStore", model: torch.nn.Module, tombstoned: set[int] | None = None,  # noqa: F821
                 device: torch.device | str = "cpu") -> None:
        self.store = store
        self.model = model
        self.device = torch.device(device)  # θ[t], g[t] and the objectives' tensors live here (model too)
        self.autocast = store.meta.get("autocast")  # the recorded precision: gradients recompute under it
        self.manifest = store.manifest
        self.rule = store.rule
        self.n_steps = store.committed_steps
        self.max_grad_norm = store.max_grad_norm
        self.tombstoned = set(tombstoned or ())
        self._cache: dict[int, object] = {}
        self._lrs = store.scalars("lr")
        self._grad_cache: tuple[int, Tensor | None] = (-1, None)
        self.recompute = store.recompute  # no gradient rows: g[t] is recomputed at θ[t] (step_grad)
        self._at: tuple[int, Tensor | None] = (-1, None)
        self.recompute_drift: tuple[int, float] | None = None  # (checkpoint step, relative drift): _measure_drift

    def _record(self, t: int):  # noqa: ANN202 - StepRecord
        rec = self._cache.get(t)
        if rec is None:
            rec = self.store.step(t)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[t] = rec
        return rec

    def batch(self, t: int) -> BatchInfo:
        rec = self._record(t)
        keep = np.array([int(i) not in self.tombstoned for i in rec.sample_ids], dtype=bool)
        return BatchInfo(t, float(self._lrs[t]), rec.sample_ids[keep], rec.weights[keep], rec.clip, rec.grad_norm)

    def objective(self, t: int, sample_ids: Sequence[int], micro: bool = False) -> Objective:
        """`micro=True` (gradients that must match the run: replay, injections): rows grouped into
        the recorded micro-batches, each padded to its recorded width, one forward each, as the
        training run computed them. Otherwise one batch (curvature)."""
        rec = self._record(t)
        wanted = {int(i) for i in sample_ids} - self.tombstoned
        pos = [k for k, i in enumerate(rec.sample_ids) if int(i) in wanted]
        if micro and rec.micro is not None and pos:
            groups: dict[int, list[int]] = {}
            for k in pos:
                groups.setdefault(int(rec.micro[k]), []).append(k)
            return MicroBatchedObjective([self._rows(rec, rows, int(rec.width[rows[0]])) for _, rows in sorted(groups.items())])
        return self._rows(rec, pos, None)

    def _rows(self, rec: "StepRecord", pos: list[int], width: int | None) -> CausalLMObjective:  # noqa: F821
        """The loss of rows `pos` of a step, padded to `width` (default: the longest row)."""
        lengths = torch.from_numpy(rec.lengths[pos].astype(np.int64))
        longest = int(lengths.max()) if len(pos) else 1
        width = max(width or longest, longest)
        ids = torch.zeros((len(pos), width), dtype=torch.int64)
        cut = min(width, rec.tokens.shape[1])
        ids[:, :cut] = torch.from_numpy(rec.tokens[pos, :cut].astype(np.int64))
        mask = None
        if rec.loss_mask is not None:
            mask = torch.zeros((len(pos), width), dtype=torch.bool)
            mask[:, :cut] = torch.from_numpy(rec.loss_mask[pos, :cut])
            mask = mask.to(self.device)
        w = torch.from_numpy(rec.weights[pos]).to(self.device, torch.float32 if self.device.type == "mps" else None)
        return CausalLMObjective(self.model, ids.to(self.device), lengths.to(self.device), w, mask, self.autocast)

    def states(self, start: int, stop: int) -> Iterator[tuple[int, Tensor, dict[str, Tensor]]]:
        cks = set(self.store.checkpoint_steps) if self.recompute else set()  # where recomputation is checked
        origin = self.store.nearest_checkpoint(start) if cks else 0
        for t, theta, state in self.store.iter_states(start, stop, grad=self.step_grad,
                                                      device=None if self.device.type == "cpu" else self.device):
            if t in cks and t > origin:
                self._measure_drift(t, theta)
            self._at = (t, theta)  # a recompute store's stored_grad(t) is computed at this θ[t]
            yield t, theta, state
        self._at = (-1, None)

    def _measure_drift(self, c: int, theta: Tensor) -> None:
        """θ[c] rebuilt by recomputation against the checkpoint of step c, relative to how far θ moved
        since the checkpoint before: 0 on the CPU; on an accelerator what its kernels' nondeterminism
        made of the replayed steps (kept as `recompute_drift` (step, value), the largest seen)."""
        if self.store.jumps_at(c):  # θ[c] is post-jump, the checkpoint pre-jump: not comparable
            return
        prev = max(s for s in self.store.checkpoint_steps if s < c)
        ref, before = self.store.checkpoint(c)[0], self.store.checkpoint(prev)[0]
        scale = float(torch.linalg.vector_norm(ref - before)) or 1.0
        rel = float(torch.linalg.vector_norm(theta.detach().float().cpu() - ref)) / scale
        if self.recompute_drift is None or rel > self.recompute_drift[1]:
            self.recompute_drift = (c, rel)

    def step_grad(self, t: int, theta: Tensor) -> Tensor:
        """The gradient step t applied, g[t] (P,) on the device, given θ[t]: the stored row, or for a
        `gradients: recompute` store ∇L_t(θ[t]) recomputed from the recorded batch as the run computed
        it (its micro-batches, weights, loss mask) times the recorded clip factor. The one place that
        owns "g[t]": θ replay (iter_states) and every method's stored_grad go through it, once per step."""
        if self._grad_cache[0] != t:
            if not self.recompute:
                g = self.store.grad(t).to(self.device, non_blocking=True)
            else:
                g = self._pinned(t)
                g = self._recomputed(t, theta) if g is None else g
            self._grad_cache = (t, g)
        return self._grad_cache[1]

    def stored_grad(self, t: int) -> Tensor:
        """g[t] on the device, made once per step: the sweep (fisher, batch-level updates, control
        variates) and the θ replay that follows both ask for it. A recompute store computes it at the
        θ[t] `states` yielded last (else rebuilds θ[t] first: a sweep never needs to)."""
        if self._grad_cache[0] == t or not self.recompute:
            return self.step_grad(t, None)  # type: ignore[arg-type]
        if self._at[0] != t:
            for _ in self.states(t, t):  # θ[t] on the device, rebuilt from its checkpoint (sets self._at)
                break
        return self.step_grad(t, self._at[1])

    def _pinned(self, t: int) -> Tensor | None:
        if not self.store.recompute:  # (--exact-states on a store with rows: nothing is ever pinned)
            return None
        from lmclean.store.pinned import read_pinned

        g = read_pinned(self.store, t)  # a step whose tokens a scrub removed (lmclean/store/pinned.py)
        return None if g is None else g.to(self.device)

    def pin(self, sample_ids: set[int]) -> int:
        """Before scrubbing `sample_ids` from a recompute store: pin g[t] of every step that holds
        one (recomputed at θ[t] while the tokens exist), so θ stays rebuildable. Returns the rows written."""
        from lmclean.store.pinned import pinned_steps, write_pinned

        if not self.store.recompute:
            return 0
        todo = sorted(set(self.occurrences(set(sample_ids))) - pinned_steps(self.store.path))
        for t, theta, _ in (self.states(todo[0], todo[-1]) if todo else ()):
            if t in todo:
                write_pinned(self.store.path, t, self.step_grad(t, theta).detach().float().cpu().numpy())
        return len(todo)

    def _recomputed(self, t: int, theta: Tensor) -> Tensor:
        rec = self._record(t)
        dead = sorted(int(i) for i in rec.sample_ids if int(i) in self.tombstoned)
        if dead:
            raise UnsupportedError(
                f"store {self.store.path} recomputes gradients (gradients: recompute) but step {t}'s batch held sample "
                f"{dead[0]}, whose tokens were scrubbed without pinning g[{t}] first (lmclean/store/pinned.py): it "
                "cannot be recomputed; restore the store from a backup or re-record it")
        if not len(rec.sample_ids):
            return torch.zeros_like(theta)
        leaf = theta.detach().clone().requires_grad_(True)  # (P,) as lmclean.unlearn.common.flat_grad
        obj = self.objective(t, [int(i) for i in rec.sample_ids], micro=True)
        (g,) = torch.autograd.grad(obj.loss_from_outputs(obj.outputs(self.manifest.views(leaf))), leaf)
        return g if rec.clip == 1.0 else g * rec.clip  # the applied gradient: clip · ∇

    def stored_grad_is_exact(self, t: int) -> bool:
        return not any(int(i) in self.tombstoned for i in self._record(t).sample_ids)

    def occurrences(self, sample_ids: set[int]) -> dict[int, list[int]]:
        return self.store.occurrences(sample_ids)


def pin_before_scrub(store: "TrajectoryStore", sample_ids: set[int] | list[int], device: str = "cpu") -> int:  # noqa: F821
    """`StoreTrajectory.pin` for a store (nothing to do, and no model built, unless it recomputes
    gradients): call before scrub_samples."""
    if not store.recompute:
        return 0
    from lmclean.unlearn.service import open_trajectory

    return open_trajectory(store, device).pin(set(int(i) for i in sample_ids))


def recompute_grad(store: "TrajectoryStore", device: torch.device | str = "cpu") -> "StepGrad | None":  # noqa: F821
    """The `grad` that rebuilds θ of a `gradients: recompute` store (for iter_states / theta_at):
    its model built from the store, gradients recomputed as StoreTrajectory.step_grad does; None
    for a store with gradient rows (the stored rows are the default). θ must be on `device`. The
    model is built at the first call: rebuilding θ at a checkpoint step costs nothing."""
    if not store.recompute:
        return None
    opened: list[StoreTrajectory] = []

    def grad(t: int, theta: Tensor) -> Tensor:
        if not opened:
            from lmclean.unlearn.service import open_trajectory

            opened.append(open_trajectory(store, str(device)))
        return opened[0].step_grad(t, theta)

    return grad


class InMemoryTrajectory:
    """Weighted squared-error training of any module, kept in memory (float64 for exactness tests).

    `run(exclude)` is also the exact retraining reference: the same batches and weights, with the
    excluded samples' terms dropped, and optionally whole steps skipped.
    """

    def __init__(self, model: torch.nn.Module, X: Tensor, Y: Tensor, batches: list[list[int]],
                 lrs: list[float], rule: UpdateRule, theta0: Tensor, max_grad_norm: float | None = None) -> None:
        self.model, self.X, self.Y = model, X, Y
        self.manifest = ParamManifest.from_model(model)
        self.rule, self.lrs, self.theta0 = rule, lrs, theta0
        self.max_grad_norm = max_grad_norm  # clip every step's gradient as torch's clip_grad_norm_
        self.batches = batches
        self.n_steps = len(batches)
        self.norms: list[float] = []  # ‖g[t]‖ before clipping, of the recorded run
        self.thetas, self.opt_states = self.run(norms=self.norms)

    def run(self, exclude: set[int] | None = None, skip_steps: set[int] | None = None,
            norms: list[float] | None = None) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        exclude, skip_steps = exclude or set(), skip_steps or set()
        theta = self.theta0.clone()
        state = self.rule.init_state(theta)
        thetas, states = [theta.clone()], [{k: v.clone() for k, v in state.items()}]
        for t in range(self.n_steps):
            if t not in skip_steps:
                kept = [i for i in self.batches[t] if i not in exclude]
                grad = self._grad(t, kept, theta)
                if norms is not None:
                    norms.append(float(torch.linalg.vector_norm(grad)))
                grad = clip_gradient(grad, self.max_grad_norm)
                # Skipped steps leave θ and the optimizer state untouched ("the step never happened").
                self.rule.step(theta, grad, self.lrs[t], state, t)
            thetas.append(theta.clone())
            states.append({k: v.clone() for k, v in state.items()})
        return thetas, states

    def _grad(self, t: int, ids: Sequence[int], theta: Tensor) -> Tensor:
        obj = self.objective(t, ids)
        params = self.manifest.views(theta.detach())
        g = torch.func.grad(lambda p: obj.loss_from_outputs(obj.outputs(p)))(params)
        return self.manifest.flatten(g)

    def batch(self, t: int) -> BatchInfo:
        ids = np.asarray(self.batches[t], dtype=np.int64)
        norm = self.norms[t]
        return BatchInfo(t, self.lrs[t], ids, np.full(len(ids), 1.0 / len(ids)), clip_factor(norm, self.max_grad_norm), norm)

    def objective(self, t: int, sample_ids: Sequence[int], micro: bool = False) -> Objective:
        ids = list(sample_ids)
        w = torch.full((len(ids),), 1.0 / len(self.batches[t]), dtype=self.X.dtype)
        return SquaredErrorObjective(self.model, self.X[ids], self.Y[ids], w)

    def states(self, start: int, stop: int) -> Iterator[tuple[int, Tensor, dict[str, Tensor]]]:
        for t in range(start, stop + 1):
            yield t, self.thetas[t], self.opt_states[t]

    def stored_grad(self, t: int) -> Tensor:
        return clip_gradient(self._grad(t, self.batches[t], self.thetas[t]), self.max_grad_norm)

    def stored_grad_is_exact(self, t: int) -> bool:
        return True

    def occurrences(self, sample_ids: set[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for t, batch in enumerate(self.batches):
            hit = [i for i in batch if i in sample_ids]
            if hit:
                out[t] = hit
        return out
