"""Grow a complete store so that training can go on (`lmclean record --continue`).

Every steps/* array gets more rows (new T), the checkpoint arrays more entries (new plan steps, all
after the old final step, so the rows of existing checkpoints keep their index), and the metadata
its new planned_steps, checkpoint_plan and config. Each zarr.json is replaced atomically
(lmclean/store/atomic.py), in an order where a crash at any point leaves a readable store:
first COMMIT.json says "not closed" (a complete run not yet marked closed: `record --resume`
closes it), then the arrays grow (rows past planned_steps are invisible), then the metadata
changes in one write (from then on `record --resume` trains the new steps).

With new samples (`record --continue --data`) the grown samples table is staged before the first
of these writes and switched in after the metadata write, which lists the new data segment
(lmclean/store/append.py); the metadata write stays the one commit point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmclean._faults import crash_point
from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.append import expected_samples, finish_pending_growth, stage_samples
from lmclean.store.atomic import atomic_write_json
from lmclean.store.reader import TrajectoryStore

__all__ = ["grow_store", "grown_plan"]


def grown_plan(plan: list[int], old_T: int, new_T: int, every: int) -> list[int]:
    """The old plan followed by every `every`-th step in (old_T, new_T) and new_T itself."""
    if any(s > old_T for s in plan):
        raise StoreError(f"checkpoint plan {plan} goes past the recorded {old_T} steps; the store is damaged")
    return sorted(set(plan) | {s for s in range(0, new_T, every) if s > old_T} | {new_T})


def _rewrite_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    atomic_write_json(path, data)


def grow_store(path: Path | str, new_T: int, *, meta_updates: dict[str, Any] | None = None,
               samples: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
    """Grow the closed store at `path` to `new_T` planned steps (the caller holds its lock);
    `meta_updates` (e.g. the new config) land in the same metadata write, and must then list the
    data segments (`data_segments`) that count the grown table when `samples` = (ids (n,), sha256
    fingerprints (n, 32) uint8) are appended. Returns the new plan."""
    finish_pending_growth(path)  # a staging group left by an earlier interrupted growth
    store = TrajectoryStore(path)
    old_T, marker = store.planned_steps, store.commit_state()
    if new_T <= old_T:
        raise StoreError(f"store {store.path} already plans {old_T} steps; growing it needs more than that")
    if marker["committed_steps"] != old_T:
        raise StoreError(f"store {store.path} has {marker['committed_steps']} of {old_T} steps committed; finish it "
                         f"with `lmclean record --store {store.path} --resume` first")
    plan = grown_plan([int(s) for s in store.meta["checkpoint_plan"]], old_T,
                      new_T, int(store.meta["checkpoint_every"]))
    if samples is not None:
        rows = stage_samples(store.path, *samples)
        if rows != expected_samples({**store.meta, **(meta_updates or {})}):
            raise StoreError(f"store {store.path}: the data segments of the growth do not count the {rows} samples "
                             "of the grown table")
        crash_point("grow:after-stage")
    opened = {k: v for k, v in {**marker, "closed": False}.items() if k != "corrections" or v}
    atomic_write_json(store.path / fmt.COMMIT_FILE, opened)
    for name, arr in store.root["steps"].arrays():
        _resize(store.path / "steps" / name, (new_T, *arr.shape[1:]))
    for name, arr in store.root["checkpoints"].arrays():
        _resize(store.path / "checkpoints" / name, (len(plan), *arr.shape[1:]))

    def update(data: dict[str, Any]) -> None:
        meta = data["attributes"][fmt.META_KEY]
        meta.update(meta_updates or {})
        meta.update(planned_steps=new_T, checkpoint_plan=plan)

    _rewrite_json(store.path / "zarr.json", update)
    if samples is not None:
        finish_pending_growth(store.path)
    return plan


def _resize(array_dir: Path, shape: tuple[int, ...]) -> None:
    """A zarr v3 array's shape changed in its zarr.json (growing: no chunk moves or goes)."""

    def update(data: dict[str, Any]) -> None:
        if len(data["shape"]) != len(shape) or any(a > b for a, b in zip(data["shape"], shape)):
            raise StoreError(f"array {array_dir.name}: cannot change shape {data['shape']} to {list(shape)}")
        data["shape"] = list(shape)

    _rewrite_json(array_dir / "zarr.json", update)
