"""`LMCleanCallback` under DDP (`torchrun`, one process per device): what each rank does.

Every rank wraps its own model's forward (its micro-batches, their ids and the Trainer's
`num_items_in_batch`); at `on_pre_optimizer_step` the ranks send what they captured to rank 0, which
alone owns the store (lock, writer, checkpoints, final model, audit). The gradient the optimizer
applies is DDP's all-reduced, clipped one, bitwise the same on every rank, so rank 0's copy is the
store's row: one writer (docs/distributed.md, "The Trainer callback under DDP").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lmclean.dist import Dist, current
from lmclean.errors import LmcleanError, UnsupportedError
from lmclean.integrations._capture import MicroBatch


def group(args: Any) -> Dist:
    """This rank's place in the Trainer's DDP group (rank 0 of 1 for a single process), or a one-line
    refusal for a multi-process run that is not plain data parallelism."""
    world = int(getattr(args, "world_size", 1) or 1)
    if world <= 1:
        return Dist(0, 1)
    mode = getattr(getattr(args, "parallel_mode", None), "value", "")
    d = current()
    sharded = [f for f in ("fsdp", "deepspeed", "parallelism_config") if getattr(args, f, None)]
    if sharded or mode != "distributed" or d.world != world:
        what = sharded[0] if sharded else f"parallel mode {mode or 'unknown'}"
        raise UnsupportedError(f"LMCleanCallback records single-process or DDP (torchrun) training only, not {what}; "
                               "train with plain DDP (docs/distributed.md)")
    return d


def refuse_under_ddp(d: Dist, *, live_requests: bool, resume: bool) -> None:
    """What the callback does not do under DDP: take deletion requests live (each rank would poll the
    queue on its own, as for `torchrun -m lmclean record`) and continue a store from a checkpoint."""
    if not d.active or not (live_requests or resume):
        return
    what = ("deletion requests live (unlearn=); drop unlearn= and apply them with `lmclean unlearn --pending` "
            "after the run" if live_requests else
            "resume_from_checkpoint yet; record the run again from step 0")
    raise UnsupportedError(f"LMCleanCallback under DDP does not take {what} (docs/distributed.md)")


def agree_all(d: Dist, error: BaseException | None) -> None:
    """Collective: every rank learns whether any rank failed, and raises (its own error, or a
    one-line one naming the failed rank), so no rank waits forever at DDP's next all-reduce."""
    if not d.active:
        if error is not None:
            raise error
        return
    import torch.distributed as td

    box: list[Any] = [None] * d.world
    td.all_gather_object(box, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = next(((r, m) for r, m in enumerate(box) if m is not None), None)
    if failed is not None:
        raise LmcleanError(f"LMCleanCallback: rank {failed[0]} stopped ({failed[1]}); this rank stops too")


def gather_micro(d: Dist, micro: list[MicroBatch], averaged: bool) -> list[MicroBatch]:
    """Rank 0: every rank's micro-batches of this step in the sampler's order (micro-batch j of rank
    r is the data loader's batch j·W + r); the peers get []. `averaged`: the Trainer's
    `num_items_in_batch` is the global target count (average_tokens_across_devices), so w_i = n_i/N;
    otherwise each rank's loss is its own mean and DDP averages the ranks: w_i = n_i/(N_r·W)."""
    import torch.distributed as td

    box: list[Any] = [None] * d.world
    td.all_gather_object(box, micro)
    if not d.main:
        return []
    out: list[MicroBatch] = []
    for j in range(max(len(b) for b in box)):
        for mbs in box:
            if j < len(mbs):
                mb = mbs[j]
                if mb.num_items is not None and not averaged:
                    mb = copy.copy(mb)
                    mb.num_items, mb.loss = mb.num_items * d.world, mb.loss / d.world
                out.append(mb)
    # without num_items each micro-batch mean is divided by G (per rank) and by W (DDP's average):
    # step_batch divides by len(out) = G·W
    return out


class SyncedGradNorms:
    """Per-parameter ‖p.grad‖ once DDP has written the all-reduced gradient into `p.grad`.

    A post-accumulate hook sees the rank's local gradient (DDP reduces after it), so the first hook
    of each backward queues an autograd-engine callback that queues itself once more: DDP's reducer
    queues its finalize (wait for the all-reduce, copy into `p.grad`) during the backward, so the
    second call runs after it. Same interface as `_capture.GradNorms`."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.norms: dict[int, Tensor] = {}
        self._queued = False
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _hook(self, _: Tensor) -> None:
        if self._queued:
            return
        self._queued = True
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(lambda: engine.queue_callback(self._measure))

    def _measure(self) -> None:
        self._queued = False
        self.norms = {k: torch.linalg.vector_norm(p.grad.detach(), 2.0)
                      for k, p in enumerate(self.params) if p.grad is not None}

    def total(self) -> float:
        if not self.norms:
            return 0.0
        parts = [self.norms[k] for k in sorted(self.norms)]
        return float(torch.linalg.vector_norm(torch.stack([n.to(parts[0].device) for n in parts]), 2.0))

    def reset(self) -> None:
        self.norms = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collective(d: Dist, body: Callable[[], None]) -> None:
    """Run `body` (rank 0's share of an event) and let every rank learn whether it failed."""
    error: BaseException | None = None
    try:
        body()
    except BaseException as exc:  # noqa: BLE001 - re-raised by agree_all on this rank
        error = exc
    agree_all(d, error)
