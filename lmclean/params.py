"""The parameter manifest: a fixed order of trainable tensors and their offsets in one flat vector.

Gradients, checkpoints and perturbations are all stored as flat (P,) vectors in this order, so the
store never needs torch modules; `views` turns a flat vector back into a name -> tensor dict for
free (views, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmclean.errors import ModelMismatchError


@dataclass(frozen=True)
class ParamEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int


@dataclass(frozen=True)
class ParamManifest:
    entries: tuple[ParamEntry, ...]

    @property
    def size(self) -> int:
        return self.entries[-1].offset + self.entries[-1].numel if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ParamManifest":
        entries, offset = [], 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            entries.append(ParamEntry(name, tuple(p.shape), str(p.dtype).removeprefix("torch."), offset, p.numel()))
            offset += p.numel()
        return cls(tuple(entries))

    def to_list(self) -> list[dict]:
        return [dict(name=e.name, shape=list(e.shape), dtype=e.dtype, offset=e.offset, numel=e.numel) for e in self.entries]

    @classmethod
    def from_list(cls, rows: list[dict]) -> "ParamManifest":
        return cls(tuple(ParamEntry(r["name"], tuple(r["shape"]), r["dtype"], r["offset"], r["numel"]) for r in rows))

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """name -> view of `flat` (P,) with the parameter's shape; leading batch dims are kept."""
        lead = flat.shape[:-1]
        return {e.name: flat[..., e.offset : e.offset + e.numel].view(*lead, *e.shape) for e in self.entries}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        return torch.cat([tensors[e.name].reshape(-1) for e in self.entries])

    def check_model(self, model: torch.nn.Module, what: str) -> None:
        """Raise a one-line error naming the first parameter that differs from the manifest."""
        other = ParamManifest.from_model(model)
        mine = {e.name: e.shape for e in self.entries}
        theirs = {e.name: e.shape for e in other.entries}
        for name, shape in mine.items():
            if name not in theirs:
                raise ModelMismatchError(f"{what} has no parameter {name}; it does not match the store's model")
            if theirs[name] != shape:
                raise ModelMismatchError(f"{what} parameter {name} has shape {theirs[name]}, the store expects {shape}")
        extra = sorted(set(theirs) - set(mine))
        if extra:
            raise ModelMismatchError(f"{what} has parameter {extra[0]} that the store's model lacks")


def bind_flat(model: torch.nn.Module, manifest: ParamManifest, flat: Tensor) -> None:
    """Make the model's parameters views into `flat`, so in-place updates of `flat` update the model."""
    views = manifest.views(flat)
    for name, p in model.named_parameters():
        if name in views:
            p.data = views[name]


def flat_params(model: torch.nn.Module, manifest: ParamManifest) -> Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[e.name].detach().reshape(-1) for e in manifest.entries])


def flat_grads(model: torch.nn.Module, manifest: ParamManifest) -> Tensor:
    params = dict(model.named_parameters())
    out = []
    for e in manifest.entries:
        g = params[e.name].grad
        out.append(torch.zeros(e.numel, dtype=params[e.name].dtype, device=params[e.name].device) if g is None else g.reshape(-1))
    return torch.cat(out)
