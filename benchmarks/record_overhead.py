"""Recording overhead of `lmclean record` on the bundled example model, measured side by side.

For N training steps of the examples/tiny.yaml run (model and data set) it times the same training
loop in one process: without recording (`train(cfg, None)`), recording fp32 gradients and
recording bf16 gradients with the default codec (`record.codec: auto`), and, with `--blosc`,
fp32 with bit-shuffled blosc (`record.codec: blosc`, smaller and more writer CPU). The modes run
in rounds, in a rotating order, each recording into a fresh store; the overhead of a round is its
recorded step time over its unrecorded step time, and the median over rounds is reported, so load
that drifts during the run (the machine is shared) hits both sides of each ratio alike. The recorded time includes flushing the writer queue at the
end (`Recorder.close`): queued work is not hidden.

Bytes per parameter per step = bytes on disk under STORE/steps/grad / (steps x parameters).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/record_overhead.py [--steps N] [--rounds 9] [--blosc] [--json]

`--config examples/small.yaml --steps 300` measures the 427k-parameter model of the issue's example config.

`--before` adds the store as it was before format version 2, in the same rounds: `fp32-v1`
records with no chunk checksums and no fsync (the version-1 pipeline, produced by patching the
codec lists and fsync for that mode's runs), `fp32-nosync` with checksums but no fsync, so the
cost of each is a ratio measured side by side. (The shard index keeps its checksum in both: it is
one 4 KB write per batch of rows, and a version-1 index cannot be written by this code.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
# mode -> (record.precision, record.codec); "none" trains without recording
RECORDED = {"fp32": ("fp32", "auto"), "bf16": ("bf16", "auto"), "fp32-blosc": ("fp32", "blosc"),
            "fp32-v1": ("fp32", "auto"), "fp32-nosync": ("fp32", "auto")}


@contextlib.contextmanager
def _pipeline(mode: str) -> Iterator[None]:
    """The store pipeline of a mode: today's, or (--before) without checksums and/or fsync."""
    from lmclean.store import format as fmt

    with contextlib.ExitStack() as stack:
        if mode in ("fp32-v1", "fp32-nosync"):
            stack.enter_context(mock.patch.object(os, "fsync", lambda fd: None))
            stack.enter_context(mock.patch.object(os, "fdatasync", lambda fd: None))
        if mode == "fp32-v1":
            stack.enter_context(mock.patch.object(fmt, "checked", lambda compressors: list(compressors)))
            stack.enter_context(mock.patch.object(fmt, "INT_CODEC", fmt.INT_CODEC[:-1]))
            stack.enter_context(mock.patch.object(fmt, "RAW_CODEC", []))
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per measured run (default: the whole example run, 8 epochs = 304 steps)")
    ap.add_argument("--rounds", type=int, default=9, help="rounds of all modes (none, fp32, bf16[, fp32-blosc]), rotating order; medians reported")
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--blosc", action="store_true", help="also time fp32 with record.codec=blosc (bit-shuffle)")
    ap.add_argument("--before", action="store_true",
                    help="also time fp32 without chunk checksums and fsync (format 1) and without fsync only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before training (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    args = ap.parse_args(argv)

    import torch

    from lmclean import config as config_mod
    from lmclean.store.writer import store_size_bytes
    from lmclean.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [f"data.path={ROOT / 'examples' / 'data' / 'authors.jsonl'}"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    cfg = config_mod.load(args.config, overrides)
    modes = ("none", "fp32", "bf16", *(["fp32-blosc"] if args.blosc else []),
             *(["fp32-v1", "fp32-nosync"] if args.before else []))
    n = len(modes)
    ms: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}  # process CPU ms per step: steadier than wall time under load
    stats: dict[str, list] = {m: [] for m in modes[1:]}
    params = 0
    with tempfile.TemporaryDirectory(prefix="lmclean-bench-") as tmp:
        train(cfg, None, save_final=False)  # warm-up: imports, allocator, caches
        for r in range(args.rounds):
            for mode in modes[r % n:] + modes[: r % n]:
                cpu0 = time.process_time()
                if mode == "none":
                    res = train(cfg, None, save_final=False)
                else:
                    cfg.record.precision, cfg.record.codec = RECORDED[mode]
                    store = Path(tmp) / f"{mode}-{r}.zarr"  # fresh: deleting a store is no part of recording
                    with _pipeline(mode):
                        res = train(cfg, store, save_final=False)
                    params = res.run.manifest.size
                    stats[mode].append((res.stats, store_size_bytes(store, "steps/grad")))
                ms[mode].append(1e3 * res.seconds / res.steps)
                cpu[mode].append(1e3 * (time.process_time() - cpu0) / res.steps)
                print(f"round {r + 1}/{args.rounds} {mode:10s} {ms[mode][-1]:7.2f} ms/step", file=sys.stderr)
    steps = res.steps
    raw = steps * params * 4
    report: dict = {"model": str(args.config), "params": params, "steps": steps, "rounds": args.rounds,
                    "torch_threads": torch.get_num_threads(), "ms_per_step": {}, "overhead_pct": {},
                    "bytes_per_param_per_step": {}, "compression_vs_raw_fp32": {}, "writer_cpu_ms_per_step": {},
                    "overhead_pct_quartiles": {}, "cpu_ms_per_step": {}, "cpu_overhead_pct": {}}
    for mode in modes:
        report["ms_per_step"][mode] = round(statistics.median(ms[mode]), 3)
        report["cpu_ms_per_step"][mode] = round(statistics.median(cpu[mode]), 3)
    for mode in modes[1:]:
        ratios = [a / b - 1 for a, b in zip(ms[mode], ms["none"])]
        grad_bytes = stats[mode][-1][1]
        report["overhead_pct"][mode] = round(100 * statistics.median(ratios), 1)
        report["cpu_overhead_pct"][mode] = round(100 * statistics.median(
            [a / b - 1 for a, b in zip(cpu[mode], cpu["none"])]), 1)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        report["overhead_pct_quartiles"][mode] = [round(100 * q1, 1), round(100 * q3, 1)]
        report["bytes_per_param_per_step"][mode] = round(grad_bytes / (steps * params), 4)
        report["compression_vs_raw_fp32"][mode] = round(raw / grad_bytes, 3)
        report["writer_cpu_ms_per_step"][mode] = round(
            1e3 * statistics.median(s.writer_cpu_seconds for s, _ in stats[mode]) / steps, 3)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.config.name}: {params:,} parameters, {steps} steps x {args.rounds} rounds, "
          f"torch threads {report['torch_threads']}")
    print(f"{'mode':11s} {'ms/step':>8s} {'overhead':>9s} {'quartiles':>14s} {'CPU ms/step':>12s} {'CPU overhead':>13s} "
          f"{'B/param/step':>13s} {'vs raw fp32':>12s} {'writer CPU ms/step':>19s}")
    for mode in modes:
        if mode == "none":
            print(f"{mode:11s} {report['ms_per_step'][mode]:8.2f} {'-':>9s} {'-':>14s} {report['cpu_ms_per_step'][mode]:12.2f} "
                  f"{'-':>13s} {'-':>13s} {'-':>12s} {'-':>19s}")
            continue
        q1, q3 = report["overhead_pct_quartiles"][mode]
        print(f"{mode:11s} {report['ms_per_step'][mode]:8.2f} {report['overhead_pct'][mode]:8.1f}% {f'{q1:.1f}..{q3:.1f}%':>14s} "
              f"{report['cpu_ms_per_step'][mode]:12.2f} {report['cpu_overhead_pct'][mode]:12.1f}% "
              f"{report['bytes_per_param_per_step'][mode]:13.3f} {report['compression_vs_raw_fp32'][mode]:11.2f}x "
              f"{report['writer_cpu_ms_per_step'][mode]:19.2f}")
    print("overhead = median over rounds of (recorded / unrecorded step time of the round) - 1; "
          "quartiles over rounds; CPU = the process's CPU time per step (training and writer threads), same medians")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
