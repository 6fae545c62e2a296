"""Curvature-vector products over parameter dicts: pure functions, no I/O.

Per-step products (exact, ggn, fisher) take an ``Objective`` (the recorded batch loss split at the network outputs), the
parameters θ[t] at which to evaluate the curvature, and a vector with the parameters' keys and shapes.
``PRODUCTS`` maps their names to those functions. Estimated-once curvatures (Hutchinson diagonal,
Lanczos low rank, K-FAC/EK-FAC) return objects that are then reused for many products.
"""

from __future__ import annotations

from collections.abc import Callable

from lmclean.curvature._tree import as_flat_matvec, flatten, unflatten
from lmclean.curvature.diag import diag_vp, ggn_diagonal_hutchinson, hessian_diagonal_hutchinson
from lmclean.curvature.exact import hvp, make_hvp
from lmclean.curvature.fisher import fisher_vp, fisher_vp_at
from lmclean.curvature.ggn import GGNAt, ggn_vp, ggn_vp_batched
from lmclean.curvature.kfac import KroneckerCurvature, kronecker_curvature
from lmclean.curvature.krylov import KrylovCurvature, krylov_curvature
from lmclean.curvature.lowrank import LowRankCurvature, top_eigenpairs
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params

__all__ = [
    "GGNAt",
    "PRODUCTS",
    "CurvatureProduct",
    "KroneckerCurvature",
    "KrylovCurvature",
    "LowRankCurvature",
    "as_flat_matvec",
    "diag_vp",
    "fisher_vp",
    "fisher_vp_at",
    "flatten",
    "get_product",
    "ggn_diagonal_hutchinson",
    "ggn_vp",
    "ggn_vp_batched",
    "hessian_diagonal_hutchinson",
    "hvp",
    "kronecker_curvature",
    "krylov_curvature",
    "make_hvp",
    "top_eigenpairs",
    "unflatten",
]

CurvatureProduct = Callable[[Objective, Params, Params], Params]
"""(obj, params, vec) -> curvature(params) · vec, with vec's keys and shapes."""

PRODUCTS: dict[str, CurvatureProduct] = {
    "exact": hvp,
    "ggn": ggn_vp,
    "fisher": fisher_vp_at,
}


def get_product(name: str) -> CurvatureProduct:
    """The product registered under ``name``; ConfigError naming the choices otherwise."""
    try:
        return PRODUCTS[name]
    except KeyError:
        raise ConfigError(f"unknown curvature {name!r}: choose one of {sorted(PRODUCTS)}") from None
