"""Exact Hessian-vector products H v of the batch loss, by reverse-over-reverse (double backward).

The exact Hessian keeps negative curvature, which is what the linearised recursion of the algorithm
literally asks for; it is also the one product whose (I − ηH) can grow, so the engine guards it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmclean.curvature._tree import check_like
from lmclean.objective import Objective, Params, loss_of

__all__ = ["hvp", "make_hvp"]


def make_hvp(obj: Objective, params: Params) -> Callable[[Params], Params]:
    """A closure v ↦ ∇²L(params) v, for the many products taken at one recorded θ[t].

    Reverse-over-reverse (double backward) with the gradient graph built once and reused for every
    vector: on eager Transformers models this is >10x faster than torch.func's jvp-of-grad.
    """
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(loss_of(obj, leaves), list(leaves.values()), create_graph=True, allow_unused=True)
    pairs = [(leaves[k], g) for k, g in zip(leaves, grads) if g is not None]

    def hvp_at(vec: Params) -> Params:
        check_like(params, vec)
        keys = [k for k, g in zip(leaves, grads) if g is not None]
        hv = torch.autograd.grad([g for _, g in pairs], [leaf for leaf, _ in pairs],
                                 [vec[k] for k in keys], retain_graph=True, allow_unused=True)
        out = {k: torch.zeros_like(p) for k, p in params.items()}
        for k, h in zip(keys, hv):
            if h is not None:
                out[k] = h.detach()
        return out

    return hvp_at


def hvp(obj: Objective, params: Params, vec: Params) -> Params:
    """∇²L(params) v with the keys, shapes and dtype of ``params``."""
    return make_hvp(obj, params)(vec)
