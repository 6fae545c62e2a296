"""Low-rank curvature: top eigenpairs by Lanczos, and closed-form propagation through many steps.

Past the propagation window the algorithm may apply the remaining steps' (I − η_s H) with a cheap
curvature U Λ Uᵀ taken at a few anchor steps. With orthonormal U the product of all those factors is
diagonal in the eigenbasis, so K steps cost one projection instead of K curvature products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from lmclean.curvature._tree import numel
from lmclean.errors import ConfigError
from lmclean.objective import Params

__all__ = ["LowRankCurvature", "top_eigenpairs"]


def top_eigenpairs(
    matvec: Callable[[Tensor], Tensor],
    dim_or_reference: int | Params,
    rank: int,
    n_iter: int | None = None,
    seed: int = 0,
    *,
    which: Literal["largest", "magnitude"] = "largest",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top ``rank`` eigenpairs of a symmetric operator on flat (P,) vectors, by Lanczos.

    Full reorthogonalisation (twice, against every previous Lanczos vector) keeps the basis
    orthonormal, so no spurious copies of converged eigenvalues appear. When the Krylov space becomes
    invariant (it happens on tiny or Kronecker-structured problems with repeated eigenvalues) the
    iteration restarts from a fresh seeded random vector orthogonal to the basis, so with
    ``n_iter == P`` every eigenvalue, multiplicities included, is found. With ``n_iter < P`` a
    multiple eigenvalue may be found with fewer copies than its multiplicity (a single-vector Krylov
    limitation). ``which="largest"`` ranks by value (for the PSD GGN); "magnitude" by |λ| (for the
    exact Hessian, whose negative curvature also drives the recursion).

    ``dim_or_reference``: P, or a Params dict whose total size, dtype and device are used.
    ``n_iter`` defaults to min(P, max(2·rank + 20, 40)). Returns eigenvalues (r,) in the chosen
    order (descending value or magnitude) and orthonormal eigenvectors as rows (r, P).
    """
    if isinstance(dim_or_reference, int):
        dim = dim_or_reference
        dtype = dtype or torch.get_default_dtype()
    else:
        dim = numel(dim_or_reference)
        ref = next(iter(dim_or_reference.values())) if dim_or_reference else None
        dtype = dtype or (ref.dtype if ref is not None else torch.get_default_dtype())
        device = device or (ref.device if ref is not None else None)
    if dim < 1:
        raise ConfigError(f"dimension must be >= 1, got {dim}")
    if not 1 <= rank <= dim:
        raise ConfigError(f"rank must be in [1, {dim}], got {rank}")
    m = min(dim, max(2 * rank + 20, 40)) if n_iter is None else n_iter
    if not rank <= m <= dim:
        raise ConfigError(f"n_iter must be in [rank={rank}, P={dim}], got {m}")
    if which not in ("largest", "magnitude"):
        raise ConfigError(f"which must be 'largest' or 'magnitude', got {which!r}")

    gen = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    Q = torch.zeros(m, dim, dtype=dtype, device=device)  # (m, P) Lanczos basis, rows orthonormal
    alpha = torch.zeros(m, dtype=dtype, device=device)  # (m,) diagonal of T
    beta = torch.zeros(max(m - 1, 0), dtype=dtype, device=device)  # (m-1,) off-diagonal of T
    q = _fresh_direction(Q[:0], gen, dim, dtype, device)  # (P,)
    scale = torch.zeros((), dtype=dtype, device=device)  # running estimate of ‖A‖ for the breakdown test
    for j in range(m):
        Q[j] = q
        w = matvec(q)  # (P,)
        alpha[j] = torch.dot(q, w)
        w = _orthogonalise(w, Q[: j + 1])  # the three-term recurrence and full reorthogonalisation at once
        if j == m - 1:
            break
        b = torch.linalg.vector_norm(w)
        scale = torch.maximum(scale, alpha[j].abs() + b)
        # Invariant subspace: restart, T decouples (β_j = 0). The test is relative to ‖A‖ and must not
        # grow with P: a P·eps factor would exceed 1 in float32 for P ≳ 10⁵ and restart every step.
        if b <= 1000 * eps * scale:
            q = _fresh_direction(Q[: j + 1], gen, dim, dtype, device)
        else:
            beta[j] = b
            q = w / b
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)  # (m, m)
    theta, S = torch.linalg.eigh(T)  # (m,), (m, m) ascending Ritz values
    key = theta if which == "largest" else theta.abs()
    order = torch.argsort(key, descending=True)[:rank]  # (r,)
    vecs = S[:, order].T @ Q  # (r, P) Ritz vectors
    return theta[order], vecs


def _orthogonalise(w: Tensor, Q: Tensor) -> Tensor:
    """w − Qᵀ(Q w), twice ("twice is enough", Kahan–Parlett) against the rows of Q (k, P)."""
    for _ in range(2):
        w = w - Q.T @ (Q @ w)  # (P,)
    return w


def _fresh_direction(
    Q: Tensor, gen: torch.Generator, dim: int, dtype: torch.dtype, device: torch.device | str | None
) -> Tensor:
    """A seeded random unit vector orthogonal to the rows of Q (k, P), k < P."""
    while True:
        r = torch.randn(dim, generator=gen, dtype=dtype).to(device)  # (P,)
        r = _orthogonalise(r, Q)
        n = torch.linalg.vector_norm(r)
        if n > 0.5 * torch.finfo(dtype).eps ** 0.5:
            return r / n


class LowRankCurvature:
    """The symmetric operator U diag(λ) Uᵀ from eigenpairs (λ (r,), U as rows (r, P), orthonormal)."""

    def __init__(self, eigvals: Tensor, eigvecs: Tensor) -> None:
        if eigvals.dim() != 1 or eigvecs.dim() != 2 or eigvecs.shape[0] != eigvals.shape[0]:
            raise ConfigError(
                f"Shape mismatch: expected eigvals (r,) and eigvecs (r, P), got {tuple(eigvals.shape)} "
                f"and {tuple(eigvecs.shape)}"
            )
        if eigvals.dtype != eigvecs.dtype:
            raise ConfigError(f"eigvals and eigvecs dtypes differ: {eigvals.dtype} vs {eigvecs.dtype}")
        self.eigvals = eigvals  # (r,)
        self.eigvecs = eigvecs  # (r, P)

    @property
    def dim(self) -> int:
        """P, the length of the flat vectors it acts on."""
        return self.eigvecs.shape[1]

    def matvec(self, v: Tensor) -> Tensor:
        """U diag(λ) Uᵀ v for a flat v (P,)."""
        c = self.eigvecs @ self._check(v)  # (r,) coordinates in the eigenbasis
        return self.eigvecs.T @ (self.eigvals * c)  # (P,)

    def propagate(self, v: Tensor, lrs: Sequence[float] | Tensor, damping: float = 0.0) -> Tensor:
        """∏_s (I − η_s (U diag(λ) Uᵀ + μ I)) v in closed form, for a flat v (P,).

        The component along eigenvector i is scaled by ∏_s (1 − η_s (λ_i + μ)); the part orthogonal to
        U by ∏_s (1 − η_s μ), i.e. carried unchanged when the damping μ is 0. All factors commute, so
        the order of ``lrs`` does not matter.
        """
        v = self._check(v)
        eta = torch.as_tensor(lrs, dtype=v.dtype, device=v.device).reshape(-1)  # (S,)
        along = torch.prod(1 - eta[:, None] * (self.eigvals[None, :] + damping), dim=0)  # (r,)
        rest = torch.prod(1 - eta * damping)  # ()
        c = self.eigvecs @ v  # (r,)
        return rest * v + self.eigvecs.T @ ((along - rest) * c)  # (P,)

    def _check(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ConfigError(f"Shape mismatch: expected a flat vector ({self.dim},), got {tuple(v.shape)}")
        return v
