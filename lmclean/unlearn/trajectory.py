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
        return self.store.iter_states(start, stop, grad=self.stored_grad,
                                      device=None if self.device.type == "cpu" else self.device)

    def stored_grad(self, t: int) -> Tensor:
        """g[t] on the device, decoded once per step: the sweep (fisher, batch-level updates, control
        variates) and the θ replay that follows both ask for it."""
        if self._grad_cache[0] != t:
            self._grad_cache = (t, self.store.grad(t).to(self.device, non_blocking=True))
        return self._grad_cache[1]

    def stored_grad_is_exact(self, t: int) -> bool:
        return not any(int(i) in self.tombstoned for i in self._record(t).sample_ids)

    def occurrences(self, sample_ids: set[int]) -> dict[int, list[int]]:
        return self.store.occurrences(sample_ids)


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
