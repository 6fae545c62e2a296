"""Names, dtypes and codecs of the store layout (documented in docs/store-format.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr.codecs as zc

FORMAT_VERSION = 1
META_KEY = "lmclean"
COMMIT_FILE = "COMMIT.json"
MODEL_DIR = "model"

# Sentinels that a never-written chunk reads as, so a missing chunk is detected, never read as zeros.
MISSING_INT = -2
MISSING_BF16 = 0xFFFF  # a bfloat16 NaN


# Arrays under steps/: per-step scalars (float64, (T,)) and the per-step rows.
STEP_SCALARS = ("lr", "loss", "grad_norm")
STEP_ARRAYS = (*STEP_SCALARS, "grad", "sample_ids", "weights", "lengths", "tokens")
# One row per chunk, a new chunk file per step: the gradient.
ROW_ARRAYS = ("grad",)
# BLOCK_ROWS steps per chunk, kept in memory by the writer and rewritten at each commit: small
# rows whose own chunk file per step cost more CPU than encoding and writing the gradient.
BLOCK_ARRAYS = (*STEP_SCALARS, "sample_ids", "weights", "lengths")
BLOCK_ROWS = 256
# The tokens (5 KB a step for the example model) come in blocks of TOKEN_ROWS steps: a file per
# step cost 0.26 ms of writer CPU per step, and a 256-row block (1.3 MB) re-encoded at every commit
# would cost as much. `lmclean audit` scrubs them chunk by chunk (rows per chunk from the metadata).
TOKEN_ROWS = 16


def grad_codec(precision: str, codec: str) -> list[Any]:
    """Compressors of steps/grad (and, with fp32, of the checkpoints).

    auto = blosc lz4 with bit-shuffle: bit-shuffling groups the sign/exponent bits, the part of a
    gradient that compresses; measured on the example model it beats zstd in ratio and speed for
    both fp32 (1.36x vs 1.26x) and bf16 (3.2x vs 2.9x vs raw fp32), see docs/store-format.md.
    clevel 1 encodes 25-30% faster than 5 for 1% less compression: the writer's CPU is what
    recording costs training.
    """
    typesize = 2 if precision == "bf16" else 4
    if codec == "none":
        return []
    if codec == "zstd":
        return [zc.ZstdCodec(level=1)]
    return [zc.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=typesize)]


INT_CODEC = [zc.ZstdCodec(level=3)]

# Chunk keys "c.<t>.0" (one flat directory per array) instead of Zarr's default "c/<t>/0": the
# default creates a directory per step and array, which cost more than writing the chunk itself.
FLAT_KEYS = {"name": "default", "separator": "."}


def grad_dtype(precision: str) -> tuple[str, Any]:
    return ("uint16", MISSING_BF16) if precision == "bf16" else ("float32", np.float32("nan"))


def chunk_codecs(array: Any) -> tuple[np.dtype, list[Any]]:
    """(little-endian dtype, numcodecs bytes->bytes codecs in encode order) of a Zarr v3 array whose
    chunks lmclean reads and writes itself, or StoreError when its pipeline is not bytes(little)
    followed by blosc/zstd.

    The writer encodes and the reader decodes chunk files with these directly: zarr's array API
    costs about a millisecond per call, more than decoding a gradient row."""
    import numcodecs

    from lmclean.errors import StoreError

    codecs = list(array.metadata.codecs)
    first = codecs[0] if codecs else None
    if not isinstance(first, zc.BytesCodec) or (first.endian is not None and first.endian.value != "little"):
        raise StoreError(f"array {array.path}: lmclean reads and writes chunks that start with little-endian bytes")
    out = []
    for codec in codecs[1:]:
        if isinstance(codec, zc.BloscCodec):
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
            out.append(numcodecs.Blosc.from_config({"cname": codec.cname.value, "clevel": codec.clevel,
                                                    "shuffle": shuffle, "blocksize": codec.blocksize,
                                                    "typesize": codec.typesize}))
        elif isinstance(codec, zc.ZstdCodec):
            out.append(numcodecs.Zstd.from_config({"level": codec.level, "checksum": codec.checksum}))
        else:
            raise StoreError(f"array {array.path}: codec {type(codec).__name__} is not one lmclean reads or writes")
    return np.dtype(array.dtype).newbyteorder("<"), out


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via temp file + rename: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
