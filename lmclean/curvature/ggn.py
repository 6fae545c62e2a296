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

__all__ = ["GGNAt", "ggn_vp", "ggn_vp_batched"]


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


class GGNAt:
    """Several GGN products at one θ on one objective (Lanczos takes k − 1 of them at an anchor, and
    one quadratic form): one forward pass with its graph, kept for every product's vjp (retain_graph),
    and J v per product by a difference quotient of forward passes without a graph.

    Why: on CPU forward-mode AD through an eager transformer costs about three forward passes (the
    dual forward of `ggn_vp`), so each product cost about 2.3 training steps; this way each product
    costs one forward and one backward (benchmarks/README.md, "Krylov").
    - float32: a forward difference (f(θ + hv) − f(θ)) / h reusing the graph's f(θ), one forward less.
      Along Lanczos vectors of the TOFU model it is off by 6e-4–2.4e-3 relative at ‖h v‖ = 2e-5·‖θ‖
      (1e-2 along a random vector), the central one at 4e-5 by 3e-5–3e-4 (3e-3), and the TOFU residual
      is the same to three digits (0.2544 both), so the cheaper one is taken.
    - float64: a central difference (f(θ + hv) − f(θ − hv)) / 2h, O(h²): ~1e-9 relative on a float64
      MLP, which the engine's equivalence tests rely on.
    h is set so that ‖h v‖ = ``rel_step``·max(‖θ‖, 1): 2e-5 forward, 4e-5 central, whatever the dtype
    (transformers keeps norms and softmax in float32 inside a float64 model, so float64 gains no
    smaller step; 2e-3 gave 3–40% errors on TOFU: truncation). Where rounding would swamp the
    difference, autocast (bf16/fp16) or TF32 matmuls on CUDA, each product takes the dual forward of
    `ggn_vp` instead."""

    def __init__(self, obj: Objective, params: Params, rel_step: float | None = None,
                 central: bool | None = None) -> None:
        self.obj, self.params = obj, params
        ref = next(iter(params.values()))
        tf32 = ref.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        self.fd = getattr(obj, "autocast", None) is None and ref.dtype in (torch.float32, torch.float64) and not tf32
        self.central = ref.dtype == torch.float64 if central is None else central
        self.rel_step = (4e-5 if self.central else 2e-5) if rel_step is None else rel_step
        self.scale = max(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params.values()))), 1.0)
        self._graph: tuple[dict[str, Tensor], Tensor] | None = None
        self._plain: Tensor | None = None

    def __call__(self, vec: Params) -> Params:
        check_like(self.params, vec)
        if not self.fd:
            return ggn_vp(self.obj, self.params, vec)
        leaves, out = self._forward()
        jv = self._jv(vec, out.detach())
        if jv is None:
            return {k: torch.zeros_like(p) for k, p in self.params.items()}
        hjv = self.obj.output_hvp(out.detach(), jv)  # (N, C)
        grads = torch.autograd.grad(out, list(leaves.values()), hjv, retain_graph=True, allow_unused=True)
        return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(self.params.items(), grads)}

    def quadratic(self, vec: Params) -> Tensor:
        """vᵀ G v = (J v)ᵀ (∇²_out L) (J v): the difference quotient's forward pass and no backward, about
        a third of a product (krylov_curvature's last basis vector needs only this)."""
        check_like(self.params, vec)
        if not self.fd:
            gv = ggn_vp(self.obj, self.params, vec)
            return sum((gv[k] * vec[k]).sum() for k in vec)  # type: ignore[return-value]
        base = self._graph[1].detach() if self._graph is not None else self._base()
        jv = self._jv(vec, base)
        ref = next(iter(self.params.values()))
        if jv is None:
            return ref.new_zeros(())
        return (jv * self.obj.output_hvp(base, jv)).sum()

    def _forward(self) -> tuple[dict[str, Tensor], Tensor]:
        """The forward pass at θ with its graph, taken once and kept for every product's vjp."""
        if self._graph is None:
            leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
            self._graph = (leaves, self.obj.outputs(leaves))
        return self._graph

    def _base(self) -> Tensor:
        """f(θ) without a graph, for quadratic forms taken before any product."""
        if self._plain is None:
            with torch.no_grad():
                self._plain = self.obj.outputs({k: p.detach() for k, p in self.params.items()})
        return self._plain

    def _jv(self, vec: Params, base: Tensor) -> Tensor | None:
        """J v by the difference quotient (forward, or central in float64) around f(θ) = base; None for v = 0."""
        norm = float(torch.sqrt(sum((x.double() ** 2).sum() for x in vec.values())))
        if norm == 0:
            return None
        h = self.rel_step * self.scale / norm
        with torch.no_grad():
            plus = self.obj.outputs({k: p.detach() + h * vec[k] for k, p in self.params.items()})
            if self.central:
                minus = self.obj.outputs({k: p.detach() - h * vec[k] for k, p in self.params.items()})
                return (plus - minus) / (2 * h)
            return (plus - base) / h


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
