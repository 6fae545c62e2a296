"""Exact Hessian-vector products H v of the batch loss, by forward-over-reverse differentiation.

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
    """A closure v ↦ ∇²L(params) v, for the many products taken at one recorded θ[t]."""
    grad_fn = torch.func.grad(lambda p: loss_of(obj, p))

    def hvp_at(vec: Params) -> Params:
        check_like(params, vec)
        # jvp of the gradient: one forward-mode pass through one reverse pass, never forms H.
        _, hv = torch.func.jvp(grad_fn, (params,), (vec,))
        return hv

    return hvp_at


def hvp(obj: Objective, params: Params, vec: Params) -> Params:
    """∇²L(params) v with the keys, shapes and dtype of ``params``."""
    return make_hvp(obj, params)(vec)
