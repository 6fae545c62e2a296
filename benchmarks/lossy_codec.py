"""Lossy gradient storage, measured: bytes per parameter per step against unlearning fidelity.

Records the fine-tune of benchmarks/fidelity.py (examples/finetune.yaml on the model examples/tiny.yaml
trained without the forget samples) three times, with `record.precision` fp32, bf16 and int8 (the
training is the same: only what is stored differs), and once more without the forget samples, in
fp32 (`record --exclude`: the exact-retraining reference). Then per precision:
  bytes     steps/grad (+ steps/grad_scale for int8) on disk / (steps × parameters): codec, shard index
            and row padding included
  rebuild   ‖θ̃[τ] − θ[τ]‖ / ‖θ[τ] − θ[0]‖ for θ̃[τ] replayed from step 0 on the stored rows alone
  residual  ‖θ̂ − θ_retrain‖ / ‖θ − θ_retrain‖ of `unlearn --hvp ggn` (lmcleaner, K=800) and of
            `--method replay` (0 = exact, 1 = did nothing), and both again with --exact-states
            (θ[t] rebuilt by recomputing each step's gradient, the stored rows not read)
and the seconds of each sweep. Everything runs in this process with --threads torch threads.

  python benchmarks/lossy_codec.py --threads 1                 # records into runs/lossy on first use
  python benchmarks/lossy_codec.py --threads 1 --json runs/lossy.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lmclean import config as config_mod
from lmclean.store import TrajectoryStore
from lmclean.store.writer import store_size_bytes
from lmclean.train.data import parse_id_spec
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay
from lmclean.unlearn.service import open_trajectory
from lmclean.unlearn.storage import exact_states

PRECISIONS = ("fp32", "bf16", "int8")


def record(cfg_path: Path, overrides: list[str], workdir: Path, name: str, exclude: list[int] | None = None) -> tuple[Path, float]:
    """Record (or reuse) one store; returns it and the recording's wall seconds (0 when reused)."""
    cfg = config_mod.load(cfg_path, overrides)
    path, stamp = workdir / f"{name}.zarr", workdir / f"{name}.key.json"
    key = json.dumps([config_mod.to_dict(cfg), exclude or []], sort_keys=True)
    if stamp.exists() and stamp.read_text() == key and (path / "COMMIT.json").exists() and TrajectoryStore(path).closed:
        return path, 0.0
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    train(cfg, path, exclude=exclude, overwrite=True, base=cfg_path.parent)
    stamp.write_text(key)
    return path, time.perf_counter() - began


def rebuild_error(store: TrajectoryStore) -> float:
    tau = store.committed_steps
    for _, theta, _ in store.iter_states(0, tau):
        pass
    final, start = store.checkpoint(tau)[0], store.checkpoint(0)[0]
    return float((theta - final).norm() / (final - start).norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path("examples/finetune.yaml"))
    ap.add_argument("--pretrain", type=Path, default=Path("examples/tiny.yaml"))
    ap.add_argument("--forget", default="3,4,10-17", help="sample ids to forget (held out of the pre-training)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/lossy"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-exact-states", action="store_true", help="omit the --exact-states rows")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    forget_ids = sorted(parse_id_spec(args.forget))
    pre = args.workdir / "pretrain-heldout.zarr"
    if not (pre / "model" / "config.json").exists():
        train(config_mod.load(args.pretrain, []), pre, exclude=forget_ids, overwrite=True, base=args.pretrain.parent)
    base = [f"model.path={pre / 'model'}", *args.overrides]
    stores, record_s = {}, {}
    for p in PRECISIONS:
        stores[p], record_s[p] = record(args.config, [*base, f"record.precision={p}"], args.workdir, p)
    ref_path, _ = record(args.config, [*base, "record.precision=fp32"], args.workdir, "retrain", exclude=forget_ids)
    ref = TrajectoryStore(ref_path)
    theta_ref = ref.checkpoint(ref.committed_steps)[0]
    forget = ForgetSet(sample_ids=set(forget_ids))
    rows = []
    theta0 = None
    for p in PRECISIONS:
        store = TrajectoryStore(stores[p])
        tau, P = store.committed_steps, store.manifest.size
        theta = store.checkpoint(tau)[0]
        if theta0 is None:
            theta0 = theta
        assert torch.equal(theta, theta0), "the three recordings must be the same training run"
        base_res = float((theta - theta_ref).norm())
        grad_bytes = store_size_bytes(store.path, "steps/grad") + store_size_bytes(store.path, "steps/grad_scale")
        row = {"precision": p, "steps": tau, "params": P, "bytes_per_param_step": grad_bytes / (tau * P),
               "store_bytes": store_size_bytes(store.path), "record_seconds": round(record_s[p], 1),
               "rebuild_error": rebuild_error(store)}
        for exact in ((False, True) if p != "fp32" and not args.skip_exact_states else (False,)):
            traj = open_trajectory(store, "cpu")
            if exact:
                exact_states(traj)
            suffix = " exact-states" if exact else ""
            for method, run in (("ggn", lambda: propagate(traj, forget, PropagationSettings(
                    K=800, operator=OperatorSettings(hvp="ggn")))), ("replay", lambda: replay(traj, forget))):
                began = time.perf_counter()
                result = run()
                row[f"{method}{suffix}"] = float((theta + result.delta - theta_ref).norm()) / base_res
                row[f"{method}{suffix} seconds"] = round(time.perf_counter() - began, 1)
                print(f"  {p:5s} {method}{suffix}: residual {row[f'{method}{suffix}']:.4g} in "
                      f"{row[f'{method}{suffix} seconds']} s", flush=True)
        rows.append(row)
    print(f"\n{rows[0]['steps']} steps, {rows[0]['params']:,} parameters, forget {len(forget_ids)} samples; "
          f"torch threads {args.threads}")
    head = f"{'precision':9s} {'B/param/step':>12s} {'rebuild':>9s} {'ggn':>7s} {'replay':>8s} {'ggn exact-st':>12s} {'replay exact-st':>15s}"
    print(head)
    for r in rows:
        def f(key: str, fmt: str = ".4f") -> str:
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['precision']:9s} {r['bytes_per_param_step']:12.3f} {r['rebuild_error']:9.2e} {f('ggn'):>7s} "
              f"{f('replay', '.2e'):>8s} {f('ggn exact-states'):>12s} {f('replay exact-states', '.2e'):>15s}")
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/lossy_codec.py " + " ".join(
            f"--threads {args.threads}".split()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
