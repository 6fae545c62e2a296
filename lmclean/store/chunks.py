"""Chunk files of the store's arrays, written and read as the files zarr reads (no zarr calls): whole
chunks (ChunkFiles), one row per chunk (RowArray: the checkpoints), blocks of rows kept in memory
and rewritten at each commit (BlockArray: the per-step scalars, ids, weights); ChunkReader reads
rows of any array, sharded ones included. The writer thread
(lmclean/store/writer.py) owns them; corrections and pinned rows reuse ChunkFiles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lmclean.errors import StoreError
from lmclean.store.atomic import DirSync
from lmclean.store.atomic import atomic_write_bytes as _atomic_write
from lmclean.store import format as fmt
from lmclean.store.codec import ChecksumError, ChunkCodec, array_codec, checked_chunk
from lmclean.store.shard import read_row

__all__ = ["BlockArray", "ChunkFiles", "ChunkReader", "RowArray"]


class ChunkFiles:
    """Writes whole chunks of one Zarr v3 array as the chunk files zarr reads (no zarr calls)."""

    def __init__(self, store_path: Path, array: zarr.Array) -> None:
        meta = array.metadata
        self.name = array.path
        self.shape = tuple(array.shape)
        self.chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        if self.chunk_shape[1:] != self.shape[1:]:
            raise StoreError(f"array {self.name} has chunks {self.chunk_shape}, the writer needs whole rows per chunk")
        self.rows = self.chunk_shape[0]
        self.codec = array_codec(array)
        self.dtype = self.codec.dtype
        self.fill = meta.fill_value
        self.dir = store_path / array.path
        self._key = meta.encode_chunk_key
        if "/" in self.chunk_key(0):
            raise StoreError(f"array {self.name}: chunk keys with '/' are not the store format (keys are 'c.<i>.0')")
        self._fd: int | None = None  # the array directory, opened on first write (paths resolve from it)

    def chunk_key(self, index: int) -> str:
        return self._key((index,) + (0,) * (len(self.shape) - 1))

    def chunk_path(self, index: int) -> Path:
        return self.dir / self.chunk_key(index)

    def encode(self, data: np.ndarray) -> bytes | memoryview:
        if data.size != int(np.prod(self.chunk_shape)):
            raise StoreError(f"array {self.name}: chunk of shape {data.shape}, expected {self.chunk_shape}")
        return self.codec.encode(data)

    def write_chunk(self, index: int, data: np.ndarray, pending: DirSync | None = None) -> None:
        """Encode and write chunk `index` atomically (lmclean/store/atomic.py; with `pending`, the
        directory fsync is left to the caller)."""
        encoded = self.encode(data)
        if self._fd is None:
            self._fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        _atomic_write(self.chunk_key(index), encoded, dir_fd=self._fd, pending=pending)

    def read_chunk(self, index: int) -> np.ndarray | None:
        """Chunk `index` decoded (checksum verified), None when its file does not exist."""
        try:
            data = self.chunk_path(index).read_bytes()
        except FileNotFoundError:
            return None
        return self.codec.decode(data, f"array {self.name} chunk {self.chunk_key(index)}")

    def first_missing(self, count: int, first: int = 0) -> int | None:
        """The first of rows first..count-1 whose chunk file does not exist, or None."""
        for index in range(first // self.rows, -(-count // self.rows)):
            if not self.chunk_path(index).is_file():
                return index * self.rows
        return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RowArray(ChunkFiles):
    """An array with one row per chunk (the checkpoints): each row is written as its own chunk file."""

    def __init__(self, store_path: Path, array: zarr.Array) -> None:
        super().__init__(store_path, array)
        if self.rows != 1:
            raise StoreError(f"array {self.name} has {self.rows} rows per chunk, expected 1")

    def write(self, index: int, row: np.ndarray, pending: DirSync | None = None) -> None:
        if not 0 <= index < self.shape[0]:
            raise StoreError(f"array {self.name}: row {index} is outside 0..{self.shape[0] - 1}")
        self.write_chunk(index, row, pending)


class BlockArray(ChunkFiles):
    """An array with `rows` rows per chunk, filled row by row in memory; `flush` writes the block.

    Rows from `start` on begin as fill values; rows of the block before `start` (a resume in the
    middle of a block) are read back from disk, so rewriting the block keeps them.
    """

    def __init__(self, store_path: Path, array: zarr.Array, start: int = 0) -> None:
        super().__init__(store_path, array)
        self.buf = np.full(self.chunk_shape, self.fill, dtype=self.dtype)
        self.block = start // self.rows
        self.dirty = False
        lo = self.block * self.rows
        if start > lo:
            kept = checked_chunk(lambda: self.read_chunk(self.block), store_path, self.name, f"step {lo}")
            self.buf[: start - lo] = kept[: start - lo]

    def set(self, index: int, row: Any) -> None:
        """Put row `index` (in order); a completed block is written at once."""
        block = index // self.rows
        if block != self.block:
            self.flush()
            self.buf.fill(self.fill)
            self.block = block
        self.buf[index - block * self.rows] = row
        self.dirty = True

    def flush(self, pending: DirSync | None = None) -> None:
        if self.dirty:
            self.dirty = False
            self.write_chunk(self.block, self.buf, pending)


class ChunkReader:
    """Rows of one array read straight from its chunk files through the codec path (no zarr call).

    zarr's array API costs about 1 ms per read, which made reading the store most of the cost of
    rollback and of reused-curvature sweeps. Keeps the last decoded chunk of block arrays (a sweep
    reads their rows in order: one decode per block), keyed by the file's inode, size and mtime so
    a chunk rewritten in place (scrub, resume) is read again."""

    def __init__(self, store_path: Path, arr: Any) -> None:
        meta = arr.metadata
        self.codec: ChunkCodec = array_codec(arr)  # StoreError for a pipeline lmclean does not write
        self.length = int(arr.shape[0])
        self.shard_rows = fmt.shard_rows(arr)  # a sharded array: rows per shard file (chunks are rows)
        self.chunk_shape = self.codec.chunk_shape
        self.rows = self.chunk_shape[0]
        self.dir = store_path / arr.path
        self._key = meta.encode_chunk_key
        self._ndim = arr.ndim
        self._cached: tuple[tuple[int, int, int, int], np.ndarray] | None = None
        self.columns = fmt.column_chunks(arr) if self.shard_rows is not None else 1  # torchrun: one per rank
        self.width = int(arr.shape[1]) if arr.ndim > 1 else 1

    def key(self, index: int, column: int = 0) -> str:
        return self._key((index, column) + (0,) * (self._ndim - 2) if self._ndim > 1 else (index,))

    def chunk(self, index: int) -> np.ndarray | None:
        """Chunk `index` decoded (read-only), or None when its file (or its shard's row) does not
        exist; ChecksumError when it (or its shard's index) fails its checksum."""
        if self.shard_rows is not None:
            shard, row = divmod(index, self.shard_rows)
            parts = []
            for column in range(self.columns):  # a torchrun store: each rank's slice of P (store/columns.py)
                try:
                    data = read_row(self.dir / self.key(shard, column), row, self.shard_rows)
                except ChecksumError as exc:
                    lo = shard * self.shard_rows
                    part = (f"the index of shard {self.key(shard, column)}, steps {lo}.."
                            f"{min(lo + self.shard_rows, self.length) - 1}")
                    raise ChecksumError(str(exc), part) from None
                if data is None:
                    return None
                parts.append(self.codec.decode(data))
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)[:, : self.width]
        path = self.dir / self.key(index)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        sig = (index, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cached is not None and self._cached[0] == sig:
            return self._cached[1]
        value = self.codec.decode(path.read_bytes())
        if self.rows > 1:
            self._cached = (sig, value)
        return value
