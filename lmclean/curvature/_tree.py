"""Linear algebra on parameter dicts (``Params``), so every product speaks the model's own layout.

Keys and shapes of the first argument are the reference; mismatches raise ``ConfigError`` instead of
silently broadcasting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lmclean.errors import ConfigError
from lmclean.objective import Params

__all__ = [
    "as_flat_matvec",
    "check_like",
    "flatten",
    "numel",
    "tree_dot",
    "tree_scale",
    "tree_zeros_like",
    "unflatten",
]


def check_like(reference: Params, other: Params, what: str = "vector") -> None:
    """Raise ConfigError unless ``other`` has exactly the keys and shapes of ``reference``."""
    if reference.keys() != other.keys():
        missing = sorted(reference.keys() - other.keys())
        extra = sorted(other.keys() - reference.keys())
        raise ConfigError(f"{what} keys differ from the parameters: missing {missing}, unexpected {extra}")
    for k, ref in reference.items():
        if other[k].shape != ref.shape:
            raise ConfigError(
                f"Shape mismatch for {what} '{k}': expected {tuple(ref.shape)}, got {tuple(other[k].shape)}"
            )


def tree_dot(a: Params, b: Params) -> Tensor:
    """Σ_k ⟨a_k, b_k⟩ as a 0-dim tensor."""
    check_like(a, b)
    return sum((torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a), torch.zeros((), dtype=_dtype(a)))


def tree_scale(a: Params, c: float | Tensor) -> Params:
    """c · a."""
    return {k: c * v for k, v in a.items()}


def tree_zeros_like(a: Params) -> Params:
    """Zeros with a's keys, shapes, dtypes and devices."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def numel(a: Params) -> int:
    """Total number of entries P."""
    return sum(v.numel() for v in a.values())


def flatten(a: Params) -> Tensor:
    """Concatenate in the dict's key order into one (P,) vector (the order ``unflatten`` expects)."""
    return torch.cat([v.reshape(-1) for v in a.values()])  # (P,)


def unflatten(flat: Tensor, reference: Params) -> Params:
    """Inverse of ``flatten``: split a (P,) vector into ``reference``'s keys and shapes (views)."""
    if flat.dim() != 1 or flat.numel() != numel(reference):
        raise ConfigError(
            f"Shape mismatch: expected a flat vector ({numel(reference)},), got {tuple(flat.shape)}"
        )
    out: Params = {}
    i = 0
    for k, ref in reference.items():
        out[k] = flat[i : i + ref.numel()].view(ref.shape)
        i += ref.numel()
    return out


def as_flat_matvec(product: Callable[[Params], Params], reference: Params) -> Callable[[Tensor], Tensor]:
    """Wrap a Params → Params product as a (P,) → (P,) matvec, for Lanczos and dense checks."""
    return lambda v: flatten(product(unflatten(v, reference)))


def _dtype(a: Params) -> torch.dtype:
    return next(iter(a.values())).dtype if a else torch.get_default_dtype()
