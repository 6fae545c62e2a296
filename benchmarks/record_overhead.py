"""Recording overhead of `lmclean record` on the bundled example model, measured side by side.

For N steps of the examples/tiny.yaml run it times the training loop three ways in one process:
without recording (`train(cfg, None)`), recording fp32 gradients, recording bf16 gradients. The three
are interleaved in rounds (rotating the order each round) and the median per-step time over rounds
is reported, so drifting machine load hits all three alike. The recorded time includes flushing the
writer queue at the end (`Recorder.close`), so queued work is not hidden.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/record_overhead.py [--steps 60] [--rounds 3] [--json]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per measured run (default 60)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (none, fp32, bf16); median reported")
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before training (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    import torch

    from lmclean import config as config_mod
    from lmclean.store.writer import store_size_bytes
    from lmclean.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_mod.load(args.config, [f"train.steps={args.steps}", f"data.path={ROOT / 'examples/data/authors.jsonl'}"])
    modes = ["none", "fp32", "bf16"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    sizes: dict[str, dict[str, int]] = {}
    params = 0
    with tempfile.TemporaryDirectory(prefix="lmclean-bench-") as tmp:
        # one untimed warm-up run so imports, allocator and caches do not land on the first mode
        train(cfg, None, save_final=False)
        for r in range(args.rounds):
            order = modes[r % 3:] + modes[: r % 3]
            for mode in order:
                if mode == "none":
                    res = train(cfg, None, save_final=False)
                else:
                    cfg.record.precision = mode
                    store = Path(tmp) / f"{mode}.zarr"
                    res = train(cfg, store, overwrite=True, save_final=False)
                    params = res.run.manifest.size
                    sizes[mode] = {"grad_bytes": store_size_bytes(store, "steps/grad"),
                                   "store_bytes": store_size_bytes(store),
                                   "writer_seconds": res.stats.writer_seconds if res.stats else 0.0,
                                   "writer_cpu_seconds": res.stats.writer_cpu_seconds if res.stats else 0.0}
                times[mode].append(res.seconds / res.steps)
                print(f"round {r + 1} {mode:4s}: {1e3 * times[mode][-1]:7.2f} ms/step", file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    raw = args.steps * params * 4
    report = {
        "steps": args.steps, "rounds": args.rounds, "params": params, "torch_threads": torch.get_num_threads(),
        "ms_per_step": {m: round(1e3 * v, 3) for m, v in med.items()},
        "overhead_pct": {m: round(100 * (med[m] / med["none"] - 1), 2) for m in ("fp32", "bf16")},
        "bytes_per_param_per_step": {m: round(sizes[m]["grad_bytes"] / (args.steps * params), 4) for m in ("fp32", "bf16")},
        "compression_vs_raw_fp32": {m: round(raw / sizes[m]["grad_bytes"], 3) for m in ("fp32", "bf16")},
        "writer_ms_per_step": {m: round(sizes[m]["writer_seconds"] / args.steps * 1e3, 3) for m in ("fp32", "bf16")},
        "writer_cpu_ms_per_step": {m: round(sizes[m]["writer_cpu_seconds"] / args.steps * 1e3, 3) for m in ("fp32", "bf16")},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"example model: {params:,} parameters, {args.steps} steps x {args.rounds} rounds, torch threads {report['torch_threads']}")
    print(f"{'mode':6s} {'ms/step':>9s} {'overhead':>9s} {'B/param/step':>13s} {'compression':>12s} "
          f"{'writer ms/step':>15s} {'writer CPU ms/step':>19s}")
    for m in modes:
        if m == "none":
            print(f"{m:6s} {report['ms_per_step'][m]:9.2f} {'-':>9s} {'-':>13s} {'-':>12s} {'-':>15s} {'-':>19s}")
        else:
            print(f"{m:6s} {report['ms_per_step'][m]:9.2f} {report['overhead_pct'][m]:8.1f}% "
                  f"{report['bytes_per_param_per_step'][m]:13.3f} {report['compression_vs_raw_fp32'][m]:11.2f}x "
                  f"{report['writer_ms_per_step'][m]:15.2f} {report['writer_cpu_ms_per_step'][m]:19.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
