"""Correction events: the recorded run's θ (and optimizer state) jumped right before step t.

An online unlearning (or `record --continue` from an unlearned model) replaces the live θ by θ̂
mid-run. The store keeps the run replayable by recording the jump as an event at step t:
`corrections/c<k>/theta` holds Δθ (P,) float32 and `corrections/c<k>/<state name>` Δ of each
optimizer buffer, written through the store's codec path (checksummed chunks). An event exists iff
COMMIT.json lists it (`"corrections": [{"index", "step", "request_id", "method"}]`), and the
writer lists it only after its chunk files are durable, so a crash never leaves a half event
visible. Checkpoints stay "θ before step t" and are taken before the jump at t; θ[t] as replay and
the engines see it is post-jump (docs/store-format.md, "Correction events").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmclean.errors import StoreError

if TYPE_CHECKING:
    import torch

__all__ = ["GROUP", "CorrectionEvent", "CorrectionRow", "apply_correction", "array_name", "read_correction",
           "validate_events", "write_correction"]

GROUP = "corrections"


@dataclass
class CorrectionRow:
    """What the writer thread writes for one event (numpy copies: training may go on)."""

    index: int
    step: int
    theta: np.ndarray  # (P,) float32 Δθ
    state: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (P,) float32 Δ of that buffer
    request_id: str | None = None
    method: str | None = None

    def listing(self) -> dict[str, Any]:
        return {"index": self.index, "step": self.step, "request_id": self.request_id, "method": self.method,
                "state": sorted(self.state)}


@dataclass(frozen=True)
class CorrectionEvent:
    """One committed event as COMMIT.json lists it."""

    index: int
    step: int
    request_id: str | None
    method: str | None
    state: tuple[str, ...] = ()  # the optimizer buffers it changes (others: unchanged)

    @property
    def group(self) -> str:
        return f"{GROUP}/c{self.index}"


def array_name(index: int, name: str) -> str:
    return f"{GROUP}/c{index}/{name}"


def validate_events(path: Path, entries: Any, committed: int, fix: str) -> list[dict[str, Any]]:
    """COMMIT.json's "corrections" (absent: none) checked: distinct int indexes, steps in
    0..committed (an event at `committed` is the jump before the next step), in listing order."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise StoreError(f"store {path}: COMMIT.json lists corrections {entries!r}, not a list; {fix}")
    out, seen = [], set()
    for e in entries:
        ok = isinstance(e, dict) and all(isinstance(e.get(k), int) and not isinstance(e.get(k), bool)
                                         for k in ("index", "step"))
        if not ok or e["index"] < 0 or e["index"] in seen or not 0 <= e["step"] <= committed:
            raise StoreError(f"store {path}: COMMIT.json lists correction {e!r}, not an event with a new index and "
                             f"a step in 0..{committed}; {fix}")
        seen.add(e["index"])
        state = e.get("state") or []
        if not isinstance(state, list) or not all(isinstance(s, str) for s in state):
            raise StoreError(f"store {path}: COMMIT.json lists correction {e['index']} with state {state!r}; {fix}")
        out.append({"index": e["index"], "step": e["step"], "request_id": e.get("request_id"),
                    "method": e.get("method"), "state": list(state)})
    if [e["step"] for e in out] != sorted(e["step"] for e in out):
        raise StoreError(f"store {path}: COMMIT.json lists corrections out of step order; {fix}")
    return out


def write_correction(store_path: Path, row: CorrectionRow) -> None:
    """Create `corrections/c<k>/` and write its arrays' one chunk each, durably (the writer thread
    lists the event in COMMIT.json afterwards). An unlisted group of the same index (an event
    a reopen dropped) is replaced."""
    import zarr

    from lmclean.store import format as fmt
    from lmclean.store.atomic import DirSync
    from lmclean.store.chunks import ChunkFiles

    P = row.theta.shape[0]
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    group = root.require_group(GROUP).create_group(f"c{row.index}", overwrite=True)
    pending, opened = DirSync(), []
    try:
        for name, value in (("theta", row.theta), *sorted(row.state.items())):
            if value.shape != (P,):
                raise StoreError(f"correction {row.index}: {name} has shape {value.shape}, expected ({P},)")
            arr = group.create_array(name, shape=(P,), chunks=(P,), dtype="float32", fill_value=np.nan,
                                     compressors=fmt.grad_codec("fp32", "auto"), chunk_key_encoding=fmt.FLAT_KEYS)
            opened.append(ChunkFiles(store_path, arr))
            opened[-1].write_chunk(0, np.ascontiguousarray(value, dtype=np.float32), pending)
        for d in (store_path / GROUP, store_path / GROUP / f"c{row.index}"):
            pending.add(d)
        pending.sync()  # (the open directory fds of the arrays are synced before they close)
    finally:
        for files in opened:
            files.close()


def read_correction(store: Any, event: CorrectionEvent) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(Δθ, {buffer: Δ}) of one event of a TrajectoryStore, read through the verified codec path."""
    import torch

    where = f"correction {event.index} (step {event.step})"
    theta = torch.from_numpy(store.chunk(array_name(event.index, "theta"), 0, where).copy())
    state = {n: torch.from_numpy(store.chunk(array_name(event.index, n), 0, where).copy()) for n in event.state}
    return theta, state


def apply_correction(theta: torch.Tensor, state: dict[str, torch.Tensor], dtheta: torch.Tensor,
                     dstate: dict[str, torch.Tensor]) -> None:
    """θ += Δθ and each buffer += its Δ, in place: the one way a jump is applied (live training, a
    resume and the reader replay all call this, so they agree bitwise)."""
    theta.add_(dtheta.to(theta.device, theta.dtype))
    for name, d in dstate.items():
        if name in state:
            d = d.to(state[name].device, state[name].dtype)
            if name == "exp_avg_sq":
                import torch

                # a linearised δs can undershoot where s is small (Adam's first steps); s + δs < 0 there,
                # and clamping to 0 makes the next step divide by ε. Those entries keep their s.
                d = torch.where(state[name] + d >= 0, d, torch.zeros_like(d))
            state[name].add_(d)
