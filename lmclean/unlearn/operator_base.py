"""The curvature operators' common part: their settings, the interface the engine asks, and the
anchored (reused) kind. The operators themselves: lmclean/unlearn/operators.py (per-step, diag,
lowrank and the registry) and lmclean/unlearn/basis_operators.py (kfac, ekfac, ekfac-rq, krylov).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params
from lmclean.params import ParamManifest

MatVec = Callable[[Tensor], Tensor]
LazyObjective = Callable[[], Objective]


@dataclass
class OperatorSettings:
    hvp: str = "ggn"
    rank: int = 8  # lowrank: eigenpairs kept
    lanczos_iter: int = 12  # lowrank: products per anchor (at least rank + 2)
    refresh: int | None = None  # anchored operators: steps an anchor estimate is reused for (None: the operator's default)
    diag_probes: int = 8  # diag: Hutchinson probes per anchor
    mc_samples: int = 1  # kfac/ekfac: sampled labels (backward passes) per anchor
    krylov_dim: int = 4  # krylov: the Krylov space's dimension per anchor (that many − 1 GGN products, one quadratic form)
    anchor_fraction: float = 0.5  # anchored operators: share of the anchor step's batch the estimate uses
    curvature_fraction: float = 1.0  # ggn/exact: share of each step's batch its product is taken on
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, what in (("--anchor-fraction", self.anchor_fraction, "anchored curvatures estimate on"),
                                  ("--curvature-fraction", self.curvature_fraction, "ggn/exact take each product on")):
            if not 0 < value <= 1:
                raise ConfigError(f"{flag} {value} must be in (0, 1]: the share of the step's batch that {what}")
        if self.krylov_dim < 1:
            raise ConfigError(f"--krylov-dim {self.krylov_dim} must be >= 1: the Krylov space's dimension per anchor")
        if self.refresh is not None and self.refresh < 1:
            raise ConfigError(f"--refresh {self.refresh} must be >= 1: the steps an anchor's curvature is reused for")

    @property
    def refresh_steps(self) -> int:
        """--refresh, else the curvature's own default (krylov's basis suits shorter windows)."""
        if self.refresh is not None:
            return self.refresh
        from lmclean.unlearn.operators import OPERATORS

        cls = OPERATORS.get(self.hvp)
        return cls.default_refresh if cls is not None else CurvatureOperator.default_refresh

    @property
    def lanczos_products(self) -> int:
        """Curvature products per lowrank anchor: Lanczos needs at least rank + 2 to resolve rank pairs."""
        return max(self.lanczos_iter, self.rank + 2)


class CurvatureOperator:
    """v ↦ H_t v for each step; counts the curvature products it computed."""

    name: ClassVar[str]
    psd: ClassVar[bool] = True
    per_step: ClassVar[bool] = True
    closed_form: ClassVar[bool] = False
    uses: ClassVar[frozenset[str]] = frozenset()  # OperatorSettings fields (CLI options) it reads
    default_refresh: ClassVar[int] = 100  # reused curvatures: steps per anchor when --refresh is not given
    # its curvature along the propagated vector is the GGN's own (an exact product, or Rayleigh–Ritz on
    # v's Krylov space), so the stabiliser's clips read the run's η·λ, not the operator's error (quality.py)
    gauss_newton_along_v: ClassVar[bool] = False

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        self.s = settings
        self.manifest = manifest
        self.products = 0

    @property
    def reused_across_steps(self) -> bool:
        return not self.per_step

    def current(self, t: int) -> bool:
        """Whether step t reuses an estimate already made (never, for per-step operators)."""
        return False

    def block_start(self, t: int) -> int:
        """First step of the block of steps that shares t's estimate (t itself for per-step operators)."""
        return t

    def window(self, v: Tensor, m: Tensor | None, lrs: list[float], momentum: float, shift: float,
               max_step: float | None) -> tuple[Tensor, Tensor | None, int]:
        """Apply len(lrs) linearised steps at once (closed_form operators only)."""
        raise NotImplementedError(f"{self.name} has no closed form")

    def at(self, t: int, theta: Tensor, objective: LazyObjective, stored_grad: Callable[[], Tensor]) -> MatVec:
        """The operator at step t. `theta` (P,) may be a reused buffer: use the result within the step."""
        raise NotImplementedError

    def products_for(self, span: int) -> int:
        """Curvature products a sweep over `span` steps costs (the planner's estimate)."""
        raise NotImplementedError

    def _subsample(self, t: int, objective: Objective, f: float) -> Objective:
        """A random share f of step t's batch, weights rescaled to the batch total, so the curvature
        estimate stays unbiased (for equal weights, as the built-in trainer's) at about f of the cost."""
        weights = getattr(objective, "weights", None)
        if f == 1 or weights is None or not hasattr(objective, "subset"):
            return objective
        B = len(weights)
        keep = max(1, round(f * B))
        if keep >= B:
            return objective
        gen = torch.Generator().manual_seed(self.s.seed * 100003 + t + 1)
        rows = torch.randperm(B, generator=gen)[:keep].sort().values  # (keep,)
        return objective.subset(rows)

    def _flat(self, product: Callable[[Params], Params]) -> MatVec:
        return lambda v: self.manifest.flatten(product(self.manifest.views(v)))


class _Anchored(CurvatureOperator):
    """Curvature estimated at an anchor step's θ[t] on (anchor_fraction of) its batch, reused for the
    rest of its block of `refresh` steps. Blocks lie on a fixed grid (steps k·refresh ...), so two
    sweeps that visit a block's first step anchor at the same θ: with the full batch's curvature the
    correction stays exactly linear in the forget set (superposition)."""

    per_step = False
    uses = frozenset({"refresh", "anchor_fraction"})

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        super().__init__(settings, manifest)
        self._anchor_step: int | None = None
        self._matvec: MatVec | None = None
        self._held: tuple[Params, Objective] | None = None  # an anchor awaiting the propagated vector

    def _hold(self, params: Params, objective: Objective) -> None:
        """Keep the anchor (θ copied: the engine reuses its buffer) for an estimate that needs v."""
        self._held = ({k: p.detach().clone() for k, p in params.items()}, objective)

    def _release(self, v: Tensor) -> tuple[Params, Objective] | None:
        """The held anchor, once, at the first non-zero v (v = 0 carries no direction); else None."""
        if self._held is None or not bool(torch.any(v != 0)):
            return None
        held, self._held = self._held, None
        return held

    def current(self, t: int) -> bool:
        """Whether step t reuses the present anchor (same block, at or after it)."""
        a = self._anchor_step
        return a is not None and a <= t and self.block_start(a) == self.block_start(t)

    def block_start(self, t: int) -> int:
        return t - t % self.s.refresh_steps

    def at(self, t: int, theta: Tensor, objective: LazyObjective, stored_grad: Callable[[], Tensor]) -> MatVec:
        if not self.current(t) or self._matvec is None:
            self._anchor_step = t
            params = self.manifest.views(theta)
            self._matvec = self._estimate(t, params, self._subsample(t, objective(), self.s.anchor_fraction))
            self.products += self.per_anchor()
        return self._matvec

    def products_for(self, span: int) -> int:
        return math.ceil(span / self.s.refresh_steps) * self.per_anchor()

    def per_anchor(self) -> int:
        raise NotImplementedError

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        raise NotImplementedError
