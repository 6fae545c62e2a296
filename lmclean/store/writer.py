"""Background writer: the training thread enqueues numpy rows; one thread compresses and writes them.

One writer owns every chunk (zarr issue #3682: concurrent writes into one shard lose data), each
step's row is one chunk, and `COMMIT.json` is advanced only after all of a step's chunks are on
disk, so a crash mid-step leaves the previous committed state visible. The queue is bounded:
if the disk is slower than training, training waits (back-pressure), memory never grows.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from lmclean.errors import StoreError
from lmclean.store import format as fmt


@dataclass
class StepRow:
    step: int
    lr: float
    loss: float
    grad: np.ndarray  # (P,) float32
    sample_ids: np.ndarray  # (b,) int64, b <= B
    weights: np.ndarray  # (b,) float64
    tokens: np.ndarray  # (b, L') int32
    lengths: np.ndarray  # (b,) int32


@dataclass
class CheckpointRow:
    index: int
    step: int
    theta: np.ndarray  # (P,) float32
    state: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,) float32


def _to_bf16_bits(grad: np.ndarray) -> np.ndarray:
    return torch.from_numpy(grad).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def create_layout(path: Path, meta: dict[str, Any], P: int, T: int, B: int, L: int, K: int,
                  state_names: list[str], sample_ids: np.ndarray, fingerprints: np.ndarray) -> None:
    """Create every array of a new store (empty chunks) and its attributes."""
    precision, codec = meta["precision"], meta["codec"]
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    steps = root.create_group("steps")
    steps.create_array("lr", shape=(T,), chunks=(1,), dtype="float64", fill_value=np.nan, compressors=None)
    steps.create_array("loss", shape=(T,), chunks=(1,), dtype="float64", fill_value=np.nan, compressors=None)
    steps.create_array("grad_norm", shape=(T,), chunks=(1,), dtype="float64", fill_value=np.nan, compressors=None)
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
        ck.create_array(name, shape=(K, P), chunks=(1, P), dtype="float32", fill_value=np.nan, compressors=fmt.grad_codec("fp32", "auto"))
    samples = root.create_group("samples")
    N = len(sample_ids)
    samples.create_array("id", shape=(N,), chunks=(max(N, 1),), dtype="int64", compressors=fmt.INT_CODEC)[:] = sample_ids
    samples.create_array("fingerprint", shape=(N, 32), chunks=(max(N, 1), 32), dtype="uint8", compressors=None)[:] = fingerprints
    root.attrs[fmt.META_KEY] = meta
    fmt.write_json_atomic(path / fmt.COMMIT_FILE, {"committed_steps": 0, "checkpoints": [], "closed": False})


class StoreWriter:
    """Writes step rows and checkpoints to an existing store layout from one background thread."""

    def __init__(self, path: Path, queue_size: int = 8, committed_steps: int = 0, checkpoints: list[int] | None = None) -> None:
        self.path = Path(path)
        root = zarr.open_group(str(self.path), mode="r+")
        self._steps = root["steps"]
        self._ck = root["checkpoints"]
        self._precision = root.attrs[fmt.META_KEY]["precision"]
        self._arrays = {name: self._steps[name] for name in ["lr", "loss", "grad_norm", "grad", "sample_ids", "weights", "lengths", "tokens"]}
        self._B = self._arrays["sample_ids"].shape[1]
        self._L = self._arrays["tokens"].shape[2]
        self.committed_steps = committed_steps
        self.checkpoints = sorted(checkpoints or [])
        self.bytes_raw = 0
        self.write_seconds = 0.0
        self._queue: queue.Queue[StepRow | CheckpointRow | None] = queue.Queue(maxsize=max(1, queue_size))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lmclean-store-writer", daemon=True)
        self._thread.start()

    # -- training-thread side -------------------------------------------------------------
    def put(self, item: StepRow | CheckpointRow) -> None:
        self._raise_if_failed()
        self._queue.put(item)

    def close(self) -> None:
        """Flush the queue, stop the thread, and re-raise any write error."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop without raising (used while another exception propagates)."""
        try:
            self._queue.put(None, timeout=5)
            self._thread.join(timeout=30)
        except queue.Full:
            pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"writing store {self.path} failed: {self._error}") from self._error

    # -- writer-thread side ----------------------------------------------------------------
    def _run(self) -> None:
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

    def _write_checkpoint(self, row: CheckpointRow) -> None:
        self._ck["theta"][row.index] = row.theta
        for name, value in row.state.items():
            self._ck[name][row.index] = value
        self._ck["step"][row.index] = row.step
        if row.step not in self.checkpoints:
            self.checkpoints.append(row.step)
            self.checkpoints.sort()
        self._commit()

    def _write_step(self, row: StepRow) -> None:
        t, b = row.step, len(row.sample_ids)
        if b > self._B or (b and row.tokens.shape[1] > self._L):
            raise StoreError(f"step {t}: batch of {b}x{row.tokens.shape[1]} exceeds the store's {self._B}x{self._L}")
        a = self._arrays
        grad = _to_bf16_bits(row.grad) if self._precision == "bf16" else row.grad
        a["grad"][t] = grad
        ids = np.full(self._B, -1, dtype=np.int64)
        ids[:b] = row.sample_ids
        w = np.zeros(self._B, dtype=np.float64)
        w[:b] = row.weights
        lens = np.zeros(self._B, dtype=np.int32)
        lens[:b] = row.lengths
        toks = np.zeros((self._B, self._L), dtype=np.int32)
        if b:
            toks[:b, : row.tokens.shape[1]] = row.tokens
        a["sample_ids"][t] = ids
        a["weights"][t] = w
        a["lengths"][t] = lens
        a["tokens"][t] = toks
        a["lr"][t] = row.lr
        a["loss"][t] = row.loss
        a["grad_norm"][t] = float(np.linalg.norm(row.grad.astype(np.float64)))
        self.bytes_raw += row.grad.nbytes
        self.committed_steps = max(self.committed_steps, t + 1)
        self._commit()

    def _commit(self) -> None:
        fmt.write_json_atomic(self.path / fmt.COMMIT_FILE, {
            "committed_steps": self.committed_steps, "checkpoints": self.checkpoints, "closed": False})

    def mark_closed(self) -> None:
        fmt.write_json_atomic(self.path / fmt.COMMIT_FILE, {
            "committed_steps": self.committed_steps, "checkpoints": self.checkpoints, "closed": True})


def store_size_bytes(path: Path, subdir: str = "") -> int:
    root = Path(path) / subdir
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
