"""steps/grad split along P into column chunks, one per torchrun rank: each rank writes its own.

Under `torchrun --nproc-per-node N` every rank holds the same all-reduced gradient row; rank r
encodes and writes only columns [r·W, (r+1)·W) of it (W = ceil(P/N)), as the Zarr chunks
(shard, r) of steps/grad, so no rank encodes or writes more than 1/N of each row. Rank 0 writes
everything else (the small per-step arrays, tokens, checkpoints) and is the only one to commit:
COMMIT.json counts a step once every rank has said, in its progress file `writers/rank<r>.json`
(written after an fdatasync of its shard), that its columns of that step are durable. zarr reads the
array as any chunked (T, P) array; lmclean's reader joins the columns (reader.py). See docs/distributed.md.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.atomic import atomic_write_json
from lmclean.store.shard import ShardRowArray

PROGRESS_DIR = "writers"
PEER_WAIT_SECONDS = 600.0  # rank 0 waits this long at close for a peer's last columns


def progress_path(store: Path, rank: int) -> Path:
    return Path(store) / PROGRESS_DIR / f"rank{rank}.json"


def owned_columns(columns: int) -> list[int] | None:
    """The column chunks this process writes: under torchrun with one column per rank, its own;
    otherwise (a single process, e.g. `record --resume` of a torchrun store) all of them (None)."""
    if columns <= 1:
        return None
    from lmclean.dist import current

    d = current()
    if d.world == columns:
        return [d.rank]
    if d.active:
        raise StoreError(f"the store's gradient rows are split into {columns} column chunks but this torchrun has "
                         f"{d.world} ranks; run with --nproc-per-node {columns} or a single process")
    return None


def peer_steps(store: Path, columns: int) -> int:
    """Steps whose columns every rank r > 0 has made durable (its progress file; 0 if none yet)."""
    durable = []
    for rank in range(1, columns):
        try:
            durable.append(int(json.loads(progress_path(store, rank).read_text())["durable_steps"]))
        except (FileNotFoundError, ValueError, KeyError):
            durable.append(0)
    return min(durable, default=1 << 62)



def pooled_buffer(pool: "queue.Queue[np.ndarray]", thread: threading.Thread, check: Any, stopped: str) -> np.ndarray:
    """A free buffer from a writer's pool, waiting while all are queued (back-pressure); `check()`
    re-raises the writer thread's failure, and a writer thread that died without one is `stopped`."""
    while True:
        check()
        try:
            return pool.get(timeout=1.0)
        except queue.Empty:
            if not thread.is_alive():
                raise StoreError(stopped) from None

class ColumnRows:
    """The rows of a sharded array split into column chunks; writes the owned ones (ShardRowArray's
    interface, so the writer treats it as one array), checks all of them."""

    def __init__(self, store_path: Path, array: Any, owned: Sequence[int] | None) -> None:
        C = fmt.column_chunks(array)
        self.width = int(array.metadata.chunk_grid.chunk_shape[1])  # W: columns per chunk
        self.fill = array.metadata.fill_value
        self.all = [ShardRowArray(store_path, array, c) for c in range(C)]
        self.parts = [self.all[c] for c in (range(C) if owned is None else owned)]
        first = self.all[0]
        self.name, self.shape, self.rows, self.codec, self.dir = first.name, first.shape, first.rows, first.codec, first.dir

    def chunk_path(self, shard: int) -> Path:
        return self.all[0].chunk_path(shard)

    def write(self, index: int, row: np.ndarray) -> None:
        """Write this process's columns of row `index` (P,); the last chunk is padded with the fill value."""
        for part in self.parts:
            piece = row[part.column * self.width: (part.column + 1) * self.width]
            if piece.size < self.width:
                padded = np.full(self.width, self.fill, dtype=row.dtype)
                padded[: piece.size] = piece
                piece = padded
            part.write(index, piece)

    def write_staged(self) -> None:
        for part in self.parts:
            part.write_staged()

    def sync(self) -> None:
        for part in self.parts:
            part.sync()

    def first_missing(self, count: int, first: int = 0) -> int | None:
        """The first row any column chunk lacks (every rank's, not only this process's)."""
        missing = [m for m in (part.first_missing(count, first) for part in self.all) if m is not None]
        return min(missing, default=None)

    def close(self) -> None:
        for part in self.all:
            part.close()


def row_array(store_path: Path, array: Any) -> ShardRowArray | ColumnRows:
    """The writer of a sharded row array: plain shards, or the column chunks this process owns."""
    C = fmt.column_chunks(array)
    return ShardRowArray(store_path, array) if C == 1 else ColumnRows(store_path, array, owned_columns(C))


def wait_for_peers(store: Path, columns: int, steps: int, timeout: float = PEER_WAIT_SECONDS) -> None:
    """Block until every peer rank's columns of steps 0..steps-1 are durable (StoreError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while (done := peer_steps(store, columns)) < steps:
        if time.monotonic() > deadline:
            raise StoreError(f"store {store}: the other ranks' gradient columns stop at step {done} of {steps} after "
                             f"{timeout:.0f} s; a rank failed: see its log, then `lmclean record --resume` (one process)")
        time.sleep(0.01)


class PeerWriter:
    """The store writer of rank r > 0: its column chunks of each gradient row, from one background
    thread (encoding is off the training thread, as in StoreWriter), then its progress file.

    Takes the Recorder's writer role: rows other than the gradient (and checkpoints, corrections)
    are rank 0's to write and are dropped here."""

    def __init__(self, path: Path, rank: int, world: int, queue_size: int = 8, commit_interval: float = 1.0) -> None:
        self.path, self.rank = Path(path), rank
        root = zarr.open_group(str(self.path), mode="r")
        steps = root["steps"]
        self.rows: ColumnRows | None = None
        if "grad" in steps:  # (a `gradients: recompute` store has no rows to write)
            C = fmt.column_chunks(steps["grad"])
            if C != world:
                raise StoreError(f"store {self.path} splits gradient rows into {C} columns, this torchrun has {world} ranks")
            self.rows = ColumnRows(self.path, steps["grad"], [rank])
        self._P = int(root["checkpoints/theta"].shape[1])
        self.corrections: list[dict[str, Any]] = []
        self.committed_steps = 0
        self.cpu_seconds = 0.0
        self.commit_interval = commit_interval
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._pool: queue.LifoQueue[np.ndarray] = queue.LifoQueue()
        if self.rows is not None:
            for _ in range(max(1, queue_size) + 2):
                self._pool.put(np.zeros(self._P, dtype=self.rows.codec.dtype))
        self._error: BaseException | None = None
        progress_path(self.path, rank).parent.mkdir(exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"lmclean-peer-writer-{rank}", daemon=True)
        self._thread.start()

    def grad_buffer(self) -> np.ndarray:
        """A free (P,) buffer (back-pressure: waits while all are queued), as StoreWriter.grad_buffer."""
        return pooled_buffer(self._pool, self._thread, self._raise_if_failed,
                             f"rank {self.rank}: the writer of store {self.path} stopped")

    def put(self, item: Any) -> None:
        self._raise_if_failed()
        if hasattr(item, "sample_ids"):  # a StepRow; checkpoints and corrections are rank 0's
            self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        try:
            self._queue.put(None, timeout=30)
            self._thread.join(timeout=60)
        except queue.Full:
            pass

    def verify(self) -> None:
        pass  # rank 0 verifies every column before it closes the store

    def mark_closed(self) -> None:
        pass

    def commit_now(self) -> None:
        pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"rank {self.rank} writing its gradient columns of store {self.path} failed: "
                             f"{self._error}") from self._error

    def _run(self) -> None:
        cpu0, last = time.thread_time(), time.monotonic()
        try:
            while (item := self._queue.get()) is not None:
                try:
                    if self._error is None:
                        if item.step != self.committed_steps:
                            raise StoreError(f"step {item.step} recorded out of order (step {self.committed_steps} next)")
                        if self.rows is not None and item.grad is not None:
                            self.rows.write(item.step, item.grad)
                        self.committed_steps = item.step + 1
                        if time.monotonic() - last >= self.commit_interval:
                            self._commit()
                            last = time.monotonic()
                except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
                    self._error = exc
                finally:
                    if getattr(item, "pooled", False) and item.grad is not None:
                        self._pool.put(item.grad)
            if self._error is None:
                self._commit()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        finally:
            if self.rows is not None:
                self.rows.close()
            self.cpu_seconds = time.thread_time() - cpu0

    def _commit(self) -> None:
        """Make this rank's columns durable, then say so in its progress file (rank 0 reads it)."""
        if self.rows is not None:
            self.rows.write_staged()
            self.rows.sync()
        atomic_write_json(progress_path(self.path, self.rank), {"durable_steps": self.committed_steps})


def peer_columns(array: Any) -> int:
    """N when this process is rank 0 of a torchrun writing one column chunk of N (its commits wait for
    the peers' progress files), else 0."""
    C = fmt.column_chunks(array)
    return C if C > 1 and owned_columns(C) is not None else 0
