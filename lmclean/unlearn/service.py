"""`unlearn` as a service over a store: plan, run the chosen method, write the model and its report.

Never modifies the store's recorded data or model; the output directory appears atomically with
its `unlearn_report.json`, or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmclean
from lmclean._faults import crash_point
from lmclean.errors import ConfigError
from lmclean.store.reader import TrajectoryStore
from lmclean.train.data import load_tokenizer
from lmclean.train.flat import flat_params
from lmclean.train.model import load_flat_into, load_model, model_from_config_dict, save_model
from lmclean.unlearn.baselines import replay, rollback
from lmclean.unlearn.common import ForgetSet, SweepResult
from lmclean.unlearn.lmcleaner import PropagationSettings, propagate, require_supported
from lmclean.unlearn.trajectory import StoreTrajectory

METHODS = ("lmcleaner", "rollback", "replay")
Progress = Callable[[int, float], None]


@dataclass
class UnlearnOptions:
    method: str = "lmcleaner"
    K: int | None = 800  # lmcleaner: propagation window; replay: None = replay to the end
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    fraction: float | None = None  # replay: control-variate subsample fraction
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r} is not known; use one of {list(METHODS)}")
        if self.K is not None and self.K < 0:
            raise ConfigError(f"--K {self.K} must be >= 0")
        if self.noise < 0:
            raise ConfigError(f"--noise {self.noise} must be >= 0")


def load_tombstones(store: TrajectoryStore) -> set[int]:
    try:
        from lmclean.audit.scrub import tombstones
    except ImportError:  # pragma: no cover - audit scrub not installed
        return set()
    return set(tombstones(store.path))


def open_trajectory(store: TrajectoryStore) -> StoreTrajectory:
    model = model_from_config_dict(store.meta["model_config"])
    model.eval()  # no dropout: curvature and gradients of the recorded (deterministic) loss
    return StoreTrajectory(store, model, load_tombstones(store))


def plan(store: TrajectoryStore, forget: ForgetSet, options: UnlearnOptions) -> dict[str, Any]:
    """What a run would touch and cost; the time estimate is timed on one real step (for --dry-run)."""
    traj = open_trajectory(store)
    affected = forget.affected(traj)
    tau = traj.n_steps
    if not affected:
        return {"method": options.method, "steps_touched": [], "note": "no recorded step contains the forget set"}
    first, last = min(affected), max(affected)
    stop = min(tau, last + (tau if options.K is None else options.K) + 1)
    prop = options.propagation
    span = last + 1 - first if options.method == "rollback" else stop - first
    grad_s, product_s = _time_one_step(traj, first, prop.operator.hvp if options.method == "lmcleaner" else None)
    products = 0
    if options.method == "lmcleaner":
        op = prop.operator
        per_anchor = {"lowrank": op.lanczos_products, "diag": op.diag_probes}
        products = span if op.hvp in ("exact", "ggn") else 0
        if op.hvp in per_anchor:
            products = -(-span // op.refresh) * per_anchor[op.hvp]
        if prop.tail == "lowrank" and stop < tau:
            products += -(-(tau - stop) // prop.tail_operator.refresh) * prop.tail_operator.lanczos_products
        seconds = products * product_s + len(affected) * grad_s
    elif options.method == "replay":
        seconds = span * grad_s * (1.0 if not options.fraction else 2 * options.fraction + 0.3)
    else:
        seconds = len(affected) * grad_s
    return {
        "method": options.method, "steps_touched": sorted(affected), "first_step": first, "last_step": last,
        "window": [first, stop], "propagated_steps": span, "carried_steps": tau - stop,
        "curvature_products_needed": products, "gradient_seconds": round(grad_s, 4),
        "product_seconds": round(product_s, 4), "estimated_seconds": round(seconds, 1),
    }


def affected_steps(store: TrajectoryStore, forget: ForgetSet) -> list[int]:
    """Recorded steps a forget set touches, from the stored sample ids alone (no model needed)."""
    if forget.steps:
        return sorted(forget.steps)
    ids = store.all_sample_ids()  # (T, B)
    return [int(t) for t in np.nonzero(np.isin(ids, sorted(forget.sample_ids)).any(axis=1))[0]]


def sweep_steps(steps: list[int], tau: int, options: UnlearnOptions) -> int:
    """How many steps a run sweeps (the progress bar's total): rollback visits first..last; the others
    go K past the last affected step, or to the end (replay without K, a low-rank tail)."""
    if not steps:
        return 0
    if options.method == "rollback":
        return steps[-1] - steps[0] + 1
    to_end = options.K is None or (options.method == "lmcleaner" and options.propagation.tail == "lowrank")
    end = tau if to_end else min(tau, steps[-1] + options.K + 1)
    return end - steps[0]


def _time_one_step(traj: StoreTrajectory, t: int, hvp: str | None) -> tuple[float, float]:
    """Seconds of one gradient and one curvature product on step t's batch (after a warm-up)."""
    from lmclean.curvature import get_product
    from lmclean.unlearn.common import flat_grad

    for _, theta, _ in traj.states(t, t):
        obj = traj.objective(t, [int(i) for i in traj.batch(t).sample_ids])
        timings = []
        for _ in range(2):  # the first call pays one-off costs
            began = time.perf_counter()
            g = flat_grad(obj, traj.manifest, theta)
            timings.append(time.perf_counter() - began)
        grad_s, product_s = timings[-1], 0.0
        if hvp in ("exact", "ggn", "lowrank", "diag"):
            product = get_product("exact" if hvp == "exact" else "ggn")
            for _ in range(2):
                began = time.perf_counter()
                product(obj, traj.manifest.views(theta), traj.manifest.views(g))
                product_s = time.perf_counter() - began
        return grad_s, product_s
    return 0.0, 0.0


def run_method(traj: StoreTrajectory, forget: ForgetSet, options: UnlearnOptions, progress: Progress | None) -> SweepResult:
    if options.method == "rollback":
        return rollback(traj, forget, progress)
    if options.method == "replay":
        return replay(traj, forget, K=options.K, fraction=options.fraction, seed=options.seed, progress=progress)
    require_supported(traj, forget)
    settings = options.propagation
    settings.K = options.K if options.K is not None else traj.n_steps
    return propagate(traj, forget, settings, progress)


def base_theta(store: TrajectoryStore, base: Path | None) -> torch.Tensor:
    if base is None:
        theta, _ = store.checkpoint(store.committed_steps)
        return theta
    model = load_model(base)
    store.manifest.check_model(model, f"--base model {base}")
    return flat_params(model, store.manifest).clone()


@dataclass
class Request:
    """Who asked and why: goes into the audit record, never into the model."""

    request_id: str | None = None
    reason: str | None = None
    requested_by: str | None = None
    keep_data: bool = False  # False: scrub the forgotten samples' tokens from the store afterwards


def unlearn(store: TrajectoryStore, forget: ForgetSet, description: dict[str, Any], options: UnlearnOptions,
            out: Path, base: Path | None = None, progress: Progress | None = None,
            request: Request | None = None) -> dict[str, Any]:
    """One audited unlearning request, holding the store lock throughout.

    Order (crash-safe at every point): finish any interrupted scrub; refuse tombstoned samples;
    compute; write the model + report to a temp dir and rename it into place; append the audit
    record; scrub the forgotten samples' tokens (resumable: the audit record says what to scrub).
    """
    from lmclean.audit import AuditLog, StoreLock, check_not_tombstoned, finish_pending_scrub, scrub_samples, unlearn_event

    request = request or Request()
    with StoreLock(store.path, "unlearn"):
        finish_pending_scrub(store.path)
        check_not_tombstoned(store.path, description.get("sample_ids", []))
        if request.request_id and AuditLog(store.path).latest(where={"request_id": request.request_id}):
            raise ConfigError(f"request id {request.request_id!r} is already in the audit log of {store.path}; use a new id")
        report, norms = compute_and_write(store, forget, description, options, out, base, progress)
        crash_point("unlearn:after-model")
        record = unlearn_event(
            store.path, request_id=request.request_id, reason=request.reason, requested_by=request.requested_by,
            forget_ids=description.get("sample_ids", []), forget_fingerprints=description.get("fingerprints", []),
            level=report["level"], method=report["method"], K=report["K"], hvp=report["hvp"], damping=report["damping"],
            noise_sigma=report["noise_sigma"], steps_touched=report["steps_touched"],
            curvature_products=report["curvature_products"], v_norms=norms,
            divergence_check=report["divergence_check"], model_before_dir=base or store.model_dir, output_dir=out,
            keep_data=request.keep_data, wall_time=report["wall_seconds"])
        crash_point("unlearn:after-audit")
        report["audit_seq"] = record["seq"]
        report["request_id"] = record["request_id"]
        if not request.keep_data and description.get("sample_ids"):
            scrub = scrub_samples(store.path, description["sample_ids"], record["seq"])
            report["scrubbed_steps"] = len(scrub.steps)
    return report


def compute_and_write(store: TrajectoryStore, forget: ForgetSet, description: dict[str, Any], options: UnlearnOptions,
                      out: Path, base: Path | None = None, progress: Progress | None = None) -> tuple[dict[str, Any], list[float]]:
    """Run the method and write the model + unlearn_report.json atomically to `out` (no audit)."""
    if not store.closed:
        raise ConfigError(f"store {store.path} is incomplete ({store.committed_steps}/{store.planned_steps} steps); "
                          "finish it with `lmclean record --resume` first")
    started = time.perf_counter()
    traj = open_trajectory(store)
    theta = base_theta(store, base)
    result = run_method(traj, forget, options, progress)
    theta_hat = theta + result.delta.to(theta.dtype)
    if options.noise:
        gen = torch.Generator().manual_seed(options.seed)
        theta_hat += options.noise * torch.randn(theta_hat.shape, generator=gen, dtype=theta_hat.dtype)
    if not torch.isfinite(theta_hat).all():
        raise ConfigError("the unlearned parameters are not finite; nothing was written (raise --damping or lower --K)")
    crash_point("unlearn:after-compute")
    norms = [n for _, n in result.v_norms]
    report = {
        "lmclean_version": lmclean.__version__,
        "store": str(store.path), "base_model": str(base) if base else "recorded final model",
        "method": result.method, "level": description.get("level", forget.level),
        "forget_sample_ids": description.get("sample_ids", []), "forget_fingerprints": description.get("fingerprints", []),
        "forget_steps": sorted(forget.steps), "collateral_samples": description.get("collateral_samples", 0),
        "K": options.K, "hvp": options.propagation.operator.hvp if options.method == "lmcleaner" else None,
        "damping": result.damping if options.method == "lmcleaner" else None,
        "curvature_batch": options.propagation.curvature_batch if options.method == "lmcleaner" else None,
        "fraction": options.fraction, "noise_sigma": options.noise, "seed": options.seed,
        # every setting the sweep used, so the report alone reproduces it
        "propagation": ({"tail": options.propagation.tail, "stabilize": options.propagation.stabilize,
                         "on_divergence": options.propagation.on_divergence,
                         "operator": dataclasses.asdict(options.propagation.operator)}
                        if options.method == "lmcleaner" else None),
        "steps_touched": result.steps_touched, "window": list(result.window),
        "curvature_products": result.products, "gradient_evaluations": round(result.gradients, 3),
        "v_norm": {"first": norms[0] if norms else 0.0, "max": max(norms, default=0.0), "last": norms[-1] if norms else 0.0,
                   "trace": [[t, n] for t, n in result.v_norms[:: max(1, len(result.v_norms) // 200)]]},
        "delta_norm": float(torch.linalg.vector_norm(result.delta)),
        "divergence_check": result.divergence, "notes": result.notes,
        "wall_seconds": round(time.perf_counter() - started, 3), "output": str(out),
    }
    model = model_from_config_dict(store.meta["model_config"])
    load_flat_into(model, store.manifest, theta_hat)
    save_model(model, load_tokenizer(store.meta["tokenizer"]), out,
               extra_files={"unlearn_report.json": json.dumps(report, indent=1)})
    return report, norms


def default_out(store: Path) -> Path:
    """`<store>-unlearned-N` next to the store, N the first free number (never overwrites)."""
    stem = store.name.removesuffix(".zarr")
    n = 1
    while (store.parent / f"{stem}-unlearned-{n}").exists():
        n += 1
    return store.parent / f"{stem}-unlearned-{n}"
