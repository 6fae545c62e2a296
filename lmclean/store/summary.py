"""What `inspect-log` reports: plain dicts computed from a store, rendered by the CLI."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmclean.store.reader import TrajectoryStore
from lmclean.store.writer import store_size_bytes

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: np.ndarray, width: int = 48) -> str:
    """Loss curve as block characters, averaged into `width` buckets."""
    values = values[np.isfinite(values)]
    if not len(values):
        return ""
    buckets = np.array_split(values, min(width, len(values)))
    means = np.array([b.mean() for b in buckets])
    lo, hi = means.min(), means.max()
    scale = (means - lo) / (hi - lo) if hi > lo else np.zeros_like(means)
    return "".join(SPARK[int(round(s * (len(SPARK) - 1)))] for s in scale)


def summarize(store: TrajectoryStore) -> dict[str, Any]:
    meta = store.meta
    committed = store.committed_steps
    lrs, losses = store.scalars("lr"), store.scalars("loss")
    ids = store.all_sample_ids()
    n_samples = len(store.sample_fingerprints)
    seen = np.unique(ids[ids >= 0])
    grad_disk = store_size_bytes(store.path, "steps/grad") + store_size_bytes(store.path, "steps/grad_scale")  # int8: + scales
    raw = committed * int(meta["param_count"]) * 4
    model_cfg = meta.get("model_config", {})
    batch = int(meta["batch_size"])
    steps_per_epoch = -(-n_samples // batch) if n_samples else 0
    return {
        "store": str(store.path),
        "format_version": meta["format_version"],
        "lmclean_version": meta["lmclean_version"],
        "created": meta.get("created"),
        "model": {
            "model_type": model_cfg.get("model_type"),
            "hidden_size": model_cfg.get("hidden_size", model_cfg.get("n_embd")),
            "layers": model_cfg.get("num_hidden_layers", model_cfg.get("n_layer")),
            "parameters": int(meta["param_count"]),
            "tensors": len(meta["manifest"]),
            "kind": meta.get("model", {}).get("kind", "full"),  # full, or peft / frozen-base: only the adapter is recorded
            "base": _base_path(store),
        },
        "recorded_params": int(meta["param_count"]),  # the manifest's size: what each step's gradient holds
        "optimizer": meta["optimizer"],
        "schedule": meta.get("schedule"),
        "tokenizer": meta.get("tokenizer"),
        "steps": {"committed": committed, "planned": store.planned_steps, "closed": store.closed,
                  "epochs": round(committed / steps_per_epoch, 2) if steps_per_epoch else None,
                  "batch_size": batch},
        "lr": {"min": float(lrs.min()) if len(lrs) else None, "max": float(lrs.max()) if len(lrs) else None},
        "loss": {"first": float(losses[0]) if len(losses) else None, "last": float(losses[-1]) if len(losses) else None,
                 "sparkline": sparkline(losses)},
        "checkpoints": store.checkpoint_steps,
        # record.keep_steps: gradient rows and θ are kept from retained_from on (None: every step)
        "window": {"keep_steps": store.keep_steps, "retained_from": store.retained_from},
        "samples": {"in_dataset": n_samples, "seen": int(len(seen)), "excluded": len(meta.get("excluded_ids", []))},
        "precision": meta["precision"],
        "gradients": meta.get("gradients", "stored"),  # recompute: no rows, θ rebuilt by recomputing them
        "codec": meta["codec"],
        "bytes": {"on_disk": store_size_bytes(store.path), "gradients_on_disk": grad_disk, "gradients_raw_fp32": raw,
                  "compression_vs_fp32": round(raw / grad_disk, 3) if grad_disk else None,
                  "bytes_per_param_per_step": round(grad_disk / max(1, committed * int(meta["param_count"])), 3)},
    }


def _base_path(store: TrajectoryStore) -> str | None:
    """Where an adapter store's frozen base lives (a relative path is inside the store)."""
    path = (store.meta.get("model") or {}).get("base", {}).get("path")
    return None if path is None else str(store.path / path)


def sample_report(store: TrajectoryStore, sample_id: int) -> dict[str, Any]:
    positions = store.sample_positions(sample_id)
    return {"sample_id": sample_id, "fingerprint": store.sample_fingerprints.get(sample_id),
            "occurrences": [{"step": s, "position": p} for s, p in positions]}


def step_report(store: TrajectoryStore, t: int) -> dict[str, Any]:
    rec = store.step(t)
    return {"step": t, "lr": rec.lr, "loss": rec.loss, "grad_norm": rec.grad_norm,
            "sample_ids": [int(i) for i in rec.sample_ids], "weights": [float(w) for w in rec.weights],
            "tokens": int(rec.lengths.sum())}
