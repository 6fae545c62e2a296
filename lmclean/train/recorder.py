"""The Recorder API: record any training loop's trajectory into a store.

Call `record_step` after backward and before the optimizer update of each step. The built-in
trainer uses exactly this class; users with their own loop can too (see docs/recorder.md).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmclean
from lmclean.errors import DataError, ModelMismatchError, StoreError, StoreExistsError
from lmclean.store import format as fmt
from lmclean.store.reader import TrajectoryStore
from lmclean.store.corrections import CorrectionRow
from lmclean.store.layout import create_layout
from lmclean.store.writer import CheckpointRow, StepRow, StoreWriter, store_size_bytes
from lmclean.params import ParamManifest, flat_grads, flat_params
from lmclean.optim import UpdateRule, rule_from_dict, rule_to_dict


def checkpoint_plan(planned_steps: int, every: int) -> list[int]:
    """Steps whose θ (before the step) is checkpointed: 0, C, 2C, … and the final θ at T."""
    return sorted(set(range(0, planned_steps, every)) | {planned_steps})


@dataclass
class RecordStats:
    steps: int
    bytes_on_disk: int
    bytes_raw_grads: int
    grad_bytes_on_disk: int
    writer_cpu_seconds: float = 0.0


class Recorder:
    def __init__(self, path: Path, meta: dict[str, Any], writer: StoreWriter) -> None:
        self.path = Path(path)
        self.meta = meta
        self.writer = writer
        self.plan = list(meta["checkpoint_plan"])
        self.precision = meta["precision"]
        self.recompute = meta.get("gradients", "stored") == "recompute"  # no gradient rows are written
        self._saved: set[int] = set()
        self._next_correction = 1 + max((e["index"] for e in writer.corrections), default=-1)

    @classmethod
    def create(cls, path: Path | str, *, manifest: ParamManifest, rule: UpdateRule, planned_steps: int,
               batch_size: int, max_length: int, checkpoint_every: int, sample_ids: list[int],
               fingerprints: list[str], precision: str = "fp32", codec: str = "auto",
               config: dict[str, Any] | None = None, model_config: dict[str, Any] | None = None,
               tokenizer: str = "external", pad_id: int = 0, excluded_ids: list[int] | None = None,
               overwrite: bool = False, queue_size: int = 8, extra: dict[str, Any] | None = None,
               max_grad_norm: float | None = None, label_mask: bool = False,
               extra_checkpoints: list[int] | None = None, micro_batches: bool = False,
               gradients: str = "stored") -> "Recorder":
        """A new store. `max_grad_norm`: the run clips gradients to this norm (record_step gets the
        clipped gradient and the factor); `label_mask`: batches carry a loss mask (record_step's
        `loss_mask`); `extra_checkpoints`: steps checkpointed besides every `checkpoint_every`
        (e.g. where a Trainer saves, so its resume can reopen the store there); `micro_batches`:
        record_step gets each row's micro-batch index and padded width (gradient accumulation);
        `gradients`: "stored" writes every step's gradient row, "recompute" none (θ[t] is rebuilt by
        recomputing them from the stored batches: docs/store-format.md)."""
        if gradients not in ("stored", "recompute"):
            raise DataError(f"gradients={gradients!r} is not a storage mode; use 'stored' or 'recompute'")
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise StoreExistsError(f"store {path} already exists; pass --resume to continue it or --overwrite to replace it")
            if (path / "zarr.json").exists() or not any(path.iterdir()):
                _clear_store(path)
            else:
                raise StoreExistsError(f"{path} exists and is not an lmclean store; refusing to overwrite it")
        plan = sorted(set(checkpoint_plan(planned_steps, checkpoint_every))
                      | {s for s in (extra_checkpoints or []) if 0 <= s <= planned_steps})
        meta = {
            "format_version": fmt.FORMAT_VERSION,
            "lmclean_version": lmclean.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config or {},
            "model_config": model_config or {},
            "manifest": manifest.to_list(),
            "param_count": manifest.size,
            "optimizer": rule_to_dict(rule),
            "schedule": (config or {}).get("train", {}).get("schedule", "external"),
            "tokenizer": tokenizer,
            "pad_id": pad_id,
            "planned_steps": planned_steps,
            "batch_size": batch_size,
            "max_length": max_length,
            "checkpoint_every": checkpoint_every,
            "checkpoint_plan": plan,
            "precision": precision,
            "codec": codec,
            "excluded_ids": sorted(excluded_ids or []),
            "loss": "sum_i w_i * mean token cross-entropy of sample i (weights fixed per step)",
            "max_grad_norm": float(max_grad_norm) if max_grad_norm else None,
            "label_mask": bool(label_mask),
            "micro_batches": bool(micro_batches),
            "gradients": gradients,
            **(extra or {}),
        }
        fps = np.array([np.frombuffer(bytes.fromhex(f), dtype=np.uint8) for f in fingerprints], dtype=np.uint8).reshape(-1, 32)
        state_names = rule.state_names() if hasattr(rule, "state_names") else []
        create_layout(path, meta, manifest.size, planned_steps, batch_size, max_length, len(plan),
                      state_names, np.asarray(sample_ids, dtype=np.int64), fps)
        return cls(path, meta, StoreWriter(path, queue_size=queue_size))

    @classmethod
    def reopen(cls, path: Path | str, restart_step: int, queue_size: int = 8) -> "Recorder":
        """Reopen a store to rewrite it from `restart_step` (a committed checkpoint) on."""
        store = TrajectoryStore(path)
        kept = [s for s in store.checkpoint_steps if s <= restart_step]
        events = [e for e in store.commit_state()["corrections"] if e["step"] <= restart_step]
        writer = StoreWriter(store.path, queue_size=queue_size, committed_steps=restart_step, checkpoints=kept,
                             corrections=events)
        writer.commit_now()  # steps (and correction events) past the checkpoint are no longer committed
        rec = cls(store.path, store.meta, writer)
        rec._saved = set(kept)  # committed checkpoints are never rewritten (a crash could tear them)
        return rec

    def needs_checkpoint(self, step: int) -> bool:
        return step in self.plan

    def checkpoint(self, step: int, theta: torch.Tensor, opt_state: dict[str, torch.Tensor]) -> None:
        """Save θ[step] and the optimizer state before step `step` (copies; training may go on)."""
        if step in self._saved:
            return
        self._saved.add(step)
        self.writer.put(CheckpointRow(
            index=self.plan.index(step), step=step, theta=theta.detach().float().cpu().numpy().copy(),
            state={k: v.detach().float().cpu().numpy().copy() for k, v in opt_state.items()}))

    def correct(self, step: int, delta: torch.Tensor, state_delta: dict[str, torch.Tensor] | None = None,
                request_id: str | None = None, method: str | None = None, *, theta: torch.Tensor | None = None,
                opt_state: dict[str, torch.Tensor] | None = None) -> int:
        """Record a correction event (returns its index): the run's θ jumps by `delta` (P,) and each optimizer buffer by
        its `state_delta` right before step `step`'s gradient is computed (call before
        `record_step(step)`; the caller applies the jump with lmclean.store.corrections.apply_correction,
        the same arithmetic replay uses). The event is listed in COMMIT.json once its arrays are on
        disk. On a checkpoint step not yet saved, pass the pre-jump `theta`/`opt_state`: checkpoints
        hold θ before the jump."""
        P = int(self.meta["param_count"])
        if delta.numel() != P:
            raise ModelMismatchError(f"correction at step {step}: Δθ has {delta.numel()} entries, the manifest {P}")
        names = set(self.rule.state_names())
        unknown = sorted(set(state_delta or {}) - names)
        if unknown:
            raise ModelMismatchError(f"correction at step {step}: optimizer buffer {unknown[0]!r} is not one of the "
                                     f"store's ({sorted(names)})")
        if self.needs_checkpoint(step) and step not in self._saved:
            if theta is None:
                raise ValueError(f"step {step} is a checkpoint step: pass the pre-jump theta and opt_state to correct()")
            self.checkpoint(step, theta, opt_state or {})

        def host(x: torch.Tensor) -> np.ndarray:
            return x.detach().reshape(-1).float().cpu().numpy().copy()

        self.writer.put(CorrectionRow(self._next_correction, int(step), host(delta),
                                      {k: host(v) for k, v in (state_delta or {}).items()}, request_id, method))
        self._next_correction += 1
        return self._next_correction - 1

    def record_step(self, step: int, *, lr: float, loss: float, sample_ids: list[int] | np.ndarray,
                    weights: list[float] | np.ndarray | torch.Tensor, input_ids: torch.Tensor,
                    lengths: torch.Tensor, grad: torch.Tensor | None, theta: torch.Tensor | None = None,
                    opt_state: dict[str, torch.Tensor] | None = None, loss_mask: torch.Tensor | None = None,
                    grad_norm: float | None = None, clip: float = 1.0, micro: list[int] | None = None,
                    widths: list[int] | None = None) -> None:
        """Record step `step`: call after backward (and clipping), before the update. `grad` is the
        flat batch gradient the optimizer applies (P,), `grad_norm` its norm before clipping and
        `clip` the factor it was scaled by; `loss_mask` (b, L) marks the positions that are loss
        targets (stores created with label_mask); `micro`/`widths` (b,) each row's micro-batch index
        and that micro-batch's padded width (stores created with micro_batches). `theta`/`opt_state` are needed on checkpoint steps
        (see needs_checkpoint). The gradient is copied into one of the writer's recycled buffers:
        the caller may reuse `grad` at once."""
        w = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
        b = len(sample_ids)
        if not (len(w) == b == input_ids.shape[0] == lengths.shape[0]):
            raise DataError(f"step {step}: {b} sample ids, {len(w)} weights, {input_ids.shape[0]} token rows and "
                            f"{lengths.shape[0]} lengths; they must match")
        if b > self.meta["batch_size"] or (b and input_ids.shape[1] > self.meta["max_length"]):
            raise DataError(f"step {step}: batch {tuple(input_ids.shape)} exceeds the store's batch_size "
                            f"{self.meta['batch_size']} x max_length {self.meta['max_length']}")
        if grad is None and not self.recompute:
            raise DataError(f"step {step}: store {self.path} records gradient rows (gradients: stored); pass grad")
        if grad is not None and grad.numel() != self.meta["param_count"]:
            raise ModelMismatchError(f"step {step}: gradient has {grad.numel()} entries, the manifest {self.meta['param_count']}")
        if self.needs_checkpoint(step):
            if theta is None:
                raise ValueError(f"step {step} is a checkpoint step: pass theta and opt_state")
            self.checkpoint(step, theta, opt_state or {})
        if clip != 1.0 and not self.meta.get("max_grad_norm"):
            raise DataError(f"step {step}: clip factor {clip:g} but the store was created without max_grad_norm")
        tokens = input_ids.detach().cpu().to(torch.int32)
        if self.meta.get("label_mask"):
            if loss_mask is None or tuple(loss_mask.shape) != tuple(input_ids.shape):
                raise DataError(f"step {step}: the store records label masks: pass loss_mask of shape {tuple(input_ids.shape)}")
            tokens = torch.where(loss_mask.detach().cpu().bool(), tokens, -tokens - 1)  # non-targets as −(id + 1)
        elif loss_mask is not None and not bool(loss_mask.all()):
            raise DataError(f"step {step}: a loss mask was given but the store was created without label_mask=True")
        if self.recompute:  # nothing of the gradient is kept but its norm (g may be None when grad_norm is given)
            norm = float(grad_norm) if grad_norm is not None else float(torch.linalg.vector_norm(grad.detach()))
            self.writer.put(self._row(step, lr, loss, None, norm, clip, micro, widths, sample_ids, w, tokens, lengths))
            return
        g = grad.detach().reshape(-1)
        copied = None
        if g.device.type == "cuda":  # into a pinned staging buffer, asynchronously: it overlaps the wait for a writer buffer
            staging = getattr(self, "_staging", None)
            if staging is None or staging.numel() != g.numel() or staging.dtype != g.dtype:
                staging = self._staging = torch.empty(g.numel(), dtype=g.dtype, pin_memory=True)
            staging.copy_(g, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(g.device))
            g = staging
        elif g.device.type != "cpu":
            g = g.to("cpu")
        stored = self.writer.grad_buffer()  # (P,) recycled: cheaper than a fresh buffer per step
        if copied is not None:
            copied.synchronize()  # the staged gradient is complete before the CPU reads it
        # torch work stays on this thread: torch (or BLAS) calls on the writer thread would compete
        # with training for the cores (see lmclean/store/writer.py)
        norm = float(torch.linalg.vector_norm(g)) if grad_norm is None else float(grad_norm)  # fp32 accumulation: rel. error ~1e-7
        if self.precision == "bf16":
            torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16).copy_(g)  # rounds to nearest even
        else:
            torch.from_numpy(stored).copy_(g)
        self.writer.put(self._row(step, lr, loss, stored, norm, clip, micro, widths, sample_ids, w, tokens, lengths))

    @staticmethod
    def _row(step: int, lr: float, loss: float, stored: np.ndarray | None, norm: float, clip: float,
             micro: list[int] | None, widths: list[int] | None, sample_ids: list[int] | np.ndarray, w: np.ndarray,
             tokens: torch.Tensor, lengths: torch.Tensor) -> StepRow:
        return StepRow(
            step=step, lr=float(lr), loss=float(loss), grad=stored, grad_norm=norm, pooled=stored is not None,
            clip=float(clip), micro=None if micro is None else np.asarray(micro, dtype=np.int32),
            width=None if widths is None else np.asarray(widths, dtype=np.int32),
            sample_ids=np.asarray(sample_ids, dtype=np.int64), weights=w.astype(np.float64),
            tokens=tokens.numpy(), lengths=lengths.detach().cpu().numpy().astype(np.int32))

    def close(self, final_step: int, theta: torch.Tensor, opt_state: dict[str, torch.Tensor],
              before_closed: Callable[[], None] | None = None) -> RecordStats:
        """Checkpoint the final θ, flush and verify the writes, run `before_closed` (e.g. save the
        final model), then mark the store closed."""
        if self.needs_checkpoint(final_step):
            self.checkpoint(final_step, theta, opt_state)
        self.writer.close()
        committed = self.writer.committed_steps
        if committed != final_step:
            raise StoreError(f"store {self.path}: {committed} steps committed at close, expected {final_step}; "
                             "every step 0..final_step-1 must be recorded once, in order")
        self.writer.verify()
        if before_closed is not None:
            before_closed()
        self.writer.mark_closed()
        return RecordStats(
            steps=committed, bytes_on_disk=store_size_bytes(self.path),
            bytes_raw_grads=committed * int(self.meta["param_count"]) * 4,
            grad_bytes_on_disk=store_size_bytes(self.path, "steps/grad") + store_size_bytes(self.path, "steps/grad_scale"),
            writer_cpu_seconds=self.writer.cpu_seconds)

    def abort(self) -> None:
        """Write and commit what is queued, then stop (the store stays resumable)."""
        self.writer.abort()

    # -- helpers for a plain torch loop (see docs/recorder.md) --------------------------------
    def record_torch_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                          loss: float | torch.Tensor, sample_ids: list[int] | np.ndarray,
                          weights: list[float] | np.ndarray | torch.Tensor, input_ids: torch.Tensor,
                          lengths: torch.Tensor, loss_mask: torch.Tensor | None = None,
                          grad_norm: float | None = None, clip: float = 1.0, micro: list[int] | None = None,
                    widths: list[int] | None = None) -> None:
        """`record_step` for a model whose `.grad`s are filled (clipped, if the run clips): reads the
        lr from the optimizer, flattens the gradients in manifest order, and on checkpoint steps θ
        and the optimizer state."""
        manifest = ParamManifest.from_list(self.meta["manifest"])
        ck = self.needs_checkpoint(step)
        self.record_step(step, lr=float(optimizer.param_groups[0]["lr"]),
                         loss=float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss), sample_ids=sample_ids,
                         weights=weights, input_ids=input_ids, lengths=lengths, grad=flat_grads(model, manifest),
                         loss_mask=loss_mask, grad_norm=grad_norm, clip=clip,
                         theta=flat_params(model, manifest) if ck else None,
                         opt_state=torch_optimizer_state(optimizer, model, manifest, self.rule) if ck else None)

    def close_torch(self, final_step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> RecordStats:
        """`close` for a plain torch loop: checkpoints the model's final θ and the optimizer state."""
        manifest = ParamManifest.from_list(self.meta["manifest"])
        return self.close(final_step, flat_params(model, manifest), torch_optimizer_state(optimizer, model, manifest, self.rule))

    @property
    def rule(self) -> UpdateRule:
        return rule_from_dict(self.meta["optimizer"])


def torch_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, manifest: ParamManifest,
                          rule: UpdateRule) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat (P,) vectors in manifest order (zeros where unset)."""
    params = dict(model.named_parameters())
    out = {}
    for name in rule.state_names():
        parts = []
        for e in manifest.entries:
            value = optimizer.state.get(params[e.name], {}).get(name)
            parts.append(torch.zeros(e.numel) if value is None else value.detach().reshape(-1).float().cpu())
        out[name] = torch.cat(parts)
    return out


def _clear_store(path: Path) -> None:
    """Empty a store directory in place for --overwrite, keeping the lock file the caller holds."""
    from lmclean.store.lock import LOCK_FILENAME

    for entry in path.iterdir():
        if entry.name == LOCK_FILENAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
