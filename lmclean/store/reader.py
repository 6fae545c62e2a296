"""Read a trajectory store: metadata, committed steps, step rows, checkpoints, and θ replay.

Only committed steps are visible (COMMIT.json, whose claims are checked against the metadata when
read). Every chunk is read through lmclean/store/codec.py, which verifies its CRC-32C; a chunk
that fails it, does not decode, or was never written is a StoreError naming array and step,
never silent zeros or fill values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from lmclean.errors import InputNotFoundError, StoreError, StoreVersionError
from lmclean.store import format as fmt
from lmclean.store.chunks import ChunkReader
from lmclean.store.codec import checked_chunk
from lmclean.store.commit import validate_commit
from lmclean.store.corrections import CorrectionEvent, apply_correction, read_correction


if TYPE_CHECKING:  # torch (2-3 s to import) is loaded only when θ is: `inspect-log` never needs it
    import torch

    from lmclean.optim import UpdateRule
    from lmclean.params import ParamManifest

StepGrad = Callable[[int, "torch.Tensor"], "torch.Tensor"]  # (t, θ[t]) -> the gradient step t applied (P,)


@dataclass
class StepRecord:
    step: int
    lr: float
    loss: float
    grad_norm: float  # before clipping
    sample_ids: np.ndarray  # (b,) int64
    weights: np.ndarray  # (b,) float64
    tokens: np.ndarray  # (b, L) int32, right padded
    lengths: np.ndarray  # (b,) int32
    clip: float = 1.0  # factor the stored (applied) gradient was clipped by
    loss_mask: np.ndarray | None = None  # (b, L) bool: position n is a loss target; None: every position
    micro: np.ndarray | None = None  # (b,) micro-batch index of each row (None: one batch)
    width: np.ndarray | None = None  # (b,) padded width of each row's micro-batch


class TrajectoryStore:
    """Read-only view of a store directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            from lmclean.store.swap import intent_path

            if intent_path(self.path).is_file():
                raise InputNotFoundError(f"no lmclean store at {self.path}: an interrupted `lmclean reconcile` is swapping "
                                         f"it in; run `lmclean reconcile {self.path}` to finish")
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
            why = " (written before chunk checksums)" if version == 1 else ""
            raise StoreVersionError(
                f"store {self.path} has format version {version}{why}, this lmclean reads version "
                f"{fmt.FORMAT_VERSION}; re-record it with `lmclean record` (or read it with lmclean "
                f"{meta.get('lmclean_version', '?')}, which wrote it)")
        self.meta: dict[str, Any] = meta
        self._readers: dict[str, ChunkReader] = {}  # per array: direct chunk reads through the codec path
        self._seen_committed = 0  # committed steps last read from COMMIT.json (see _check_step)
        self._retained: int | None = None  # the retained start last read (record.keep_steps)
        try:
            self._steps = self.root["steps"]
            self._ck = self.root["checkpoints"]
        except KeyError as exc:
            raise StoreError(f"store {self.path} lacks the group {exc}; it is damaged or not an lmclean store") from exc

    @cached_property
    def manifest(self) -> ParamManifest:
        from lmclean.params import ParamManifest

        return ParamManifest.from_list(self.meta["manifest"])

    @cached_property
    def rule(self) -> UpdateRule:
        from lmclean.optim import rule_from_dict

        return rule_from_dict(self.meta["optimizer"])

    # -- commit state ---------------------------------------------------------------------
    def commit_state(self) -> dict[str, Any]:
        """COMMIT.json, its claims checked against the metadata (StoreError saying what is wrong)."""
        return validate_commit(self.path, self.meta)

    @property
    def committed_steps(self) -> int:
        return int(self.commit_state()["committed_steps"])

    @property
    def planned_steps(self) -> int:
        return int(self.meta["planned_steps"])

    @property
    def closed(self) -> bool:
        return bool(self.commit_state()["closed"])

    @property
    def checkpoint_steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        return list(self.commit_state()["checkpoints"])

    @property
    def corrections(self) -> list[CorrectionEvent]:
        """The committed correction events (jumps of θ and the optimizer state), in step order."""
        return [CorrectionEvent(e["index"], e["step"], e["request_id"], e["method"], tuple(e["state"]))
                for e in self.commit_state()["corrections"]]

    def correction(self, event: CorrectionEvent) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Δθ, {buffer: Δ}) of one event, read through the verified codec path."""
        return read_correction(self, event)

    def jumps_at(self, t: int, events: list[CorrectionEvent] | None = None,
                 ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The (Δθ, Δstate) of every event at step t, in the order they are applied."""
        return [read_correction(self, e) for e in (self.corrections if events is None else events) if e.step == t]

    # -- rows --------------------------------------------------------------------------------
    def _check_step(self, t: int) -> None:
        # Steps below a count already seen committed stay committed while we hold the store (writers
        # take the lock): skip re-reading COMMIT.json on every row of a sweep.
        if 0 <= t < self._seen_committed:
            return
        n = self._seen_committed = self.committed_steps
        if not 0 <= t < n:
            raise StoreError(f"step {t} is not recorded in {self.path}: committed steps are 0..{n - 1}")

    def reader(self, name: str) -> "ChunkReader":
        """The chunk reader of array `name` (e.g. "steps/grad"), made once."""
        if name not in self._readers:
            try:
                arr = self.root[name]
            except KeyError:
                raise StoreError(f"store {self.path} lacks the array {name}; it is damaged") from None
            self._readers[name] = ChunkReader(self.path, arr)
        return self._readers[name]

    def chunk(self, name: str, index: int, where: str) -> np.ndarray:
        """Chunk `index` of array `name` decoded and verified (a sharded array: its row `index`);
        StoreError naming the array and `where` (e.g. "step 17") when it fails its checksum, does
        not decode, or was never written."""
        reader = self.reader(name)
        return checked_chunk(lambda: reader.chunk(index), self.path, name, where)

    def _row(self, name: str, index: int, step: int | None = None) -> np.ndarray:
        """Row `index` of array `name` (e.g. "steps/grad"); a never-written chunk is an error, not fill.

        The result may be a read-only view: copy it before writing into it."""
        where = f"step {index}" if step is None else f"row {index} (checkpoint of step {step})"
        reader = self.reader(name)
        if not 0 <= index < reader.length:
            raise StoreError(f"store {self.path}: array {name} has no {where} (it holds {reader.length} rows)")
        return self.chunk(name, index // reader.rows, where)[index % reader.rows]

    def rows(self, name: str, stop: int, unit: str = "step") -> np.ndarray:
        """Rows 0..stop-1 of array `name`, chunk by chunk through the verified codec path."""
        reader = self.reader(name)
        parts = [self.chunk(name, i, f"{unit} {i * reader.rows}") for i in range(-(-stop // reader.rows))]
        if not parts:
            return np.empty((0, *reader.chunk_shape[1:]), dtype=reader.codec.dtype)
        return np.concatenate(parts)[:stop]

    def step(self, t: int) -> StepRecord:
        self._check_step(t)
        ids = self._row("steps/sample_ids", t)
        keep = ids >= 0
        lengths = self._row("steps/lengths", t)[keep]
        tokens = self._row("steps/tokens", t)[keep]
        width = int(lengths.max()) if len(lengths) else 1
        tokens, mask = tokens[:, :width], None
        if self.meta.get("label_mask"):  # non-target positions are stored as −(id + 1)
            mask = tokens >= 0
            tokens = np.where(mask, tokens, -tokens - 1)
        return StepRecord(
            step=t, lr=float(self._row("steps/lr", t)), loss=float(self._row("steps/loss", t)),
            grad_norm=float(self._row("steps/grad_norm", t)), sample_ids=ids[keep],
            weights=self._row("steps/weights", t)[keep], tokens=tokens, lengths=lengths,
            clip=float(self._row("steps/clip", t)) if self.has_clip else 1.0, loss_mask=mask,
            micro=self._row("steps/micro", t)[keep] if self.has_micro else None,
            width=self._row("steps/width", t)[keep] if self.has_micro else None)

    @cached_property
    def has_micro(self) -> bool:
        """Whether rows carry their micro-batch (index, padded width): see format.MICRO_ARRAYS."""
        return "micro" in self.root["steps"]

    @cached_property
    def has_clip(self) -> bool:
        """Whether the store records a clip factor per step (stores before it was added do not)."""
        return "clip" in self.root["steps"]

    @property
    def max_grad_norm(self) -> float | None:
        """The clipping threshold C of the recorded run (None: not clipped)."""
        c = self.meta.get("max_grad_norm")
        return float(c) if c else None

    @property
    def recompute(self) -> bool:
        """Whether the store holds no gradient rows (`record.gradients: recompute`): g[t] exists only
        as a recomputation at θ[t], so θ is rebuilt with a gradient callable (iter_states' `grad`)."""
        return self.meta.get("gradients", "stored") == "recompute"

    def _no_rows(self, what: str) -> StoreError:
        return StoreError(f"store {self.path} records no gradient rows (gradients: recompute), so {what} needs each "
                          "step's gradient recomputed at θ[t]: pass grad=lmclean.unlearn.trajectory.recompute_grad(store)")

    def grad(self, t: int) -> torch.Tensor:
        """Mean batch gradient g[t] as float32 (P,), decoded from the bf16 bits when stored so (a
        recompute store has none: StoreError)."""
        import torch

        if self.recompute:
            raise self._no_rows(f"reading g[{t}]")
        self._check_step(t)
        if self._retained is None or t < self._retained:  # (re-read: the start only moves forward)
            self._retained = self.retained_from
            if t < self._retained:
                raise self._outside_window(t, f"its gradient row g[{t}] was dropped")
        raw = self._row("steps/grad", t)
        if self.meta["precision"] == "bf16":
            return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float()
        if self.meta["precision"] == "int8":
            from lmclean.store.quant import dequantize

            return dequantize(raw, self._row("steps/grad_scale", t))
        return torch.from_numpy(raw.copy())

    @property
    def retained_from(self) -> int:
        """First step whose θ and gradient the store still holds (record.keep_steps; 0: all)."""
        return int(self.commit_state()["retained_from"])

    @property
    def keep_steps(self) -> int | None:
        """The retention window N of record.keep_steps (None: every step kept)."""
        from lmclean.store.retention import keep_steps_of

        return keep_steps_of(self.meta)

    def _outside_window(self, t: int, what: str) -> StoreError:
        r = self.retained_from
        return StoreError(f"store {self.path} keeps steps {r}..{self.committed_steps - 1} only (record.keep_steps: "
                          f"{self.keep_steps}); step {t} left the window: {what}")

    def scalars(self, name: str) -> np.ndarray:
        """A per-step scalar array (lr, loss, grad_norm) over committed steps."""
        if name not in fmt.STEP_SCALARS:
            raise StoreError(f"no per-step scalar {name!r}; use one of {list(fmt.STEP_SCALARS)}")
        if name == "clip" and not self.has_clip:
            return np.ones(self.committed_steps)
        return self.rows(f"steps/{name}", self.committed_steps)

    def all_sample_ids(self) -> np.ndarray:
        """(T, B) sample ids of committed steps, -1 = empty slot."""
        ids = self.rows("steps/sample_ids", self.committed_steps)
        missing = np.nonzero((ids == fmt.MISSING_INT).all(axis=1))[0]
        if len(missing):
            raise StoreError(f"store {self.path}: array steps/sample_ids has no data at step {int(missing[0])} "
                             "(chunk file missing); the store is damaged")
        return ids

    # -- samples -----------------------------------------------------------------------------
    @cached_property
    def sample_fingerprints(self) -> dict[int, str]:
        n = int(self.root["samples/id"].shape[0])
        ids, fps = self.rows("samples/id", n, "row"), self.rows("samples/fingerprint", n, "row")
        return {int(i): bytes(fp).hex() for i, fp in zip(ids, fps)}

    # -- checkpoints and θ replay -------------------------------------------------------------
    def checkpoint(self, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """θ and optimizer state saved before step `step`."""
        import torch

        if step not in self.checkpoint_steps:
            raise StoreError(f"store {self.path} has no committed checkpoint at step {step}; "
                             f"checkpoints: {self.checkpoint_steps}")
        k = list(self.meta["checkpoint_plan"]).index(step)
        if int(self._row("checkpoints/step", k, step)) != step:
            raise StoreError(f"store {self.path}: array checkpoints/step does not list committed checkpoint {step} at "
                             f"row {k}; the store is damaged")
        theta = torch.from_numpy(self._row("checkpoints/theta", k, step).copy())
        state = {n: torch.from_numpy(self._row(f"checkpoints/{n}", k, step).copy()) for n in self.rule.state_names()}
        return theta, state

    def nearest_checkpoint(self, t: int) -> int:
        earlier = [s for s in self.checkpoint_steps if s <= t]
        if not earlier:
            raise StoreError(f"store {self.path} has no checkpoint at or before step {t}")
        return earlier[-1]

    def iter_states(self, start: int, stop: int, grad: StepGrad | None = None,
                    jump_at_stop: bool = True, device: "torch.device | str | None" = None,
                    ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """Yield (t, θ[t], optimizer state before step t) for start <= t <= stop, streaming.

        Begins at the nearest checkpoint at or before `start` and replays the update rule on the
        applied gradient of each step, `grad(t, θ[t])`: default the stored row (`self.grad(t)`); a
        caller that also needs g[t] passes a caching reader so each row is decoded once, and a
        recompute store needs one that recomputes it at θ[t] (lmclean.unlearn.trajectory.
        recompute_grad: the store layer knows no model). Yielded tensors are reused buffers.
        θ[t] is post-jump: the correction events at t are applied before it is yielded (what step
        t's gradient was computed at); `jump_at_stop=False` yields θ[stop] before its events (the
        checkpoint's meaning: `lmclean check` compares with it). `device`: θ and the state live
        there and the update rule runs there (where training ran, with the same kernels); `grad`
        must then return gradients on that device.
        """
        if start < self.retained_from:
            raise self._outside_window(start, f"θ[{start}] cannot be rebuilt")
        if grad is None and self.recompute and stop > self.nearest_checkpoint(start):
            raise self._no_rows(f"rebuilding θ[{stop}]")
        read_grad = grad or (lambda t, theta: self.grad(t))
        if stop > self.committed_steps:
            raise StoreError(f"step {stop} is beyond the {self.committed_steps} committed steps of {self.path}")
        c = self.nearest_checkpoint(start)
        theta, state = self.checkpoint(c)
        if device is not None:
            theta, state = theta.to(device), {k: v.to(device) for k, v in state.items()}
        lrs = self.scalars("lr")
        events = self.corrections
        for t in range(c, stop + 1):
            if t < stop or jump_at_stop:
                for dtheta, dstate in self.jumps_at(t, events):
                    apply_correction(theta, state, dtheta, dstate)
            if t >= start:
                yield t, theta, state
            if t < stop:
                self.rule.step(theta, read_grad(t, theta), float(lrs[t]), state, t)

    def theta_at(self, t: int, grad: StepGrad | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """θ[t] (parameters before step t, after the correction events at t; t = committed_steps gives
        the final θ) and its optimizer state; `grad` as in iter_states."""
        if t in self.checkpoint_steps:
            theta, state = self.checkpoint(t)
            for dtheta, dstate in self.jumps_at(t):
                apply_correction(theta, state, dtheta, dstate)
            return theta, state
        for _, theta, state in self.iter_states(t, t, grad):
            return theta.clone(), {k: v.clone() for k, v in state.items()}
        raise StoreError(f"cannot rebuild step {t}")

    @property
    def model_dir(self) -> Path:
        return self.path / fmt.MODEL_DIR

    def occurrences(self, sample_ids: Iterable[int]) -> dict[int, list[int]]:
        """step -> the given samples in that step's batch, over the committed steps: the one answer to
        "which steps hold these ids" (scrub alone also reads rows past the commit point)."""
        ids = self.all_sample_ids()  # (T, B)
        wanted = np.fromiter((int(i) for i in sample_ids), dtype=np.int64)
        out: dict[int, list[int]] = {}
        if not len(wanted):
            return out
        for t, b in zip(*np.nonzero(np.isin(ids, wanted))):
            out.setdefault(int(t), []).append(int(ids[t, b]))
        return out

    def sample_positions(self, sample_id: int) -> list[tuple[int, int]]:
        """(step, batch position) of every committed occurrence of a sample."""
        ids = self.all_sample_ids()
        steps, pos = np.nonzero(ids == sample_id)
        return [(int(s), int(p)) for s, p in zip(steps, pos)]
