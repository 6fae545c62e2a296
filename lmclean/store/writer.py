"""Background writer: the training thread enqueues numpy rows; one thread encodes and writes them.

One writer owns every chunk (zarr issue #3682: concurrent writes into one shard lose data), each
step's row is one chunk, and `COMMIT.json` is advanced only after all of a step's chunks are on
disk, so a crash mid-step leaves the previous committed state visible. The queue is bounded:
if the disk is slower than training, training waits (back-pressure), memory never grows.

The hot path does not go through zarr's async array API (about 1 ms and several thread hand-offs
per array write, which starved the training thread of the GIL): each row is encoded with the same
numcodecs codecs that the array's Zarr metadata names and written as the chunk file zarr itself
would read, atomically (temp file + rename). Commits are throttled to one per `commit_interval`
seconds, plus one at every checkpoint and at close/abort: a crash loses at most that much work.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr
import zarr.codecs as zc

from lmclean.errors import StoreError
from lmclean.store import format as fmt


@dataclass
class StepRow:
    step: int
    lr: float
    loss: float
    grad: np.ndarray  # (P,) float32, the gradient as computed
    sample_ids: np.ndarray  # (b,) int64, b <= B
    weights: np.ndarray  # (b,) float64
    tokens: np.ndarray  # (b, L') int32
    lengths: np.ndarray  # (b,) int32
    grad_bits: np.ndarray | None = None  # (P,) uint16 bfloat16 bits when the store is bf16


@dataclass
class CheckpointRow:
    index: int
    step: int
    theta: np.ndarray  # (P,) float32
    state: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,) float32


def _numcodec(codec: Any) -> Any:
    """The numcodecs encoder equivalent to one bytes->bytes Zarr v3 codec (what zarr itself calls)."""
    if isinstance(codec, zc.BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return numcodecs.Blosc.from_config({"cname": codec.cname.value, "clevel": codec.clevel, "shuffle": shuffle,
                                            "blocksize": codec.blocksize, "typesize": codec.typesize})
    if isinstance(codec, zc.ZstdCodec):
        return numcodecs.Zstd.from_config({"level": codec.level, "checksum": codec.checksum})
    raise StoreError(f"codec {type(codec).__name__} is not supported by the lmclean writer")


class RowArray:
    """A Zarr v3 array chunked one row per chunk, written a row at a time as raw chunk files."""

    def __init__(self, store_path: Path, array: zarr.Array) -> None:
        meta = array.metadata
        self.name = array.path
        self.shape = tuple(array.shape)
        chunk_shape = tuple(meta.chunk_grid.chunk_shape)
        if chunk_shape != (1, *self.shape[1:]):
            raise StoreError(f"array {self.name} has chunks {chunk_shape}, the writer needs one row per chunk")
        codecs = list(meta.codecs)
        if not isinstance(codecs[0], zc.BytesCodec) or (codecs[0].endian is not None and codecs[0].endian.value != "little"):
            raise StoreError(f"array {self.name}: the writer needs little-endian bytes as the first codec")
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.encoders = [_numcodec(c) for c in codecs[1:]]
        self.dir = store_path / array.path
        self._key = meta.encode_chunk_key
        self._made: set[Path] = set()

    def chunk_path(self, index: int) -> Path:
        return self.dir / self._key((index,) + (0,) * (len(self.shape) - 1))

    def encode(self, row: np.ndarray) -> bytes:
        data = np.ascontiguousarray(row, dtype=self.dtype)
        if data.size != int(np.prod(self.shape[1:])):
            raise StoreError(f"array {self.name}: row of shape {data.shape}, expected {self.shape[1:]}")
        out: Any = data
        for enc in self.encoders:
            out = enc.encode(out)
        return out.tobytes() if isinstance(out, np.ndarray) else bytes(out)

    def write(self, index: int, row: np.ndarray) -> int:
        """Write row `index` atomically (temp file + rename); returns the bytes written."""
        if not 0 <= index < self.shape[0]:
            raise StoreError(f"array {self.name}: row {index} is outside 0..{self.shape[0] - 1}")
        data = self.encode(row)
        if os.environ.get("LMCLEAN_WRITER_EXP") == "encode":
            return len(data)
        path = self.chunk_path(index)
        if path.parent not in self._made:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(data)


def create_layout(path: Path, meta: dict[str, Any], P: int, T: int, B: int, L: int, K: int,
                  state_names: list[str], sample_ids: np.ndarray, fingerprints: np.ndarray) -> None:
    """Create every array of a new store (no chunks yet: unwritten rows read as fill sentinels)."""
    precision, codec = meta["precision"], meta["codec"]
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    steps = root.create_group("steps")
    for name in fmt.STEP_SCALARS:
        steps.create_array(name, shape=(T,), chunks=(1,), dtype="float64", fill_value=np.nan, compressors=None)
    gdtype, gfill = fmt.grad_dtype(precision)
    steps.create_array("grad", shape=(T, P), chunks=(1, P), dtype=gdtype, fill_value=gfill,
                       compressors=fmt.grad_codec(precision, codec))
    steps.create_array("sample_ids", shape=(T, B), chunks=(1, B), dtype="int64", fill_value=fmt.MISSING_INT, compressors=fmt.INT_CODEC)
    steps.create_array("weights", shape=(T, B), chunks=(1, B), dtype="float64", fill_value=np.nan, compressors=fmt.INT_CODEC)
    steps.create_array("lengths", shape=(T, B), chunks=(1, B), dtype="int32", fill_value=fmt.MISSING_INT, compressors=fmt.INT_CODEC)
    steps.create_array("tokens", shape=(T, B, L), chunks=(1, B, L), dtype="int32", fill_value=fmt.MISSING_INT, compressors=fmt.INT_CODEC)
    ck = root.create_group("checkpoints")
    ck.create_array("step", shape=(K,), chunks=(1,), dtype="int64", fill_value=fmt.MISSING_INT, compressors=None)
    for name in ["theta", *state_names]:
        ck.create_array(name, shape=(K, P), chunks=(1, P), dtype="float32", fill_value=np.nan,
                        compressors=fmt.grad_codec("fp32", "auto"))
    samples = root.create_group("samples")
    N = len(sample_ids)
    samples.create_array("id", shape=(N,), chunks=(max(N, 1),), dtype="int64", compressors=fmt.INT_CODEC)[:] = sample_ids
    samples.create_array("fingerprint", shape=(N, 32), chunks=(max(N, 1), 32), dtype="uint8", compressors=None)[:] = fingerprints
    root.attrs[fmt.META_KEY] = meta
    fmt.write_json_atomic(path / fmt.COMMIT_FILE, {"committed_steps": 0, "checkpoints": [], "closed": False})


class StoreWriter:
    """Writes step rows and checkpoints to an existing store layout from one background thread."""

    def __init__(self, path: Path, queue_size: int = 8, committed_steps: int = 0, checkpoints: list[int] | None = None,
                 commit_interval: float = 0.2) -> None:
        self.path = Path(path)
        root = zarr.open_group(str(self.path), mode="r")
        meta = root.attrs[fmt.META_KEY]
        self._precision = meta["precision"]
        self._plan = list(meta["checkpoint_plan"])
        self._steps = {name: RowArray(self.path, root[f"steps/{name}"]) for name in fmt.STEP_ARRAYS}
        ck = root["checkpoints"]
        self._ck = {name: RowArray(self.path, arr) for name, arr in ck.arrays()}
        self._B = self._steps["sample_ids"].shape[1]
        self._L = self._steps["tokens"].shape[2]
        self.committed_steps = committed_steps
        self.checkpoints = sorted(checkpoints or [])
        self.commit_interval = commit_interval
        self.bytes_raw = 0
        self.bytes_written = 0
        self.write_seconds = 0.0  # wall time spent writing (includes waiting for the disk and the GIL)
        self.cpu_seconds = 0.0  # CPU time of the writer thread, set when it stops
        self.commits = 0
        self._last_commit = time.monotonic()
        self._dirty = False
        self._queue: queue.Queue[StepRow | CheckpointRow | None] = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmclean-store-writer", daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------------------------
    def put(self, item: StepRow | CheckpointRow) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def close(self) -> None:
        """Flush the queue, commit, stop the thread, and re-raise any write error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Write and commit what is queued, then stop, without raising (another exception propagates)."""
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
        if os.environ.get("LMCLEAN_WRITER_NICE"):  # EXPERIMENT
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(os.environ["LMCLEAN_WRITER_NICE"]))
        cpu0 = time.thread_time()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is not None:
                    continue  # drain so the producer never blocks forever
                try:
                    start = time.perf_counter()
                    if isinstance(item, CheckpointRow):
                        self._write_checkpoint(item)
                    else:
                        self._write_step(item)
                    self.write_seconds += time.perf_counter() - start
                except BaseException as exc:  # noqa: BLE001 - re-raised on the training thread
                    self._error = exc
        finally:
            if self._dirty:
                try:
                    self._commit()
                except BaseException as exc:  # noqa: BLE001
                    self._error = self._error or exc
            self.cpu_seconds = time.thread_time() - cpu0

    def _write_checkpoint(self, row: CheckpointRow) -> None:
        c = self._ck
        self.bytes_written += c["theta"].write(row.index, row.theta)
        for name, value in row.state.items():
            self.bytes_written += c[name].write(row.index, value)
        self.bytes_written += c["step"].write(row.index, np.array([row.step]))
        if row.step not in self.checkpoints:
            self.checkpoints.append(row.step)
            self.checkpoints.sort()
        self._commit()  # checkpoints are rare and are what resume restarts from: commit at once

    def _write_step(self, row: StepRow) -> None:
        t, b = row.step, len(row.sample_ids)
        EXP = os.environ.get("LMCLEAN_WRITER_EXP")
        if EXP == "drop":
            self.committed_steps = t + 1; return
        if EXP == "sleep":
            time.sleep(0.001); self.committed_steps = t + 1; return
        if t != self.committed_steps:
            raise StoreError(f"step {t} recorded out of order: the store expects step {self.committed_steps} next")
        if b > self._B or (b and row.tokens.shape[1] > self._L):
            raise StoreError(f"step {t}: batch of {b}x{row.tokens.shape[1]} exceeds the store's {self._B}x{self._L}")
        if row.grad.shape != (self._steps["grad"].shape[1],):
            raise StoreError(f"step {t}: gradient of shape {row.grad.shape}, the store expects ({self._steps['grad'].shape[1]},)")
        a = self._steps
        ids = np.full(self._B, -1, dtype=np.int64)
        ids[:b] = row.sample_ids
        w = np.zeros(self._B, dtype=np.float64)
        w[:b] = row.weights
        lens = np.zeros(self._B, dtype=np.int32)
        lens[:b] = row.lengths
        toks = np.zeros((self._B, self._L), dtype=np.int32)
        if b:
            toks[:b, : row.tokens.shape[1]] = row.tokens
        g64 = row.grad.astype(np.float64)
        n = a["grad"].write(t, row.grad_bits if self._precision == "bf16" else row.grad)
        n += a["sample_ids"].write(t, ids) + a["weights"].write(t, w) + a["lengths"].write(t, lens)
        n += a["tokens"].write(t, toks)
        n += a["lr"].write(t, np.array([row.lr])) + a["loss"].write(t, np.array([row.loss]))
        # ‖g‖ by a plain numpy reduction: np.dot / np.linalg.norm call BLAS, whose worker threads
        # spin on the cores torch's OpenMP threads need (measured: +250% step time on 2 cores)
        n += a["grad_norm"].write(t, np.array([float(np.sqrt(np.square(g64).sum()))]))
        self.bytes_written += n
        self.bytes_raw += row.grad.nbytes
        self.committed_steps = t + 1
        self._dirty = True
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self._commit()

    def _commit(self, closed: bool = False) -> None:
        fmt.write_json_atomic(self.path / fmt.COMMIT_FILE, {
            "committed_steps": self.committed_steps, "checkpoints": self.checkpoints, "closed": closed})
        self._last_commit = time.monotonic()
        self._dirty = False
        self.commits += 1

    def commit_now(self) -> None:
        """Commit from the training thread (only while the queue is idle, e.g. right after reopening)."""
        self._commit()

    def verify(self) -> None:
        """After close: every committed step and checkpoint has all its chunk files (else StoreError)."""
        for arr in self._steps.values():
            for t in range(self.committed_steps):
                if not arr.chunk_path(t).is_file():
                    raise StoreError(f"store {self.path}: array {arr.name} has no chunk for committed step {t}")
        for step in self.checkpoints:
            index = self._plan.index(step)
            for arr in self._ck.values():
                if not arr.chunk_path(index).is_file():
                    raise StoreError(f"store {self.path}: array {arr.name} has no chunk for the checkpoint of step {step}")

    def mark_closed(self) -> None:
        self._commit(closed=True)


def store_size_bytes(path: Path, subdir: str = "") -> int:
    root = Path(path) / subdir
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
