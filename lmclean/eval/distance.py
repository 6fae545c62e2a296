"""Distances between parameter vectors: how far an unlearned model is from the retrained one.

Parameters come as one tensor, a mapping name -> tensor (a state dict), or an `nn.Module` (read
through `named_parameters()`, which lists tied weights once; a state dict lists them under every
name, so they count once per name). Sums of squares are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lmclean.errors import DataError, ModelMismatchError

Params = torch.Tensor | Mapping[str, torch.Tensor] | nn.Module


def _as_mapping(params: Params, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return {"<tensor>": params}
    if isinstance(params, nn.Module):
        return dict(params.named_parameters())
    if isinstance(params, Mapping):
        return params
    raise ModelMismatchError(f"{name}: expected a tensor, a state dict or an nn.Module, got {type(params).__name__}")


def _aligned(a: Params, b: Params, name_a: str, name_b: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(a[k], b[k]) for every key, after checking both hold the same keys with the same shapes."""
    ma, mb = _as_mapping(a, name_a), _as_mapping(b, name_b)
    only_a, only_b = sorted(set(ma) - set(mb)), sorted(set(mb) - set(ma))
    if only_a or only_b:
        key, has, lacks = (only_a[0], name_a, name_b) if only_a else (only_b[0], name_b, name_a)
        raise ModelMismatchError(f"parameter {key!r} is in {has} but not in {lacks}; compare models of one architecture")
    for key in ma:
        ta, tb = ma[key], mb[key]
        if ta.shape != tb.shape:
            raise ModelMismatchError(
                f"parameter {key!r}: shape {tuple(ta.shape)} in {name_a} vs {tuple(tb.shape)} in {name_b}"
            )
        yield ta, tb


def _squared_distance(a: Params, b: Params, name_a: str, name_b: str) -> float:
    total = 0.0
    with torch.no_grad():
        for ta, tb in _aligned(a, b, name_a, name_b):
            diff = ta.detach().to(torch.float64) - tb.detach().to(device=ta.device, dtype=torch.float64)
            total += float(diff.pow(2).sum())
    return total


def param_distance(a: Params, b: Params) -> float:
    """Euclidean distance ||a - b|| over all parameters."""
    return math.sqrt(_squared_distance(a, b, "a", "b"))


def residual_ratio(theta_hat: Params, theta_orig: Params, theta_ref: Params) -> float:
    """||theta_hat - theta_ref|| / ||theta_orig - theta_ref||: the share of the distance to the
    reference (retrained) model that unlearning left. 0 = reached retraining, 1 = no closer than
    the original model, > 1 = moved away.
    """
    # check all three agree before the (possibly long) sums
    for _ in _aligned(theta_hat, theta_ref, "theta_hat", "theta_ref"):
        pass
    denominator = _squared_distance(theta_orig, theta_ref, "theta_orig", "theta_ref")
    if denominator == 0.0:
        raise DataError("residual_ratio: theta_orig equals theta_ref, so the ratio is undefined; check the models passed")
    return math.sqrt(_squared_distance(theta_hat, theta_ref, "theta_hat", "theta_ref") / denominator)


__all__ = ["Params", "param_distance", "residual_ratio"]
