"""Curvature operators for the propagation: v ↦ H_t v at the recorded θ[t] and batch t.

One class per curvature kind, each declaring what it is (as curvlinops' operators do with class
flags), so the engine and the planner ask the operator instead of branching on its name:

- ``psd``: positive semi-definite, so the stabiliser may clip its steps (the exact Hessian is not);
- ``per_step``: a fresh product at every step; otherwise the curvature is estimated at an anchor
  step and reused for ``refresh`` steps (``reused_across_steps``);
- ``closed_form``: the reused curvature is diagonal in a known basis, so a window of steps without
  injections is applied at once (``window``) instead of one product per step;
- ``gauss_newton_along_v``: its curvature along the propagated vector is the GGN's own, so the
  stabiliser's clips measure the run (edge of stability), not the operator's error;
- ``products_for(span)``: curvature products (each about one GGN product) a span of steps costs.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from lmclean.curvature import LowRankCurvature, ggn_diagonal_hutchinson, ggn_vp, hvp, top_eigenpairs
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params
from lmclean.params import ParamManifest
from lmclean.unlearn.basis_operators import EKFACOperator, KFACOperator, KrylovOperator, RescaledEKFACOperator
from lmclean.unlearn.operator_base import CurvatureOperator, LazyObjective, MatVec, OperatorSettings, _Anchored
from lmclean.unlearn.sharded import summed

__all__ = ["HVP_CHOICES", "OPERATORS", "CurvatureOperator", "OperatorSettings", "make_operator", "operator_class"]


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
    gauss_newton_along_v = True
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


OPERATORS: dict[str, type[CurvatureOperator]] = {
    cls.name: cls for cls in (GGNOperator, ExactOperator, DiagOperator, LowRankOperator, FisherOperator,
                              KFACOperator, EKFACOperator, RescaledEKFACOperator, KrylovOperator)}
HVP_CHOICES = tuple(OPERATORS)


def operator_class(name: str) -> type[CurvatureOperator]:
    """The operator registered as `name`; ConfigError naming the choices otherwise."""
    try:
        return OPERATORS[name]
    except KeyError:
        raise ConfigError(f"--hvp {name!r} is not known; use one of {list(HVP_CHOICES)}") from None


def make_operator(settings: OperatorSettings, manifest: ParamManifest) -> CurvatureOperator:
    return operator_class(settings.hvp)(settings, manifest)
