"""Krylov curvature: the GGN restricted to the Krylov space of the vector being propagated.

A window of linearised steps applies the polynomial Π_t (1 − η_t λ) of the curvature to the
correction v. Lanczos started at v, with k − 1 exact products and the last vector's quadratic form,
gives an orthonormal basis V of span{v, Gv, …, G^(k−1) v} and the tridiagonal T = V G Vᵀ;
p(G) v ≈ V p(T) Vᵀ v is the Lanczos approximation of a matrix function: exact for polynomials of
degree < k, close for smooth ones. So k − 1 products stand in for a window of per-step products, and
unlike a fixed low-rank or Kronecker summary the space is built from v itself: the directions v has
mass on are the ones resolved.

Directions outside the space (injections made after the anchor) get zero curvature (damping and
weight decay still act) until the next anchor folds them into its Krylov space: a scalar or an EK-FAC
curvature there measured worse (benchmarks/README.md). The operator is U diag(θ) Uᵀ, U the Ritz
vectors, so windows run in closed form in the basis [U, complement] (closed_form.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lmclean.curvature.closed_form import diagonal_recursion
from lmclean.errors import ConfigError

__all__ = ["KrylovCurvature", "krylov_curvature"]


class KrylovCurvature:
    """U diag(θ) Uᵀ on flat (P,) vectors; U (k, P) orthonormal rows (Ritz vectors), θ (k,) ≥ 0."""

    def __init__(self, vecs: Tensor, vals: Tensor) -> None:
        if vecs.dim() != 2 or vals.shape != (vecs.shape[0],):
            raise ConfigError(f"Krylov basis (k, P) and values (k,) expected, got {tuple(vecs.shape)} and {tuple(vals.shape)}")
        self.vecs, self.vals = vecs, vals

    def matvec(self, v: Tensor) -> Tensor:
        return self.vecs.T @ (self.vals * (self.vecs @ v))

    def propagate(self, v: Tensor, m: Tensor | None, lrs: Sequence[float], momentum: float = 0.0,
                  shift: float = 0.0, max_step: float | None = None) -> tuple[Tensor, Tensor | None, int]:
        """len(lrs) steps of d = (G + shift) v; m ← μ m + d; v ← v − η m (as KroneckerCurvature.propagate):
        the Krylov coordinates follow θ, the complement only the shift. Returns v, m, capped steps."""
        zero = torch.zeros((), dtype=v.dtype, device=v.device)
        cv = self._split(v)
        cm = self._split(m) if m is not None else None
        capped = diagonal_recursion([self.vals, zero], cv, cm, lrs, momentum, shift, max_step)
        return self._join(cv), (self._join(cm) if cm is not None else None), capped

    def _split(self, v: Tensor) -> list[Tensor]:
        c = self.vecs @ v  # (k,)
        return [c, v - self.vecs.T @ c]

    def _join(self, parts: list[Tensor]) -> Tensor:
        return parts[1] + self.vecs.T @ parts[0]


def krylov_curvature(matvec: Callable[[Tensor], Tensor], seeds: Tensor | Sequence[Tensor], k: int,
                     quadratic: Callable[[Tensor], Tensor] | None = None) -> tuple[KrylovCurvature, int]:
    """Rayleigh–Ritz on the (block) Krylov space of ``seeds`` (one vector: Lanczos) of dimension at
    most k, for the PSD ``matvec``: the basis grows by the seeds, then by each basis vector's product in
    turn, orthonormalised twice against the basis; a candidate that is (numerically) inside the span is
    skipped, and when none is left the space is invariant and the iteration stops. T = Qᵀ G Q is taken
    from the products themselves.

    ``quadratic`` (q ↦ qᵀ G q, cheaper than a product: for the GGN one forward pass, no backward) saves
    the last product: T's last column is q_kᵀ G q_i = (G q_i)ᵀ q_k for the earlier basis vectors, which
    their products already give, and its corner is the quadratic form. Same T, k − 1 products.
    Returns the curvature and the number of products taken."""
    if k < 1:
        raise ConfigError(f"Krylov dimension must be >= 1, got {k}")
    pending = [seeds] if isinstance(seeds, Tensor) else list(seeds)
    if not pending or not bool(torch.linalg.vector_norm(pending[0]) > 0):
        raise ConfigError("a Krylov space needs a non-zero start vector")
    eps = torch.finfo(pending[0].dtype).eps
    Q: list[Tensor] = []  # orthonormal basis, each (P,)
    GQ: list[Tensor] = []  # G q for each basis vector
    grown = 0  # products already used as candidates

    def grow() -> bool:
        """Add the next basis vector (the next seed, else the next product); False when none is left."""
        nonlocal grown
        while True:
            if pending:
                c = pending.pop(0)
            elif grown < len(GQ):
                c, grown = GQ[grown], grown + 1
            else:
                return False
            size = torch.linalg.vector_norm(c)
            for _ in range(2):
                for q in Q:
                    c = c - torch.dot(q, c) * q
            n = torch.linalg.vector_norm(c)
            if bool(n > 1000 * eps * size) and bool(size > 0):
                Q.append(c / n)
                return True

    budget = k - 1 if quadratic is not None else k
    while len(GQ) < budget and grow():  # stops early where the space is invariant: v's part is exact
        GQ.append(matvec(Q[-1]))
    n = len(GQ)
    if n:
        Gm = torch.stack(GQ)  # (n, P)
        T = torch.stack(Q[:n]) @ Gm.T  # (n, n)
    else:
        Gm, T = pending[0].new_zeros((0, pending[0].numel())), pending[0].new_zeros((0, 0))
    if quadratic is not None and n == budget and grow():  # the k-th vector: no product, its column from the others'
        q = Q[n]
        col = Gm @ q  # (n,)
        corner = quadratic(q).reshape(1).to(col.dtype)
        T = torch.cat([torch.cat([T, col[:, None]], 1), torch.cat([col, corner])[None, :]], 0)
    Qm = torch.stack(Q[: T.shape[0]])  # (m, P)
    theta, S = torch.linalg.eigh((T + T.T) / 2)
    return KrylovCurvature(S.T @ Qm, theta.clamp(min=0)), n  # the GGN is PSD: rounding may dip below 0
