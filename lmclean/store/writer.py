"""Background writer: the training thread enqueues numpy rows; one thread encodes and writes them.

One writer owns every chunk (zarr issue #3682: concurrent writes into one shard lose data), and
`COMMIT.json` is advanced only after all of a step's chunks are on disk, so a crash mid-step leaves
the previous committed state visible. The queue is bounded: if the disk is slower than training,
training waits (back-pressure), memory never grows.

Why it looks as it does: on CPU training every bit of writer CPU is taken from training. So the
hot path encodes chunks itself through lmclean/store/codec.py instead of zarr's array API, calls
no BLAS (its threads spin on torch's cores), creates no file per step (small per-step arrays are
kept in blocks of BLOCK_ROWS steps and rewritten at each commit, tokens in blocks of TOKEN_ROWS,
gradient rows appended to shards: lmclean/store/shard.py), and wakes at most every `batch_wait`
seconds. The measurements are in benchmarks/README.md ("Why the store writer looks as it does").
Commits are throttled to one per `commit_interval` seconds, plus one at every checkpoint and one
when the writer stops (close/abort): a crash (SIGKILL) loses at most that much work.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.atomic import PARTIAL_SUFFIX, DirSync, atomic_write_json
from lmclean.store.chunks import BlockArray, RowArray
from lmclean.store.corrections import CorrectionRow, write_correction
from lmclean.store.quant import quantize
from lmclean.store.retention import Retention, read_retained as _read_retained
from lmclean.store.columns import peer_columns, peer_steps, pooled_buffer, row_array, wait_for_peers


@dataclass
class StepRow:
    step: int
    lr: float
    loss: float
    grad: np.ndarray | None  # (P,) as stored: float32, or the uint16 bits of bfloat16 in a bf16 store; None: recompute
    grad_norm: float  # ‖g‖₂ of the gradient as computed, before clipping and any rounding
    sample_ids: np.ndarray  # (b,) int64, b <= B
    weights: np.ndarray  # (b,) float64
    tokens: np.ndarray  # (b, L') int32
    lengths: np.ndarray  # (b,) int32
    pooled: bool = False  # grad is a buffer of the writer's pool (grad_buffer): returned once written
    clip: float = 1.0  # factor the applied gradient `grad` was clipped by
    micro: np.ndarray | None = None  # (b,) int32 micro-batch index of each row (stores with micro_batches)
    width: np.ndarray | None = None  # (b,) int32 padded width of the row's micro-batch


@dataclass
class CheckpointRow:
    index: int
    step: int
    theta: np.ndarray  # (P,) float32
    state: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,) float32


@dataclass
class _Barrier:
    """A queue item: the writer commits what came before it, runs `action`, and sets `done`."""

    done: threading.Event
    action: Callable[[], None] | None = None


class StoreWriter:
    """Writes step rows and checkpoints to an existing store layout from one background thread."""

    def __init__(self, path: Path, queue_size: int = 8, committed_steps: int = 0, checkpoints: list[int] | None = None,
                 commit_interval: float = 1.0, batch_wait: float = 0.03,
                 corrections: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        root = zarr.open_group(str(self.path), mode="r")
        meta = root.attrs[fmt.META_KEY]
        self._plan = list(meta["checkpoint_plan"])
        steps = root["steps"]
        self._rows = {name: row_array(self.path, steps[name]) for name in fmt.ROW_ARRAYS if name in steps}
        self._peers = peer_columns(steps["grad"]) if "grad" in steps else 0  # torchrun: ranks writing grad columns
        self._int8 = meta["precision"] == "int8"  # rows arrive as float32 and are quantized here
        self._retention = Retention(self.path, meta, self._plan, self._rows["grad"].rows if "grad" in self._rows else 1,
                                    _read_retained(self.path))
        # (a store written before steps/clip existed has no such array: its steps are all unclipped)
        self._blocks = {name: BlockArray(self.path, steps[name], committed_steps) for name in fmt.BLOCK_ARRAYS
                        if name in steps}
        self._tokens = BlockArray(self.path, steps["tokens"], committed_steps)  # filled at commits only
        self._ck = {name: RowArray(self.path, arr) for name, arr in root["checkpoints"].arrays()}
        for arr in (*self._rows.values(), *self._blocks.values(), self._tokens, *self._ck.values()):
            _remove_partials(arr.dir)  # temp files of a writer that was killed mid-write
        self._B = self._blocks["sample_ids"].shape[1]
        self._L = self._tokens.shape[2]
        self._P = int(root["checkpoints/theta"].shape[1])
        self.committed_steps = committed_steps
        self.checkpoints = sorted(checkpoints or [])
        self.corrections = list(corrections or [])  # COMMIT.json's events (lmclean/store/corrections.py)
        self.commit_interval = commit_interval
        self.batch_wait = batch_wait
        self.max_pending_bytes = 8 << 20  # token rows held for the next commit, at most
        self._pending_tokens: list[tuple[int, np.ndarray]] = []
        self._pending_bytes = 0
        self.cpu_seconds = 0.0  # CPU time of the writer thread, set when it stops
        self._last_commit = time.monotonic()
        self._dirty = False
        self._queue: queue.Queue[StepRow | CheckpointRow | CorrectionRow | None] = queue.Queue(maxsize=max(1, queue_size))
        # Recycled gradient buffers: one per queue slot, one being written, one being filled. A fresh
        # buffer per step (torch's own, handed over) cost ~170 page faults per step on the training
        # thread, and the TLB shootdowns of freeing it on this thread interrupt training's cores.
        # Last in, first out: while the writer keeps up only the first few buffers are ever used,
        # and np.zeros leaves the others unmapped (no memory for a large model's idle buffers).
        self._pool: queue.LifoQueue[np.ndarray] = queue.LifoQueue()
        for _ in range(max(1, queue_size) + 2 if "grad" in self._rows else 0):  # none: gradients recomputed
            self._pool.put(np.zeros(self._P, dtype=np.float32 if self._int8 else self._rows["grad"].codec.dtype))
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmclean-store-writer", daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------------------------
    def grad_buffer(self) -> np.ndarray:
        """A free (P,) buffer in the stored dtype to fill and pass as a StepRow's grad (pooled=True);
        waits while all are queued (back-pressure)."""
        return pooled_buffer(self._pool, self._thread, self._raise_if_failed,
                             f"writing store {self.path} failed: the writer thread stopped")

    def put(self, item: StepRow | CheckpointRow | CorrectionRow) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def flush(self, then: Callable[[], None] | None = None) -> None:
        """Block until everything queued so far is written and committed (then run `then` on the
        writer thread, which is idle until the caller queues again); re-raise a write error.
        An online request reads the store up to the live step between two training steps."""
        barrier = _Barrier(threading.Event(), then)
        self.put(barrier)  # type: ignore[arg-type]
        barrier.done.wait()
        self._raise_if_failed()

    def reload_tokens(self) -> None:
        """Re-read the in-memory block of token rows from disk after a scrub rewrote it: the block is
        rewritten whole at the next commit and must not write forgotten tokens back."""
        def reload() -> None:
            block = self._tokens
            data = block.read_chunk(block.block)
            if data is not None:
                block.buf[...] = data

        self.flush(then=reload)

    def close(self) -> None:
        """Flush the queue, commit, stop the thread, and re-raise any write error."""
        self._stopping.set()
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()
        if self._peers:  # torchrun: commit again once every rank's columns of every step are durable
            wait_for_peers(self.path, self._peers, self.committed_steps)
            self._commit()

    def abort(self) -> None:
        """Write and commit what is queued, then stop, without raising (another exception propagates)."""
        self._stopping.set()
        try:
            self._queue.put(None, timeout=30)
            self._thread.join(timeout=60)
        except queue.Full:
            pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing store {self.path} failed: {self._error}") from self._error

    # -- writer-thread side ----------------------------------------------------------------
    def _run(self) -> None:
        cpu0 = time.thread_time()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _Barrier):
                    self._barrier(item)
                    continue
                try:
                    if self._error is not None:
                        continue  # drain so the producer never blocks forever
                    if isinstance(item, CheckpointRow):
                        self._write_checkpoint(item)
                    elif isinstance(item, CorrectionRow):
                        self._write_correction(item)
                    else:
                        self._write_step(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
                    self._error = exc
                finally:
                    if isinstance(item, StepRow) and item.pooled and item.grad is not None:
                        self._pool.put(item.grad)  # encoded and written (or dropped): free again
                if self._queue.empty():  # let a few steps queue up: fewer wake-ups on busy cores
                    if self._error is None:
                        try:
                            self._write_staged()  # the drained steps' gradients, in one write
                        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
                            self._error = exc
                    self._stopping.wait(self.batch_wait)
        finally:
            if self._dirty and self._error is None:
                try:
                    self._commit()
                except BaseException as exc:  # noqa: BLE001
                    self._error = exc
            for arr in (*self._rows.values(), *self._blocks.values(), self._tokens, *self._ck.values()):
                arr.close()
            self.cpu_seconds = time.thread_time() - cpu0

    def _barrier(self, item: "_Barrier") -> None:
        try:
            if self._error is None:
                self._write_staged()
                self._commit()
                if item.action is not None:
                    item.action()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
            self._error = exc
        finally:
            item.done.set()

    def _write_checkpoint(self, row: CheckpointRow) -> None:
        c, pending = self._ck, DirSync()
        c["theta"].write(row.index, row.theta, pending)
        for name, value in row.state.items():
            c[name].write(row.index, value, pending)
        c["step"].write(row.index, np.array([row.step]), pending)
        pending.sync()  # durable before the commit below lists the checkpoint
        if row.step not in self.checkpoints:
            self.checkpoints.append(row.step)
            self.checkpoints.sort()
        self._commit()  # checkpoints are rare and are what resume restarts from: commit at once

    def _write_correction(self, row: CorrectionRow) -> None:
        """Write the event's arrays (durable), then list it: committed at once, like a checkpoint."""
        if row.step < self.committed_steps:
            raise StoreError(f"correction at step {row.step} comes after step {self.committed_steps - 1} was recorded; "
                             "a jump must be recorded before its step")
        self._write_staged()
        write_correction(self.path, row)
        self.corrections = [e for e in self.corrections if e["index"] != row.index] + [row.listing()]
        self._commit()

    def _write_step(self, row: StepRow) -> None:
        t, b = row.step, len(row.sample_ids)
        if t != self.committed_steps:
            raise StoreError(f"step {t} recorded out of order: the store expects step {self.committed_steps} next")
        if b > self._B or (b and row.tokens.shape[1] > self._L):
            raise StoreError(f"step {t}: batch of {b}x{row.tokens.shape[1]} exceeds the store's {self._B}x{self._L}")
        if ("grad" in self._rows) != (row.grad is not None):
            raise StoreError(f"step {t}: store {self.path} " + ("records gradient rows; pass the step's gradient" if "grad" in
                             self._rows else "recomputes gradients (gradients: recompute); pass no gradient row"))
        if row.grad is not None and row.grad.shape != (self._P,):
            raise StoreError(f"step {t}: gradient of shape {row.grad.shape}, the store expects ({self._P},)")
        ids = np.full(self._B, -1, dtype=np.int64)
        ids[:b] = row.sample_ids
        toks = np.zeros((self._B, self._L), dtype=np.int32)
        if b:
            toks[:b, : row.tokens.shape[1]] = row.tokens
        r, k = self._rows, self._blocks
        if row.grad is not None:  # None: a `gradients: recompute` store
            if self._int8:
                q, scale = quantize(row.grad)
                r["grad"].write(t, q)
                r["grad_scale"].write(t, scale)
            else:
                r["grad"].write(t, row.grad)
        self._pending_tokens.append((t, toks))  # put in their block at the commit, after the sample ids
        self._pending_bytes += toks.nbytes
        w = np.zeros(self._B, dtype=np.float64)
        w[:b] = row.weights
        lens = np.zeros(self._B, dtype=np.int32)
        lens[:b] = row.lengths
        for name, given in (("micro", row.micro), ("width", row.width)):
            if name in k:
                if given is None:
                    raise StoreError(f"step {t}: store {self.path} records micro-batches; pass micro and widths")
                arr = np.zeros(self._B, dtype=np.int32)
                arr[:b] = given
                k[name].set(t, arr)
        for name, value in (("sample_ids", ids), ("weights", w), ("lengths", lens), ("lr", row.lr),
                            ("loss", row.loss), ("grad_norm", row.grad_norm), ("clip", row.clip)):
            if name in k:
                k[name].set(t, value)
            elif value != 1.0:
                raise StoreError(f"step {t} was clipped (factor {value:.4g}) but store {self.path} predates recorded "
                                 "clipping; record into a new store")
        self.committed_steps = t + 1  # (in memory; COMMIT.json follows at the next commit)
        self._dirty = True
        if (time.monotonic() - self._last_commit >= self.commit_interval
                or self._pending_bytes >= self.max_pending_bytes):
            self._commit()

    def _commit(self, closed: bool = False) -> None:
        """Make everything written so far visible: blocks, then token blocks, then COMMIT.json.

        Token rows enter their block only here, after the sample-ids block is on disk, so every
        token chunk on disk, even one past the commit point after a crash, has its sample ids on
        disk (scrubbing relies on it). Everything COMMIT.json counts is made durable first: the
        open gradient shard (fdatasync), each block chunk (fsync), their directories."""
        self._write_staged()
        pending = DirSync()
        for rows in self._rows.values():
            rows.sync()
        for arr in self._blocks.values():
            arr.flush(pending)
        for t, toks in self._pending_tokens:
            self._tokens.set(t, toks)  # writes a block as it completes
        self._tokens.flush(pending)
        self._pending_tokens.clear()
        self._pending_bytes = 0
        pending.sync()
        # a checkpoint counts once the steps before it do (a misused Recorder can send it early)
        n = self.committed_steps  # torchrun: only steps whose every column chunk is durable (store/columns.py)
        if self._peers:
            n = min(n, peer_steps(self.path, self._peers))
        listed = [c for c in self.checkpoints if c <= n]
        retained = self._retention.start(n, listed)
        listed = [c for c in listed if c >= retained]
        marker: dict[str, Any] = {"committed_steps": n, "checkpoints": listed, "closed": closed}
        if retained:  # (absent: every step kept, the marker of a plain store stays as it was)
            marker["retained_from"] = retained
        events = [e for e in self.corrections if e["step"] <= n]
        if events:  # (absent when there are none: the marker of a plain store stays as it was)
            marker["corrections"] = events
        atomic_write_json(self.path / fmt.COMMIT_FILE, marker)
        self._last_commit = time.monotonic()
        self._dirty = n < self.committed_steps
        if retained:  # after the marker no longer lists them: a crash in between leaves only garbage
            self.checkpoints = [c for c in self.checkpoints if c >= retained]
            self._retention.drop_before(retained, self._rows.values(), self._ck.values())

    def _write_staged(self) -> None:
        for arr in self._rows.values():
            arr.write_staged()

    def commit_now(self) -> None:
        """Commit from the training thread (only while the queue is idle, e.g. right after reopening)."""
        self._commit()

    def verify(self) -> None:
        """After close: every committed step and checkpoint has all its chunk files (else StoreError)."""
        for arr in (*self._rows.values(), *self._blocks.values(), self._tokens):
            first = self._retention.retained if arr in self._rows.values() else 0
            missing = arr.first_missing(self.committed_steps, first)
            if missing is not None:
                raise StoreError(f"store {self.path}: array {arr.name} has no chunk for committed step {missing}")
        for step in self.checkpoints:
            index = self._plan.index(step)
            for arr in self._ck.values():
                if not arr.chunk_path(index).is_file():
                    raise StoreError(f"store {self.path}: array {arr.name} has no chunk for the checkpoint of step {step}")
        for e in self.corrections:
            for name in ("theta", *e.get("state", [])):
                if not (self.path / "corrections" / f"c{e['index']}" / name / "c.0").is_file():
                    raise StoreError(f"store {self.path}: correction {e['index']} (step {e['step']}) has no {name} chunk")

    def mark_closed(self) -> None:
        self._commit(closed=True)


def _remove_partials(directory: Path) -> None:
    """Unlink the temp files (`.<key>.<pid>.partial`) a killed writer left; the caller holds the
    store (the lock), so no other writer's temp file can be among them."""
    for entry in os.scandir(directory):
        if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def store_size_bytes(path: Path, subdir: str = "") -> int:
    root = Path(path) / subdir
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
