"""Batch objectives: the weighted loss of one recorded step as a pure function of parameters.

An objective is split at the network output, ``loss(θ) = loss_from_outputs(outputs(θ))``, so that
curvature code can form the Gauss-Newton matrix Jᵀ ∇²_out ℓ J without knowing the model.
Training, replay, per-sample gradients and curvature products all go through these objects, so the
loss that is differentiated is exactly the loss that was recorded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.func import functional_call

Params = dict[str, Tensor]


class Objective(Protocol):
    """A scalar batch loss L(θ) = Σ_i w_i ℓ(z_i; θ), split at the network outputs."""

    def outputs(self, params: Params) -> Tensor:
        """Network outputs that the loss reads, shape (N, C)."""
        ...

    def loss_from_outputs(self, out: Tensor) -> Tensor:
        """The weighted scalar loss given the outputs (N, C)."""
        ...

    def output_hvp(self, out: Tensor, u: Tensor) -> Tensor:
        """(∇²_out loss) u for u of shape (N, C): the middle factor of the GGN."""
        ...


def loss_of(obj: Objective, params: Params) -> Tensor:
    """L(θ) for an objective."""
    return obj.loss_from_outputs(obj.outputs(params))


@dataclass
class CausalLMObjective:
    """Σ_i w_i · (mean token cross-entropy of sample i) for a causal LM on a padded batch.

    ``input_ids`` (B, L) right-padded, ``lengths`` (B,) real token counts, ``weights`` (B,) the
    recorded per-sample loss weights, ``loss_mask`` (B, L) optional: token n is a target only
    where it is True (a Trainer's labels != −100). Target token n of sample i gets coefficient
    w_i / n_i (n_i: sample i's targets, len_i − 1 without a mask); the loss is Σ c_n CE over targets.
    """

    model: torch.nn.Module
    input_ids: Tensor  # (B, L) int64
    lengths: Tensor  # (B,) int64
    weights: Tensor  # (B,) float
    loss_mask: Tensor | None = None  # (B, L) bool
    autocast: str | None = None  # "bf16": the forward runs under torch.autocast, as the recorded run did

    def __post_init__(self) -> None:
        B, L = self.input_ids.shape
        pos = torch.arange(L - 1, device=self.input_ids.device)  # predicted positions 0..L-2
        self._valid = pos[None, :] < (self.lengths[:, None] - 1)  # (B, L-1) position n predicts n+1
        if self.loss_mask is not None:
            self._valid = self._valid & self.loss_mask[:, 1:].to(torch.bool)
        self._targets = self.input_ids[:, 1:][self._valid]  # (N,)
        n_pred = self._valid.sum(1).clamp(min=1).to(self.weights.dtype)
        coef = (self.weights / n_pred)[:, None].expand(B, L - 1)  # (B, L-1)
        self._coef = coef[self._valid]  # (N,)
        self._attention_mask = (
            torch.arange(L, device=self.input_ids.device)[None, :] < self.lengths[:, None]
        ).long()  # (B, L)
        # Transformers models (their config has use_cache) build and drop a KV cache on every forward
        # unless told not to; nothing here decodes. Other modules may not take the keyword.
        self._no_cache = {"use_cache": False} if getattr(getattr(self.model, "config", None), "use_cache", None) is not None else {}

    def outputs(self, params: Params) -> Tensor:
        with _autocast(self.autocast, self.input_ids.device.type):
            logits = functional_call(
                self.model,
                params,
                args=(),
                kwargs={"input_ids": self.input_ids, "attention_mask": self._attention_mask, **self._no_cache},
                strict=False,
            ).logits  # (B, L, V)
        out = logits[:, :-1][self._valid]  # (N, V)
        return out.float() if self.autocast else out  # the loss is taken in float32 under autocast

    def loss_from_outputs(self, out: Tensor) -> Tensor:
        ce = torch.nn.functional.cross_entropy(out, self._targets, reduction="none")  # (N,)
        return (self._coef.to(ce.dtype) * ce).sum()

    def subset(self, rows: Tensor) -> "CausalLMObjective":
        """The same loss on samples `rows` only, weights rescaled to the batch's total weight (an
        unbiased estimate of the batch's curvature), padding trimmed to the longest kept sample."""
        w = self.weights[rows]  # (b,)
        width = int(self.lengths[rows].max())
        mask = None if self.loss_mask is None else self.loss_mask[rows, :width]
        return CausalLMObjective(self.model, self.input_ids[rows, :width], self.lengths[rows],
                                 w * (self.weights.sum() / w.sum()), mask, self.autocast)

    def output_hvp(self, out: Tensor, u: Tensor) -> Tensor:
        # Softmax-CE Hessian w.r.t. logits is c_n (diag p − p pᵀ): (N, V) ⊙ ... without forming V×V.
        p = torch.softmax(out, dim=-1)  # (N, V)
        pu = (p * u).sum(-1, keepdim=True)  # (N, 1)
        return self._coef.to(out.dtype)[:, None] * (p * u - p * pu)


def _autocast(mode: str | None, device_type: str) -> contextlib.AbstractContextManager[object]:
    """torch.autocast for a recorded precision ("bf16", "fp16"), or nothing (None: fp32)."""
    if mode is None:
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mode not in dtypes:
        from lmclean.errors import UnsupportedError

        raise UnsupportedError(f"autocast {mode!r} is not supported; use one of {sorted(dtypes)} or none (fp32)")
    return torch.autocast(device_type, dtype=dtypes[mode])


@dataclass
class MicroBatchedObjective:
    """The sum of several causal-LM objectives, each its own forward: a step computed micro-batch by
    micro-batch (gradient accumulation). Used where a gradient must match the run's (under bf16
    autocast the rounding depends on the batch shape); curvature takes the single-batch form."""

    parts: list[CausalLMObjective]

    @property
    def model(self) -> torch.nn.Module:
        return self.parts[0].model

    def _sizes(self) -> list[int]:
        return [int(p._targets.numel()) for p in self.parts]

    def outputs(self, params: Params) -> Tensor:
        return torch.cat([p.outputs(params) for p in self.parts])

    def loss_from_outputs(self, out: Tensor) -> Tensor:
        return sum(p.loss_from_outputs(o) for p, o in zip(self.parts, out.split(self._sizes())))  # type: ignore[return-value]

    def output_hvp(self, out: Tensor, u: Tensor) -> Tensor:
        sizes = self._sizes()
        return torch.cat([p.output_hvp(o, v) for p, o, v in zip(self.parts, out.split(sizes), u.split(sizes))])


@dataclass
class SquaredErrorObjective:
    """Σ_i w_i · ½‖f(x_i; θ) − y_i‖² for any module f: the quadratic test case and small regressions."""

    model: torch.nn.Module
    inputs: Tensor  # (B, D_in)
    targets: Tensor  # (B, D_out)
    weights: Tensor  # (B,)

    def outputs(self, params: Params) -> Tensor:
        return functional_call(self.model, params, (self.inputs,), strict=False)  # (B, D_out)

    def loss_from_outputs(self, out: Tensor) -> Tensor:
        return 0.5 * (self.weights.to(out.dtype)[:, None] * (out - self.targets) ** 2).sum()

    def output_hvp(self, out: Tensor, u: Tensor) -> Tensor:
        return self.weights.to(out.dtype)[:, None] * u

    def subset(self, rows: Tensor) -> "SquaredErrorObjective":
        """The same loss on samples `rows` only, weights rescaled to the batch's total weight."""
        w = self.weights[rows]
        return SquaredErrorObjective(self.model, self.inputs[rows], self.targets[rows], w * (self.weights.sum() / w.sum()))

