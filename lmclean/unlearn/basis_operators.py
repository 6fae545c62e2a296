"""Reused curvatures diagonal in a known basis, so a window of steps runs in closed form: K-FAC and
EK-FAC (Kronecker eigenbasis), EK-FAC rescaled along the propagated vector, and the GGN on the Krylov
space of the propagated vector (Ritz basis). Registered in lmclean/unlearn/operators.py.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lmclean.curvature import GGNAt, KroneckerCurvature, KrylovCurvature, ggn_vp, kronecker_curvature, krylov_curvature
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params
from lmclean.params import ParamManifest
from lmclean.unlearn.operator_base import MatVec, OperatorSettings, _Anchored
from lmclean.unlearn.sharded import summed, summed_forms


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

    def products_for(self, span: int) -> int:
        return math.ceil(span / self.s.refresh_steps) * (self.per_anchor() + 1)  # + the calibration product

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        super()._estimate(t, params, objective)
        self._hold(params, objective)

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
        held = self._release(v)
        if held is None:
            return
        params, obj = held
        vec = self.manifest.views(v)
        gv = summed(obj, lambda part: self.manifest.flatten(ggn_vp(part, params, vec)), lambda: torch.zeros_like(v))
        self.curvature = self._curvature().rescaled_along(vec, self.manifest.views(gv))
        self.products += 1


class KrylovOperator(_Anchored):
    """The anchor's exact GGN restricted to the Krylov space of the propagated vector
    (lmclean.curvature.krylov): a ``krylov_dim``-dimensional space from ``krylov_dim`` − 1 GGN products
    and one quadratic form per anchor, taken at the anchor's θ on its estimation batch when the
    estimate is first used with a non-zero vector; the window then runs in closed form. Like ekfac-rq
    the basis depends on that vector, so the correction is not linear in the forget set (sequential
    requests do not compose exactly)."""

    name = "krylov"
    closed_form = True
    gauss_newton_along_v = True
    uses = frozenset({"refresh", "anchor_fraction", "krylov_dim"})
    default_refresh = 16  # with krylov_dim 4: benchmarks/README.md, "Krylov"

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        super().__init__(settings, manifest)
        self.curvature: KrylovCurvature | None = None

    def per_anchor(self) -> int:
        return 0  # the products are taken (and counted) when the estimate is first used

    def products_for(self, span: int) -> int:
        """Per anchor k − 1 products and one quadratic form (a forward pass: a third of a product; under
        autocast, where GGNAt takes the dual product, the form is a whole one and this undercounts)."""
        anchors = math.ceil(span / self.s.refresh_steps)
        return -(-anchors * (3 * self.s.krylov_dim - 2) // 3)

    def _estimate(self, t: int, params: Params, objective: Objective) -> MatVec:
        self._hold(params, objective)
        self.curvature = None

        def matvec(v: Tensor) -> Tensor:
            if self.curvature is None and not bool(torch.any(v != 0)):
                return torch.zeros_like(v)  # G̃ 0 = 0 whatever the space: no estimate needed yet
            return self._calibrated(v).matvec(v)

        return matvec

    def window(self, v: Tensor, m: Tensor | None, lrs: list[float], momentum: float, shift: float,
               max_step: float | None) -> tuple[Tensor, Tensor | None, int]:
        nv, nm, capped = self._calibrated(v).propagate(v, m, lrs, momentum, shift, max_step)
        v.copy_(nv)
        if m is not None and nm is not None:
            m.copy_(nm)
        return v, m, capped

    def _calibrated(self, v: Tensor) -> KrylovCurvature:
        held = self._release(v)
        if held is not None:
            params, obj = held

            def local(part: Objective) -> tuple[MatVec, MatVec]:
                product = GGNAt(part, params)  # one forward graph for the anchor's k − 1 products
                views = self.manifest.views
                return (lambda x: self.manifest.flatten(product(views(x))), lambda x: product.quadratic(views(x)))

            ggn, form = summed_forms(obj, local)
            self.curvature, n = krylov_curvature(ggn, v, self.s.krylov_dim, quadratic=form)
            self.products += n
        if self.curvature is None:
            raise ConfigError("no Krylov anchor yet: take a product at the window's first step")
        return self.curvature
