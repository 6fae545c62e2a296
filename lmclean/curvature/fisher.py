"""Rank-1 "Fisher" products g (gᵀ v) with the batch gradient g.

This is the curvature of the LMCleaner paper's Algorithm 1, kept only as a baseline: a rank-1 matrix
ignores every direction but g, and its authors needed norm clipping to keep it stable.
"""

from __future__ import annotations

import torch

from lmclean.curvature._tree import check_like, tree_dot, tree_scale
from lmclean.objective import Objective, Params, loss_of

__all__ = ["fisher_vp", "fisher_vp_at"]


def fisher_vp(grad: Params, vec: Params) -> Params:
    """g (gᵀ v) for a precomputed (e.g. recorded) batch gradient g."""
    return tree_scale(grad, tree_dot(grad, vec))


def fisher_vp_at(obj: Objective, params: Params, vec: Params) -> Params:
    """g (gᵀ v) with g = ∇L(params) computed here: the registry's (obj, params, vec) form."""
    check_like(params, vec)
    grad = torch.func.grad(lambda p: loss_of(obj, p))(params)
    return fisher_vp(grad, vec)

