"""Storage modes side by side: bytes per parameter per step, recording overhead, and unlearning cost.

For the examples/tiny.yaml run it records, in one process and in rounds of rotating order (as
benchmarks/record_overhead.py does, so load that drifts hits every mode alike): no recording
(`train(cfg, None)`), stored fp32 rows, stored bf16 rows, `record.gradients: recompute`, and int8
rows when this lmclean has them. Per mode: median step time, its overhead against the unrecorded
run of the same round, and the store's bytes on disk per parameter per step (gradient rows, and the
whole trajectory: rows + checkpoints + batches; the final model directory is not written).

Then the unlearning cost of one request on the last round's stored-fp32 and recompute stores (the
same run: the recompute store's θ[t] is the stored one's bitwise on CPU): exact replay, rollback
and lmcleaner ggn, alternated `--unlearn-rounds` times, wall time as a ratio recompute / stored and in
training steps (the unrecorded step time). The forget sample is one of step 0's batch, so every
step is swept (the upper bound `record --dry-run` reports). The divergence guard is off (the tiny
run trains at lr 0.05 with momentum 0.9, where GGN propagation diverges, benchmarks/README.md): this
times the sweep, whatever its result.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/storage_modes.py --threads 1 [--steps N] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mode -> config overrides (record.gradients, record.precision); "none" trains without recording
MODES = {"fp32": ("stored", "fp32"), "bf16": ("stored", "bf16"), "recompute": ("recompute", "fp32"),
         "int8": ("stored", "int8")}


def _has_int8() -> bool:
    from typing import get_args, get_type_hints

    from lmclean.config import RecordConfig

    return "int8" in get_args(get_type_hints(RecordConfig)["precision"])


def _bytes(store: Path, sub: str = "") -> int:
    from lmclean.store.writer import store_size_bytes

    return store_size_bytes(store, sub) if (store / sub).exists() else 0


def _unlearn_times(stores: dict[str, Path], rounds: int, forget: int) -> dict[str, dict[str, list[float]]]:
    """Wall seconds of replay and lmcleaner ggn on each store, alternated; checks both give one delta."""
    import torch

    from lmclean.store.reader import TrajectoryStore
    from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay, rollback
    from lmclean.unlearn.service import open_trajectory

    methods = {"replay": lambda traj: replay(traj, ForgetSet(sample_ids={forget})),
               "rollback": lambda traj: rollback(traj, ForgetSet(sample_ids={forget})),
               "lmcleaner ggn": lambda traj: propagate(traj, ForgetSet(sample_ids={forget}),
                                                       PropagationSettings(operator=OperatorSettings(hvp="ggn"),
                                                                           divergence_factor=1e12))}
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in stores} for m in methods}
    for r in range(rounds):
        for method, run in methods.items():
            deltas = {}
            for name in (list(stores) if r % 2 == 0 else list(stores)[::-1]):
                traj = open_trajectory(TrajectoryStore(stores[name]))
                t0 = time.perf_counter()
                deltas[name] = run(traj).delta
                times[method][name].append(time.perf_counter() - t0)
                print(f"unlearn round {r + 1}/{rounds} {method:14s} {name:10s} {times[method][name][-1]:6.2f} s",
                      file=sys.stderr)
            a, b = deltas.values()
            if not torch.equal(a, b):
                print(f"note: {method} deltas differ between the stores: max |Δ| {float((a - b).abs().max()):.3g}",
                      file=sys.stderr)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's whole run)")
    ap.add_argument("--rounds", type=int, default=5, help="recording rounds of every mode, rotating order; medians")
    ap.add_argument("--unlearn-rounds", type=int, default=2, help="alternated unlearning runs per method and store")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before training")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = ap.parse_args(argv)

    import torch

    from lmclean import config as config_mod
    from lmclean.store.reader import TrajectoryStore
    from lmclean.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"data.path={ROOT / 'examples' / 'data' / 'authors.jsonl'}"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = config_mod.load(args.config, overrides)
    modes = ("none", "fp32", "bf16", "recompute", *(["int8"] if _has_int8() else []))
    ms: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # process CPU ms per step: steadier than wall time under load
    sizes: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="lmclean-modes-") as tmp:
        train(cfg, None, save_final=False)  # warm-up: imports, allocator, caches
        last: dict[str, Path] = {}
        for r in range(args.rounds):
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                cpu0 = time.process_time()
                if mode == "none":
                    res = train(cfg, None, save_final=False)
                else:
                    cfg.record.gradients, cfg.record.precision = MODES[mode]
                    store = last[mode] = Path(tmp) / f"{mode}-{r}.zarr"
                    res = train(cfg, store, save_final=False)
                    sizes[mode] = (_bytes(store, "steps/grad") + _bytes(store, "steps/grad_scale"),
                                   _bytes(store, "steps") + _bytes(store, "checkpoints"))
                ms[mode].append(1e3 * res.seconds / res.steps)
                cpu[mode].append(1e3 * (time.process_time() - cpu0) / res.steps)
                print(f"round {r + 1}/{args.rounds} {mode:10s} {ms[mode][-1]:7.2f} ms/step", file=sys.stderr)
        steps, params = res.steps, res.run.manifest.size
        forget = int(TrajectoryStore(last["fp32"]).step(0).sample_ids[0])
        times = _unlearn_times({"stored": last["fp32"], "recompute": last["recompute"]}, args.unlearn_rounds, forget)
    train_ms = statistics.median(ms["none"])
    report: dict = {"config": str(args.config), "params": params, "steps": steps, "rounds": args.rounds,
                    "torch_threads": torch.get_num_threads(), "train_ms_per_step": round(train_ms, 3), "modes": {},
                    "unlearn": {"forget_id": forget, "rounds": args.unlearn_rounds}}
    for mode in modes[1:]:
        ratios = [a / b - 1 for a, b in zip(ms[mode], ms["none"])]
        cpu_ratios = [a / b - 1 for a, b in zip(cpu[mode], cpu["none"])]
        report["modes"][mode] = {
            "ms_per_step": round(statistics.median(ms[mode]), 3), "overhead_pct": round(100 * statistics.median(ratios), 1),
            "cpu_ms_per_step": round(statistics.median(cpu[mode]), 3),
            "cpu_overhead_pct": round(100 * statistics.median(cpu_ratios), 1),
            "grad_bytes_per_param_step": round(sizes[mode][0] / (steps * params), 4),
            "store_bytes_per_param_step": round(sizes[mode][1] / (steps * params), 4)}
    for method, per_store in times.items():
        s, c = statistics.median(per_store["stored"]), statistics.median(per_store["recompute"])
        report["unlearn"][method] = {
            "stored_s": round(s, 2), "recompute_s": round(c, 2), "ratio": round(c / s, 2),
            "stored_training_steps": round(1e3 * s / train_ms, 1), "recompute_training_steps": round(1e3 * c / train_ms, 1),
            "extra_training_steps_per_step": round(1e3 * (c - s) / train_ms / steps, 2)}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.config.name}: {params:,} parameters, {steps} steps x {args.rounds} rounds, torch threads "
          f"{report['torch_threads']}; unrecorded step {train_ms:.2f} ms")
    print(f"{'mode':10s} {'ms/step':>8s} {'overhead':>9s} {'CPU ms/step':>12s} {'CPU overhead':>13s} "
          f"{'grad B/param/step':>18s} {'store B/param/step':>19s}")
    for mode, m in report["modes"].items():
        print(f"{mode:10s} {m['ms_per_step']:8.2f} {m['overhead_pct']:8.1f}% {m['cpu_ms_per_step']:12.2f} "
              f"{m['cpu_overhead_pct']:12.1f}% {m['grad_bytes_per_param_step']:18.3f} {m['store_bytes_per_param_step']:19.3f}")
    print(f"unlearning sample {forget} (in step 0's batch: every step swept), medians of {args.unlearn_rounds}:")
    print(f"{'method':14s} {'stored s':>9s} {'recompute s':>12s} {'ratio':>6s} {'stored steps':>13s} "
          f"{'recompute steps':>16s} {'extra/step':>11s}")
    for method, u in report["unlearn"].items():
        if isinstance(u, dict):
            print(f"{method:14s} {u['stored_s']:9.2f} {u['recompute_s']:12.2f} {u['ratio']:6.2f} "
                  f"{u['stored_training_steps']:13.1f} {u['recompute_training_steps']:16.1f} "
                  f"{u['extra_training_steps_per_step']:11.2f}")
    print("overhead = median over rounds of (recorded / unrecorded step time of the round) - 1 (CPU: the process's "
          "CPU time, training and writer threads); store = steps/ + "
          "checkpoints/ on disk; steps = wall time / unrecorded step time; extra/step = (recompute - stored) / steps swept")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
