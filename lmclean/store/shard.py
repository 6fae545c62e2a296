"""Gradient rows stored as Zarr v3 shards that the writer appends to in place.

A shard file holds the chunks (one row each) of up to S consecutive steps: first the shard index,
S entries of (offset, nbytes) as little-endian uint64 (2**64-1, 2**64-1 for a row not written)
followed by the CRC-32C of those 16*S bytes, padded to SHARD_ALIGN bytes, then the encoded rows
(each ending in its own CRC-32C) at SHARD_ALIGN-aligned offsets. zarr reads it as
`sharding_indexed` with `index_location: start` and index codecs `[bytes, crc32c]`.

Why: creating a file per row cost more than encoding and writing the row, so rows are appended
to an open file (with O_DIRECT where the file system accepts it: no page-cache write-back competing
with training). Crash safety: the drained rows are written first, then the whole index with its new
checksum, so a crash leaves new rows unreferenced under the old valid index, and a torn index or
half-written row fails its checksum. The measurements behind these choices are in
benchmarks/README.md ("Why the store writer looks as it does").

One writer thread owns every shard (zarr issue #3682: concurrent writers lose data).
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.atomic import atomic_write_bytes
from lmclean.store.codec import CRC_BYTES, ChecksumError, array_codec, seal, unseal

ENTRY = struct.Struct("<QQ")  # (offset, nbytes) of one row in its shard
EMPTY = 2**64 - 1
STAGE_BYTES = 32 << 20  # staged rows written at once, at most; a larger row goes out alone, in pieces of this


def _align(n: int) -> int:
    return -(-n // fmt.SHARD_ALIGN) * fmt.SHARD_ALIGN


def index_bytes(rows: int) -> int:
    """Size of the index of a shard of `rows` rows: the entries and their CRC-32C."""
    return ENTRY.size * rows + CRC_BYTES


def data_start(rows: int) -> int:
    """Offset of the first row in a shard of `rows` rows: the index, padded to SHARD_ALIGN."""
    return _align(index_bytes(rows))


def encode_index(entries: np.ndarray) -> bytes:
    """The index bytes of (rows, 2) uint64 entries: the entries, little-endian, then their CRC-32C."""
    return seal(np.ascontiguousarray(entries, dtype="<u8").tobytes())


def read_index(fd: int, rows: int, what: str) -> np.ndarray:
    """The index of an open shard of `rows` rows as (rows, 2) uint64, checksum verified; StoreError
    when the file is shorter than its index, ChecksumError when the index fails its checksum."""
    raw = os.pread(fd, index_bytes(rows), 0)
    if len(raw) < index_bytes(rows):
        raise StoreError(f"shard {what} is truncated inside its index")
    body = unseal(raw, f"the index of shard {what}")
    return np.frombuffer(body, dtype="<u8").reshape(rows, 2).copy()


def _absent(entries: np.ndarray) -> np.ndarray:
    """Which of these index entries mark a row not written, (n,) bool."""
    return (entries == EMPTY).all(axis=1)


def read_row(path: Path, row: int, rows: int) -> bytes | None:
    """The encoded bytes of row `row` (0-based within the shard) of shard file `path` of `rows` rows,
    found through the checksummed index; None when the file or the row is absent. StoreError when
    the index points past the end of the file, ChecksumError when the index fails its checksum."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        offset, nbytes = (int(v) for v in read_index(fd, rows, str(path))[row])
        if offset == EMPTY and nbytes == EMPTY:
            return None
        if nbytes > 1 << 40:
            raise StoreError(f"shard {path}: row {row} has an impossible size {nbytes} in the index")
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise StoreError(f"shard {path} is truncated: row {row} needs bytes {offset}..{offset + nbytes}")
        return data
    finally:
        os.close(fd)


class ShardRowArray:
    """Writes the one-row chunks of a sharded array (steps/grad) in step order, shard by shard.

    Rows of a shard must come in order; the first write into a shard other than at its row 0 (a
    resume from a checkpoint mid-shard) keeps the rows before it and forgets those after.
    """

    def __init__(self, store_path: Path, array: Any, column: int = 0) -> None:
        rows = fmt.shard_rows(array)
        if rows is None:
            raise StoreError(f"array {array.path} is not sharded")
        self.name = array.path
        self.shape = tuple(int(n) for n in array.shape)
        self.rows = rows  # rows per shard file
        self.codec = array_codec(array)
        self.column = column  # the column chunk (a slice of P, docs/distributed.md) this writes; 0: whole rows
        self.dir = store_path / array.path
        self._key = array.metadata.encode_chunk_key
        self._start = data_start(rows)
        self._dir_fd: int | None = None
        self._shard: int | None = None  # the open shard
        self._fd: int | None = None  # buffered: index entries (and rows when O_DIRECT is unsupported)
        self._direct_fd: int | None = None
        self._entries = np.full((rows, 2), EMPTY, dtype="<u8")  # the open shard's index, as on disk
        self._end = 0  # where the next row of the open shard goes
        self.direct = True  # rows with O_DIRECT until the file system refuses
        self._scratch: mmap.mmap | None = None  # page-aligned staging buffer (O_DIRECT needs the alignment)
        self._staged: list[tuple[int, int, int]] = []  # (row in shard, offset, nbytes) not yet written
        self._used = 0  # bytes of the staging buffer in use
        self._next: int | None = None  # the row that must come next (any row first: a resume)

    def chunk_key(self, shard: int) -> str:
        return self._key((shard, self.column) + (0,) * (len(self.shape) - 2))

    def chunk_path(self, shard: int) -> Path:
        return self.dir / self.chunk_key(shard)

    def encode(self, row: np.ndarray) -> bytes | memoryview:
        if row.size != int(np.prod(self.codec.chunk_shape[1:])):
            raise StoreError(f"array {self.name}: row of shape {row.shape}, expected {self.codec.chunk_shape[1:]}")
        return self.codec.encode(row)

    def write(self, index: int, row: np.ndarray) -> None:
        """Encode row `index` and stage it for its shard. The row is on disk and referenced after
        the next `write_staged` (the writer calls it before it sleeps and before every commit)."""
        if not 0 <= index < self.shape[0]:
            raise StoreError(f"array {self.name}: row {index} is outside 0..{self.shape[0] - 1}")
        if self._next is not None and index != self._next:
            raise StoreError(f"array {self.name}: row {index} written out of order (row {self._next} comes next)")
        shard, j = divmod(index, self.rows)
        if shard != self._shard:
            self.write_staged()
            self._open(shard, j)
        self._next = index + 1
        encoded = self.encode(row)
        n, padded = len(encoded), _align(len(encoded))
        if self._staged and self._used + padded > STAGE_BYTES:
            self.write_staged()
        if padded > STAGE_BYTES:  # a large model's row: through the staging buffer piece by piece
            self._write_large(j, encoded)
            return
        self._reserve(self._used + padded)
        assert self._scratch is not None
        self._scratch[self._used: self._used + n] = encoded
        self._scratch[self._used + n: self._used + padded] = bytes(padded - n)
        self._staged.append((j, self._end, n))
        self._end += padded
        self._used += padded

    def write_staged(self) -> None:
        """Write the staged rows with one write, then the index with its new checksum with another."""
        if not self._staged:
            return
        assert self._fd is not None and self._scratch is not None
        offset = self._staged[0][1]
        view = memoryview(self._scratch)[: self._used]
        try:
            self._write_data(offset, view)
        finally:
            view.release()
        for j, off, n in self._staged:
            self._entries[j] = (off, n)
        self._write_index()  # the rows are in the file: reference them
        self._staged.clear()
        self._used = 0

    def sync(self) -> None:
        """Make the open shard's rows and index durable (fdatasync): a commit calls it before
        COMMIT.json counts them."""
        if self._fd is not None:
            os.fdatasync(self._fd)

    def first_missing(self, count: int, first: int = 0) -> int | None:
        """The first of rows first..count-1 that no shard references, or None (one index read per
        shard; an index that fails its checksum is a StoreError). `first`: a windowed store's
        retained start (record.keep_steps): the rows before its shard were dropped."""
        for shard in range(first // self.rows, -(-count // self.rows)):
            rows = min(self.rows, count - shard * self.rows)
            try:
                fd = os.open(self.chunk_path(shard), os.O_RDONLY)
            except FileNotFoundError:
                return shard * self.rows
            try:
                entries = read_index(fd, self.rows, f"{self.name}/{self.chunk_key(shard)}")[:rows]
            finally:
                os.close(fd)
            absent = np.flatnonzero(_absent(entries))
            if len(absent):
                return shard * self.rows + int(absent[0])
        return None

    def close(self) -> None:
        """Release files and buffers; staged rows not yet written are dropped (call write_staged)."""
        self._staged.clear()
        self._used = 0
        self._close_shard()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    # -- internals ----------------------------------------------------------------------------
    def _open(self, shard: int, first_row: int) -> None:
        self._close_shard()
        if self._dir_fd is None:
            self._dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        key = self.chunk_key(shard)
        if first_row == 0:  # a new shard: an empty index, in place at once (atomic write)
            self._entries.fill(EMPTY)
            header = encode_index(self._entries)
            atomic_write_bytes(key, header + bytes(self._start - len(header)), dir_fd=self._dir_fd)
            self._fd = os.open(key, os.O_RDWR, dir_fd=self._dir_fd)
            self._end = self._start
        else:  # resuming inside a shard: keep rows before first_row, forget the rest
            try:
                self._fd = os.open(key, os.O_RDWR, dir_fd=self._dir_fd)
            except FileNotFoundError:
                raise StoreError(f"array {self.name}: shard {key} holding step {shard * self.rows} is missing; "
                                 "the store is damaged") from None
            try:
                entries = read_index(self._fd, self.rows, f"{self.name}/{key}")
            except ChecksumError as exc:
                raise StoreError(f"array {self.name}: {exc} (steps {shard * self.rows}..); the store is damaged: "
                                 f"run `lmclean check`") from None
            if _absent(entries[:first_row]).any():
                raise StoreError(f"array {self.name}: shard {key} lacks rows before step "
                                 f"{shard * self.rows + first_row}; the store is damaged")
            kept = entries[:first_row]
            self._end = _align(int((kept[:, 0] + kept[:, 1]).max())) if first_row else self._start
            self._entries[:] = entries
            self._entries[first_row:] = EMPTY
            self._write_index()
            os.ftruncate(self._fd, self._end)
        self._shard = shard
        if self.direct:
            try:
                self._direct_fd = os.open(key, os.O_WRONLY | os.O_DIRECT, dir_fd=self._dir_fd)
            except (OSError, AttributeError):  # no O_DIRECT here (tmpfs, macOS): the page cache it is
                self.direct = False

    def _write_large(self, j: int, encoded: bytes | memoryview) -> None:
        """Write one row larger than STAGE_BYTES and its index entry, staging STAGE_BYTES at a time
        (the staging buffer stays small however large the model)."""
        n, offset = len(encoded), self._end
        source = memoryview(encoded)
        self._reserve(STAGE_BYTES)
        assert self._fd is not None and self._scratch is not None
        for start in range(0, n, STAGE_BYTES):
            piece = source[start: start + STAGE_BYTES]
            size = _align(len(piece))
            self._scratch[: len(piece)] = piece
            self._scratch[len(piece): size] = bytes(size - len(piece))
            view = memoryview(self._scratch)[:size]
            try:
                self._write_data(offset + start, view)
            finally:
                view.release()
        self._entries[j] = (offset, n)
        self._write_index()
        self._end = offset + _align(n)

    def _write_index(self) -> None:
        """Rewrite the open shard's whole index with its checksum (one write of <= 4 KB + 4 bytes)."""
        assert self._fd is not None
        data = encode_index(self._entries)
        if os.pwrite(self._fd, data, 0) != len(data):
            raise StoreError(f"array {self.name}: short write of a shard index")

    def _reserve(self, size: int) -> None:
        """A staging buffer of at least `size` bytes, keeping what is staged."""
        if self._scratch is not None and len(self._scratch) >= size:
            return
        # page-aligned; callers never ask for more than STAGE_BYTES, so doubling stops there
        grown = mmap.mmap(-1, _align(min(STAGE_BYTES, max(size, 2 * len(self._scratch) if self._scratch else size))))
        if self._scratch is not None:
            grown[: self._used] = self._scratch[: self._used]
            self._scratch.close()
        self._scratch = grown

    def _write_data(self, offset: int, data: memoryview) -> None:
        """Write `data` (SHARD_ALIGN-aligned in memory, offset and length) at `offset`."""
        if self.direct and self._direct_fd is not None:
            try:
                done = 0
                while done < len(data):
                    done += os.pwrite(self._direct_fd, data[done:], offset + done)
                return
            except OSError:  # the file system refused O_DIRECT after all: write through the page cache
                self.direct = False
                os.close(self._direct_fd)
                self._direct_fd = None
        assert self._fd is not None
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def _close_shard(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None
        self._shard = None
