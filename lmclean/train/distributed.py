"""The built-in trainer under `torchrun`: each rank's share of a step, and the store's ranks.

Every rank builds the same run (same seed: same model, same batch plan), computes the loss and
gradient of its contiguous share of each step's kept samples, and the SUM of the shares is
all-reduced, so every rank applies the same update to the same θ. Rank 0 creates the store,
writes everything but the other ranks' gradient columns, commits, saves the model and audits;
rank r > 0 writes its columns of each gradient row (lmclean/store/columns.py). See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from lmclean.config import LmcleanConfig
from lmclean.dist import Dist, Gate
from lmclean.errors import ConfigError

T = TypeVar("T")

_gate: list[Gate] = []  # rank 0: whether the peers have been told the store exists (or why not)


def refuse_unsupported(cfg: LmcleanConfig, resume: bool, d: Dist) -> None:
    """One-line refusals of what a torchrun record does not do (yet)."""
    if resume:
        raise ConfigError(f"record --resume runs as a single process (rank {d.rank} of {d.world} here): resume with "
                          "`lmclean record --resume --store ...` without torchrun; it reads the torchrun store as any other")
    if cfg.record.precision == "int8":
        raise ConfigError("record.precision int8 is single-process only (its scales are computed per 256-parameter block "
                          "of the whole row); use fp32 or bf16 under torchrun")
    if cfg.record.keep_steps is not None:
        raise ConfigError("record.keep_steps is single-process only (the window drops whole shard files, and each rank "
                          "writes its own); leave it empty under torchrun")


def store_meta(d: Dist) -> dict[str, Any]:
    """Metadata of a store recorded by `d.world` ranks: its gradient rows split into that many columns."""
    return {"grad_columns": d.world, "world_size": d.world} if d.active else {}


def start_gate(d: Dist) -> None:
    """Rank 0, once its store exists: let the peers open it. Peers: wait for that (or rank 0's error)."""
    gate(d).open()


def fail_gate(d: Dist, exc: BaseException) -> None:
    """Rank 0 failed before its store existed: tell the peers waiting at the start gate (they raise)."""
    gate(d).fail(exc)


def gate(d: Dist) -> Gate:
    if not _gate or _gate[0].d != d:
        reset_gate(d)
    return _gate[0]


def reset_gate(d: Dist) -> None:
    _gate[:] = [Gate(d)]


def peer_recorder(store: Path, d: Dist, queue_size: int) -> Any:
    """The Recorder of rank r > 0: the store's metadata, a writer of its gradient columns only."""
    from lmclean.errors import StoreError
    from lmclean.store.columns import PeerWriter
    from lmclean.store.reader import TrajectoryStore
    from lmclean.train.recorder import Recorder, RecordStats

    class PeerRecorder(Recorder):
        """Recorder.record_step's checks and encoding; closing is rank 0's (it verifies every column)."""

        def close(self, final_step: int, theta: torch.Tensor, opt_state: dict[str, torch.Tensor],
                  before_closed: Callable[[], None] | None = None) -> RecordStats:
            self.writer.close()
            if self.writer.committed_steps != final_step:
                raise StoreError(f"store {self.path}: rank {d.rank} wrote {self.writer.committed_steps} steps, "
                                 f"expected {final_step}")
            if before_closed is not None:
                before_closed()
            return RecordStats(final_step, 0, 0, 0, self.writer.cpu_seconds)

    start_gate(d)
    meta = TrajectoryStore(store).meta
    return PeerRecorder(Path(store), meta, PeerWriter(Path(store), d.rank, d.world, queue_size=queue_size))


def share_grad(d: Dist, kept: int, compute: Callable[[slice], tuple[float, torch.Tensor]],
               zeros: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(loss, gradient) of a step whose `kept` samples are split over the ranks: `compute(rows)` for
    this rank's share (zeros for an empty share), then both summed over the ranks."""
    rows = d.share(kept)
    loss, grad = compute(rows) if rows.stop > rows.start else (0.0, zeros())
    if not d.active:
        return loss, grad
    d.sum_(grad)
    total = torch.tensor([loss], dtype=torch.float64, device=grad.device)
    d.sum_(total)
    return float(total[0]), grad


def run_peer(fn: Callable[[], T], d: Dist) -> T:
    """A peer's whole record: its share of training, then wait for rank 0 to close and audit the store."""
    result = fn()
    d.barrier()
    return result
