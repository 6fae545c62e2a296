"""`unlearn` as a service over a store: one audited request, composed with every earlier one.

Every unlearning starts from the store's *current model* (the latest unlearning's output, or the
recorded final model; see lmclean/audit/history.py): `lmcleaner` and `rollback` add the new
correction to it; `replay` re-runs the recorded training without every sample forgotten so far plus
the new ones. The output appears together with its audit record or not at all (lmclean/audit/publish.py, through unlearn/output.py).
The store's recorded data and model are never modified, apart from scrubbing forgotten tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lmclean
from lmclean._faults import crash_point
from lmclean.dist import Gate, current
from lmclean.device import check_device_spec, deterministic, replay_drift, resolve_device
from lmclean.errors import AuditError, ConfigError, Interrupted, LmcleanError
from lmclean.store.reader import TrajectoryStore
from lmclean.unlearn.common import ForgetSet, SweepResult
from lmclean.unlearn.lmcleaner import PropagationSettings
from lmclean.unlearn.request import OUTSIDE_WINDOW, ForgetSpec, Requester, ResolvedForget, Window, default_K
from lmclean.unlearn.storage import exact_states, lossy_store, retention_policy, storage_notes
from lmclean.unlearn.auto import choose_auto
from lmclean.unlearn.output import default_out, write_and_audit
from lmclean.unlearn.quality import check_steps, keep_for, spot_check, stability_reading
from lmclean.unlearn.trajectory import StoreTrajectory

METHODS = ("lmcleaner", "rollback", "replay", "auto")  # auto: chosen per request (unlearn/auto.py)
Progress = Callable[[int, float], None]  # (step, ‖v‖ or ‖θ' − θ‖)


@dataclass
class UnlearnOptions:
    method: str = "lmcleaner"
    K: int | None = None  # None: the method's default (default_K)
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    fraction: float | None = None  # replay: control-variate subsample fraction
    noise: float = 0.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (lmclean/device.py)
    outside_window: str = "refuse"  # a windowed store (record.keep_steps): refuse | carry (unlearn/request.py)
    exact_states: bool = False  # rebuild θ[t] from recomputed gradients, not the (lossy) stored rows
    budget: str | None = None  # --method auto: training-step equivalents ("200", "200steps") or seconds ("90s")
    check_steps: int = 3  # quality spot check: sampled steps (0: none; lmclean/unlearn/quality.py)
    auto_choice: dict[str, Any] | None = None  # set by choose_auto: what auto chose and why (for the report)

    def __post_init__(self) -> None:
        check_device_spec(self.device, "--device")
        if self.outside_window not in OUTSIDE_WINDOW:
            raise ConfigError(f"--outside-window {self.outside_window!r} is not known; use one of {list(OUTSIDE_WINDOW)}")
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not known; use one of {list(METHODS)}")
        if self.budget is not None:
            from lmclean.unlearn.auto import parse_budget

            if self.method != "auto":
                raise ConfigError(f"--budget is used only with --method auto, not with --method {self.method}: remove it")
            parse_budget(self.budget)
        if self.check_steps < 0:
            raise ConfigError(f"--check-steps {self.check_steps} must be >= 0 (0 disables the spot check)")
        if self.K is not None and self.K < 0:
            raise ConfigError(f"--K {self.K} must be >= 0")
        if self.noise < 0:
            raise ConfigError(f"--noise {self.noise} must be >= 0")
        self.K = default_K(self.method, self.K)


@dataclass(frozen=True)
class OutputSpec:
    """Where the unlearned model goes and what it starts from."""

    out: Path | None = None  # default: <store>-unlearned-N next to the store
    overwrite: bool = False  # replace an existing non-empty --out directory (never a store)
    base: Path | None = None  # default: the store's current model
    base_unrelated: bool = False  # accept a --base outside the store's chain (recorded in the audit)
    merge: bool = False  # adapter stores: write the merged full model (default: the adapter directory)


@dataclass(frozen=True)
class StartModel:
    """The model a correction is added to: its path, weights digest and whether it is in the chain."""

    path: Path
    digest: str
    unrelated: bool = False
    recorded: bool = False  # the recorded final model (θ read from the store's last checkpoint)


def open_trajectory(store: TrajectoryStore, device: str = "cpu") -> StoreTrajectory:
    from lmclean.adapters import store_model
    from lmclean.store.scrub import tombstones

    where = resolve_device(device)
    model = store_model(store).to(where)  # a full skeleton, or the verified base + adapter
    model.eval()  # no dropout: curvature and gradients of the recorded (deterministic) loss
    return StoreTrajectory(store, model, set(tombstones(store.path)), device=where)


def starting_point(store: TrajectoryStore, history: Any, output: OutputSpec, method: str) -> StartModel:
    """The current model, or a `--base` checked against the store's chain."""
    from lmclean.audit import model_digest

    if output.base is None:
        path, digest = history.require_current()
        return StartModel(path, digest, recorded=path == store.model_dir)
    if method == "replay":
        raise ConfigError("--base has no effect with --method replay: replay re-runs the recorded training without every "
                          "forgotten sample; omit --base")
    base = Path(output.base)
    digest = model_digest(base)
    pos = history.position_of(digest)
    if pos is None:
        if not output.base_unrelated:
            raise AuditError(f"--base {base} (weights {digest[:12]}…) is not a model of this store's chain (current model: "
                             f"{history.current_path}); omit --base to start from the current model, or pass "
                             "--base-unrelated to correct it anyway (the audit log records that)")
        return StartModel(base, digest, unrelated=True)
    missing = history.missing_after(pos)
    if missing and not output.base_unrelated:
        more = f" and {len(missing) - 1} later ones" if len(missing) > 1 else ""
        raise AuditError(f"--base {base} is the output of {history.chain[pos].describe()}, which does not include "
                         f"{missing[0].describe()}{more}; omit --base to start from the current model "
                         f"{history.current_path}, or pass --base-unrelated")
    return StartModel(base, digest, unrelated=bool(missing))


def start_theta(store: TrajectoryStore, start: StartModel) -> torch.Tensor:
    if start.recorded:
        theta, _ = store.checkpoint(store.committed_steps)
        return theta
    from lmclean.adapters import load_for_store
    from lmclean.params import flat_params

    model = load_for_store(store, start.path)  # an adapter store's outputs are adapter directories
    store.manifest.check_model(model, f"model {start.path}")
    return flat_params(model, store.manifest).clone()


def engine_forget(resolved: ResolvedForget, history: Any, method: str) -> ForgetSet:
    """What the engine removes: the request, plus (replay) every sample and step forgotten so far."""
    if method != "replay":
        return resolved.forget
    earlier = ForgetSet(set(history.forgotten_ids), set(history.forgotten_steps))
    return resolved.forget.union(earlier)


def window_of(traj: StoreTrajectory, forget: ForgetSet, options: UnlearnOptions) -> Window:
    to_end = options.method == "lmcleaner" and options.propagation.propagates_tail
    return Window.of(list(forget.affected(traj)), traj.n_steps, options.method, options.K, to_end)


def run_method(traj: StoreTrajectory, forget: ForgetSet, options: UnlearnOptions, progress: Progress | None,
               keep: frozenset[int] = frozenset()) -> SweepResult:
    from lmclean.unlearn.baselines import replay, rollback
    from lmclean.unlearn.lmcleaner import propagate, require_supported

    if options.method == "rollback":
        return rollback(traj, forget, progress, keep=keep)
    if options.method == "replay":
        return replay(traj, forget, K=options.K, fraction=options.fraction, seed=options.seed, progress=progress,
                      keep=keep)
    require_supported(traj, forget)
    settings = dataclasses.replace(options.propagation, K=options.K if options.K is not None else traj.n_steps)
    return propagate(traj, forget, settings, progress, keep=keep)


@dataclass
class Prepared:
    """Everything checked before any work: the request, the start, the output and the window."""

    store: TrajectoryStore
    resolved: ResolvedForget
    history: Any
    start: StartModel
    out: Path
    forget: ForgetSet  # what the engine removes
    traj: StoreTrajectory
    window: Window
    merge: bool = False  # OutputSpec.merge
    carried: tuple[int, ...] = ()  # affected steps before a windowed store's retained start, left uncorrected


def prepare(store_path: Path | str, spec: ForgetSpec, options: UnlearnOptions, output: OutputSpec,
            who: Requester) -> Prepared:
    """Resolve and check a request against the store (read-only; the caller holds the lock to act)."""
    from lmclean.audit import AuditLog, check_not_tombstoned
    from lmclean.audit.events import refuse_used_request_id
    from lmclean.audit.history import load_history, refuse_forgotten
    from lmclean.paths import check_output
    from lmclean.unlearn.lmcleaner import require_supported

    store = TrajectoryStore(store_path)
    if not store.closed:
        raise ConfigError(f"store {store.path} is incomplete ({store.committed_steps}/{store.planned_steps} steps); "
                          "finish it with `lmclean record --resume` first")
    resolved = resolve(store, spec)
    if options.method == "lmcleaner":
        require_supported(store, resolved.forget)  # an optimizer lmcleaner cannot follow: before any output
    records = AuditLog(store.path).records()
    history = load_history(store.path, records)
    refuse_forgotten(history, resolved.sample_ids, resolved.steps if spec.steps else ())
    check_not_tombstoned(store.path, list(resolved.sample_ids))
    refuse_used_request_id(records, who.request_id)
    start = starting_point(store, history, output, options.method)
    out = check_output(output.out or default_out(store.path), overwrite=output.overwrite)
    traj = open_trajectory(store, options.device)
    if options.exact_states:
        exact_states(traj)
    forget = engine_forget(resolved, history, options.method)
    forget, carried = retention_policy(store, traj, forget, options.outside_window)
    return Prepared(store, resolved, history, start, out, forget, traj, window_of(traj, forget, options), output.merge,
                    carried)



def resolve(store: TrajectoryStore, spec: ForgetSpec) -> ResolvedForget:
    from lmclean.unlearn.resolve import resolve_forget

    return resolve_forget(store, spec)


def plan(store_path: Path | str, spec: ForgetSpec, options: UnlearnOptions, output: OutputSpec = OutputSpec(),
         who: Requester = Requester()) -> dict[str, Any]:
    """`--dry-run`: every check of a real run, then the steps touched and the estimated cost."""
    from lmclean.unlearn.plan import estimate

    options = choose_auto(store_path, spec, options, output)
    p = prepare(store_path, spec, options, output, who)
    data = estimate(p.traj, p.window, options, len(p.window.affected))
    if options.auto_choice:
        data["auto"] = options.auto_choice
    data.update(sample_ids=list(p.resolved.sample_ids), level=p.resolved.level, base_model=str(p.start.path),
                output=str(p.out), composes_with=[link.request_id for link in p.history.unlearnings])
    if p.resolved.level == "batch":
        data.update(steps=list(p.resolved.steps), collateral_samples=p.resolved.collateral_samples)
    if p.store.retained_from:
        data.update(retained_from=p.store.retained_from, carried_outside_window=list(p.carried))
    return data


def unlearn(store_path: Path | str, spec: ForgetSpec, options: UnlearnOptions, output: OutputSpec = OutputSpec(),
            who: Requester = Requester(), progress: Progress | None = None,
            on_start: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One audited unlearning request, holding the store lock throughout (see the module docstring).

    `on_start(total)` is called with the number of steps the sweep visits once every check passed.
    Returns the report (also written as `unlearn_report.json` into the output model directory).
    """
    store_path = Path(store_path)
    d = current()  # torchrun: rank 0 does what one process does; the others sum their shares into its sweep
    if d.active:
        from lmclean.unlearn.distributed import peer_unlearn, refuse_unsupported

        refuse_unsupported(options)
        if not d.main:
            return peer_unlearn(store_path, spec, options, output, who, d)
    gate = Gate(d)  # opened twice: after recovery, after the checks (lmclean/unlearn/distributed.py)
    try:
        report = _unlearn_locked(store_path, spec, options, output, who, progress, on_start, gate)
    except BaseException as exc:
        gate.fail(exc, phases=2)  # peers still waiting for the checks: they stop too
        raise
    d.barrier()
    return report


def _unlearn_locked(store_path: Path, spec: ForgetSpec, options: UnlearnOptions, output: OutputSpec, who: Requester,
                    progress: Progress | None, on_start: Callable[[int], None] | None, gate: Gate) -> dict[str, Any]:
    from lmclean.audit import AuditLog, finish_pending_scrub
    from lmclean.store.lock import StoreLock
    from lmclean.store.scrub import scrub_samples
    from lmclean.audit.publish import finish_pending_unlearn
    from lmclean.store.swap import finish_pending_swap

    finish_pending_swap(store_path)  # a reconcile interrupted after its commit point
    TrajectoryStore(store_path)  # "no lmclean store at ..." before anything else
    with StoreLock(store_path, "unlearn"):
        log = AuditLog(store_path)
        log.require_intact()  # before anything: a forged record must not be scrubbed or signed over
        finish_pending_unlearn(store_path)
        finish_pending_scrub(store_path)
        gate.open()  # torchrun: the store is settled; the peers prepare the same request alongside
        options = choose_auto(store_path, spec, options, output)
        p = prepare(store_path, spec, options, output, who)
        gate.open()  # torchrun: rank 0's checks passed; the peers join the sweep
        if on_start:
            on_start(max(1, p.window.span))
        try:
            theta_hat, result, report = _compute(p, options, progress)
        except KeyboardInterrupt:
            raise Interrupted("interrupted during the sweep: nothing was written and the store is unchanged") from None
        record = write_and_audit(p, who, theta_hat, result, report)
        report["audit_seq"] = record["seq"]
        report["request_id"] = record["request_id"]
        if not who.keep_data and p.resolved.sample_ids:
            p.traj.pin(set(p.resolved.sample_ids))  # a recompute store keeps g[t] of the steps it scrubs
            scrub = scrub_samples(store_path, list(p.resolved.sample_ids), record["seq"])
            report["scrubbed_steps"] = len(scrub.steps)
    return report


def _compute(p: Prepared, options: UnlearnOptions, progress: Progress | None) -> tuple[torch.Tensor, SweepResult, dict]:
    started = time.perf_counter()

    def tick(t: int, norm: float) -> None:
        crash_point("unlearn:mid-sweep")  # a kill while the sweep runs: the store must be untouched
        if progress:
            progress(t, norm)

    with deterministic(p.traj.device):  # CUDA: deterministic kernels, so replay drifts as little as it can
        checks = check_steps(p.window.first, p.window.tau, p.window.affected, options.check_steps, options.seed)
        result = run_method(p.traj, p.forget, options, tick, keep_for(checks))
        # a recompute store has no stored g[t] to compare with (and the probe would rebuild θ again):
        # its drift is θ rebuilt at each checkpoint the sweep crossed against the checkpoint (recompute_drift)
        drift = (replay_drift(p.traj, p.window.first, min(p.window.first + 8, p.traj.n_steps - 1))
                 if p.window.affected and not p.store.recompute else None)
    result.delta = result.delta.cpu()  # the correction is applied and saved on the CPU
    if drift is not None and drift[1] > 1e-6:
        result.notes.append(f"replay drift {drift[1]:.2e}: ‖g' − g‖/‖g‖ of the gradient recomputed at step {drift[0]} on "
                            f"{p.traj.device} against the stored one (0 = same kernels; bf16 storage alone ~2e-3)")
    rd = p.traj.recompute_drift  # (checkpoint step, ‖θ_rebuilt − θ_ck‖ / ‖θ_ck − θ_prev ck‖): 0 on the CPU
    if rd and rd[1] > 1e-6:
        result.notes.append(f"recompute drift {rd[1]:.2e}: θ rebuilt by recomputed gradients at checkpoint {rd[0]} on "
                            f"{p.traj.device} against the checkpoint, relative to θ's move since the previous one")
    if options.method == "replay":  # θ̂ = the counterfactual run's θ[τ]: recorded θ[τ] + (θ' − θ)
        theta, _ = p.store.checkpoint(p.store.committed_steps)
    else:  # compose: the new correction on top of the current model
        theta = start_theta(p.store, p.start)
    theta_hat = theta + result.delta.to(theta.dtype)
    if options.noise:
        gen = torch.Generator().manual_seed(options.seed)
        theta_hat += options.noise * torch.randn(theta_hat.shape, generator=gen, dtype=theta_hat.dtype)
    if not torch.isfinite(theta_hat).all():
        raise ConfigError("the unlearned parameters are not finite; nothing was written (raise --damping or lower --K)")
    crash_point("unlearn:after-compute")
    result.notes += storage_notes(p.store, options, p.carried)
    report = _report(p, options, result, time.perf_counter() - started)
    began = time.perf_counter()
    try:
        report["quality"] = spot_check(p.traj, p.forget, result, checks, theta, theta_hat, options.seed)
    except LmcleanError as exc:  # a diagnostic: the unlearning itself stands, and the report says why it has none
        report["quality"] = {"check_steps": [], "defect_ratio": None, "error": " ".join(str(exc).split()),
                             "stability": stability_reading(result)}
        report["notes"].append(f"no quality spot check: {report['quality']['error']}")
    report["quality"]["seconds"] = round(time.perf_counter() - began, 3)
    report["lossy_store"], report["exact_states"] = lossy_store(p.store, options.exact_states), options.exact_states
    report["outside_window"] = ({"policy": options.outside_window, "keep_steps": p.store.keep_steps,
                                 "retained_from": p.store.retained_from, "carried_steps": list(p.carried)}
                                if p.store.retained_from else None)
    report["replay_drift"], report["replay_drift_step"] = drift[1] if drift else None, drift[0] if drift else None
    report["recompute_drift"], report["recompute_drift_step"] = (rd[1], rd[0]) if rd else (None, None)
    return theta_hat, result, report


def _report(p: Prepared, options: UnlearnOptions, result: SweepResult, seconds: float) -> dict[str, Any]:
    norms = [n for _, n in result.v_norms]
    lm = options.method == "lmcleaner"
    prop = options.propagation
    return {
        "lmclean_version": lmclean.__version__,
        "store": str(p.store.path), "base_model": str(p.start.path), "base_digest": p.start.digest,
        "base_unrelated": p.start.unrelated,
        "composes_with": [link.request_id for link in p.history.unlearnings],
        "also_excluded_ids": sorted(p.forget.sample_ids - set(p.resolved.sample_ids)),
        "method": result.method, "level": p.resolved.level,
        "forget_sample_ids": list(p.resolved.sample_ids), "forget_fingerprints": list(p.resolved.fingerprints),
        "forget_steps": list(p.resolved.steps), "collateral_samples": p.resolved.collateral_samples,
        "K": options.K, "hvp": prop.operator.hvp if lm else None, "damping": result.damping if lm else None,
        "curvature_batch": prop.curvature_batch if lm else None,
        "fraction": options.fraction, "noise_sigma": options.noise, "seed": options.seed,
        # every setting the sweep used, so the report alone reproduces it
        "propagation": ({"tail": prop.tail, "stabilize": prop.stabilize, "on_divergence": prop.on_divergence,
                         "operator": dataclasses.asdict(prop.operator),
                         "tail_operator": dataclasses.asdict(prop.tail_operator) if prop.propagates_tail else None}
                        if lm else None),
        "steps_touched": result.steps_touched, "window": list(result.window),
        "curvature_products": result.products, "gradient_evaluations": round(result.gradients, 3),
        "v_norm": {"first": norms[0] if norms else 0.0, "max": max(norms, default=0.0), "last": norms[-1] if norms else 0.0,
                   "trace": [[t, n] for t, n in result.v_norms[:: max(1, len(result.v_norms) // 200)]]},
        "v_norms": norms,
        "delta_norm": float(torch.linalg.vector_norm(result.delta)),
        "divergence_check": result.divergence, "notes": result.notes,
        "device": str(p.traj.device), "autocast": p.traj.autocast,
        "wall_seconds": round(seconds, 3), "output": str(p.out), "auto": options.auto_choice,
    }
