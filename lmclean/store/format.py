"""Names, dtypes and codecs of the store layout (documented in docs/store-format.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr.codecs as zc

FORMAT_VERSION = 2  # 2: every chunk and shard index carries a CRC-32C (1: none; re-record)
META_KEY = "lmclean"
COMMIT_FILE = "COMMIT.json"
MODEL_DIR = "model"

# Sentinels that a never-written chunk reads as, so a missing chunk is detected, never read as zeros.
MISSING_INT = -2
MISSING_BF16 = 0xFFFF  # a bfloat16 NaN


# Arrays under steps/: per-step scalars (float64, (T,)) and the per-step rows.
# clip: the factor the gradient was scaled by before the update (1.0: not clipped); grad holds the
# applied (clipped) gradient and grad_norm its norm before clipping. Stores written before clipping
# was recorded lack steps/clip: it reads as 1.0.
STEP_SCALARS = ("lr", "loss", "grad_norm", "clip")
# micro, width: for runs with gradient accumulation recorded with micro_batches (the Trainer
# callback), the micro-batch index of each row and the padded width that micro-batch had. Under
# bf16 autocast the rounding depends on the batch shape, so an exact recomputation needs them.
MICRO_ARRAYS = ("micro", "width")
STEP_ARRAYS = (*STEP_SCALARS, "grad", "grad_scale", "sample_ids", "weights", "lengths", "tokens", *MICRO_ARRAYS)
# absent from older stores / stores without micro-batches / stores not int8
OPTIONAL_STEP_ARRAYS = ("clip", *MICRO_ARRAYS, "grad_scale")
# One row per chunk: the gradient. Its chunks are stored GRAD_SHARD_ROWS to a file (Zarr v3
# sharding, index at the start of the file with its own checksum), appended in place by the writer: on the
# ext4 disk of the development machine creating a file costs ~0.4 ms of kernel CPU, more than
# encoding and writing a 131k-parameter gradient row (see lmclean/store/shard.py).
ROW_ARRAYS = ("grad", "grad_scale")  # grad_scale: int8 stores only (OPTIONAL_ROW_ARRAYS)
OPTIONAL_ROW_ARRAYS = ("grad_scale",)
# record.precision: int8 stores steps/grad as int8 with one float32 scale per QUANT_BLOCK consecutive
# parameters in steps/grad_scale (T, ceil(P / QUANT_BLOCK)), sharded like steps/grad: value =
# q * scale, scale = absmax(block) / 127, q = round-half-even(g / scale) (lmclean/store/quant.py).
QUANT_BLOCK = 256
LOSSY_PRECISIONS = ("bf16", "int8")  # θ replayed from these gradients is approximate
GRAD_SHARD_ROWS = 256
GRAD_SHARD_BYTES = 1 << 30  # fewer rows per shard for large models: a shard holds at most ~1 GiB raw
SHARD_ALIGN = 4096  # shard data offsets and row extents: the O_DIRECT alignment
# BLOCK_ROWS steps per chunk, kept in memory by the writer and rewritten at each commit: small
# rows whose own chunk file per step cost more CPU than encoding and writing the gradient.
BLOCK_ARRAYS = (*STEP_SCALARS, "sample_ids", "weights", "lengths", *MICRO_ARRAYS)
BLOCK_ROWS = 256
# The tokens (5 KB a step for the example model) come in blocks of TOKEN_ROWS steps: a file per
# step cost 0.26 ms of writer CPU per step, and a 256-row block (1.3 MB) re-encoded at every commit
# would cost as much. `lmclean audit` scrubs them chunk by chunk (rows per chunk from the metadata).
TOKEN_ROWS = 16
# A store with meta "label_mask": true records which positions are loss targets (a Trainer's labels
# −100 where not) inside the tokens array: a position that is not a target holds −(id + 1).


def grad_codec(precision: str, codec: str) -> list[Any]:
    """Compressors of steps/grad (and, with fp32, of the checkpoints).

    - auto: fp32 -> blosc lz4 without shuffle (finds the cheap part: runs of exact zeros in the
      embedding rows of absent tokens); bf16 and int8 -> blosc lz4 with bit-shuffle (a user who
      chose a lossy precision chose size);
    - blosc: lz4 with bit-shuffle for both; zstd: zstd level 1; none: raw.
    Why not bit-shuffle fp32 by default: about 4x the writer CPU for 1.16x smaller rows, and on
    CPU training the writer's CPU is taken from training (figures: benchmarks/README.md).
    Every list ends with the crc32c checksum (`checked`).
    """
    typesize = {"bf16": 2, "int8": 1}.get(precision, 4)
    if codec == "none":
        return checked([])
    if codec == "zstd":
        return checked([zc.ZstdCodec(level=1)])
    if codec == "auto" and precision == "fp32":
        return checked([zc.BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=typesize)])
    return checked([zc.BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=typesize)])


def checked(compressors: list[Any]) -> list[Any]:
    """`compressors` followed by zarr's crc32c codec: every chunk lmclean writes carries its CRC-32C
    (4 bytes), verified on every read (lmclean/store/codec.py)."""
    return [*compressors, zc.Crc32cCodec()]


INT_CODEC = checked([zc.ZstdCodec(level=3)])
RAW_CODEC = checked([])  # small arrays stored uncompressed: the checksum only

# Chunk keys "c.<t>.0" (one flat directory per array) instead of Zarr's default "c/<t>/0": the
# default creates a directory per step and array, which cost more than writing the chunk itself.
FLAT_KEYS = {"name": "default", "separator": "."}


def grad_shard_rows(P: int, itemsize: int, T: int) -> int:
    """Rows per shard file of steps/grad: GRAD_SHARD_ROWS, fewer for large rows or short runs."""
    return max(1, min(GRAD_SHARD_ROWS, T, GRAD_SHARD_BYTES // max(1, P * itemsize)))


INDEX_CODECS = [zc.BytesCodec(), zc.Crc32cCodec()]  # the shard index: entries, then their CRC-32C


def grad_serializer(precision: str, codec: str, P: int) -> zc.ShardingCodec:
    """The sharding codec of steps/grad: inner chunks of one row, encoded with grad_codec; the
    shard index (offset, nbytes as little-endian uint64 per row, then its CRC-32C) at the start,
    rewritten whole with its checksum after each batch of rows (see lmclean/store/shard.py)."""
    return zc.ShardingCodec(chunk_shape=(1, P), codecs=[zc.BytesCodec(), *grad_codec(precision, codec)],
                            index_codecs=INDEX_CODECS, index_location="start")



def shard_rows(array: Any) -> int | None:
    """Rows per shard file of an array stored as lmclean writes shards (one-row inner chunks, index
    at the start, little-endian index with its crc32c), None for an unsharded array; StoreError
    otherwise."""
    from lmclean.errors import StoreError

    codecs = list(array.metadata.codecs)
    if not codecs or not isinstance(codecs[0], zc.ShardingCodec):
        return None
    sharding = codecs[0]
    index = list(sharding.index_codecs)
    checked_index = (len(index) == 2 and isinstance(index[0], zc.BytesCodec) and isinstance(index[1], zc.Crc32cCodec)
                     and (index[0].endian is None or index[0].endian.value == "little"))
    grid = tuple(array.metadata.chunk_grid.chunk_shape)  # (S, width): width < P splits rows into column chunks
    if (tuple(sharding.chunk_shape)[0] != 1 or tuple(sharding.chunk_shape)[1:] != grid[1:]
            or sharding.index_location.value != "start" or not checked_index):
        raise StoreError(f"array {array.path}: lmclean reads and writes shards of one-row chunks with a "
                         "checksummed index at the start")
    return int(array.metadata.chunk_grid.chunk_shape[0])


def column_chunks(array: Any) -> int:
    """How many column chunks (slices of P, one per rank that wrote them) each row of a sharded
    array is split into; 1 for every single-process store (docs/distributed.md)."""
    width = int(array.metadata.chunk_grid.chunk_shape[1]) if array.ndim > 1 else 1
    return -(-int(array.shape[1]) // width) if array.ndim > 1 else 1


def grad_dtype(precision: str) -> tuple[str, Any]:
    """(dtype, fill) of steps/grad; int8 has no sentinel value (every byte is a valid q): a missing
    row is detected by its shard index, as for every row."""
    if precision == "int8":
        return ("int8", 0)
    return ("uint16", MISSING_BF16) if precision == "bf16" else ("float32", np.float32("nan"))


def quant_blocks(P: int) -> int:
    """Scales per int8 gradient row: ceil(P / QUANT_BLOCK)."""
    return -(-P // QUANT_BLOCK)
