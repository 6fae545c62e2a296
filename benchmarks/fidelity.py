"""Fidelity versus cost of every unlearning method, against exact retraining (`record --exclude`).

Records the run and its retrained reference once (cached under --workdir), then for each method
prints, measured side by side in this one process:
  residual  ‖θ̂ − θ_retrain‖ / ‖θ − θ_retrain‖      (0 = exact, 1 = did nothing)
  gap       (L_F(θ̂) − L_F(θ)) / (L_F(θ_retrain) − L_F(θ))   (1 = like retraining, ≫1 = over-forgetting);
            "n/a" when retraining moves the forget loss by under 1% (the ratio would be noise: e.g.
            forgotten early batches whose samples are seen again later)
  cost      wall time / time of the same number of recorded training steps (forward+backward+update,
            mean over 40 recorded steps spread across the window)
  vs replay wall time / exact replay's wall time
and the time of 1 vs 100 forget requests in one call.

Fine-tunes the model of examples/tiny.yaml on examples/finetune.yaml (both recorded on first use).

  python benchmarks/fidelity.py                          # scenario "memorise": forget 10 samples seen every epoch
  python benchmarks/fidelity.py --scenario early         # forget steps seen only early (K matters)
  python benchmarks/fidelity.py --quick                  # fewer variants
  python benchmarks/fidelity.py --frontier --json runs/x.json --plot runs/x.png   # the study rows (README)

Rows named "cb=full" take the curvature on the recorded batch (`--curvature-batch full`), the others
on the batch without the forget set (retained). `--json` writes the case (its numbers and command)
with its rows; benchmarks/frontier.py draws several such files as one figure. Rows "ekfac-rq" run
`--hvp ekfac-rq` (EK-FAC rescaled along the propagated vector, lmclean/unlearn/basis_operators.py); rows "krylov" run `--hvp krylov` (lmclean/curvature/krylov.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from lmclean import config as config_mod
from lmclean.store import TrajectoryStore
from lmclean.train.data import parse_id_spec
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay, rollback
from lmclean.unlearn.common import flat_grad
from lmclean.unlearn.service import open_trajectory


# the rows of the frontier / curvature-batch study (benchmarks/README.md, "Frontier and --curvature-batch")
FRONTIER_ROWS = {
    "rollback", "lmcleaner ggn K=800", "lmcleaner ggn K=800 cb=full", "lmcleaner exact K=800",
    *(f"lmcleaner {hvp} K=800 refresh={r}{cb}" for hvp in ("kfac", "ekfac") for r in (10, 50) for cb in ("", " cb=full")),
    "lmcleaner diag K=800", "lmcleaner lowrank K=800", "lmcleaner fisher K=800", "lmcleaner ggn K=800 cf=0.25",
    "lmcleaner ggn K=20 tail=ekfac", "replay f=0.5", "replay f=0.25", "replay f=0.125",
}


def record_pair(cfg_path: Path, overrides: list[str], exclude: list[int], workdir: Path) -> tuple[Path, Path]:
    """Record the run and its exact-retraining reference, reusing them when the config is unchanged."""
    cfg = config_mod.load(cfg_path, overrides)
    key = json.dumps([config_mod.to_dict(cfg), exclude], sort_keys=True)
    stores = (workdir / "full.zarr", workdir / "retrain.zarr")
    stamp = workdir / "key.json"
    if stamp.exists() and stamp.read_text() == key and all((p / "COMMIT.json").exists() for p in stores):
        return stores
    workdir.mkdir(parents=True, exist_ok=True)
    train(cfg, stores[0], overwrite=True, base=cfg_path.parent)
    train(cfg, stores[1], exclude=exclude, overwrite=True, base=cfg_path.parent)
    stamp.write_text(key)
    return stores


def forget_loss(traj, theta: torch.Tensor, occurrences: dict[int, list[int]]) -> float:  # noqa: ANN001
    """Mean per-sample loss of the forget samples at θ (each sample once, tokens from its first step)."""
    seen: dict[int, int] = {}
    for t, ids in sorted(occurrences.items()):
        for i in ids:
            seen.setdefault(i, t)
    total = 0.0
    with torch.no_grad():
        for i, t in seen.items():
            obj = traj.objective(t, [i])
            w = float(traj.batch(t).weights[list(traj.batch(t).sample_ids).index(i)])
            total += float(obj.loss_from_outputs(obj.outputs(traj.manifest.views(theta)))) / w
    return total / max(1, len(seen))


def train_step_seconds(traj, steps: list[int]) -> float:  # noqa: ANN001
    """Mean time of one recorded training step (forward + backward + update) over recorded batches
    spread across the window (batch lengths vary: a sweep's cost is a sum, so the mean is the unit)."""
    times = []
    for t, theta, state in traj.states(steps[0], steps[-1]):
        if t not in steps:
            continue
        start = time.perf_counter()
        g = flat_grad(traj.objective(t, [int(i) for i in traj.batch(t).sample_ids]), traj.manifest, theta)
        nxt, st = theta.clone(), {k: v.clone() for k, v in state.items()}
        traj.rule.step(nxt, g, traj.batch(t).lr, st, t)
        times.append(time.perf_counter() - start)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("examples/finetune.yaml"))
    ap.add_argument("--pretrain", type=Path, default=Path("examples/tiny.yaml"),
                    help="config recorded first; its model is the starting point of --config (model.path)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--scenario", choices=["memorise", "early"], default="memorise")
    ap.add_argument("--forget", default="3,4,10-17", help="memorise: sample ids to forget")
    ap.add_argument("--early-steps", default="8-15", help="early: recorded steps to forget (batch level)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--stores", type=Path, nargs="+", metavar="STORE",
                    help="benchmark existing stores instead of recording them: FULL RETRAINED for memorise (e.g. "
                         "the TOFU example's runs/tofu/original.zarr runs/tofu/retrained.zarr with --forget "
                         "3960-3999), FULL alone for early (its reference is exact replay)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="run only the methods whose name contains one of these comma-separated texts (e.g. rollback,lowrank); "
                         "=NAME selects exactly that row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frontier", action="store_true",
                    help="run only the frontier / curvature-batch study rows (FRONTIER_ROWS; see benchmarks/README.md)")
    ap.add_argument("--label", help="the case's name in --json and --plot (default: the scenario and stores)")
    ap.add_argument("--json", type=Path, help="also write the case and its rows as JSON here")
    ap.add_argument("--plot", type=Path, help="also draw this run's frontier (residual vs ×replay) here (needs matplotlib: the bench extra)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    full_path = args.workdir / args.scenario
    if args.stores and len(args.stores) != (2 if args.scenario == "memorise" else 1):
        ap.error("--stores takes FULL RETRAINED with --scenario memorise, FULL with --scenario early")
    if args.pretrain and not args.stores:
        # memorise: like TOFU, the pre-trained model never saw the forget samples, the fine-tune
        # introduces them (forgetting samples the base model also learned cannot be judged against
        # retraining the fine-tune alone)
        held_out = sorted(parse_id_spec(args.forget)) if args.scenario == "memorise" else []
        pre = args.workdir / ("pretrain-heldout.zarr" if held_out else "pretrain.zarr")
        if not (pre / "model" / "config.json").exists():
            train(config_mod.load(args.pretrain, []), pre, exclude=held_out, overwrite=True, base=args.pretrain.parent)
        args.overrides = [f"model.path={pre / 'model'}", *args.overrides]
    if args.scenario == "memorise":
        forget = ForgetSet(sample_ids=set(parse_id_spec(args.forget)))
        exclude = sorted(forget.sample_ids)
        full, ref = args.stores or record_pair(args.config, args.overrides, exclude, full_path)
    else:
        full = args.stores[0] if args.stores else record_pair(args.config, args.overrides, [], full_path / "plain")[0]
        steps = set(parse_id_spec(args.early_steps))
        forget = ForgetSet(steps=steps)  # reference: exact replay with the steps skipped (replay is exact)
    store = TrajectoryStore(full)
    traj = open_trajectory(store)
    tau = store.committed_steps
    theta, _ = store.checkpoint(tau)
    occ = forget.affected(traj)
    first, last = min(occ), max(occ)
    # measured first: it also warms the caches, so exact replay (the first method timed) is not
    # charged for them
    window = list(range(first, tau))
    step_s = train_step_seconds(traj, window[:: max(1, len(window) // 40)])
    start = time.perf_counter()
    exact = replay(traj, forget)
    replay_seconds = time.perf_counter() - start
    if args.scenario == "early":
        theta_ref = theta + exact.delta
    else:
        reference = TrajectoryStore(ref)
        theta_ref = reference.checkpoint(reference.committed_steps)[0]
    if args.scenario == "memorise":
        check = float(torch.linalg.vector_norm(theta + exact.delta - theta_ref) / torch.linalg.vector_norm(theta - theta_ref))
        print(f"exact replay vs record --exclude: residual {check:.2e} (float rounding only)")
    lf = {k: forget_loss(traj, v, occ) for k, v in {"orig": theta, "ref": theta_ref}.items()}
    base = float(torch.linalg.vector_norm(theta - theta_ref))
    print(f"scenario {args.scenario}: {tau} steps, forget {len(forget.sample_ids) or len(forget.steps)} "
          f"{'samples' if forget.sample_ids else 'steps'} in {len(occ)} steps ({first}..{last}); "
          f"‖θ − θ_retrain‖ = {base:.4g}; forget loss {lf['orig']:.4f} (orig) vs {lf['ref']:.4f} (retrained); "
          f"training step {step_s * 1e3:.1f} ms")

    def lm(hvp: str, K: int, damping: float = 1e-4, cb: str = "retained", **op) -> callable:  # noqa: ANN003
        return lambda: propagate(traj, forget, PropagationSettings(K=K, damping=damping, curvature_batch=cb,
                                                                   operator=OperatorSettings(hvp=hvp, **op)))

    variants: list[tuple[str, callable]] = [("rollback", lambda: rollback(traj, forget))]
    Ks = [20, 800] if args.quick else [5, 20, 100, 800]
    for K in Ks:
        variants.append((f"lmcleaner ggn K={K}", lm("ggn", K)))
    variants.append(("lmcleaner ggn K=800 cb=full", lm("ggn", 800, cb="full")))
    variants.append(("lmcleaner ggn K=800 damp=1e-2", lm("ggn", 800, 1e-2)))
    variants.append(("lmcleaner ggn K=800 no-stabilize", lambda: propagate(
        traj, forget, PropagationSettings(K=800, stabilize=False, divergence_factor=1e6, operator=OperatorSettings(hvp="ggn")))))
    variants.append(("lmcleaner ggn K=20 tail=lowrank", lambda: propagate(
        traj, forget, PropagationSettings(K=20, tail="lowrank", operator=OperatorSettings(hvp="ggn")))))
    for hvp in ["exact", "diag", "lowrank", "fisher"]:
        variants.append((f"lmcleaner {hvp} K=800", lm(hvp, 800)))
    variants.append(("lmcleaner exact K=20", lm("exact", 20)))
    # Kronecker-factored GGN at anchor steps, reused for `refresh` steps (closed form in between)
    for hvp in ["kfac", "ekfac"]:
        for refresh in ([10, 50] if args.quick else [1, 10, 50]):
            variants.append((f"lmcleaner {hvp} K=800 refresh={refresh}", lm(hvp, 800, refresh=refresh)))
            if refresh > 1:
                variants.append((f"lmcleaner {hvp} K=800 refresh={refresh} cb=full", lm(hvp, 800, cb="full", refresh=refresh)))
    for refresh in (10, 50):
        variants.append((f"lmcleaner ekfac-rq K=800 refresh={refresh}", lm("ekfac-rq", 800, refresh=refresh)))
    # the anchor's exact GGN on the Krylov space of the propagated vector (lmclean/curvature/krylov.py);
    # any "=lmcleaner krylov K=800 refresh=R k=K af=A [seed=S]" named in --only runs too
    wanted_krylov = [w[1:] for w in (args.only or "").split(",") if w.strip().startswith("=lmcleaner krylov")]
    for name in dict.fromkeys(["lmcleaner krylov K=800 refresh=16 k=4 af=0.5", *map(str.strip, wanted_krylov)]):
        kv = dict(part.split("=") for part in name.split()[2:])
        variants.append((name, lm("krylov", int(kv["K"]), refresh=int(kv["refresh"]), krylov_dim=int(kv["k"]),
                                  anchor_fraction=float(kv["af"]), seed=int(kv.get("seed", 0)))))
    variants.append(("lmcleaner ekfac K=800 refresh=10 anchor=1", lm("ekfac", 800, refresh=10, anchor_fraction=1.0)))
    variants.append(("lmcleaner ggn K=20 tail=ekfac", lambda: propagate(
        traj, forget, PropagationSettings(K=20, tail="ekfac", operator=OperatorSettings(hvp="ggn", refresh=10)))))
    for cf in [0.5, 0.25, 0.125]:  # subsampled curvature: each step's product on a share of its batch
        variants.append((f"lmcleaner ggn K=800 cf={cf}", lm("ggn", 800, curvature_fraction=cf)))
    if not args.quick:
        variants.append(("lmcleaner lowrank r=32 K=800", lm("lowrank", 800, rank=32, lanczos_iter=40)))
        variants.append(("replay K=20", lambda: replay(traj, forget, K=20)))
    for f in [0.5, 0.25, 0.125]:
        variants.append((f"replay f={f}", lambda f=f: replay(traj, forget, fraction=f)))
    if args.frontier:
        variants = [(name, fn) for name, fn in variants if name in FRONTIER_ROWS]
    if not forget.sample_ids:  # batch level: no sample is excluded from any curvature, full = retained
        variants = [(name, fn) for name, fn in variants if "cb=full" not in name]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]  # "=name": that row only; else any row containing it
        variants = [(name, fn) for name, fn in variants
                    if any(name == w[1:] if w.startswith("=") else w in name for w in wanted)]

    span = exact.window[1] - exact.window[0]
    header = f"{'method':42s} {'residual':>9s} {'gap':>7s} {'seconds':>8s} {'×train':>7s} {'×replay':>8s} {'/step':>7s} {'products':>8s}"
    print("\n" + header, flush=True)
    rows: list[dict] = []

    def cost(row: dict) -> None:  # the cost columns, kept in the JSON rows too
        row["x_train"] = row["seconds"] / (span * step_s)
        row["x_replay"] = row["seconds"] / replay_seconds

    def emit(row: dict) -> None:
        rows.append(row)
        if "error" in row:
            print(f"{row['method']:42s} ERROR {row['error']}", flush=True)
            return
        cost(row)
        per_step = row["seconds"] / (row["steps"] * step_s)
        gap = f"{row['gap']:7.2f}" if row["gap"] is not None else f"{'n/a':>7s}"
        print(f"{row['method']:42s} {row['residual']:9.3f} {gap} {row['seconds']:8.1f} "
              f"{row['seconds'] / (span * step_s):7.2f} {row['seconds'] / replay_seconds:8.2f} {per_step:7.2f} "
              f"{row['products']:8d}", flush=True)

    gap_defined = abs(lf["ref"] - lf["orig"]) >= 0.01 * abs(lf["orig"])
    th = theta + exact.delta  # measured, not assumed: in the early scenario it is the reference itself

    emit({"method": "replay (exact)", "residual": float(torch.linalg.vector_norm(th - theta_ref)) / base,
          "gap": (forget_loss(traj, th, occ) - lf["orig"]) / (lf["ref"] - lf["orig"]) if gap_defined else None,
          "seconds": replay_seconds, "steps": span, "products": 0})
    for name, fn in variants:
        begin = time.perf_counter()
        try:
            res = fn()
        except Exception as exc:  # noqa: BLE001 - a diverged method is a result, not a crash
            emit({"method": name, "error": str(exc)[:100]})
            continue
        seconds = time.perf_counter() - begin
        th = theta + res.delta
        gap = (forget_loss(traj, th, occ) - lf["orig"]) / (lf["ref"] - lf["orig"]) if gap_defined else None
        emit({"method": name, "residual": float(torch.linalg.vector_norm(th - theta_ref)) / base, "gap": gap,
              "seconds": seconds, "steps": max(1, res.window[1] - res.window[0]), "products": res.products})
    print("×train: wall time / (training steps of the exact replay span); /step: per propagated step, in training steps")

    if args.scenario == "memorise" and not args.only and not args.frontier:
        ids = sorted(traj.store.sample_fingerprints)
        for n in (1, 100):
            fs = ForgetSet(sample_ids=set(ids[:: max(1, len(ids) // n)][:n]))
            begin = time.perf_counter()
            propagate(traj, fs, PropagationSettings(K=800, operator=OperatorSettings(hvp="ggn")))
            rows.append({"method": f"ggn {n} requests", "seconds": time.perf_counter() - begin})
            print(f"lmcleaner ggn, {n:3d} forget requests in one call: {rows[-1]['seconds']:.1f} s")
        print(f"100 vs 1 request time ratio: {rows[-1]['seconds'] / rows[-2]['seconds']:.2f}")
    case = {"case": args.label or f"{args.scenario}: {' '.join(map(str, args.stores or [args.config]))}",
            "scenario": args.scenario, "command": shlex.join(["python", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch_threads": args.threads, "steps": tau, "forget_steps": len(occ), "span": span,
            "theta_distance": base, "forget_loss": lf, "gap_defined": gap_defined,
            "train_step_seconds": step_s, "replay_seconds": replay_seconds, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(case, indent=1) + "\n")
    if args.plot:
        from frontier import draw  # benchmarks/frontier.py; imports matplotlib itself

        draw([case], args.plot)


if __name__ == "__main__":
    main()
