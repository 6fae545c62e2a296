"""The one chunk codec path of the store: reader, writer, shards and scrub all encode and decode here.

lmclean reads and writes chunk files itself (zarr's array API costs ~1 ms a call, more than
decoding a gradient row), so this module must produce exactly the bytes zarr would: the array's
pipeline `bytes` (little-endian) -> blosc/zstd -> `crc32c`, where crc32c appends the CRC-32C
(Castagnoli) of the compressed bytes as 4 little-endian bytes (zarr's Crc32cCodec;
tests/test_store.py reads every array with zarr too). Every decode verifies the checksum first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr.codecs as zc

from lmclean.errors import StoreError

__all__ = ["CRC_BYTES", "ChecksumError", "ChunkCodec", "array_codec", "crc32c", "has_checksum", "seal", "unseal"]

CRC_BYTES = 4


class ChecksumError(StoreError):
    """Bytes that fail their CRC-32C; the reader turns it into a message naming array and step.
    `part` names what failed when it is not the chunk itself (a shard's index)."""

    def __init__(self, message: str, part: str = "") -> None:
        super().__init__(message)
        self.part = part


def checked_chunk(read: Callable[[], np.ndarray | None], store: Path, name: str, where: str) -> np.ndarray:
    """Run one chunk read and turn every way it can fail into one StoreError naming the store, the
    array and `where` (e.g. "step 17"): a checksum mismatch, bytes that do not decode, a missing file."""
    try:
        chunk = read()
    except ChecksumError as exc:
        detail = f" ({exc.part})" if exc.part else ""
        raise StoreError(f"store {store}: array {name} at {where} fails its checksum{detail}; the store is damaged: "
                         f"run `lmclean check {store}`") from None
    except StoreError as exc:
        raise StoreError(f"store {store}: array {name} at {where} is unreadable ({exc}); the store is damaged") from exc
    except Exception as exc:  # numcodecs raises many types for a corrupted chunk
        raise StoreError(f"store {store}: array {name} at {where} is unreadable ({type(exc).__name__}: {exc}); the "
                         "store is damaged") from exc
    if chunk is None:
        raise StoreError(f"store {store}: array {name} has no data at {where} (chunk file missing); the store is damaged")
    return chunk


def crc32c(data: Any) -> bytes:
    """CRC-32C of `data` (any contiguous buffer) as the 4 little-endian bytes zarr stores."""
    return int(google_crc32c.value(np.frombuffer(data, dtype=np.uint8))).to_bytes(CRC_BYTES, "little")


def seal(data: Any) -> bytes:
    """`data` followed by its CRC-32C (zarr's crc32c encode)."""
    return bytes(data) + crc32c(data)


def unseal(data: Any, what: str = "chunk") -> memoryview:
    """`data` without its trailing CRC-32C, after checking it (zarr's crc32c decode);
    ChecksumError naming `what` when it does not match or the data is shorter than a checksum."""
    view = memoryview(data).cast("B")
    if len(view) < CRC_BYTES or crc32c(view[:-CRC_BYTES]) != bytes(view[-CRC_BYTES:]):
        raise ChecksumError(f"{what} fails its checksum")
    return view[:-CRC_BYTES]


def has_checksum(codecs: list[Any]) -> bool:
    """Whether a codec list ends with zarr's crc32c codec."""
    return bool(codecs) and isinstance(codecs[-1], zc.Crc32cCodec)


@dataclass(frozen=True)
class ChunkCodec:
    """How one array's chunks (a sharded array: its one-row inner chunks) become bytes and back."""

    dtype: np.dtype  # little-endian
    chunk_shape: tuple[int, ...]
    encoders: tuple[Any, ...]  # numcodecs compressors in encode order (blosc/zstd), maybe none
    checksum: bool  # a trailing CRC-32C (every array lmclean creates has one)

    def encode(self, data: np.ndarray) -> bytes | memoryview:
        """One chunk's values encoded; without compressor or checksum, the values' own memory
        (a copy would cost as much as writing it)."""
        if data.size != int(np.prod(self.chunk_shape)):
            raise StoreError(f"chunk of shape {data.shape}, expected {self.chunk_shape}")
        out: Any = np.ascontiguousarray(data, dtype=self.dtype)
        for enc in self.encoders:
            out = enc.encode(out)
        raw = memoryview(out).cast("B") if isinstance(out, np.ndarray) else out
        return seal(raw) if self.checksum else raw

    def decode(self, data: Any, what: str = "chunk") -> np.ndarray:
        """Decode one chunk file's bytes (checksum first: ChecksumError naming `what`); read-only."""
        if self.checksum:
            data = unseal(data, what)
        for dec in reversed(self.encoders):
            data = dec.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunk_shape)


def _numcodec(codec: Any, name: str) -> Any:
    import numcodecs

    if isinstance(codec, zc.BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return numcodecs.Blosc.from_config({"cname": codec.cname.value, "clevel": codec.clevel, "shuffle": shuffle,
                                            "blocksize": codec.blocksize, "typesize": codec.typesize})
    if isinstance(codec, zc.ZstdCodec):
        return numcodecs.Zstd.from_config({"level": codec.level, "checksum": codec.checksum})
    raise StoreError(f"array {name}: codec {type(codec).__name__} is not one lmclean reads or writes")


def array_codec(array: Any) -> ChunkCodec:
    """The ChunkCodec of a Zarr v3 array (of a sharded one: its inner chunks); StoreError unless its
    pipeline is bytes(little) [+ blosc | zstd] [+ crc32c]."""
    from lmclean.store.format import shard_rows

    name = array.path
    codecs = list(array.metadata.codecs)
    shape = tuple(int(n) for n in array.metadata.chunk_grid.chunk_shape)
    if shard_rows(array) is not None:
        codecs = list(codecs[0].codecs)
        shape = (1, *shape[1:])
    first = codecs[0] if codecs else None
    if not isinstance(first, zc.BytesCodec) or (first.endian is not None and first.endian.value != "little"):
        raise StoreError(f"array {name}: lmclean reads and writes chunks that start with little-endian bytes")
    checksum = has_checksum(codecs)
    middle = codecs[1:-1] if checksum else codecs[1:]
    if len(middle) > 1:
        raise StoreError(f"array {name}: lmclean reads and writes at most one compressor per chunk")
    return ChunkCodec(np.dtype(array.dtype).newbyteorder("<"), shape, tuple(_numcodec(c, name) for c in middle),
                      checksum)
