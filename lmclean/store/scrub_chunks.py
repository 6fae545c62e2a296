"""The scrub's chunk access: read one chunk of an array (checksum verified, a damaged one named by
the step or row it holds), re-encode it through the store's codec path and replace its file with the
store's atomic write.

Why not the writer's ChunkFiles (lmclean/store/chunks.py): the scrub also rewrites arrays it creates
itself from in-memory metadata (the tombstones), and its errors must say which step is damaged and
point to `lmclean check`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lmclean._faults import crash_point
from lmclean.errors import StoreError
from lmclean.store.atomic import DirSync, atomic_write_bytes
from lmclean.store.codec import ChecksumError, ChunkCodec, array_codec


def write_file(path: Path, data: Any, dirs: DirSync | None = None) -> None:
    """The store's atomic write (lmclean/store/atomic.py); with ``dirs`` the directory fsync is
    left to ``dirs.sync()`` (the caller syncs them in bulk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data, pending=dirs)


def open_array(store: Path, name: str) -> Any:
    try:
        return zarr.open_array(str(store / name), mode="r")
    except Exception as exc:  # zarr raises many types for missing or broken metadata
        raise StoreError(f"store {store}: array {name} is missing or unreadable ({exc})") from exc


def chunk_rows(array: Any) -> int:
    """Rows per storage chunk along axis 0; the chunk must span every other axis whole."""
    shape = array.metadata.chunk_grid.chunk_shape
    if tuple(shape[1:]) != tuple(array.shape[1:]):
        raise StoreError(
            f"array {array.path} has chunks {tuple(shape)} for shape {array.shape}; scrubbing "
            "needs chunks that hold whole rows (the store format's layout)"
        )
    return int(shape[0])


def chunk_path(store: Path, name: str, array: Any, coords: tuple[int, ...]) -> Path:
    """The chunk's file, from the array metadata's chunk_key_encoding (default: c/<i>/<j>/...)."""
    return store / name / array.metadata.encode_chunk_key(coords)


def read_chunk(store: Path, array: Any, name: str, codec: ChunkCodec, index: int) -> np.ndarray | None:
    """Chunk ``index`` of an array decoded (a writable copy, checksum verified), None when its file
    does not exist; StoreError naming the array and the first step or row it holds when damaged."""
    path = chunk_path(store, name, array, (index,) + (0,) * (array.ndim - 1))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    unit = "step" if name.startswith("steps/") else "row"
    where = f"{unit} {index * chunk_rows(array)}"
    try:
        return codec.decode(raw).copy()
    except ChecksumError:
        raise StoreError(
            f"store {store}: array {name} at {where} fails its checksum; the store is damaged: "
            f"run `lmclean check {store}`"
        ) from None
    except Exception as exc:  # numcodecs raises many types for a corrupted chunk
        raise StoreError(
            f"store {store}: array {name} chunk holding {where} is corrupted ({exc}); it cannot be scrubbed"
        ) from exc


def read_all(store: Path, name: str) -> np.ndarray:
    """Every row of an array whose chunk files all exist (samples/*, the tombstones)."""
    array = open_array(store, name)
    codec, c = array_codec(array), chunk_rows(array)
    parts = []
    for index in range(-(-array.shape[0] // c)):
        chunk = read_chunk(store, array, name, codec, index)
        if chunk is None:
            raise StoreError(f"store {store}: array {name} chunk {index} is missing; the store is damaged")
        parts.append(chunk)
    return np.concatenate(parts)[: array.shape[0]] if parts else np.empty(0, dtype=codec.dtype)


def rewrite_chunk(store: Path, name: str, array: Any, codec: ChunkCodec, index: int, data: np.ndarray,
                   dirs: DirSync) -> None:
    """Re-encode one chunk of array ``name`` (with its checksum) and replace its file atomically."""
    path = chunk_path(store, name, array, (index,) + (0,) * (array.ndim - 1))
    write_file(path, codec.encode(data), dirs)
    crash_point("scrub:after-chunk")
