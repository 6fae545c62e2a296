"""The layout of a new store: every array `record` will fill, created empty before the first step.

Apart from the writer (writer.py) because it runs once, before the writer thread exists: it decides
each array's shape, chunking, codec and fill sentinel (format.py), and the writer only fills rows.
`COMMIT.json` (0 committed steps) is written last, after every array exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lmclean.errors import StoreExistsError
from lmclean.store import format as fmt
from lmclean.store.atomic import atomic_write_json
from lmclean.store.retention import keep_steps_of

__all__ = ["create_layout"]


def create_layout(path: Path, meta: dict[str, Any], P: int, T: int, B: int, L: int, K: int,
                  state_names: list[str], sample_ids: np.ndarray, fingerprints: np.ndarray) -> None:
    """Create every array of a new store (no chunks yet: unwritten rows read as fill sentinels)."""
    precision, codec = meta["precision"], meta["codec"]
    if (path / "zarr.json").exists():
        raise StoreExistsError(f"store {path} already exists; pass --resume to continue it or --overwrite to replace it")
    # "a", not "w-": an emptied store directory still holds the lock of the `record --overwrite` creating it
    root = zarr.open_group(str(path), mode="a", zarr_format=3)
    flat = {"chunk_key_encoding": fmt.FLAT_KEYS}
    R = min(fmt.BLOCK_ROWS, max(T, 1))  # rows per chunk of the block arrays
    steps = root.create_group("steps")
    for name in fmt.STEP_SCALARS:
        steps.create_array(name, shape=(T,), chunks=(R,), dtype="float64", fill_value=np.nan, compressors=fmt.INT_CODEC, **flat)
    gdtype, gfill = fmt.grad_dtype(precision)
    S = fmt.grad_shard_rows(P, np.dtype(gdtype).itemsize, max(T, 1))
    keep = keep_steps_of(meta)
    if keep:  # a window drops whole shard files: smaller shards keep the window tighter
        S = max(1, min(S, -(-keep // 4)))
    if meta.get("gradients", "stored") != "recompute":  # recompute: no gradient rows at all (reader.py)
        W = -(-P // max(1, int(meta.get("grad_columns", 1))))  # torchrun: one column chunk (slice of P) per rank
        steps.create_array("grad", shape=(T, P), chunks=(S, W), dtype=gdtype, fill_value=gfill,
                           serializer=fmt.grad_serializer(precision, codec, W), compressors=None, **flat)
        if precision == "int8":  # the per-block scales, sharded as the rows they scale
            nb = fmt.quant_blocks(P)
            steps.create_array("grad_scale", shape=(T, nb), chunks=(S, nb), dtype="float32", fill_value=np.nan,
                               serializer=fmt.grad_serializer("fp32", "none", nb), compressors=None, **flat)
    steps.create_array("sample_ids", shape=(T, B), chunks=(R, B), dtype="int64", fill_value=fmt.MISSING_INT,
                       compressors=fmt.INT_CODEC, **flat)
    steps.create_array("weights", shape=(T, B), chunks=(R, B), dtype="float64", fill_value=np.nan,
                       compressors=fmt.INT_CODEC, **flat)
    steps.create_array("lengths", shape=(T, B), chunks=(R, B), dtype="int32", fill_value=fmt.MISSING_INT,
                       compressors=fmt.INT_CODEC, **flat)
    if meta.get("micro_batches"):
        for name in fmt.MICRO_ARRAYS:
            steps.create_array(name, shape=(T, B), chunks=(R, B), dtype="int32", fill_value=fmt.MISSING_INT,
                               compressors=fmt.INT_CODEC, **flat)
    steps.create_array("tokens", shape=(T, B, L), chunks=(min(fmt.TOKEN_ROWS, max(T, 1)), B, L), dtype="int32",
                       fill_value=fmt.MISSING_INT, compressors=fmt.INT_CODEC, **flat)
    ck = root.create_group("checkpoints")
    ck.create_array("step", shape=(K,), chunks=(1,), dtype="int64", fill_value=fmt.MISSING_INT,
                    compressors=fmt.RAW_CODEC, **flat)
    for name in ["theta", *state_names]:
        ck.create_array(name, shape=(K, P), chunks=(1, P), dtype="float32", fill_value=np.nan,
                        compressors=fmt.grad_codec("fp32", "auto"), **flat)
    samples = root.create_group("samples")
    N = len(sample_ids)
    samples.create_array("id", shape=(N,), chunks=(max(N, 1),), dtype="int64", compressors=fmt.INT_CODEC)[:] = sample_ids
    samples.create_array("fingerprint", shape=(N, 32), chunks=(max(N, 1), 32), dtype="uint8",
                         compressors=fmt.RAW_CODEC)[:] = fingerprints
    root.attrs[fmt.META_KEY] = meta
    atomic_write_json(path / fmt.COMMIT_FILE, {"committed_steps": 0, "checkpoints": [], "closed": False})
