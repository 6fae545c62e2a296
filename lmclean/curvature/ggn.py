"""Generalised Gauss–Newton products G v = Jᵀ (∇²_out L) J v, with J = ∂outputs/∂θ.

G drops the second-derivative-of-the-network term of the Hessian, so for a convex loss on the outputs
(softmax cross-entropy, squared error) it is positive semi-definite and (I − ηG) cannot blow up for
η·λmax(G) < 2. It is computed from the objective's split at the outputs — jvp, output Hessian, vjp —
and never from the exact Hessian (a published "GGN" that was really the Hessian is what this avoids).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from lmclean.curvature._tree import check_like
from lmclean.errors import ConfigError
from lmclean.objective import Objective, Params

__all__ = ["ggn_vp", "ggn_vp_batched"]


def ggn_vp(obj: Objective, params: Params, vec: Params) -> Params:
    """G(params) v from ONE forward pass: dual tensors give J v while autograd records the graph
    for the vjp, then the output Hessian on J v and one backward (torch.func's jvp and vjp would each
    run their own forward)."""
    check_like(params, vec)
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    with fwAD.dual_level():
        out_dual = obj.outputs({k: fwAD.make_dual(leaves[k], vec[k]) for k in leaves})
        out, jv = fwAD.unpack_dual(out_dual)  # (N, C), (N, C)
        hjv = obj.output_hvp(out.detach(), jv.detach())  # (N, C)
    # The backward runs after the dual level closes: backward kernels need no forward-mode rules.
    grads = torch.autograd.grad(out, list(leaves.values()), hjv, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads)}


def ggn_vp_batched(obj: Objective, params: Params, vecs: Params) -> Params:
    """G(params) v_j for k vectors stacked on a leading dim: ``vecs[name]`` is (k, *param.shape).

    Vectorised with ``torch.func.vmap`` (no Python loop): one batched jvp, the output Hessian mapped
    over the k tangents, and the vjp closure (one forward pass) mapped over the k cotangents. The
    model must be vmap-compatible in its tangents (Transformers with attn_implementation="eager" is).
    """
    k = _leading_dim(params, vecs)
    if k == 0:
        return {n: torch.zeros_like(v) for n, v in vecs.items()}

    def jvp_one(v: Params) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(obj.outputs, (params,), (v,))  # (N, C), (N, C)

    out, jv = torch.func.vmap(jvp_one, out_dims=(None, 0))(vecs)  # (N, C), (k, N, C)
    hjv = torch.func.vmap(obj.output_hvp, in_dims=(None, 0))(out, jv)  # (k, N, C)
    _, vjp_fn = torch.func.vjp(obj.outputs, params)
    (gv,) = torch.func.vmap(vjp_fn)(hjv)  # each (k, *shape)
    return gv


def _leading_dim(params: Params, vecs: Params) -> int:
    """Check vecs is params with one extra leading dim, and return that dim's size k."""
    if params.keys() != vecs.keys():
        raise ConfigError(
            f"batched vector keys differ from the parameters: expected {sorted(params)}, got {sorted(vecs)}"
        )
    sizes = set()
    for n, p in params.items():
        v = vecs[n]
        if v.dim() != p.dim() + 1 or v.shape[1:] != p.shape:
            raise ConfigError(
                f"Shape mismatch for batched vector '{n}': "
                f"expected (k, *{tuple(p.shape)}), got {tuple(v.shape)}"
            )
        sizes.add(v.shape[0])
    if len(sizes) > 1:
        raise ConfigError(f"batched vectors disagree on the leading dim k: found {sorted(sizes)}")
    return sizes.pop() if sizes else 0
