"""Verify a whole store: every chunk's checksum, the commit marker against the arrays, and θ replay.

`check_store` is what `lmclean check` runs. It reads everything once, so its cost is that of
reading the store plus replaying every recorded step (about one optimizer step each). Problems
are collected, not raised, in the order found (marker, then chunks array by array, then replay),
so the report names the first bad array and step and everything else that is wrong.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmclean.errors import StoreError, UnsupportedError
from lmclean.store import format as fmt
from lmclean.store.codec import ChecksumError
from lmclean.store.commit import validate_commit
from lmclean.store.reader import StepGrad, TrajectoryStore
from lmclean.store.shard import EMPTY, read_index

__all__ = ["BF16_REPLAY_RTOL", "CheckReport", "Problem", "check_store"]

# bf16 gradients are rounded, so θ replayed between two checkpoints only approximates the later
# one: ‖Δθ‖ <= this fraction of ‖θ[c1] − θ[c0]‖ (docs/store-format.md measures 0.07% over 12
# steps from step 0). fp32 replay must be bitwise.
BF16_REPLAY_RTOL = 0.02
# int8 rows (per-block absmax/127) are ~1% off per row; replay between checkpoints measured 0.4-1.1%
LOSSY_REPLAY_RTOL = {"bf16": BF16_REPLAY_RTOL, "int8": 0.05}

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class Problem:
    array: str  # "steps/grad", "COMMIT.json", "checkpoints/theta", ...
    step: int | None  # the step (or checkpoint step) at fault, None when not tied to one
    message: str  # one line


@dataclass
class CheckReport:
    store: str
    committed_steps: int | None  # None when the commit marker is unusable
    planned_steps: int
    chunks_verified: int = 0
    steps_replayed: int = 0
    checkpoints_matched: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_store(path: Path | str, progress: Progress | None = None, replay: bool = True,
                recompute: Callable[[TrajectoryStore], StepGrad | None] | None = None) -> CheckReport:
    """Check the store at `path` (see the module docstring); `replay=False` skips the θ replay.
    `recompute`: makes the gradient callable of a `gradients: recompute` store (the store layer
    knows no model: lmclean.unlearn.trajectory.recompute_grad); without it such a store's replay
    is reported as not possible.

    Raises only when `path` is not a readable lmclean store of this format version."""
    t0 = time.monotonic()
    store = TrajectoryStore(path)
    report = CheckReport(str(store.path), None, store.planned_steps)
    try:
        marker = validate_commit(store.path, store.meta)
        report.committed_steps = marker["committed_steps"]
    except StoreError as exc:
        report.problems.append(Problem(fmt.COMMIT_FILE, None, str(exc)))
        marker = None
    tick = progress or (lambda phase, done, total: None)
    present = _verify_chunks(store, report, tick)
    if marker is not None:
        _check_marker(store, report, marker, present)
        if replay and not report.problems:
            _replay(store, report, marker, tick, recompute(store) if recompute and store.recompute else None)
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _arrays(store: TrajectoryStore) -> list[str]:
    names = [f"steps/{n}" for n in fmt.STEP_ARRAYS if n in store.root["steps"]
             or (n not in fmt.OPTIONAL_STEP_ARRAYS and not (n == "grad" and store.recompute))]  # recompute: no rows
    for group in ("checkpoints", "samples"):
        names += sorted(f"{group}/{n}" for n, _ in store.root[group].arrays())
    if "corrections" in store.root:  # correction events (lmclean/store/corrections.py), listed or not
        for event, grp in sorted(store.root["corrections"].groups()):
            names += sorted(f"corrections/{event}/{n}" for n, _ in grp.arrays())
    return names


def _where(store: TrajectoryStore, name: str, row: int) -> tuple[str, int | None]:
    """("step 17", 17) for a step array, ("row 2 (checkpoint of step 10)", 10), ("row 5", None)."""
    if name.startswith("steps/"):
        return f"step {row}", row
    if name.startswith("checkpoints/"):
        step = store.meta["checkpoint_plan"][row]
        return f"row {row} (checkpoint of step {step})", step
    if name.startswith("corrections/"):
        return f"correction {name.split('/')[1][1:]}", None
    return f"row {row}", None


def _verify_chunks(store: TrajectoryStore, report: CheckReport, tick: Progress) -> dict[str, set[int]]:
    """Decode (and so checksum) every chunk file of every array; returns per array the rows whose
    chunk exists (a sharded array: the rows its valid indexes reference)."""
    names = _arrays(store)
    present: dict[str, set[int]] = {}
    plan: list[tuple[str, int, int]] = []  # (array, first row, rows) of each chunk that exists
    for name in names:
        try:
            reader = store.reader(name)
        except StoreError as exc:
            report.problems.append(Problem(name, None, f"store {store.path}: {exc}"))
            continue
        present[name] = set()
        if not reader.codec.checksum:
            report.problems.append(Problem(name, None, f"store {store.path}: array {name} has no crc32c codec, so its "
                                           "chunks cannot be verified; re-record the store"))
        if reader.shard_rows is None:
            for index in range(-(-reader.length // reader.rows)):
                if (reader.dir / reader.key(index)).is_file():
                    plan.append((name, index * reader.rows, reader.rows))
            continue
        S = reader.shard_rows
        for shard in range(-(-reader.length // S)):
            lo = shard * S
            try:
                fd = os.open(reader.dir / reader.key(shard), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                entries = read_index(fd, S, reader.key(shard))
            except (ChecksumError, StoreError) as exc:
                what = f"the index of shard {reader.key(shard)}, steps {lo}..{min(lo + S, reader.length) - 1}"
                verdict = "fails its checksum" if isinstance(exc, ChecksumError) else f"is unreadable ({exc})"
                report.problems.append(Problem(name, lo, f"store {store.path}: array {name} at step {lo} {verdict} "
                                               f"({what}); the store is damaged: run `lmclean check {store.path}`"))
                present[name].update(range(lo, min(lo + S, reader.length)))  # damaged, reported once
                continue
            finally:
                os.close(fd)
            plan += [(name, lo + j, 1) for j in np.flatnonzero(~(entries == EMPTY).all(axis=1)).tolist()
                     if lo + j < reader.length]
    for done, (name, lo, rows) in enumerate(plan, 1):
        reader = store.reader(name)
        where, step = _where(store, name, lo)
        present[name].update(range(lo, lo + rows))  # exists (damaged or not: reported once, below)
        try:
            store.chunk(name, lo // reader.rows, where)
            report.chunks_verified += 1
        except StoreError as exc:
            report.problems.append(Problem(name, step, str(exc)))
        tick("verifying chunks", done, len(plan))
    return present


def _check_marker(store: TrajectoryStore, report: CheckReport, marker: dict[str, Any],
                  present: dict[str, set[int]]) -> None:
    """Every committed step has every step array's row; every listed checkpoint its rows."""
    n = marker["committed_steps"]
    for name in (f"steps/{a}" for a in fmt.STEP_ARRAYS):
        first = marker.get("retained_from", 0) if name.split("/")[1] in fmt.ROW_ARRAYS else 0  # record.keep_steps
        missing = sorted(set(range(first, n)) - present.get(name, set()))
        if missing and name in present:
            report.problems.append(Problem(name, missing[0], f"store {store.path}: array {name} has no data at "
                                           f"committed step {missing[0]}; the store is damaged"))
    if n and "steps/sample_ids" in present and not any(p.array == "steps/sample_ids" for p in report.problems):
        ids = store.rows("steps/sample_ids", n)
        unwritten = np.flatnonzero((ids == fmt.MISSING_INT).all(axis=1))
        if len(unwritten):
            t = int(unwritten[0])
            report.problems.append(Problem("steps/sample_ids", t, f"store {store.path}: {fmt.COMMIT_FILE} counts {n} "
                                           f"committed steps but step {t} was never written; the commit marker is "
                                           "damaged"))
    for e in marker.get("corrections", []):
        for name in (f"corrections/c{e['index']}/{a}" for a in ("theta", *e["state"])):
            if 0 not in present.get(name, set()):
                report.problems.append(Problem(name, e["step"], f"store {store.path}: {fmt.COMMIT_FILE} lists correction "
                                               f"{e['index']} (step {e['step']}), but array {name} has no data; the store "
                                               "is damaged"))
    plan = list(store.meta["checkpoint_plan"])
    for c in marker["checkpoints"]:
        k = plan.index(c)
        for name in (a for a in present if a.startswith("checkpoints/")):
            if k not in present[name]:
                report.problems.append(Problem(name, c, f"store {store.path}: {fmt.COMMIT_FILE} lists the checkpoint "
                                               f"of step {c}, but array {name} has no row {k}; the store is damaged"))
        if "checkpoints/step" in present and k in present["checkpoints/step"]:
            got = int(store.chunk("checkpoints/step", k, f"row {k}")[0])
            if got != c:
                report.problems.append(Problem("checkpoints/step", c, f"store {store.path}: array checkpoints/step "
                                               f"says row {k} is the checkpoint of step {got}, the plan says {c}; "
                                               "the store is damaged"))


def _replay(store: TrajectoryStore, report: CheckReport, marker: dict[str, Any], tick: Progress,
            grad: StepGrad | None = None) -> None:
    """Replay the stored (or, `grad`, recomputed) gradients from each committed checkpoint to the
    next; compare θ and state."""
    import torch

    cks = [c for c in marker["checkpoints"] if c <= marker["committed_steps"]]
    total = cks[-1] - cks[0] if len(cks) > 1 else 0
    # bf16 rows are rounded; gradients recomputed on an accelerator differ in the last bits (device.replay_drift)
    on_accelerator = not str(store.meta.get("device", "cpu")).startswith("cpu")
    bf16 = store.meta["precision"] in LOSSY_REPLAY_RTOL or (store.recompute and on_accelerator)
    rtol = LOSSY_REPLAY_RTOL.get(store.meta["precision"], BF16_REPLAY_RTOL)
    for c0, c1 in zip(cks, cks[1:]):
        try:
            # θ[c1] before the events at c1: a checkpoint is taken before the jump at its step
            for t, theta, state in store.iter_states(c0, c1, grad, jump_at_stop=False):
                if t > c0:
                    report.steps_replayed += 1
                    tick("replaying θ", report.steps_replayed, total)
            ref_theta, ref_state = store.checkpoint(c1)
        except (StoreError, UnsupportedError) as exc:  # UnsupportedError: a recompute step whose tokens were scrubbed
            report.problems.append(Problem("steps/grad", c1, str(exc)))
            return
        pairs = [("checkpoints/theta", theta, ref_theta),
                 *((f"checkpoints/{k}", state[k], ref_state[k]) for k in ref_state)]
        start = store.checkpoint(c0)[0] if bf16 else None
        for name, got, ref in pairs:
            if bf16:
                scale = float((ref_theta - start).norm()) if name == "checkpoints/theta" else float(ref.norm())
                ok = float((got - ref).norm()) <= rtol * max(scale, 1e-30)
            else:
                ok = torch.equal(got, ref)
            if not ok:
                diff = float((got - ref).abs().max())
                report.problems.append(Problem(name, c1, f"store {store.path}: replaying steps {c0}..{c1 - 1} from the "
                                               f"checkpoint of step {c0} does not give {name} of step {c1} (max |Δ| "
                                               f"{diff:.3g}); the gradients or checkpoints are inconsistent"))
                return
        report.checkpoints_matched.append(c1)
