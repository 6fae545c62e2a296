"""1 vs N processes (`torchrun`, gloo on CPU) for `record` and `unlearn`, side by side in one run.

For each round and each process count (in alternating order, so load that drifts on a shared
machine hits both sides), `torchrun --nproc-per-node N` runs this file's worker, which records the
config into a fresh store (each rank one torch thread) and unlearns --forget from it with each
--methods method. The worker reports, from rank 0: the training time of `record` (set-up and
imports excluded: TrainResult.seconds, recording and the final flush included) and each unlearn's
`wall_seconds` (the sweep, excluding the store checks before it). Medians over rounds are printed,
with the 1-process results checked against the N-process ones (max |Δθ| of the final and the
unlearned models: float32 rounding).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed.py [--procs 1 2] [--rounds 3]
        [--config examples/tiny.yaml] [--set train.epochs=2 ...] [--forget 3,17] [--methods replay lmcleaner] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from lmclean import config as config_mod
    from lmclean.dist import init_from_env
    from lmclean.train.trainer import train
    from lmclean.unlearn.request import ForgetSpec, Requester
    from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

    d = init_from_env()
    work = Path(args.work)
    cfg = config_mod.load(Path(args.config), args.set or [])
    result = train(cfg, work / "run.zarr", base=Path(args.config).parent)
    out: dict[str, object] = {"record_seconds": result.seconds, "steps": result.steps}
    for method in args.methods:
        copy = work / f"run-{method}.zarr"
        if d.main:
            shutil.copytree(work / "run.zarr", copy)
        d.barrier()
        report = unlearn(copy, ForgetSpec(ids=args.forget), UnlearnOptions(method=method, check_steps=0),
                         OutputSpec(out=work / f"out-{method}"), Requester())
        out[f"{method}_seconds"] = report["wall_seconds"]
    if d.main:
        (work / "result.json").write_text(json.dumps(out))


def _launch(n: int, work: Path, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--worker", "--work", str(work), "--config", args.config,
           "--forget", args.forget, "--methods", *args.methods, *sum((["--set", s] for s in args.set or []), [])]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{n} processes failed:\n{done.stderr[-3000:]}")
    return json.loads((work / "result.json").read_text())


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default="examples/tiny.yaml")
    p.add_argument("--set", action="append")
    p.add_argument("--forget", default="3,17")
    p.add_argument("--methods", nargs="+", default=["replay", "lmcleaner"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    results: dict[int, list[dict]] = {n: [] for n in args.procs}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lmclean-dist-") as tmp:
        for r in range(args.rounds):
            order = args.procs if r % 2 == 0 else list(reversed(args.procs))
            for n in order:
                work = Path(tmp) / f"r{r}-n{n}"
                work.mkdir()
                results[n].append(_launch(n, work, args))
                print(f"round {r} procs {n}: {results[n][-1]}", file=sys.stderr)
            ref, other = Path(tmp) / f"r{r}-n{args.procs[0]}", Path(tmp) / f"r{r}-n{args.procs[-1]}"
            for what in ["run.zarr/model", *(f"out-{m}" for m in args.methods)]:
                diffs[what] = max(diffs.get(what, 0.0), _max_diff(ref / what, other / what))
    keys = ["record_seconds", *(f"{m}_seconds" for m in args.methods)]
    table = {n: {k: statistics.median(x[k] for x in results[n]) for k in keys} for n in args.procs}
    if args.json:
        print(json.dumps({"median": table, "max_abs_diff": diffs, "rounds": results}, indent=1))
        return
    print(f"| processes | {' | '.join(k.replace('_seconds', ' (s)') for k in keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    for n in args.procs:
        print(f"| {n} | {' | '.join(f'{table[n][k]:.2f}' for k in keys)} |")
    print(f"max |Δθ| {args.procs[0]} vs {args.procs[-1]} processes: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
