"""Read a trajectory store: metadata, committed steps, step rows, checkpoints, and θ replay.

Only committed steps are visible (COMMIT.json). Chunks that were never written read as sentinels
(NaN / -2), which this reader turns into a precise StoreError instead of silent zeros.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from lmclean.errors import InputNotFoundError, StoreError, StoreVersionError
from lmclean.store import format as fmt
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
        self.manifest = ParamManifest.from_list(meta["manifest"])
        self.rule: UpdateRule = rule_from_dict(meta["optimizer"])
        self._steps = self.root["steps"]
        self._ck = self.root["checkpoints"]

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
        n = self.committed_steps
        if not 0 <= t < n:
            raise StoreError(f"step {t} is not recorded in {self.path}: committed steps are 0..{n - 1}")

    def _read(self, group: Any, name: str, index: int) -> np.ndarray:
        try:
            return np.asarray(group[name][index])
        except Exception as exc:
            raise StoreError(f"store {self.path}: array {group.name}/{name} row {index} is corrupted ({exc})") from exc

    def step(self, t: int) -> StepRecord:
        self._check_step(t)
        ids = self._read(self._steps, "sample_ids", t)
        lr = float(self._read(self._steps, "lr", t))
        if (ids == fmt.MISSING_INT).any() or np.isnan(lr):
            raise StoreError(f"store {self.path}: step {t} is committed but its rows are missing (damaged store)")
        keep = ids >= 0
        lengths = self._read(self._steps, "lengths", t)[keep]
        tokens = self._read(self._steps, "tokens", t)[keep]
        width = int(lengths.max()) if len(lengths) else 1
        return StepRecord(
            step=t, lr=lr, loss=float(self._read(self._steps, "loss", t)),
            grad_norm=float(self._read(self._steps, "grad_norm", t)), sample_ids=ids[keep],
            weights=self._read(self._steps, "weights", t)[keep], tokens=tokens[:, :width], lengths=lengths)

    def grad(self, t: int) -> torch.Tensor:
        """Mean batch gradient g[t] as float32 (P,), decoded from bf16 when stored so."""
        self._check_step(t)
        raw = self._read(self._steps, "grad", t)
        if self.meta["precision"] == "bf16":
            if (raw == fmt.MISSING_BF16).all():
                raise StoreError(f"store {self.path}: array steps/grad row {t} is missing")
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        if np.isnan(raw).all():
            raise StoreError(f"store {self.path}: array steps/grad row {t} is missing")
        return torch.from_numpy(raw.copy())

    def scalars(self, name: str) -> np.ndarray:
        """A per-step scalar array (lr, loss, grad_norm) over committed steps."""
        return np.asarray(self._steps[name][: self.committed_steps])

    def all_sample_ids(self) -> np.ndarray:
        """(T, B) sample ids of committed steps, -1 = empty slot."""
        return np.asarray(self._steps["sample_ids"][: self.committed_steps])

    # -- samples -----------------------------------------------------------------------------
    @cached_property
    def sample_fingerprints(self) -> dict[int, str]:
        ids = np.asarray(self.root["samples/id"][:])
        fps = np.asarray(self.root["samples/fingerprint"][:])
        return {int(i): bytes(fp).hex() for i, fp in zip(ids, fps)}

    # -- checkpoints and θ replay -------------------------------------------------------------
    def checkpoint(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """θ and optimizer state saved before step `step`."""
        steps = np.asarray(self._ck["step"][:])
        where = np.nonzero(steps == step)[0]
        if step not in self.checkpoint_steps or not len(where):
            raise StoreError(f"store {self.path} has no committed checkpoint at step {step}")
        k = int(where[0])
        theta = torch.from_numpy(self._read(self._ck, "theta", k).copy())
        state = {n: torch.from_numpy(self._read(self._ck, n, k).copy()) for n in self.rule.state_names()}
        if torch.isnan(theta).all():
            raise StoreError(f"store {self.path}: checkpoint at step {step} is missing its parameters")
        return theta, state

    def nearest_checkpoint(self, t: int) -> int:
        earlier = [s for s in self.checkpoint_steps if s <= t]
        if not earlier:
            raise StoreError(f"store {self.path} has no checkpoint at or before step {t}")
        return earlier[-1]

    def iter_states(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield (t, θ[t], optimizer state before step t) for start <= t <= stop, streaming.

        Begins at the nearest checkpoint at or before `start` and replays the update rule on the
        stored gradients; yielded tensors are reused buffers: clone what you keep.
        """
        if stop > self.committed_steps:
            raise StoreError(f"step {stop} is beyond the {self.committed_steps} committed steps of {self.path}")
        c = self.nearest_checkpoint(start)
        theta, state = self.checkpoint(c)
        lrs = self.scalars("lr")
        for t in range(c, stop + 1):
            if t >= start:
                yield t, theta, state
            if t < stop:
                self.rule.step(theta, self.grad(t), float(lrs[t]), state, t)

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
