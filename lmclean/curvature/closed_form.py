"""The per-direction recursion shared by the curvatures that are diagonal in a known basis.

With d = (G + shift·I) v, m ← μ m + d, v ← v − η m and G = Q diag(λ) Qᵀ, every coordinate in the basis Q
follows its own 2×2 (1×1 without momentum) recursion: a whole window of steps costs two rotations
(into and out of the basis), not one product per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def diagonal_recursion(lam: Sequence[Tensor], cv: list[Tensor], cm: list[Tensor] | None, lrs: Sequence[float],
                       momentum: float, shift: float, max_step: float | None) -> int:
    """Run len(lrs) steps on coordinates cv (and momentum coordinates cm), in place; lam[i] broadcasts
    against cv[i]. ``max_step`` caps η·λ per direction (the stabiliser's bound in the basis; None: no
    cap). Returns the number of steps in which some direction was capped."""
    capped = 0
    for eta in lrs:
        hit = False
        for i, (l, c) in enumerate(zip(lam, cv)):
            step = eta * l
            if max_step is not None and bool((step > max_step).any()):
                hit = True
                step = step.clamp(max=max_step)
            d = (step / eta if eta else l) * c + shift * c
            if cm is None:
                cv[i] = c - eta * d
            else:
                cm[i] = momentum * cm[i] + d
                cv[i] = c - eta * cm[i]
        capped += hit
    return capped
