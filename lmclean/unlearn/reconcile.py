"""`lmclean reconcile STORE`: rewrite the store to exact retraining without every forgotten sample.

A fast approximate unlearning (lmcleaner, rollback, or any request applied online) answers a
request at once; the recorded arrays still carry the forgotten samples' influence (the gradient
rows of the steps that held them, and every θ after). Reconcile replays the run from the first
affected step without them (the replay engine, `baselines.replay_steps`, whose gradients are the
training run's own computation), records it into a new store beside the old one through the
Recorder (same metadata and checkpoint plan; rows hold only the kept samples with their recorded
weights and tokens; no correction events: the counterfactual never jumped), copies the steps before
the first affected one row for row, saves the replayed final θ as STORE/model, carries over what is
not trajectory (audit log, request queue, tombstones, an adapter store's base), appends the audit
"reconcile" record to the new log, and swaps the new store in (lmclean/store/swap.py).

Counterfactual: retraining without every sample an unlearning forgot — the ids of every unlearn
record, including the batch of a batch-level request. A step all of whose samples are forgotten
stays a step with no data term, as `lmclean record --exclude` trains it (a removed step cannot be
recorded in the store format: replaying the update rule on a zero gradient still moves θ), so the
reconciled store equals `record --exclude <all forgotten ids>`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmclean._faults import crash_point
from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.reader import StepRecord, TrajectoryStore

__all__ = ["reconcile"]

Progress = Callable[[int, int], None]  # (steps done, steps in all)
# store entries that are the trajectory (rebuilt), not state to carry over
_TRAJECTORY = {"zarr.json", fmt.COMMIT_FILE, "steps", "checkpoints", "corrections", "samples", fmt.MODEL_DIR,
               "pinned"}  # pinned: g[t] of scrubbed steps of a recompute store (the rebuilt store needs none)
TOMBSTONES = "samples/tombstone"


def reconcile(store_path: Path | str, progress: Progress | None = None,
              on_start: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Reconcile the store (see the module docstring), holding its lock throughout; returns the
    report (also the audit record's "reconcile" field). `on_start(first, steps)` once the checks pass."""
    from lmclean.audit.history import load_history
    from lmclean.audit.recovery import finish_interrupted
    from lmclean.store.lock import StoreLock
    from lmclean.store.swap import build_path, finish_pending_swap, remove_leftovers, swap_in

    store_path = Path(store_path)
    finished = finish_pending_swap(store_path)  # a crash between the renames leaves no STORE: first
    TrajectoryStore(store_path)  # "no lmclean store at ..." before anything else
    began = time.perf_counter()
    with StoreLock(store_path, "reconcile"):
        finish_interrupted(store_path)  # growth included: a grown store is reconciled on its whole table
        remove_leftovers(store_path)
        store = TrajectoryStore(store_path)
        if not store.closed:
            raise StoreError(f"store {store_path} is incomplete ({store.committed_steps}/{store.planned_steps} steps); "
                             f"finish it with `lmclean record --store {store_path} --resume` first")
        history = load_history(store_path)
        current, _ = history.require_current()
        forget = _forgotten(store, history)
        T = store.committed_steps
        events = store.corrections
        touched = sorted(store.occurrences(forget))
        first = min([*touched[:1], *(e.step for e in events), T])
        report: dict[str, Any] = {"store": str(store_path), "forgotten_ids": sorted(forget), "first_step": first,
                                  "steps": T, "steps_replayed": T - first, "corrections_removed": len(events),
                                  "replaced_model": str(current), "finished_interrupted": finished}
        if first == T and current == store.model_dir:
            report.update(reconciled=False, note="nothing to reconcile: the store already is the run without "
                                                 "every forgotten sample, and its model is the current model")
            return report
        if store.retained_from > 0:  # the rebuilt store copies rows 0..first-1 and replays from θ[first]
            raise StoreError(f"store {store_path} keeps steps {store.retained_from}..{T - 1} only (record.keep_steps: "
                             f"{store.keep_steps}): reconcile rebuilds the whole run from step 0, whose θ and gradients "
                             "left the window; reconcile needs a store recorded without record.keep_steps")
        if on_start:
            on_start(first, T - first)
        new = build_path(store_path)
        try:
            theta_exact, gradients = _build(store, forget, first, new, progress)
            report.update(_residual(store, current, theta_exact))
            _carry(store_path, new)
            seconds = time.perf_counter() - began
            report.update(reconciled=True, seconds=round(seconds, 3), cost_training_steps=T - first,
                          gradients=gradients, model=str(store_path.absolute() / fmt.MODEL_DIR))
            record = _audit(store, new, forget, current, seconds, report)
            report["audit_seq"] = record["seq"]
            crash_point("reconcile:before-intent")
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)  # never committed: the old store is untouched
            raise
        swap_in(store_path, new)  # the lock file moves with the store: the `with` releases it at STORE
    return report


def _forgotten(store: TrajectoryStore, history: Any) -> set[int]:
    """Every sample an unlearning forgot, and every sample of a batch-level request's steps."""
    ids = {int(i) for i in history.forgotten_ids}
    for t in history.forgotten_steps:
        if 0 <= int(t) < store.committed_steps:
            ids.update(int(i) for i in store.step(int(t)).sample_ids)
    return ids


def _build(store: TrajectoryStore, forget: set[int], first: int, new: Path,
           progress: Progress | None) -> tuple[torch.Tensor, float]:
    """Record the counterfactual run into `new`; returns its final θ and the gradient count."""
    from lmclean.adapters import save_output, store_model
    from lmclean.train.data import store_tokenizer
    from lmclean.train.model import load_flat_into
    from lmclean.train.recorder import Recorder
    from lmclean.unlearn.baselines import replay_steps
    from lmclean.unlearn.common import ForgetSet, SweepResult
    from lmclean.unlearn.service import open_trajectory

    meta, T = store.meta, store.committed_steps
    own = {"excluded_ids", "dropped_ids", "created", "lmclean_version", "format_version"}
    fps = store.sample_fingerprints  # the samples table, in stored order
    rec = Recorder.create(
        new, manifest=store.manifest, rule=store.rule, planned_steps=T, batch_size=int(meta["batch_size"]),
        max_length=int(meta["max_length"]), checkpoint_every=int(meta["checkpoint_every"]),
        sample_ids=list(fps), fingerprints=list(fps.values()), precision=meta["precision"], codec=meta["codec"],
        config=meta.get("config"), model_config=meta.get("model_config"), tokenizer=meta.get("tokenizer", "external"),
        pad_id=int(meta.get("pad_id", 0)), excluded_ids=sorted(set(meta.get("excluded_ids", [])) | forget),
        max_grad_norm=meta.get("max_grad_norm"), label_mask=bool(meta.get("label_mask")),
        micro_batches=bool(meta.get("micro_batches")), extra_checkpoints=list(meta["checkpoint_plan"]),
        extra={k: v for k, v in meta.items() if k not in own})
    if rec.plan != list(meta["checkpoint_plan"]):
        raise StoreError(f"store {store.path}: the rebuilt checkpoint plan {rec.plan} differs from the recorded "
                         f"{meta['checkpoint_plan']}")
    try:
        for t in range(first):  # before the first affected step the counterfactual is the recorded run
            row = store.step(t)
            theta = state = None
            if rec.needs_checkpoint(t):
                theta, state = store.checkpoint(t)
            _record(rec, row, [int(i) for i in row.sample_ids], t, grad=None if store.recompute else store.grad(t),
                    loss=row.loss, grad_norm=row.grad_norm, clip=row.clip, theta=theta, state=state)
            if progress:
                progress(t + 1, T)
        traj = open_trajectory(store)
        result = SweepResult(torch.zeros(0), "replay", [], (first, T))
        final: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        for step in replay_steps(traj, ForgetSet(set(forget)), first, T, result=result):
            if step.t == T:
                final = step.theta, step.state
                break
            crash_point("reconcile:mid-replay")
            grad = step.grad if step.grad is not None else torch.zeros_like(step.theta)
            _record(rec, store.step(step.t), step.kept, step.t, grad=grad, loss=step.loss, grad_norm=step.grad_norm,
                    clip=step.clip, theta=step.theta, state=step.state)
            if progress:
                progress(step.t + 1, T)
        if final is None:  # first == T: nothing replayed, the final θ is the recorded one before any jump at T
            final = store.checkpoint(T)
        theta_exact, state_exact = final[0].detach().float().cpu().clone(), final[1]

        tokenizer = store_tokenizer(store)  # the old store's (STORE/model's, for a Trainer store)

        def save() -> None:
            model = store_model(store)
            load_flat_into(model, store.manifest, theta_exact)
            save_output(model, tokenizer, new / fmt.MODEL_DIR)

        rec.close(T, final[0], state_exact, before_closed=save)
    except BaseException:
        rec.abort()
        raise
    return theta_exact, float(result.gradients)


def _record(rec: Any, row: StepRecord, kept: list[int], t: int, *, grad: torch.Tensor | None, loss: float,
            grad_norm: float, clip: float, theta: torch.Tensor | None, state: dict[str, torch.Tensor] | None) -> None:
    """Record step t with the rows of `kept` (recorded order, weights, tokens, micro-batches)."""
    keep = set(kept)
    pos = [k for k, i in enumerate(row.sample_ids) if int(i) in keep]
    lengths = row.lengths[pos]
    width = int(lengths.max()) if pos else 1  # the width `collate` pads the kept samples to
    tokens = np.ascontiguousarray(row.tokens[pos, :width]) if pos else np.zeros((0, 1), dtype=np.int32)
    mask = None
    if row.loss_mask is not None:
        mask = torch.from_numpy(np.ascontiguousarray(row.loss_mask[pos, :width]) if pos else np.ones((0, 1), bool))
    rec.record_step(t, lr=row.lr, loss=loss, sample_ids=row.sample_ids[pos], weights=row.weights[pos],
                    input_ids=torch.from_numpy(tokens), lengths=torch.from_numpy(lengths.astype(np.int64)),
                    grad=grad, grad_norm=grad_norm, clip=clip, theta=theta, opt_state=state, loss_mask=mask,
                    micro=None if row.micro is None else row.micro[pos].tolist(),
                    widths=None if row.width is None else row.width[pos].tolist())


def uncorrected_final(store: TrajectoryStore) -> torch.Tensor:
    """The store's final θ rebuilt without its correction events: the recorded updates from the
    recorded start, no jump applied (equal to the recorded final θ when the store has no events).
    The reference of the residual ratio: what the run would hold had no unlearning corrected it."""
    T = store.committed_steps
    events = store.corrections
    if not events:
        return store.checkpoint(T)[0]
    c = store.nearest_checkpoint(min(e.step for e in events))  # checkpoints are pre-jump
    theta, state = store.checkpoint(c)
    lrs = store.scalars("lr")
    if store.recompute:  # g[t] exists only at the recorded (jumped) θ[t]: recompute it there, apply it here
        from lmclean.unlearn.trajectory import recompute_grad

        grad = recompute_grad(store)
        for t, theta_t, _ in store.iter_states(c, T - 1, grad=grad):
            store.rule.step(theta, grad(t, theta_t), float(lrs[t]), state, t)  # (cached: iter_states asks again)
        return theta
    for t in range(c, T):
        store.rule.step(theta, store.grad(t), float(lrs[t]), state, t)
    return theta


def _residual(store: TrajectoryStore, current: Path, theta_exact: torch.Tensor) -> dict[str, Any]:
    """‖θ̂ − θ_exact‖ / ‖θ_ref − θ_exact‖ of the approximate current model θ̂ (θ_ref: uncorrected_final)."""
    from lmclean.adapters import load_for_store
    from lmclean.params import flat_params

    model = load_for_store(store, current)
    store.manifest.check_model(model, f"model {current}")
    theta_hat = flat_params(model, store.manifest).detach().float().cpu()
    ref = uncorrected_final(store)
    residual = float(torch.linalg.vector_norm(theta_hat - theta_exact))
    reference = float(torch.linalg.vector_norm(ref - theta_exact))
    return {"residual_norm": residual, "reference_norm": reference,
            "residual_ratio": residual / reference if reference > 0 else None,
            "residual_reference": "final θ without correction events"}


def _carry(old: Path, new: Path) -> None:
    """Copy what is not trajectory: audit log, request queue, an adapter store's base, tombstones."""
    from lmclean.store.atomic import PARTIAL_SUFFIX, fsync_dir
    from lmclean.store.lock import LOCK_FILENAME

    for entry in old.iterdir():
        name = entry.name
        if name in _TRAJECTORY or name.startswith(LOCK_FILENAME) or name.endswith(PARTIAL_SUFFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / name, symlinks=True)
        else:
            shutil.copy2(entry, new / name, follow_symlinks=False)
    if (old / TOMBSTONES / "zarr.json").is_file():  # which samples were scrubbed, under which record
        shutil.copytree(old / TOMBSTONES, new / TOMBSTONES)
    fsync_dir(new)


def _audit(store: TrajectoryStore, new: Path, forget: set[int], current: Path, seconds: float,
           report: dict[str, Any]) -> dict[str, Any]:
    from lmclean.audit.events import reconcile_event

    meta = store.meta
    summary = {k: report[k] for k in ("first_step", "steps_replayed", "cost_training_steps", "gradients",
                                      "corrections_removed", "residual_ratio", "residual_norm", "reference_norm",
                                      "residual_reference", "replaced_model")}
    return reconcile_event(new, config=meta.get("config") or {}, steps=store.committed_steps, forget_ids=sorted(forget),
                           model_before_dir=current, model_dir=new / fmt.MODEL_DIR,
                           output_path=store.path.absolute() / fmt.MODEL_DIR, wall_time=seconds,
                           excluded_ids=sorted(set(meta.get("excluded_ids", [])) | forget),
                           extra={"reconcile": summary})
