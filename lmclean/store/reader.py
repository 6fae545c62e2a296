"""Read a trajectory store: metadata, committed steps, step rows, checkpoints, and θ replay.

Only committed steps are visible (COMMIT.json). Chunks that were never written read as sentinels
(NaN / -2), which this reader turns into a precise StoreError instead of silent zeros.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from lmclean.errors import InputNotFoundError, StoreError, StoreVersionError
from lmclean.store import format as fmt
from lmclean.store.shard import read_row
from lmclean.train.flat import ParamManifest
from lmclean.train.optim import UpdateRule, rule_from_dict


@dataclass
class StepRecord:
    step: int
    lr: float
    loss: float
    grad_norm: float
    sample_ids: np.ndarray  # (b,) int64
    weights: np.ndarray  # (b,) float64
    tokens: np.ndarray  # (b, L) int32, right padded
    lengths: np.ndarray  # (b,) int32


class TrajectoryStore:
    """Read-only view of a store directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise InputNotFoundError(f"no lmclean store at {self.path}; create one with `lmclean record --store {self.path}`")
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
            meta = self.root.attrs.get(fmt.META_KEY)
        except Exception as exc:  # zarr raises many types for broken metadata
            raise StoreError(f"store {self.path} has unreadable metadata ({exc}); it may be damaged") from exc
        if not isinstance(meta, dict):
            raise StoreError(f"{self.path} is a Zarr group but not an lmclean store (no `{fmt.META_KEY}` attributes)")
        version = meta.get("format_version")
        if version != fmt.FORMAT_VERSION:
            raise StoreVersionError(
                f"store {self.path} has format version {version}, this lmclean reads version {fmt.FORMAT_VERSION}; "
                "use the lmclean version that wrote it (attribute lmclean_version) or re-record")
        self.meta: dict[str, Any] = meta
        self._readers: dict[str, _ChunkReader | None] = {}  # per array: direct chunk reads (None: via zarr)
        self._seen_committed = 0  # committed steps last read from COMMIT.json (see _check_step)
        self.manifest = ParamManifest.from_list(meta["manifest"])
        self.rule: UpdateRule = rule_from_dict(meta["optimizer"])
        try:
            self._steps = self.root["steps"]
            self._ck = self.root["checkpoints"]
        except KeyError as exc:
            raise StoreError(f"store {self.path} lacks the group {exc}; it is damaged or not an lmclean store") from exc

    # -- commit state ---------------------------------------------------------------------
    def commit_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / fmt.COMMIT_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"store {self.path} has no readable {fmt.COMMIT_FILE}; it was not created by lmclean record") from exc

    @property
    def committed_steps(self) -> int:
        return int(self.commit_state()["committed_steps"])

    @property
    def planned_steps(self) -> int:
        return int(self.meta["planned_steps"])

    @property
    def closed(self) -> bool:
        return bool(self.commit_state().get("closed"))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        return sorted(int(s) for s in self.commit_state()["checkpoints"])

    # -- rows --------------------------------------------------------------------------------
    def _check_step(self, t: int) -> None:
        # Steps below a count already seen committed stay committed while we hold the store (writers
        # take the lock): skip re-reading COMMIT.json on every row of a sweep.
        if 0 <= t < self._seen_committed:
            return
        n = self._seen_committed = self.committed_steps
        if not 0 <= t < n:
            raise StoreError(f"step {t} is not recorded in {self.path}: committed steps are 0..{n - 1}")

    def _row(self, name: str, index: int, step: int | None = None) -> np.ndarray:
        """Row `index` of array `name` (e.g. "steps/grad"); a never-written chunk is an error, not fill.

        Read from the chunk file directly where the codecs allow (see _ChunkReader); the result
        may be a read-only view: copy it before writing into it."""
        where = f"step {index}" if step is None else f"row {index} (checkpoint of step {step})"
        if name not in self._readers:
            self._readers[name] = _ChunkReader.for_array(self.path, self.root[name])
        reader = self._readers[name]
        if reader is not None:
            if not 0 <= index < reader.length:
                raise StoreError(f"store {self.path}: array {name} has no {where} (it holds {reader.length} rows)")
            try:
                chunk = reader.chunk(index // reader.rows)
            except Exception as exc:  # numcodecs raises many types for a corrupted chunk
                raise StoreError(f"store {self.path}: array {name} at {where} is unreadable ({type(exc).__name__}: "
                                 f"{exc}); the store is damaged") from exc
            if chunk is None:
                raise StoreError(f"store {self.path}: array {name} has no data at {where} (chunk file missing); "
                                 "the store is damaged")
            return chunk[index % reader.rows]
        arr = self.root[name]
        try:
            value = np.asarray(arr[index])
        except Exception as exc:  # zarr/numcodecs raise many types for a corrupted chunk
            raise StoreError(f"store {self.path}: array {name} at {where} is unreadable ({type(exc).__name__}: {exc}); "
                             "the store is damaged") from exc
        if _all_fill(value, arr.fill_value) and not self._chunk_exists(arr, index):
            raise StoreError(f"store {self.path}: array {name} has no data at {where} (chunk file missing); "
                             "the store is damaged")
        return value

    def _chunk_exists(self, arr: Any, index: int) -> bool:
        """Whether the chunk file holding row `index` exists (rows per chunk from the metadata)."""
        rows = arr.metadata.chunk_grid.chunk_shape[0]
        key = arr.metadata.encode_chunk_key((index // rows,) + (0,) * (arr.ndim - 1))
        return (self.path / arr.path / key).is_file()

    def step(self, t: int) -> StepRecord:
        self._check_step(t)
        ids = self._row("steps/sample_ids", t)
        keep = ids >= 0
        lengths = self._row("steps/lengths", t)[keep]
        tokens = self._row("steps/tokens", t)[keep]
        width = int(lengths.max()) if len(lengths) else 1
        return StepRecord(
            step=t, lr=float(self._row("steps/lr", t)), loss=float(self._row("steps/loss", t)),
            grad_norm=float(self._row("steps/grad_norm", t)), sample_ids=ids[keep],
            weights=self._row("steps/weights", t)[keep], tokens=tokens[:, :width], lengths=lengths)

    def grad(self, t: int) -> torch.Tensor:
        """Mean batch gradient g[t] as float32 (P,), decoded from the bf16 bits when stored so."""
        self._check_step(t)
        raw = self._row("steps/grad", t)
        if self.meta["precision"] == "bf16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        return torch.from_numpy(raw.copy())

    def scalars(self, name: str) -> np.ndarray:
        """A per-step scalar array (lr, loss, grad_norm) over committed steps."""
        if name not in fmt.STEP_SCALARS:
            raise StoreError(f"no per-step scalar {name!r}; use one of {list(fmt.STEP_SCALARS)}")
        values = np.asarray(self._steps[name][: self.committed_steps])
        for t in np.nonzero(np.isnan(values))[0]:
            self._row(f"steps/{name}", int(t))  # raises when the NaN is a missing chunk, not a recorded NaN
        return values

    def all_sample_ids(self) -> np.ndarray:
        """(T, B) sample ids of committed steps, -1 = empty slot."""
        ids = np.asarray(self._steps["sample_ids"][: self.committed_steps])
        missing = np.nonzero((ids == fmt.MISSING_INT).all(axis=1))[0]
        if len(missing):
            raise StoreError(f"store {self.path}: array steps/sample_ids has no data at step {int(missing[0])} "
                             "(chunk file missing); the store is damaged")
        return ids

    # -- samples -----------------------------------------------------------------------------
    @cached_property
    def sample_fingerprints(self) -> dict[int, str]:
        ids = np.asarray(self.root["samples/id"][:])
        fps = np.asarray(self.root["samples/fingerprint"][:])
        return {int(i): bytes(fp).hex() for i, fp in zip(ids, fps)}

    # -- checkpoints and θ replay -------------------------------------------------------------
    def checkpoint(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """θ and optimizer state saved before step `step`."""
        if step not in self.checkpoint_steps:
            raise StoreError(f"store {self.path} has no committed checkpoint at step {step}; "
                             f"checkpoints: {self.checkpoint_steps}")
        steps = np.asarray(self._ck["step"][:])
        where = np.nonzero(steps == step)[0]
        if not len(where):
            raise StoreError(f"store {self.path}: array checkpoints/step does not list committed checkpoint {step}; "
                             "the store is damaged")
        k = int(where[0])
        theta = torch.from_numpy(self._row("checkpoints/theta", k, step).copy())
        state = {n: torch.from_numpy(self._row(f"checkpoints/{n}", k, step).copy()) for n in self.rule.state_names()}
        return theta, state

    def nearest_checkpoint(self, t: int) -> int:
        earlier = [s for s in self.checkpoint_steps if s <= t]
        if not earlier:
            raise StoreError(f"store {self.path} has no checkpoint at or before step {t}")
        return earlier[-1]

    def iter_states(self, start: int, stop: int, grad: Callable[[int], torch.Tensor] | None = None,
                    ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield (t, θ[t], optimizer state before step t) for start <= t <= stop, streaming.

        Begins at the nearest checkpoint at or before `start` and replays the update rule on the
        stored gradients (read with `grad`, default `self.grad`: a caller that also needs g[t] can
        pass a caching reader so each row is decoded once); yielded tensors are reused buffers.
        """
        read_grad = grad or self.grad
        if stop > self.committed_steps:
            raise StoreError(f"step {stop} is beyond the {self.committed_steps} committed steps of {self.path}")
        c = self.nearest_checkpoint(start)
        theta, state = self.checkpoint(c)
        lrs = self.scalars("lr")
        for t in range(c, stop + 1):
            if t >= start:
                yield t, theta, state
            if t < stop:
                self.rule.step(theta, read_grad(t), float(lrs[t]), state, t)

    def theta_at(self, t: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """θ[t] (parameters before step t; t = committed_steps gives the final θ) and its optimizer state."""
        if t in self.checkpoint_steps:
            return self.checkpoint(t)
        for _, theta, state in self.iter_states(t, t):
            return theta.clone(), {k: v.clone() for k, v in state.items()}
        raise StoreError(f"cannot rebuild step {t}")

    @property
    def model_dir(self) -> Path:
        return self.path / fmt.MODEL_DIR

    def sample_positions(self, sample_id: int) -> list[tuple[int, int]]:
        """(step, batch position) of every committed occurrence of a sample."""
        ids = self.all_sample_ids()
        steps, pos = np.nonzero(ids == sample_id)
        return [(int(s), int(p)) for s, p in zip(steps, pos)]


class _ChunkReader:
    """Rows of one array read straight from its chunk files with numcodecs (no zarr call).

    zarr's array API costs about 1 ms per read, which made reading the store most of the cost of
    rollback and of reused-curvature sweeps. Keeps the last decoded chunk of block arrays (a sweep
    reads their rows in order: one decode per block), keyed by the file's inode, size and mtime so
    a chunk rewritten in place (scrub, resume) is read again."""

    def __init__(self, store_path: Path, arr: Any, dtype: np.dtype, codecs: list[Any]) -> None:
        meta = arr.metadata
        self.length = int(arr.shape[0])
        self.chunk_shape = tuple(int(n) for n in meta.chunk_grid.chunk_shape)
        self.shard_rows = fmt.shard_rows(arr)  # a sharded array: rows per shard file (chunks are rows)
        if self.shard_rows is not None:
            self.chunk_shape = (1, *self.chunk_shape[1:])
        self.rows = self.chunk_shape[0]
        self.decoders = codecs[::-1]  # decode in reverse encode order
        self.dtype = dtype
        self.dir = store_path / arr.path
        self._key = meta.encode_chunk_key
        self._ndim = arr.ndim
        self._cached: tuple[tuple[int, int, int, int], np.ndarray] | None = None

    @classmethod
    def for_array(cls, store_path: Path, arr: Any) -> "_ChunkReader | None":
        """A reader, or None when the array's codecs are not bytes(little) + blosc/zstd (zarr reads those)."""
        try:
            dtype, codecs = fmt.chunk_codecs(arr)
        except StoreError:
            return None
        return cls(store_path, arr, dtype, codecs)

    def chunk(self, index: int) -> np.ndarray | None:
        """Chunk `index` decoded (read-only), or None when its file (or its shard's row) does not exist."""
        if self.shard_rows is not None:
            shard, row = divmod(index, self.shard_rows)
            data = read_row(self.dir / self._key((shard,) + (0,) * (self._ndim - 1)), row)
            return None if data is None else self._decode(data)
        path = self.dir / self._key((index,) + (0,) * (self._ndim - 1))
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        sig = (index, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cached is not None and self._cached[0] == sig:
            return self._cached[1]
        value = self._decode(path.read_bytes())
        if self.rows > 1:
            self._cached = (sig, value)
        return value

    def _decode(self, data: Any) -> np.ndarray:
        for dec in self.decoders:
            data = dec.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunk_shape)


def _all_fill(value: np.ndarray, fill: Any) -> bool:
    """True when every element equals the array's fill value (NaN fill: every element NaN)."""
    if value.dtype.kind == "f" and np.isnan(fill):
        return bool(np.isnan(value).all())
    return bool((value == fill).all())
