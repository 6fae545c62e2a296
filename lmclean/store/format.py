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
# One row per chunk: the gradient. Its chunks are stored GRAD_SHARD_ROWS to a file (Zarr v3
# sharding, index at the start of the file, no checksum), appended in place by the writer: on the
# ext4 disk of the development machine creating a file costs ~0.4 ms of kernel CPU, more than
# encoding and writing a 131k-parameter gradient row (see lmclean/store/shard.py).
ROW_ARRAYS = ("grad",)
GRAD_SHARD_ROWS = 256
GRAD_SHARD_BYTES = 1 << 30  # fewer rows per shard for large models: a shard holds at most ~1 GiB raw
SHARD_ALIGN = 4096  # shard data offsets and row extents: the O_DIRECT alignment
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

    fp32 gradients are mostly incompressible mantissa bits. What compresses cheaply is the runs of
    exact zeros (embedding rows of tokens absent from the batch: 10-16% of the example models'
    entries, far more with a real vocabulary); bit-shuffling also squeezes the exponent bits, but
    costs about 4x the CPU for 1.16x more. On CPU training the writer's CPU is taken from
    training (docs/store-format.md, "Recording cost"), so:
    - auto: fp32 -> blosc lz4 without shuffle (1.11-1.13x at ~14 GB/s); bf16 -> blosc lz4 with
      bit-shuffle (users who chose bf16 chose size: 3.1-3.2x vs raw fp32, ~0.3 ms per 1.7 MB row);
    - blosc: lz4 with bit-shuffle for both (fp32 1.29-1.36x); zstd: zstd level 1; none: raw.
    clevel 1 encodes 25-30% faster than 5 for 1% less compression.
    """
    typesize = 2 if precision == "bf16" else 4
    if codec == "none":
        return []
    if codec == "zstd":
        return [zc.ZstdCodec(level=1)]
    if codec == "auto" and precision != "bf16":
        return [zc.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=typesize)]
    return [zc.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=typesize)]


INT_CODEC = [zc.ZstdCodec(level=3)]

# Chunk keys "c.<t>.0" (one flat directory per array) instead of Zarr's default "c/<t>/0": the
# default creates a directory per step and array, which cost more than writing the chunk itself.
FLAT_KEYS = {"name": "default", "separator": "."}


def grad_shard_rows(P: int, itemsize: int, T: int) -> int:
    """Rows per shard file of steps/grad: GRAD_SHARD_ROWS, fewer for large rows or short runs."""
    return max(1, min(GRAD_SHARD_ROWS, T, GRAD_SHARD_BYTES // max(1, P * itemsize)))


def grad_serializer(precision: str, codec: str, P: int) -> zc.ShardingCodec:
    """The sharding codec of steps/grad: inner chunks of one row, encoded with grad_codec; the
    shard index (offset, nbytes as little-endian uint64 per row) at the start, without a checksum,
    so the writer can add a row by writing its 16-byte entry (see lmclean/store/shard.py)."""
    return zc.ShardingCodec(chunk_shape=(1, P), codecs=[zc.BytesCodec(), *grad_codec(precision, codec)],
                            index_codecs=[zc.BytesCodec()], index_location="start")


def shard_rows(array: Any) -> int | None:
    """Rows per shard file of an array stored as lmclean writes shards (one-row inner chunks, index
    at the start, plain little-endian index), None for an unsharded array; StoreError otherwise."""
    from lmclean.errors import StoreError

    codecs = list(array.metadata.codecs)
    if not codecs or not isinstance(codecs[0], zc.ShardingCodec):
        return None
    sharding = codecs[0]
    index = list(sharding.index_codecs)
    plain_index = (len(index) == 1 and isinstance(index[0], zc.BytesCodec)
                   and (index[0].endian is None or index[0].endian.value == "little"))
    if (tuple(sharding.chunk_shape)[0] != 1 or tuple(sharding.chunk_shape)[1:] != tuple(array.shape)[1:]
            or sharding.index_location.value != "start" or not plain_index):
        raise StoreError(f"array {array.path}: lmclean reads and writes shards of one-row chunks with a plain "
                         "index at the start")
    return int(array.metadata.chunk_grid.chunk_shape[0])


def grad_dtype(precision: str) -> tuple[str, Any]:
    return ("uint16", MISSING_BF16) if precision == "bf16" else ("float32", np.float32("nan"))


def chunk_codecs(array: Any) -> tuple[np.dtype, list[Any]]:
    """(little-endian dtype, numcodecs bytes->bytes codecs in encode order) of a Zarr v3 array whose
    chunks (a sharded array: inner chunks) lmclean reads and writes itself, or StoreError when its
    pipeline is not bytes(little) followed by blosc/zstd.

    The writer encodes and the reader decodes chunk files with these directly: zarr's array API
    costs about a millisecond per call, more than decoding a gradient row."""
    import numcodecs

    from lmclean.errors import StoreError

    codecs = list(array.metadata.codecs)
    if shard_rows(array) is not None:  # the codecs of one row (an inner chunk) of a shard
        codecs = list(codecs[0].codecs)
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


def encode_chunk(data: np.ndarray, dtype: np.dtype, encoders: list[Any]) -> bytes | memoryview:
    """One chunk's values encoded with `encoders` (as chunk_codecs returns them); with none, the
    values' own memory (a copy would cost as much as writing it)."""
    out: Any = np.ascontiguousarray(data, dtype=dtype)
    for enc in encoders:
        out = enc.encode(out)
    return memoryview(out).cast("B") if isinstance(out, np.ndarray) else bytes(out)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via temp file + rename: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
