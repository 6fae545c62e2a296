"""Per-step curvature operators for the propagation: v ↦ H_t v at the recorded θ[t] and batch t.

`exact` and `ggn` take one product per step; `fisher` uses the stored batch gradient (free, rank 1,
baseline only); `diag` and `lowrank` estimate curvature at anchor steps and reuse it for `refresh`
steps, which is what makes them cheaper than a training step per propagated step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmclean.curvature import LowRankCurvature, get_product, ggn_diagonal_hutchinson, top_eigenpairs
from lmclean.errors import ConfigError
from lmclean.objective import Objective
from lmclean.train.flat import ParamManifest

HVP_CHOICES = ("ggn", "exact", "diag", "lowrank", "fisher")
MatVec = Callable[[Tensor], Tensor]


@dataclass
class OperatorSettings:
    hvp: str = "ggn"
    rank: int = 8  # lowrank: eigenpairs kept
    lanczos_iter: int = 12  # lowrank: products per anchor (at least rank + 2)
    refresh: int = 100  # diag/lowrank: steps an anchor estimate is reused for
    diag_probes: int = 8  # diag: Hutchinson probes per anchor
    anchor_fraction: float = 0.5  # diag/lowrank: share of the anchor step's batch the estimate uses
    curvature_fraction: float = 1.0  # ggn/exact: share of each step's batch its product is taken on
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, what in (("--anchor-fraction", self.anchor_fraction, "diag/lowrank estimate curvature on"),
                                  ("--curvature-fraction", self.curvature_fraction, "ggn/exact take each product on")):
            if not 0 < value <= 1:
                raise ConfigError(f"{flag} {value} must be in (0, 1]: the share of the step's batch that {what}")

    @property
    def lanczos_products(self) -> int:
        """Curvature products per lowrank anchor: Lanczos needs at least rank + 2 to resolve rank pairs."""
        return max(self.lanczos_iter, self.rank + 2)


class CurvatureOperator:
    """Builds v ↦ H_t v for each step; counts the curvature products it computed."""

    def __init__(self, settings: OperatorSettings, manifest: ParamManifest) -> None:
        if settings.hvp not in HVP_CHOICES:
            raise ConfigError(f"--hvp {settings.hvp!r} is not known; use one of {list(HVP_CHOICES)}")
        self.s = settings
        self.manifest = manifest
        self.products = 0
        self._anchor_step: int | None = None
        self._anchor: LowRankCurvature | Tensor | None = None

    def at(self, t: int, theta: Tensor, objective: Objective, stored_grad: Callable[[], Tensor]) -> MatVec:
        """The operator at step t. `theta` (P,) may be a reused buffer: use the result within the step."""
        name = self.s.hvp
        params = self.manifest.views(theta)
        if name in ("exact", "ggn"):
            product = get_product(name)
            objective = self._subsample(t, objective, self.s.curvature_fraction)

            def matvec(v: Tensor) -> Tensor:
                self.products += 1
                return self.manifest.flatten(product(objective, params, self.manifest.views(v)))

            return matvec
        if name == "fisher":
            g = stored_grad()  # (P,) the recorded ∇L_t(θ[t])

            def fisher(v: Tensor) -> Tensor:
                return g * torch.dot(g, v)

            return fisher
        if self._anchor is None or self._anchor_step is None or t - self._anchor_step >= self.s.refresh:
            self._refresh(t, params, objective)
        anchor = self._anchor
        if isinstance(anchor, LowRankCurvature):
            return anchor.matvec
        assert isinstance(anchor, Tensor)
        return lambda v: anchor * v

    def _refresh(self, t: int, params: dict[str, Tensor], objective: Objective) -> None:
        self._anchor_step = t
        objective = self._subsample(t, objective, self.s.anchor_fraction)
        if self.s.hvp == "diag":
            gen = torch.Generator().manual_seed(self.s.seed * 100003 + t)
            diag = ggn_diagonal_hutchinson(objective, params, self.s.diag_probes, gen)
            self.products += self.s.diag_probes
            # Hutchinson estimates can dip below zero; the GGN diagonal cannot.
            self._anchor = self.manifest.flatten(diag).clamp(min=0)
            return
        product = get_product("ggn")

        def flat_ggn(v: Tensor) -> Tensor:
            return self.manifest.flatten(product(objective, params, self.manifest.views(v)))

        ref = next(iter(params.values()))
        n_iter = self.s.lanczos_products
        vals, vecs = top_eigenpairs(flat_ggn, self.manifest.size, self.s.rank, n_iter, seed=self.s.seed + t,
                                    dtype=ref.dtype, device=ref.device)  # (r,), (r, P)
        self.products += n_iter
        self._anchor = LowRankCurvature(vals.clamp(min=0), vecs)

    def _subsample(self, t: int, objective: Objective, f: float) -> Objective:
        """A random share f of step t's batch, weights rescaled to the batch total, so the curvature
        estimate stays unbiased (for equal weights, as the built-in trainer's) at about f of the cost. Anchors (diag/lowrank) use half a batch by
        default: their estimate stands in for `refresh` other batches anyway. Per-step products
        (ggn/exact) use the whole batch unless --curvature-fraction says otherwise."""
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
