"""Curvature operators for the propagation: v ↦ H_t v at the recorded θ[t] and batch t.

One class per curvature kind, each declaring what it is (as curvlinops' operators do with class
flags), so the engine and the planner ask the operator instead of branching on its name:

- ``psd``: positive semi-definite, so the stabiliser may clip its steps (the exact Hessian is not);
- ``per_step``: a fresh product at every step; otherwise the curvature is estimated at an anchor
  step and reused for ``refresh`` steps (``reused_across_steps``);
- ``closed_form``: the reused curvature is diagonal in a known basis, so a window of steps without
  injections is applied at once (``window``) instead of one product per step;
- ``products_for(span)``: curvature products (each about one GGN product) a span of steps costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lmclean.curvature import (
    KroneckerCurvature,
    LowRankCurvature,
    ggn_diagonal_hutchinson,
    ggn_vp,
    hvp,
    kronecker_curvature,
    top_eigenpairs,
)
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params
from lmclean.params import ParamManifest
from lmclean.unlearn.sharded import summed

MatVec = Callable[[Tensor], Tensor]
LazyObjective = Callable[[], Objective]


@dataclass
class OperatorSettings:
    hvp: str = "ggn"
    rank: int = 8  # lowrank: eigenpairs kept
    lanczos_iter: int = 12  # lowrank: products per anchor (at least rank + 2)
    refresh: int = 100  # anchored operators (diag/lowrank/kfac/ekfac): steps an anchor estimate is reused for
    diag_probes: int = 8  # diag: Hutchinson probes per anchor
    mc_samples: int = 1  # kfac/ekfac: sampled labels (backward passes) per anchor
    anchor_fraction: float = 0.5  # anchored operators: share of the anchor step's batch the estimate uses
    curvature_fraction: float = 1.0  # ggn/exact: share of each step's batch its product is taken on
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, what in (("--anchor-fraction", self.anchor_fraction, "anchored curvatures estimate on"),
                                  ("--curvature-fraction", self.curvature_fraction, "ggn/exact take each product on")):
            if not 0 < value <= 1:
                raise ConfigError(f"{flag} {value} must be in (0, 1]: the share of the step's batch that {what}")
        if self.refresh < 1:
            raise ConfigError(f"--refresh {self.refresh} must be >= 1: the steps an anchor's curvature is reused for")

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


class _PerStepProduct(CurvatureOperator):
    """One product per step on (a --curvature-fraction share of) the step's own batch."""

    product: ClassVar[Callable[[Objective, Params, Params], Params]]
    uses = frozenset({"curvature_fraction"})

    def at(self, t: int, theta: Tensor, objective: LazyObjective, stored_grad: Callable[[], Tensor]) -> MatVec:
        params = self.manifest.views(theta)
        obj = self._subsample(t, objective(), self.s.curvature_fraction)
        product = type(self).product

        def matvec(v: Tensor) -> Tensor:  # a sum over the batch's samples: split under torchrun (unlearn/sharded.py)
            self.products += 1
            return summed(obj, lambda part: self.manifest.flatten(product(part, params, self.manifest.views(v))),
                          lambda: torch.zeros_like(v))

        return matvec

    def products_for(self, span: int) -> int:
        return span


class GGNOperator(_PerStepProduct):
    """Gauss–Newton products (PSD): the default."""

    name = "ggn"
    product = staticmethod(ggn_vp)


class ExactOperator(_PerStepProduct):
    """Exact Hessian products: indefinite, so never stabilised."""

    name = "exact"
    psd = False
    product = staticmethod(hvp)


class FisherOperator(CurvatureOperator):
    """Rank-1 g gᵀ with the recorded batch gradient: free, PSD, a baseline only."""

    name = "fisher"

    def at(self, t: int, theta: Tensor, objective: LazyObjective, stored_grad: Callable[[], Tensor]) -> MatVec:
        g = stored_grad()  # (P,) the recorded ∇L_t(θ[t])
        return lambda v: g * torch.dot(g, v)

    def products_for(self, span: int) -> int:
        return 0


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

    def current(self, t: int) -> bool:
        """Whether step t reuses the present anchor (same block, at or after it)."""
        a = self._anchor_step
        return a is not None and a <= t and self.block_start(a) == self.block_start(t)

    def block_start(self, t: int) -> int:
        return t - t % self.s.refresh

    def at(self, t: int, theta: Tensor, objective: LazyObjective, stored_grad: Callable[[], Tensor]) -> MatVec:
        if not self.current(t) or self._matvec is None:
            self._anchor_step = t
            params = self.manifest.views(theta)
            self._matvec = self._estimate(t, params, self._subsample(t, objective(), self.s.anchor_fraction))
            self.products += self.per_anchor()
        return self._matvec

    def products_for(self, span: int) -> int:
        return math.ceil(span / self.s.refresh) * self.per_anchor()

    def per_anchor(self) -> int:
        raise NotImplementedError

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        raise NotImplementedError


class DiagOperator(_Anchored):
    """Hutchinson estimate of the GGN diagonal (clamped at 0, as the true diagonal is)."""

    name = "diag"

    def per_anchor(self) -> int:
        return self.s.diag_probes

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        gen = torch.Generator().manual_seed(self.s.seed * 100003 + t)
        d = self.manifest.flatten(ggn_diagonal_hutchinson(objective, params, self.s.diag_probes, gen)).clamp(min=0)
        return lambda v: d * v


class LowRankOperator(_Anchored):
    """Top-`rank` GGN eigenpairs by Lanczos."""

    name = "lowrank"
    uses = frozenset({"refresh", "anchor_fraction", "rank"})

    def per_anchor(self) -> int:
        return self.s.lanczos_products

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        ref = next(iter(params.values()))
        flat_ggn = self._flat(lambda v: ggn_vp(objective, params, v))
        P = self.manifest.size  # a rank near P: Lanczos cannot take more than P steps
        vals, vecs = top_eigenpairs(flat_ggn, P, min(self.s.rank, P), min(self.s.lanczos_products, P),
                                    seed=self.s.seed + t, dtype=ref.dtype, device=ref.device)  # (r,), (r, P)
        return LowRankCurvature(vals.clamp(min=0), vecs).matvec


class KFACOperator(_Anchored):
    """K-FAC of the GGN (lmclean.curvature.kfac): one forward and `mc_samples` backward passes per
    anchor; within an anchor's steps the propagation runs in its eigenbasis (closed form)."""

    name = "kfac"
    closed_form = True
    eigen_correction: ClassVar[bool] = False

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        super().__init__(settings, manifest)
        self.curvature: KroneckerCurvature | None = None

    def per_anchor(self) -> int:
        return self.s.mc_samples

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        gen = torch.Generator().manual_seed(self.s.seed * 100003 + t)
        self.curvature = kronecker_curvature(objective, params, eigen_correction=self.eigen_correction,
                                             mc_samples=self.s.mc_samples, generator=gen)
        return self._flat(self.curvature.matvec)

    def window(self, v: Tensor, m: Tensor | None, lrs: list[float], momentum: float, shift: float,
               max_step: float | None) -> tuple[Tensor, Tensor | None, int]:
        """len(lrs) steps of (I − η(G + shift)) (with momentum: the (v, m) recursion) at the present
        anchor's curvature, in place on the flat v (and m); returns the steps where the cap hit."""
        if self.curvature is None:
            raise ConfigError("no K-FAC anchor yet: take a product at the window's first step")
        views = self.manifest.views
        nv, nm, capped = self.curvature.propagate(views(v), views(m) if m is not None else None, lrs, momentum,
                                                  shift, max_step)
        v.copy_(self.manifest.flatten(nv))
        if m is not None and nm is not None:
            m.copy_(self.manifest.flatten(nm))
        return v, m, capped


class EKFACOperator(KFACOperator):
    """K-FAC's eigenbasis with eigenvalues corrected to the GGN's diagonal in that basis (EK-FAC)."""

    name = "ekfac"
    eigen_correction = True


class RescaledEKFACOperator(EKFACOperator):
    """EK-FAC with its eigenvalues rescaled at each anchor, part by part, to the GGN's quadratic form
    along the propagated vector (KroneckerCurvature.rescaled_along). Why: K-FAC's traces match the
    GGN's, but along a propagated correction the GGN's Rayleigh quotient is several times larger, so
    plain K-FAC under-contracts it (benchmarks/README.md, "EK-FAC rescaled along the propagated
    vector"). Costs ONE exact GGN product per anchor, taken at the anchor's θ (on the anchor's
    estimation batch) on the first use of the estimate with a non-zero vector. The scale depends on
    that vector, so unlike the other reused curvatures the correction is not linear in the forget set
    (sequential requests do not compose exactly, even with --curvature-batch full)."""

    name = "ekfac-rq"

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        super().__init__(settings, manifest)
        self._pending: tuple[Params, Objective] | None = None  # the anchor awaiting its calibration

    def products_for(self, span: int) -> int:
        return math.ceil(span / self.s.refresh) * (self.per_anchor() + 1)  # + the calibration product

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        super()._estimate(t, params, objective)
        self._pending = ({k: p.detach().clone() for k, p in params.items()}, objective)  # θ is a reused buffer

        def matvec(v: Tensor) -> Tensor:
            self._calibrate(v)
            return self._flat(self._curvature().matvec)(v)

        return matvec

    def window(self, v: Tensor, m: Tensor | None, lrs: list[float], momentum: float, shift: float,
               max_step: float | None) -> tuple[Tensor, Tensor | None, int]:
        self._calibrate(v)
        return super().window(v, m, lrs, momentum, shift, max_step)

    def _curvature(self) -> KroneckerCurvature:
        if self.curvature is None:
            raise ConfigError("no K-FAC anchor yet: take a product at the window's first step")
        return self.curvature

    def _calibrate(self, v: Tensor) -> None:
        """Rescale the present anchor's curvature along v, once per anchor (v = 0 carries no direction)."""
        if self._pending is None or not bool(torch.any(v != 0)):
            return
        params, obj = self._pending
        self._pending = None
        vec = self.manifest.views(v)
        gv = summed(obj, lambda part: self.manifest.flatten(ggn_vp(part, params, vec)), lambda: torch.zeros_like(v))
        self.curvature = self._curvature().rescaled_along(vec, self.manifest.views(gv))
        self.products += 1


OPERATORS: dict[str, type[CurvatureOperator]] = {
    cls.name: cls for cls in (GGNOperator, ExactOperator, DiagOperator, LowRankOperator, FisherOperator,
                              KFACOperator, EKFACOperator, RescaledEKFACOperator)}
HVP_CHOICES = tuple(OPERATORS)


def operator_class(name: str) -> type[CurvatureOperator]:
    """The operator registered as `name`; ConfigError naming the choices otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ConfigError(f"--hvp {name!r} is not known; use one of {list(HVP_CHOICES)}") from None


def make_operator(settings: OperatorSettings, manifest: ParamManifest) -> CurvatureOperator:
    return operator_class(settings.hvp)(settings, manifest)
