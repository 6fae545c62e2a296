"""`lmclean record --store S --continue`: train a complete store on, from its current model.

The store's current model (lmclean/audit/history.py: the latest unlearning's output, or the
recorded final model) is where training goes on, with the optimizer state that belongs to it
(the recorded final state plus the output's `optimizer_delta.safetensors`). The jump from the
recorded θ[T] to it is recorded as a correction event at step T (lmclean/store/corrections.py), so
the store still replays exactly; the store grows (lmclean/store/grow.py) and the new steps are
trained by the built-in trainer's resume path, with every forgotten sample dropped from the planned
batches (weights unchanged: fixed denominators). The order of the writes makes every crash point
recoverable with `lmclean record --resume`: event, then growth, then training (docs/recorder.md).

With `data` (more samples, JSON Lines read with the store's data config), the samples are appended
to the store's samples table as the store grows (lmclean/store/append.py), the metadata's
`data_segments` list every data file with the step it is first trained at, and the new steps draw
from the union (lmclean/train/data.py segmented_plan: from the continue on, each epoch permutes the
old and new samples together). An id the store already holds is refused before anything is written.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lmclean._faults import crash_point
from lmclean.errors import ConfigError, DataError, InputNotFoundError, StoreError
from lmclean.store.reader import TrajectoryStore
from lmclean.train.trainer import StartCallback, StepCallback, TrainResult, stored_config

__all__ = ["continue_training", "continued_config"]


def continued_config(config: dict[str, Any], old_steps: int, n_samples: int, epochs: int | None,
                     steps: int | None, new_data: bool = False) -> tuple[dict[str, Any], int]:
    """The stored config with `epochs` more passes (or `steps` more steps), and the new step count.

    Batch order of epoch e is seeded by (seed, e) alone (lmclean/train/data.py batch_plan), so the
    longer plan starts with the recorded one: an epochs-config gains epochs, any other a step count
    (as does every continue with `new_data`: its epochs, over `n_samples`, start at the continue)."""
    if (epochs is None) == (steps is None):
        raise ConfigError("--continue needs exactly one of --epochs N or --steps N (how much longer to train)")
    more = epochs if epochs is not None else steps
    if more is None or more < 1:
        raise ConfigError(f"--{'epochs' if epochs is not None else 'steps'} {more} must be >= 1 with --continue")
    cfg = copy.deepcopy(config)
    train = cfg.setdefault("train", {})
    per_epoch = math.ceil(n_samples / int(train.get("batch_size") or 1))
    whole_epochs = train.get("steps") is None and old_steps == int(train.get("epochs") or 0) * per_epoch
    if epochs is not None and not new_data and whole_epochs:
        train["epochs"] = int(train["epochs"]) + epochs
        return cfg, old_steps + epochs * per_epoch
    total = old_steps + (epochs * per_epoch if epochs is not None else int(steps or 0))
    train["steps"] = total
    return cfg, total


def continue_training(store: Path | str, *, epochs: int | None = None, steps: int | None = None,
                      data: Path | None = None, on_step: StepCallback | None = None,
                      on_start: StartCallback | None = None) -> tuple[TrainResult, dict[str, Any]]:
    """Train the complete store at `store` on (see the module docstring), holding its lock; append
    the audit "continue" record. Returns the training result and a summary of the jump."""
    from lmclean.audit import record_event
    from lmclean.audit.recovery import finish_interrupted
    from lmclean.audit.history import load_history
    from lmclean.device import deterministic, resolve_device
    from lmclean.store.lock import StoreLock
    from lmclean.train.trainer import _train

    store = Path(store)
    TrajectoryStore(store)  # "no lmclean store at ..." first
    began = time.perf_counter()
    from lmclean.store.swap import finish_pending_swap

    finish_pending_swap(store)  # a reconcile interrupted after its commit point
    with StoreLock(store, "record --continue"):
        finish_interrupted(store)
        existing = TrajectoryStore(store)
        if not existing.closed:
            raise StoreError(f"store {store} is incomplete ({existing.committed_steps}/{existing.planned_steps} "
                             f"steps); finish it with `lmclean record --store {store} --resume` first")
        old_T = existing.committed_steps
        added = _new_samples(existing, Path(data), old_T) if data is not None else None  # refusals first
        history = load_history(store)
        current, _ = history.require_current()
        jump = _record_jump(existing, current, history)
        n_samples = len(existing.sample_fingerprints) + (len(added["ids"]) if added else 0)
        cfg_dict, total = continued_config(existing.meta["config"], old_T, n_samples, epochs, steps, added is not None)
        dropped = sorted(set(existing.meta.get("dropped_ids", [])) | set(history.forgotten_ids))
        from lmclean.store.grow import grow_store

        updates: dict[str, Any] = {"config": cfg_dict, "dropped_ids": dropped}
        if added is not None:
            updates["data_segments"] = added["segments"]
        grow_store(store, total, meta_updates=updates,
                   samples=(added["ids"], added["fingerprints"]) if added is not None else None)
        crash_point("continue:after-grow")
        cfg, base, excluded = stored_config(store)

        def step_hook(t: int, n: int, loss: float, lr: float) -> None:
            if t == old_T + 1:
                crash_point("continue:mid-train")  # steps after the jump are being recorded
            if on_step:
                on_step(t, n, loss, lr)

        with deterministic(resolve_device(cfg.train.device)):
            result = _train(cfg, store, resume=True, exclude=excluded, base=base, on_step=step_hook,
                            on_start=on_start)
        if len(result.run.plan) != total:
            raise StoreError(f"store {store}: the continued plan has {len(result.run.plan)} steps, expected {total}")
        summary = {"from_step": old_T, "steps": total, "model_before": str(current), "dropped_ids": dropped, **jump,
                   "data": None if added is None else {"path": added["segments"][-1]["path"], "first_step": old_T,
                                                       "samples": len(added["ids"])}}
        record_event(store, "continue", cfg, result.steps, result.model_dir, time.perf_counter() - began,
                     start_step=old_T, excluded_ids=excluded, model_before_dir=current,
                     extra={"continue": summary})
    return result, summary


def _new_samples(store: TrajectoryStore, data: Path, first_step: int) -> dict[str, Any]:
    """The samples of `data` read as the store's data config reads its data file: ids (n,) int64,
    fingerprints (n, 32) uint8 and the grown `data_segments`. DataError for an id already recorded."""
    import numpy as np

    from lmclean.train.data import load_dataset, load_tokenizer, resolve_path

    if not data.is_file():
        raise InputNotFoundError(f"--data {data} does not exist; pass a JSON Lines file of new samples")
    cfg, base, _ = stored_config(store.path)
    dataset = load_dataset(replace(cfg.data, path=str(data.absolute())), load_tokenizer(cfg.tokenizer))
    recorded = store.sample_fingerprints
    clash = next((s.id for s in dataset.samples if s.id in recorded), None)
    if clash is not None:
        raise DataError(f"{data}: sample id {clash} is already recorded in store {store.path}; give the new samples "
                        "ids the store has not used (forgotten ones stay used)")
    segments = list(store.meta.get("data_segments") or [
        {"path": str(resolve_path(cfg.data.path, base).absolute()), "first_step": 0, "samples": len(recorded)}])
    segments.append({"path": str(dataset.path), "first_step": first_step, "samples": len(dataset.samples)})
    return {"ids": np.asarray(dataset.ids, dtype=np.int64),
            "fingerprints": np.asarray([list(bytes.fromhex(s.fingerprint)) for s in dataset.samples], dtype=np.uint8),
            "segments": segments}


def _record_jump(store: TrajectoryStore, current: Path, history: Any) -> dict[str, Any]:
    """Record the correction event θ[T] → current model at step T (none when they are equal)."""
    from lmclean.adapters import load_for_store
    from lmclean.params import flat_params
    from lmclean.train.recorder import Recorder
    from lmclean.unlearn.output import load_optimizer_delta
    from lmclean.unlearn.trajectory import recompute_grad

    T = store.committed_steps
    theta_T, state_T = store.theta_at(T, grad=recompute_grad(store))  # after any event already at T (a continue re-run after a crash)
    model = load_for_store(store, current)
    store.manifest.check_model(model, f"model {current}")
    theta_hat = flat_params(model, store.manifest).detach().float().cpu()
    head = history.current
    from_output = head is not None and head.kind == "unlearn" and Path(current) != store.model_dir
    state_delta = (load_optimizer_delta(current) or {}) if from_output else {}
    names = set(store.rule.state_names())
    state_delta = {k: v.float() for k, v in state_delta.items() if k in names}
    if "exp_avg_sq" in state_delta:  # a linearised δs may undershoot 0 where s is tiny: those entries keep s
        s = state_T["exp_avg_sq"]
        d = state_delta["exp_avg_sq"]
        state_delta["exp_avg_sq"] = torch.where(s + d >= 0, d, torch.zeros_like(d))  # as apply_correction
    delta = theta_hat - theta_T
    info: dict[str, Any] = {"correction": None, "delta_norm": float(torch.linalg.vector_norm(delta)),
                            "optimizer_delta": sorted(state_delta)}
    if not bool(torch.any(delta != 0)) and not any(bool(torch.any(v != 0)) for v in state_delta.values()):
        return info  # training goes on from the recorded θ[T]: no jump to record
    rec = Recorder.reopen(store.path, T)
    try:
        rec.correct(T, delta, state_delta, request_id=head.request_id if head else None,
                    method=head.method if head else None)
    finally:
        rec.writer.close()
    info["correction"] = {"step": T, "request_id": head.request_id if head else None,
                          "method": head.method if head else None}
    return info
