"""What `LMCleanCallback` reads from a `transformers.Trainer` run, and the checks that keep it exact.

The Trainer computes each micro-batch's loss inside `model(**inputs)` and keeps the pre-clip
gradient norm in a local, so the callback wraps the model's forward (to see the batch, the sample
ids and `num_items_in_batch`) and hooks the parameters' gradient accumulation (to see the norm).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmclean.config import OnlineUnlearnConfig
from lmclean.errors import ConfigError, DataError, StoreError, UnsupportedError
from lmclean.params import ParamManifest

IGNORE = -100  # the Trainer's (and PyTorch's) ignore_index for labels


@dataclass
class MicroBatch:
    """The kept rows of one micro-batch, each trimmed to its real length."""

    ids: list[int]
    tokens: list[Tensor]  # (len_i,) int64
    masks: list[Tensor]  # (len_i,) bool: labels[n] != -100
    n_targets: list[int]  # n_i: target positions 1 <= n < len_i (the Trainer counts labels[..., 1:])
    n_full: int  # Σ n_i over every row of the micro-batch, excluded rows included
    num_items: int | None  # the Trainer's num_items_in_batch (None: the model averages per micro-batch)
    loss: float  # the loss the model returned for the kept rows
    width: int = 0  # the padded width the model saw (bf16 rounding depends on the batch shape)


@dataclass
class StepBatch:
    """One optimizer step's recorded batch: the kept rows of its micro-batches, in order."""

    ids: list[int]
    input_ids: Tensor  # (b, L) right-padded
    lengths: Tensor  # (b,)
    loss_mask: Tensor  # (b, L) bool
    weights: Tensor  # (b,) float64: w_i = n_i / N, so Σ_i w_i·meanCE_i is the Trainer's loss
    loss: float
    micro: list[int]  # (b,) the micro-batch each row came from
    widths: list[int]  # (b,) that micro-batch's padded width


def step_batch(micro: Sequence[MicroBatch], pad_id: int) -> StepBatch:
    """Merge a step's micro-batches. With `num_items_in_batch` the Trainer's loss is Σ CE / N;
    without it each micro-batch's mean is divided by the number of micro-batches G."""
    G = len(micro)
    ids: list[int] = []
    weights: list[float] = []
    rows: list[Tensor] = []
    masks: list[Tensor] = []
    loss = 0.0
    index: list[int] = []
    widths: list[int] = []
    for k_mb, mb in enumerate(micro):
        index += [k_mb] * len(mb.ids)
        widths += [mb.width] * len(mb.ids)
        denom = mb.num_items if mb.num_items is not None else mb.n_full * G
        ids += mb.ids
        rows += mb.tokens
        masks += mb.masks
        weights += [n / denom if denom else 0.0 for n in mb.n_targets]
        loss += mb.loss if mb.num_items is not None else mb.loss / G
    width = max((len(r) for r in rows), default=1)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, (r, m) in enumerate(zip(rows, masks)):
        input_ids[k, : len(r)] = r
        loss_mask[k, : len(m)] = m
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    return StepBatch(ids, input_ids, lengths, loss_mask, torch.tensor(weights, dtype=torch.float64), loss, index, widths)


def _row_ids(value: Any, id_column: str) -> list[int]:
    try:
        ids = [int(i) for i in (value.tolist() if isinstance(value, Tensor) else value)]
    except (TypeError, ValueError):
        raise DataError(f"batch column {id_column!r} must hold integer sample ids") from None
    return ids


def check_batch(input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """(lengths (B,), loss mask (B, L) bool) of a causal-LM batch, or a one-line DataError."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise DataError("LMCleanCallback records causal-LM batches: pass input_ids as a (batch, length) tensor")
    if labels is None:
        raise DataError("LMCleanCallback: the batch has no labels; the collator must pass labels (-100 where no loss)")
    if labels.shape != input_ids.shape:
        raise DataError(f"LMCleanCallback: labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in "
                        "shape; pass unshifted causal-LM labels")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if input_ids.shape[1] and (not bool(mask[:, 0].all()) or bool((mask[:, 1:] & ~mask[:, :-1]).any())):
        raise DataError("LMCleanCallback needs right padding (attention_mask a prefix of ones per row); "
                        "set tokenizer.padding_side = 'right'")
    target = labels != IGNORE
    if bool((target & (labels != input_ids)).any()):
        raise DataError("LMCleanCallback: labels must equal input_ids where they are not -100 "
                        "(unshifted causal-LM labels; mask prompts with -100)")
    if bool((target & ~mask).any()):
        raise DataError("LMCleanCallback: labels at padding positions must be -100")
    return mask.sum(1), target


class ForwardCapture:
    """Wraps `model.forward`: pops the id column, drops excluded rows, and records each training
    micro-batch. Records only while `active` (set by the callback) and the model is training."""

    def __init__(self, model: torch.nn.Module, id_column: str, exclude: set[int], zero_loss: Callable[[], Tensor]) -> None:
        self.model, self.id_column, self.exclude, self.zero_loss = model, id_column, exclude, zero_loss
        self.micro: list[MicroBatch] = []
        self.active = False
        self._had_instance_forward = "forward" in vars(model)
        self._inner = model.forward
        model.forward = self._forward  # instance attribute: nn.Module.__call__ finds it first

    def remove(self) -> None:
        if self._had_instance_forward:
            self.model.forward = self._inner
        else:
            vars(self.model).pop("forward", None)

    def take(self) -> list[MicroBatch]:
        out, self.micro = self.micro, []
        return out

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.pop(self.id_column, None)
        if not (self.active and self.model.training):
            return self._inner(*args, **kwargs)
        if args:
            raise DataError("LMCleanCallback: the model was called with positional inputs; the Trainer passes keywords")
        if ids is None:
            raise DataError(f"LMCleanCallback: the batch has no {self.id_column!r} column; pass "
                            "TrainingArguments(remove_unused_columns=False) and have the collator keep it")
        input_ids, labels = kwargs.get("input_ids"), kwargs.get("labels")
        lengths, target = check_batch(input_ids, kwargs.get("attention_mask"), labels)
        row_ids = _row_ids(ids, self.id_column)
        B, L = input_ids.shape
        if len(row_ids) != B:
            raise DataError(f"LMCleanCallback: {len(row_ids)} ids for {B} rows in the batch")
        n_targets = target[:, 1:].sum(1).tolist()
        num_items = kwargs.get("num_items_in_batch")
        num_items = None if num_items is None else int(num_items)
        keep = [k for k, i in enumerate(row_ids) if i not in self.exclude]
        if not keep:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            out: Any = CausalLMOutputWithPast(loss=self.zero_loss())  # still connected: backward runs
        else:
            if len(keep) < B:  # the same rows, trimmed to the longest kept one; N unchanged (fixed denominator)
                width = int(lengths[keep].max())
                index = torch.tensor(keep, device=input_ids.device)
                for name, v in list(kwargs.items()):
                    if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == B:
                        v = v.index_select(0, index)
                        kwargs[name] = v[:, :width] if v.dim() >= 2 and v.shape[1] == L else v
            out = self._inner(**kwargs)
            if num_items is None and len(keep) < B and sum(n_targets):
                # the model averages over the kept rows' targets: rescale to the full micro-batch's count
                out["loss"] = out["loss"] * (sum(n_targets[k] for k in keep) / sum(n_targets))
        self.micro.append(MicroBatch(
            ids=[row_ids[k] for k in keep],
            tokens=[input_ids[k, : int(lengths[k])].detach().cpu() for k in keep],
            masks=[target[k, : int(lengths[k])].detach().cpu() for k in keep],
            n_targets=[int(n_targets[k]) for k in keep], n_full=int(sum(n_targets)), num_items=num_items,
            loss=float(out["loss"].detach()), width=int(L)))
        return out


class GradNorms:
    """Per-parameter ‖p.grad‖ after each backward (overwritten: the last one is the accumulated
    gradient's), combined like `torch.nn.utils.clip_grad_norm_` into the pre-clip norm."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.norms: dict[int, Tensor] = {}
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(k)) for k, p in enumerate(params)]

    def _hook(self, k: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self.norms[k] = torch.linalg.vector_norm(p.grad.detach(), 2.0)
        return hook

    def total(self) -> float:
        if not self.norms:
            return 0.0
        parts = [self.norms[k] for k in sorted(self.norms)]
        return float(torch.linalg.vector_norm(torch.stack([n.to(parts[0].device) for n in parts]), 2.0))  # one sync

    def reset(self) -> None:
        self.norms.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def online_settings(unlearn: dict[str, Any] | None) -> OnlineUnlearnConfig:
    """`unlearn={"method": ..., "K": ..., "hvp": ...}` as the config's `record.unlearn`."""
    known = {"method", "K", "hvp"}
    extra = sorted(set(unlearn or {}) - known)
    if extra:
        raise ConfigError(f"LMCleanCallback(unlearn=...) has unknown key {extra[0]!r}; use method, K, hvp")
    cfg = OnlineUnlearnConfig(**(unlearn or {}))
    allowed = {"method": ("lmcleaner", "replay", "rollback", "none"),
               "hvp": ("ggn", "exact", "kfac", "ekfac", "diag", "lowrank", "fisher")}
    for key, values in allowed.items():
        if getattr(cfg, key) not in values:
            raise ConfigError(f"LMCleanCallback(unlearn=...): {key}={getattr(cfg, key)!r} is not one of {', '.join(values)}")
    if cfg.K is not None and (not isinstance(cfg.K, int) or cfg.K < 0):
        raise ConfigError(f"LMCleanCallback(unlearn=...): K={cfg.K!r} must be an integer >= 0")
    return cfg


def write_back(model: torch.nn.Module, optimizer: Any, manifest: ParamManifest, theta: Tensor, opt_state: dict[str, Tensor],
               before: Tensor, before_state: dict[str, Tensor], t: int) -> None:
    """Copy a corrected flat θ and optimizer state (what changed from `before`) into the parameters
    and `optimizer.state[p][name]` in place, keeping their dtype and device."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        if not torch.equal(theta, before):
            for name, view in manifest.views(theta).items():
                params[name].copy_(view)
        for key, flat in opt_state.items():
            if torch.equal(flat, before_state[key]):
                continue
            for e in manifest.entries:
                part = flat[e.offset : e.offset + e.numel]
                buf = optimizer.state.get(params[e.name], {}).get(key)
                if buf is None:
                    if torch.equal(part, before_state[key][e.offset : e.offset + e.numel]):
                        continue
                    raise StoreError(f"LMCleanCallback: step {t}: optimizer buffer {key!r} of {e.name} does not "
                                     "exist yet, so the correction cannot be applied to it")
                buf.copy_(part.view_as(buf))


def active_dropout(model: torch.nn.Module) -> str | None:
    """Where the model has dropout that training would apply (replay could not reproduce it)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"module {name or type(m).__name__} (p={m.p})"
    config = getattr(model, "config", None)
    p = getattr(config, "attention_dropout", 0.0)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return f"config.attention_dropout={p}"
    return None


def check_run(args: Any, model: Any, optimizer: Any, id_column: str) -> None:
    """Refuse, in one line each, a Trainer run that replay could not reproduce or the store cannot hold."""
    if model is None or optimizer is None:
        raise UnsupportedError("LMCleanCallback needs the Trainer's model and optimizer at on_train_begin")
    if getattr(args, "remove_unused_columns", False):
        raise ConfigError(f"LMCleanCallback needs the {id_column!r} column, which the Trainer drops: pass "
                          "TrainingArguments(remove_unused_columns=False)")
    if getattr(args, "n_gpu", 1) > 1:
        raise UnsupportedError(f"LMCleanCallback records one device per process (this run has n_gpu "
                               f"{getattr(args, 'n_gpu', 1)}): use one device, or one process per device with "
                               "torchrun (DDP; docs/distributed.md)")
    if getattr(args, "label_smoothing_factor", 0.0):
        raise UnsupportedError("LMCleanCallback cannot record label smoothing; set label_smoothing_factor=0")
    if getattr(args, "load_best_model_at_end", False):
        raise UnsupportedError("load_best_model_at_end=True replaces the trained model with an earlier one; "
                               "set it False (the store records the last step)")
    for flag, fix in (("torch_compile", "torch_compile=False"), ("neftune_noise_alpha", "neftune_noise_alpha=None")):
        if getattr(args, flag, None):
            raise UnsupportedError(f"LMCleanCallback cannot record a run with {flag} (replay could not "
                                   f"reproduce it); set {fix}")
    if getattr(args, "fp16", False):
        raise UnsupportedError("LMCleanCallback cannot record fp16 training (its loss scaling skips steps); "
                               "use bf16=True or fp32")
    odd = next((n for n, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32), None)
    if odd is not None:
        raise UnsupportedError(f"LMCleanCallback records float32 training only: trainable parameter {odd} is "
                               "not float32; load the model (or the adapter) in float32")
    where = active_dropout(model)
    if where is not None:
        raise UnsupportedError(f"LMCleanCallback: {where} has dropout, which replay cannot reproduce; "
                               "set dropout to 0")
    if not isinstance(optimizer, (torch.optim.AdamW, torch.optim.SGD)):
        raise unsupported_optimizer(optimizer)


def unsupported_optimizer(optimizer: Any) -> UnsupportedError:
    return UnsupportedError(f"LMCleanCallback cannot record optimizer {type(optimizer).__name__}: replay supports "
                            "torch.optim.AdamW (optim='adamw_torch' / 'adamw_torch_fused') and torch.optim.SGD")


def _as_list(value: Any) -> list[int]:
    if isinstance(value, Tensor):
        return [int(x) for x in value.reshape(-1).tolist()]
    return [int(x) for x in np.asarray(value).reshape(-1).tolist()]


def sample_fingerprint(row: Mapping[str, Any], id_column: str) -> str:
    """sha256 hex of the sample's input_ids then labels as little-endian int32 bytes (rows without
    input_ids: of their canonical JSON, id column left out)."""
    if row.get("input_ids") is None:
        rest = {k: v for k, v in row.items() if k != id_column}
        return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()
    data = np.asarray(_as_list(row["input_ids"]), dtype="<i4").tobytes()
    if row.get("labels") is not None:
        data += np.asarray(_as_list(row["labels"]), dtype="<i4").tobytes()
    return hashlib.sha256(data).hexdigest()


def scan_dataset(dataset: Any, id_column: str) -> tuple[list[int], list[str], int | None]:
    """(sample ids, fingerprints, longest input_ids or None) of a map-style training set."""
    if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise UnsupportedError("LMCleanCallback needs a map-style train_dataset (len() and [i]) whose rows carry "
                               f"the {id_column!r} column; iterable datasets are not supported")
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list):  # a datasets.Dataset: read whole columns, not row by row
        if id_column not in columns:
            raise DataError(f"train_dataset has no {id_column!r} column (columns: {', '.join(columns)})")
        cols = {c: list(dataset[c]) for c in (id_column, "input_ids", "labels") if c in columns}
        rows: list[Mapping[str, Any]] = [{c: v[k] for c, v in cols.items()} for k in range(len(dataset))]
        if "input_ids" not in cols:
            rows = [dataset[k] for k in range(len(dataset))]
    else:
        rows = [dataset[k] for k in range(len(dataset))]
    ids, fps, longest = [], [], None
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping) or id_column not in row:
            raise DataError(f"train_dataset row {k} has no {id_column!r} field; give every sample an integer id")
        try:
            ids.append(int(row[id_column]))
        except (TypeError, ValueError):
            raise DataError(f"train_dataset row {k}: {id_column!r} = {row[id_column]!r} is not an integer") from None
        fps.append(sample_fingerprint(row, id_column))
        if row.get("input_ids") is not None:
            longest = max(longest or 0, len(_as_list(row["input_ids"])))
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dup = next(i for i in ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise DataError(f"train_dataset has sample id {dup} more than once; ids must be unique")
    return ids, fps, longest


def zero_loss(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """0, connected to every trainable parameter (a micro-batch whose rows are all excluded)."""
    return sum(p.reshape(-1)[:1].sum() for p in params) * 0.0  # type: ignore[return-value]


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_base_model", None)  # PEFT
    return get() if callable(get) else model


def base_config(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(base_model(model), "config", None)
    return config.to_dict() if config is not None else {}


def save_steps(args: Any, state: Any) -> list[int]:
    """The steps the Trainer saves a checkpoint at: the store checkpoints them too, so that
    `resume_from_checkpoint` can reopen it there."""
    every = int(getattr(state, "save_steps", 0) or 0)
    strategy = getattr(args, "save_strategy", "no")
    if getattr(strategy, "value", strategy) != "steps" or every <= 0:
        return []
    return list(range(every, int(state.max_steps) + 1, every))


def pretrained_dir(model: torch.nn.Module) -> Path | None:
    """The local directory the model was loaded from (the audit's model_digest_before), if any."""
    name = getattr(getattr(base_model(model), "config", None), "_name_or_path", "") or ""
    path = Path(name)
    return path if name and path.is_dir() and any(path.glob("*.safetensors")) else None
