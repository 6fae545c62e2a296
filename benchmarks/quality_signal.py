"""The quality spot check (lmclean/unlearn/quality.py) next to the true residual, for every method.

On stores recorded by benchmarks/fidelity.py (the bundled fine-tune and its exact retraining), runs
each method once, keeping its state at the sampled steps, and prints per method:
  residual      ‖θ̂ − θ_retrain‖ / ‖θ − θ_retrain‖ (0 exact, 1 did nothing; the truth the check estimates)
  defect s=3    the spot check's defect ratio at the default 3 sampled steps (seed 0)
  defect s=10   the same at 10 sampled steps
  pooled s=10   √Σ defect² / √Σ correction² at those 10 steps (reported beside it: large corrections dominate)
  forget Δ      the forget-set loss change the report shows (θ̂ vs θ)
  check s       seconds the s=3 check took (its cost: 3 gradients, 4 forward passes, 3 state rebuilds)
  clipped       the stability reading (ggn, krylov): propagated steps the stabiliser clipped / all, and
                "edge" where the report calls it the edge of stability; "-" for methods without one

  python benchmarks/quality_signal.py --threads 1          # memorise: runs/bench/memorise/{full,retrain}.zarr
  python benchmarks/quality_signal.py --scenario early --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmclean.store import TrajectoryStore
from lmclean.train.data import parse_id_spec
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay, rollback
from lmclean.unlearn.common import SweepResult
from lmclean.unlearn.quality import check_steps, keep_for, spot_check
from lmclean.unlearn.service import open_trajectory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["memorise", "early"], default="memorise")
    ap.add_argument("--stores", type=Path, nargs="+", help="FULL RETRAINED (memorise) or FULL (early); default: "
                    "fidelity.py's runs/bench stores")
    ap.add_argument("--forget", default="3,4,10-17")
    ap.add_argument("--early-steps", default="8-15")
    ap.add_argument("--only", help="comma-separated texts: run only the rows whose name contains one")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stores = args.stores or ([Path("runs/bench/memorise/full.zarr"), Path("runs/bench/memorise/retrain.zarr")]
                             if args.scenario == "memorise" else [Path("runs/bench/early/plain/full.zarr")])
    store = TrajectoryStore(stores[0])
    traj = open_trajectory(store, "cpu")
    forget = (ForgetSet(sample_ids=set(parse_id_spec(args.forget))) if args.scenario == "memorise"
              else ForgetSet(steps=set(parse_id_spec(args.early_steps))))
    tau = store.committed_steps
    theta, _ = store.checkpoint(tau)
    affected = forget.affected(traj)
    first = min(affected)

    def lm(hvp: str, K: int = 800, **op: object):  # noqa: ANN202
        return lambda keep: propagate(traj, forget, PropagationSettings(K=K, operator=OperatorSettings(hvp=hvp, **op)), keep=keep)

    rows = [("replay (exact)", lambda keep: replay(traj, forget, keep=keep)),
            *((f"replay f={f}", lambda keep, f=f: replay(traj, forget, fraction=f, keep=keep)) for f in (0.5, 0.25)),
            ("rollback", lambda keep: rollback(traj, forget, keep=keep)),
            ("lmcleaner ggn K=800", lm("ggn")), ("lmcleaner ggn K=20", lm("ggn", 20)),
            ("lmcleaner ekfac K=800 refresh=10", lm("ekfac", refresh=10)),
            ("lmcleaner krylov K=800 refresh=16", lm("krylov", refresh=16)),
            ("lmcleaner diag K=800", lm("diag")), ("lmcleaner lowrank K=800", lm("lowrank")),
            ("lmcleaner fisher K=800", lm("fisher"))]
    if args.only:
        rows = [r for r in rows if any(x in r[0] for x in args.only.split(","))]
    started = time.perf_counter()
    exact = replay(traj, forget)
    if args.scenario == "memorise":
        ref = TrajectoryStore(stores[1])
        theta_ref = ref.checkpoint(ref.committed_steps)[0]
    else:  # batch level: exact replay is the reference
        theta_ref = theta + exact.delta
    base = float(torch.linalg.vector_norm(theta - theta_ref))
    print(f"scenario {args.scenario}: {tau} steps, {len(affected)} affected ({first}..{max(affected)}); "
          f"‖θ − θ_retrain‖ = {base:.4g}; reference in {time.perf_counter() - started:.1f} s")
    print(f"{'method':34s} {'residual':>9s} {'defect s=3':>11s} {'defect s=10':>12s} {'pooled s=10':>12s} "
          f"{'forget Δ':>9s} {'check s':>8s}  clipped")
    for name, run in rows:
        picks = {s: check_steps(first, tau, affected, s, seed=0) for s in (3, 10)}
        result: SweepResult = run(keep_for(sorted(set(picks[3]) | set(picks[10]))))
        theta_hat = theta + result.delta
        residual = float(torch.linalg.vector_norm(theta_hat - theta_ref)) / base
        began = time.perf_counter()
        q3 = spot_check(traj, forget, result, picks[3], theta, theta_hat)
        seconds = time.perf_counter() - began
        q10 = spot_check(traj, forget, result, picks[10], theta, theta_hat)
        s = q3["stability"]
        clipped = "-" if s is None else f"{s['clipped_steps']}/{s['steps']}" + (" edge" if s["edge_of_stability"] else "")
        print(f"{name:34s} {residual:9.3f} {q3['defect_ratio']:11.3f} {q10['defect_ratio']:12.3f} "
              f"{q10['strata']['pooled']:12.3f} {q3['forget_loss']['delta']:+9.4f} {seconds:8.2f}  {clipped}", flush=True)


if __name__ == "__main__":
    main()
