"""Gradients and curvature products of a step's objective, split over the ranks of a `torchrun`.

A step's loss is Σ_i w_i ℓ_i with fixed weights, so its gradient and its curvature products
(G v = Σ_i J_iᵀ H_i J_i v, H v alike) are sums over samples: each rank evaluates its contiguous
share of the rows and the results are all-reduced (SUM). `summed` is the one place the engine does
it: `flat_grad` (every recomputed gradient: replay, injections, drift) and the per-step curvature
operators (ggn, exact) call it. Without torchrun it is a plain call. Every rank must reach the same
calls in the same order, which the engine does: all ranks run the same deterministic sweep.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from lmclean.dist import Dist, current
from lmclean.objective import CausalLMObjective, MicroBatchedObjective, Objective, SquaredErrorObjective

__all__ = ["share_of", "summed", "summed_forms"]


def share_of(obj: Objective, d: Dist) -> Objective | None:
    """This rank's rows of `obj` (recorded weights and padding kept), None for an empty share.
    Micro-batches are never split (their rounding under autocast is the run's); an objective of
    another kind is evaluated whole by rank 0."""
    if isinstance(obj, MicroBatchedObjective):
        parts = d.share_groups(obj.parts)
        return None if not parts else parts[0] if len(parts) == 1 else MicroBatchedObjective(parts)
    if isinstance(obj, CausalLMObjective):
        rows = d.share(int(obj.input_ids.shape[0]))
        if rows.stop <= rows.start:
            return None
        mask = None if obj.loss_mask is None else obj.loss_mask[rows]
        return CausalLMObjective(obj.model, obj.input_ids[rows], obj.lengths[rows], obj.weights[rows], mask, obj.autocast)
    if isinstance(obj, SquaredErrorObjective):
        rows = d.share(int(obj.inputs.shape[0]))
        if rows.stop <= rows.start:
            return None
        return SquaredErrorObjective(obj.model, obj.inputs[rows], obj.targets[rows], obj.weights[rows])
    return obj if d.main else None


def summed(obj: Objective, compute: Callable[[Objective], Tensor], zeros: Callable[[], Tensor]) -> Tensor:
    """`compute(obj)` for a quantity that is a sum over the objective's samples; under torchrun,
    `compute` of this rank's share (`zeros()` for none) all-reduced over the ranks."""
    d = current()
    if not d.active:
        return compute(obj)
    part = share_of(obj, d)
    return d.sum_(compute(part) if part is not None else zeros())


def summed_forms(obj: Objective, make: Callable[[Objective], tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]
                 ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """A linear map v ↦ G v and its quadratic form v ↦ vᵀ G v (a scalar), both sums over the objective's
    samples, that keep state between calls (a forward graph reused by several products): `make` is
    called once, on this rank's share, and each call is all-reduced; every rank must make the same
    calls (as with `summed`)."""
    d = current()
    if not d.active:
        return make(obj)
    part = share_of(obj, d)
    local = make(part) if part is not None else None
    return (lambda v: d.sum_(local[0](v) if local is not None else v.new_zeros(v.shape)),
            lambda v: d.sum_(local[1](v).reshape(()) if local is not None else v.new_zeros(())))
