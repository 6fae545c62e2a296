"""Data parallelism under `torchrun`: which rank this is, its share of a batch, and the sums.

A step's loss is a weighted SUM over its samples (weights fixed per step), so every rank can take a
deterministic share of the batch and the all-reduced SUM of the shares' gradients (or curvature
products) is the single-process quantity, up to float32 rounding of a different summation order.
Nothing here is needed without `torchrun`: `current()` is then rank 0 of 1 and every call is a no-op.
See docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmclean.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Dist", "Gate", "current", "init_from_env", "launched"]


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env() -> "Dist":
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) once: gloo for
    CPU tensors, nccl for CUDA tensors where CUDA exists. Without torchrun: rank 0 of 1, nothing done."""
    if not launched():
        return Dist(0, 1)
    import torch
    import torch.distributed as td

    if not td.is_available():
        raise ConfigError("torchrun started lmclean but this torch has no torch.distributed; install a torch build with it")
    if not td.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {missing[0]} is not set; start lmclean with "
                              "`torchrun --nproc-per-node N -m lmclean ...`")
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and local < torch.cuda.device_count():  # more ranks than GPUs: --device cpu
            torch.cuda.set_device(local)
        td.init_process_group(backend=backend)
    return current()


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: rank `rank` of `world` (1: a single process)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: it writes everything but its peers' gradient columns, commits, and audits."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (sizes differ by at most one; may be empty)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def share_groups(self, groups: list[Any]) -> list[Any]:
        """This rank's share of whole groups (micro-batches are never split: their rounding is the run's)."""
        return groups[self.share(len(groups))]

    def sum_(self, x: "torch.Tensor") -> "torch.Tensor":
        """All-reduce SUM in place (a no-op on one process); returns x."""
        if self.active:
            import torch.distributed as td

            td.all_reduce(x, op=td.ReduceOp.SUM)
        return x

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Collective: every rank learns whether rank 0 failed (a one-line reason), and raises if so,
        so no rank waits forever at the next collective for a rank 0 that gave up."""
        if not self.active:
            if error is not None:
                raise error
            return
        import torch.distributed as td

        box: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
        td.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            from lmclean.errors import LmcleanError

            raise LmcleanError(f"rank 0 stopped ({box[0]}); this rank stops too")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


class Gate:
    """Rank 0 tells the peers waiting for its set-up (the store created, the request checked),
    collectively, whether it succeeded; a peer's `open` waits for that and raises if it did not."""

    def __init__(self, d: Dist) -> None:
        self.d, self.count = d, 0

    def open(self) -> None:
        """One collective `agree`: rank 0 says it got this far; a peer waits for it (or raises). A
        gate may be opened several times (one set-up phase each): every rank opens it as often."""
        if self.d.active:
            self.count += 1
            self.d.agree(None)

    def fail(self, exc: BaseException, phases: int = 1) -> None:
        """Rank 0 failed before its last `open` (of `phases`): the peers raise too (the original error
        is the one reported)."""
        if self.d.active and self.d.main and self.count < phases:
            self.count = phases
            try:
                self.d.agree(exc)
            except BaseException:  # noqa: BLE001 - agree re-raises exc: the caller raises it
                pass


def current() -> Dist:
    """The group this process is in (torch.distributed initialised), else rank 0 of 1."""
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover - torch without distributed
        return Dist(0, 1)
    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size())
    return Dist(0, 1)
