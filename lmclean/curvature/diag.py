"""Hutchinson estimates of a curvature diagonal, diag(A) ≈ mean_k z_k ⊙ (A z_k) with Rademacher z.

A diagonal is the cheapest curvature that still sees every parameter: estimated once per anchor step
and reused, each later product is an elementwise multiply. The estimate is unbiased with per-entry
variance Σ_{j≠i} A_ij² / n_probes, so it is rough; probes come from a seeded generator so that a
rerun gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmclean.curvature._tree import check_like, tree_zeros_like
from lmclean.curvature.exact import make_hvp
from lmclean.curvature.ggn import ggn_vp
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params

__all__ = ["diag_vp", "ggn_diagonal_hutchinson", "hessian_diagonal_hutchinson"]

Seed = torch.Generator | int


def rademacher_like(params: Params, generator: torch.Generator) -> Params:
    """Independent ±1 entries with params' shapes, dtypes and devices, drawn from ``generator``."""
    out: Params = {}
    for k, p in params.items():
        bits = torch.randint(0, 2, p.shape, generator=generator, device=generator.device)
        out[k] = (2 * bits - 1).to(device=p.device, dtype=p.dtype)
    return out


def hutchinson_diagonal(
    matvec: Callable[[Params], Params], params: Params, n_probes: int, generator: Seed
) -> Params:
    """mean over n_probes Rademacher z of z ⊙ (A z), for any symmetric product ``matvec``."""
    if n_probes < 1:
        raise ConfigError(f"n_probes must be >= 1, got {n_probes}")
    gen = _generator(generator)
    acc = tree_zeros_like(params)
    for _ in range(n_probes):
        z = rademacher_like(params, gen)
        az = matvec(z)
        for k in acc:
            acc[k] += z[k] * az[k]
    return {k: v / n_probes for k, v in acc.items()}


def ggn_diagonal_hutchinson(obj: Objective, params: Params, n_probes: int, generator: Seed) -> Params:
    """Hutchinson estimate of diag(G), the Gauss–Newton diagonal (non-negative in expectation)."""
    return hutchinson_diagonal(lambda z: ggn_vp(obj, params, z), params, n_probes, generator)


def hessian_diagonal_hutchinson(obj: Objective, params: Params, n_probes: int, generator: Seed) -> Params:
    """Hutchinson estimate of diag(H), the exact Hessian diagonal."""
    return hutchinson_diagonal(make_hvp(obj, params), params, n_probes, generator)


def diag_vp(diag: Params, vec: Params) -> Params:
    """diag(d) v: the product with a stored diagonal."""
    check_like(diag, vec)
    return {k: diag[k] * vec[k] for k in diag}


def _generator(seed: Seed) -> torch.Generator:
    """A CPU generator from a seed, or the caller's generator (whose state then advances)."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"generator must be a torch.Generator or an int seed, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)
