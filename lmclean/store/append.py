"""Append samples to a store's samples table (`lmclean record --continue --data`), crash-safely.

`samples/id`, `samples/fingerprint` (and `samples/tombstone`, if any) are single-chunk arrays whose
lengths must agree, so they cannot grow one file at a time. The grown table is built whole in a
staging group `STORE/.samples-grown/` (ids and fingerprints, every file fsynced), the metadata then
lists the new data segment (`data_segments`, lmclean/store/grow.py: the commit point), and the
staging group is switched in for `samples/` with one atomic directory exchange (Linux
`renameat2(RENAME_EXCHANGE)`; elsewhere two renames, `samples/` → `.samples-old/` and the staging
group → `samples/`). The tombstones are copied into the staging group right before the switch, so
a scrub between staging and switch is never lost.

`finish_pending_growth` makes any interrupted state whole (every command that trains on the store
calls it under the lock): a staging group that the metadata's segment counts expect is switched
in; one they do not expect (a crash before the metadata write) is removed, as is the old table.
Until the switch the store is consistent with its old table: no committed step holds a new sample.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lmclean._faults import crash_point
from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.atomic import atomic_write_bytes, exchange_dirs, fsync_dir
from lmclean.store.codec import array_codec

__all__ = ["STAGING", "expected_samples", "finish_pending_growth", "stage_samples"]

SAMPLES = "samples"
STAGING = ".samples-grown"
OLD = ".samples-old"
TOMBSTONE = "tombstone"
LIVE = -1  # lmclean/store/scrub.py: the tombstone of a sample never removed


def expected_samples(meta: dict[str, Any]) -> int | None:
    """Rows the samples table must have by the metadata's data segments (None: not recorded)."""
    segments = meta.get("data_segments") or []
    return sum(int(s["samples"]) for s in segments) if segments else None


def _open(path: Path) -> Any:
    try:
        return zarr.open_array(str(path), mode="r")
    except Exception as exc:  # zarr raises many types for missing or broken metadata
        raise StoreError(f"array {path} is missing or unreadable ({exc}); the store is damaged") from exc


def _read(path: Path) -> np.ndarray:
    """All rows of a single-chunk array, checksum verified (lmclean/store/codec.py)."""
    arr = _open(path)
    if int(arr.metadata.chunk_grid.chunk_shape[0]) < arr.shape[0]:
        raise StoreError(f"array {path} has {arr.shape[0]} rows in chunks of "
                         f"{arr.metadata.chunk_grid.chunk_shape[0]}; lmclean writes the samples table as one chunk")
    codec = array_codec(arr)
    try:
        data = (path / arr.metadata.encode_chunk_key((0,) * arr.ndim)).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"array {path} has no chunk file; the store is damaged") from None
    return codec.decode(data, f"array {path}")[: arr.shape[0]]


def _write_array(src: Path, dst: Path, values: np.ndarray) -> None:
    """`dst` = array `src`'s metadata (codecs, attributes) with `values` as its one chunk: chunk
    file first, zarr.json last (the array appears only with its data in place), each fsynced."""
    meta = json.loads((src / "zarr.json").read_text())
    meta["shape"] = list(values.shape)
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [max(values.shape[0], 1), *values.shape[1:]]
    dst.mkdir(parents=True, exist_ok=True)
    raw = (json.dumps(meta, indent=2) + "\n").encode()
    from zarr.core.buffer import cpu
    from zarr.storage import MemoryStore

    arr = zarr.open_array(store=MemoryStore({"zarr.json": cpu.Buffer.from_bytes(raw)}), mode="r")
    chunk = dst / arr.metadata.encode_chunk_key((0,) * arr.ndim)
    chunk.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(chunk, array_codec(arr).encode(values))
    atomic_write_bytes(dst / "zarr.json", raw)


def stage_samples(store: Path, ids: np.ndarray, fingerprints: np.ndarray) -> int:
    """Build `STORE/.samples-grown/`: the table with `ids` (n,) int64 and `fingerprints` (n, 32)
    uint8 appended, durable before this returns. Returns the grown table's length."""
    store = Path(store)
    cur = store / SAMPLES
    old_ids, old_fps = _read(cur / "id"), _read(cur / "fingerprint")
    staged = store / STAGING
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    _write_array(cur / "id", staged / "id", np.concatenate([old_ids, ids.astype(old_ids.dtype)]))
    _write_array(cur / "fingerprint", staged / "fingerprint",
                 np.concatenate([old_fps, fingerprints.astype(old_fps.dtype).reshape(-1, old_fps.shape[1])]))
    atomic_write_bytes(staged / "zarr.json", (cur / "zarr.json").read_bytes())
    fsync_dir(store)
    return len(old_ids) + len(ids)


def _rows(group: Path) -> int | None:
    try:
        return int(json.loads((group / "id" / "zarr.json").read_text())["shape"][0])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise StoreError(f"array {group / 'id'} has unreadable metadata ({exc}); the store is damaged") from exc


def finish_pending_growth(store: Path | str) -> str | None:
    """Finish (or clean up after) an interrupted growth of the samples table (module docstring);
    the caller holds the store's lock. Returns what was done, None when nothing was pending."""
    store = Path(store)
    staged, cur, old = store / STAGING, store / SAMPLES, store / OLD
    if not staged.exists() and not old.exists():
        return None
    meta = json.loads((store / "zarr.json").read_text())["attributes"][fmt.META_KEY]
    want = expected_samples(meta)
    have = _rows(cur)
    ready = _rows(staged) if (staged / "zarr.json").is_file() else None  # the group's zarr.json is staged last
    if have is None and (want is None or ready != want):
        raise StoreError(f"store {store} has no samples table and no complete grown one; the store is damaged "
                         f"(restore it from a backup)")
    if have == want or want is None or ready != want:
        # done already (the exchanged old table or the old copy is left), or staged before a crash
        # that came before the metadata write: the metadata does not expect these rows
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(store)
        return "removed an unused samples table left by an interrupted `record --continue --data`"
    if have is not None:
        _copy_tombstones(cur, staged)
    crash_point("grow:before-samples-switch")
    _switch(store, staged, cur, old)
    return f"switched in the grown samples table of {store} ({want} samples)"


def _copy_tombstones(cur: Path, staged: Path) -> None:
    """The current tombstones, extended with live rows, into the staged group (idempotent)."""
    if not (cur / TOMBSTONE / "zarr.json").is_file():
        shutil.rmtree(staged / TOMBSTONE, ignore_errors=True)
        return
    values = _read(cur / TOMBSTONE).astype(np.int64)
    n = _rows(staged) or 0
    if len(values) > n:
        raise StoreError(f"{cur / TOMBSTONE} has {len(values)} rows, more than the grown table's {n}; the store is "
                         "damaged")
    _write_array(cur / TOMBSTONE, staged / TOMBSTONE, np.concatenate([values, np.full(n - len(values), LIVE)]))
    fsync_dir(staged)


def _switch(store: Path, staged: Path, cur: Path, old: Path) -> None:
    if cur.exists() and _exchange(cur, staged):
        fsync_dir(store)
        crash_point("grow:after-samples-switch")
        shutil.rmtree(staged, ignore_errors=True)  # now the old table
    else:
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)  # a leftover: the current table is `cur`
            os.rename(cur, old)
            fsync_dir(store)
            crash_point("grow:between-samples-renames")
        os.rename(staged, cur)
        fsync_dir(store)
        crash_point("grow:after-samples-switch")
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(store)




_exchange = exchange_dirs  # module-level name: tests replace it to reach the two-rename path

