"""Online deletion requests on TOFU, and exact reconciliation (issue 13), measured in one process.

Scenario: the TOFU example's two stages (examples/tofu/): a base model learns TOFU authors 0-19
(tofu_pretrain.yaml), then a recorded fine-tune (tofu_tiny.yaml: plain SGD, constant lr) on 6
authors: 0-3 (known to the base) and the two forget01 authors (3960-3999, new to it). The author
to forget is the last one (ids 3980-3999). Its 20 samples are split in three groups by id
(7 / 7 / 6), one deletion request per group, queued with `lmclean.requests.enqueue` from the step
callback so that the run applies them at the boundaries of 25%, 50% and 75% of training; training
goes on to the end. Each method is one run with `record.unlearn.method` set:
  lmcleaner ggn K=20/100/800, replay (exact), none ("exclude from later batches only": the
  do-nothing baseline of an online system), plus "never forget" (no requests, for scale).
Reference: exact retraining that never saw the author (`train(cfg, store, exclude=author)`).
  residual  ‖θ̂ − θ_retrain‖ / ‖θ_none − θ_retrain‖  (θ_none, the final model of method none, is what
            an online system holds without unlearning: the samples are already dropped from every
            later batch; 0 = exact, 1 = no better than dropping them)
  gap       (L_F(θ̂) − L_F(θ_none)) / (L_F(θ_retrain) − L_F(θ_none))   (1 = like retraining)
            L_F: mean per-sample answer+question loss of the author's 20 samples
  requests  per request, the audit's wall time of applying it (claim, engine, correction) and the
            request file's wait (queued -> applied, scrub included), in mean training steps of the
            same run (step intervals without a request)
Then `reconcile` on the lmcleaner K=100 store: its cost in training steps, and whether its arrays,
checkpoints and model equal the exclude run's bitwise (torch.equal), with the max abs difference.

  python benchmarks/online.py [--workdir runs/bench-online] [--tofu ../shared/data/tofu] [--json OUT]
  python benchmarks/online.py --quick     # < 60 s smoke run (tests/test_online_bench.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
AUTHOR = list(range(3980, 4000))  # the last TOFU author (forget01's second)
ARRAYS = ("grad", "sample_ids", "weights", "tokens", "lengths", "loss", "lr", "grad_norm", "clip")


def _make_subset(full: Path, out: Path, n_authors: int, retain_only: bool) -> None:
    """examples/tofu/make_subset.py, imported by path (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("make_subset", ROOT / "examples" / "tofu" / "make_subset.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    mod.main(full, out, n_authors, retain_only)


def _final(store: Path) -> torch.Tensor:
    from lmclean.store.reader import TrajectoryStore

    s = TrajectoryStore(store)
    return s.checkpoint(s.committed_steps)[0]


class ForgetLoss:
    """Mean per-sample loss of the author's samples at θ, from the data set (the stores' tokens are scrubbed)."""

    def __init__(self, cfg: Any, ids: list[int]) -> None:
        from lmclean.objective import CausalLMObjective
        from lmclean.train.trainer import batch_tensors, prepare

        self.run = prepare(cfg)
        self.run.model.eval()
        input_ids, lengths, weights = batch_tensors(self.run, ids, 1.0 / len(ids))
        self.obj = CausalLMObjective(self.run.model, input_ids, lengths, weights)

    def __call__(self, theta: torch.Tensor) -> float:
        from lmclean.train.model import load_flat_into

        load_flat_into(self.run.model, self.run.manifest, theta)
        with torch.no_grad():
            return float(self.obj.loss_from_outputs(self.obj.outputs(dict(self.run.model.named_parameters()))))


def online_run(cfg: Any, store: Path, at: list[int], groups: list[list[int]]) -> dict[str, Any]:
    """Train with request k queued after step at[k] - 1 (applied at the boundary of step at[k])."""
    from lmclean.audit.log import AuditLog
    from lmclean.requests import enqueue, list_requests
    from lmclean.train.trainer import train

    stamps: dict[int, float] = {}

    def on_step(t: int, total: int, loss: float, lr: float) -> None:
        stamps[t] = time.perf_counter()
        for s, g in zip(at, groups):
            if t == s - 1:
                enqueue(store, ids=",".join(map(str, g)), reason="benchmarks/online.py")

    began = time.perf_counter()
    train(cfg, store, overwrite=True, on_step=on_step)
    seconds = time.perf_counter() - began
    request_steps = set(at)
    gaps = [stamps[t] - stamps[t - 1] for t in sorted(stamps) if t > 0 and t not in request_steps]
    step_s = float(np.mean(gaps))
    reqs = list_requests(store) if groups else []
    audits = {r["request_id"]: r for r in AuditLog(store).records() if r.get("kind") == "online-unlearn"} if groups else {}
    out = []
    for r in reqs:
        rec = audits.get(r.audit_request_id or "", {})
        wall = float(rec.get("wall_time_s", float("nan")))
        out.append({"step": r.step, "status": r.status, "ids": len(r.ids), "apply_s": wall, "wait_s": r.wait_seconds,
                    "apply_steps": wall / step_s, "wait_steps": float(r.wait_seconds or float("nan")) / step_s})
    return {"theta": _final(store), "step_s": step_s, "seconds": seconds, "requests": out}


def compare_stores(got: Path, want: Path) -> dict[str, Any]:
    """Every step array, checkpoint (θ and state) and model tensor: bitwise equal? max abs difference."""
    from safetensors.torch import load_file

    from lmclean.store.reader import TrajectoryStore

    a, b = TrajectoryStore(got), TrajectoryStore(want)
    T = b.committed_steps
    same = a.committed_steps == T and a.checkpoint_steps == b.checkpoint_steps
    diffs: dict[str, float] = {}
    for name in ARRAYS:
        x, y = a.rows(f"steps/{name}", T), b.rows(f"steps/{name}", T)
        ok = x.shape == y.shape and x.tobytes() == y.tobytes()
        same &= ok
        if name == "grad":
            diffs["grad"] = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.shape == y.shape else math.inf
    ck = 0.0
    for c in b.checkpoint_steps:
        (ta, sa), (tb, sb) = a.checkpoint(c), b.checkpoint(c)
        same &= torch.equal(ta, tb) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb)
        ck = max([ck, float((ta - tb).abs().max()), *(float((sa[k] - sb[k]).abs().max()) for k in sb if k in sa)])
    diffs["checkpoints"] = ck
    ma, mb = load_file(got / "model" / "model.safetensors"), load_file(want / "model" / "model.safetensors")
    same &= ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in mb)
    diffs["model"] = max(float((ma[k] - mb[k]).abs().max()) for k in mb if k in ma)
    return {"bitwise_equal": bool(same), "max_abs_diff": diffs, "steps": T}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-online")
    ap.add_argument("--tofu", type=Path, default=ROOT.parent / "shared" / "data" / "tofu", help="TOFU folder (full.jsonl)")
    ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs (15 steps each)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, K=20 only (< 60 s)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from lmclean import config as config_mod
    from lmclean.train.trainer import train
    from lmclean.unlearn.reconcile import reconcile

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    full = args.tofu / "full.jsonl"
    n_pre, n_fine = (1, 0) if args.quick else (20, 4)
    _make_subset(full, wd / "retain.jsonl", n_pre, True)
    _make_subset(full, wd / "subset.jsonl", n_fine, False)
    short = ["data.max_length=96"] if args.quick else []
    pre_cfg = config_mod.load(ROOT / "examples" / "tofu" / "tofu_pretrain.yaml",
                              [f"data.path={wd / 'retain.jsonl'}", *short, *(["train.epochs=1"] if args.quick else [])])
    pre = wd / "pretrain.zarr"
    key = json.dumps(config_mod.to_dict(pre_cfg), sort_keys=True)
    stamp = wd / "pretrain.key"
    if not (pre / "model" / "config.json").exists() or not stamp.exists() or stamp.read_text() != key:
        train(pre_cfg, pre, overwrite=True)
        stamp.write_text(key)
    epochs = 3 if args.quick else args.epochs
    base = [f"data.path={wd / 'subset.jsonl'}", f"model.path={pre / 'model'}", f"train.epochs={epochs}", *short]

    def cfg(method: str = "none", K: int | None = None) -> Any:
        extra = [f"record.unlearn.method={method}", "record.unlearn.hvp=ggn"]
        return config_mod.load(ROOT / "examples" / "tofu" / "tofu_tiny.yaml", [*base, *extra, *([f"record.unlearn.K={K}"] if K else [])])

    groups = [AUTHOR[0:7], AUTHOR[7:14], AUTHOR[14:20]]
    began = time.perf_counter()
    retrain = train(cfg(), wd / "retrain.zarr", exclude=AUTHOR, overwrite=True)
    T = retrain.steps
    at = [round(T * q) for q in (0.25, 0.5, 0.75)]
    theta_retrain = _final(wd / "retrain.zarr")
    loss = ForgetLoss(cfg(), AUTHOR)
    print(f"TOFU online: {T} steps ({epochs} epochs, {n_fine + 2} authors, batch 8), author {AUTHOR[0]}-{AUTHOR[-1]} forgotten in "
          f"3 requests ({', '.join(str(len(g)) for g in groups)} samples) applied at steps {at}", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    methods = [("none", "none", None), ("replay", "replay", None)]
    methods += [(f"lmcleaner ggn K={K}", "lmcleaner", K) for K in ([20] if args.quick else [20, 100, 800])]
    runs["never forget"] = online_run(cfg(), wd / "never.zarr", [], [])
    for name, method, K in methods:
        store = wd / f"{name.replace(' ', '_').replace('=', '')}.zarr"
        runs[name] = online_run(cfg(method, K), store, at, groups)
        runs[name]["store"] = store
        print(f"  {name}: {runs[name]['seconds']:.1f} s, {runs[name]['step_s'] * 1e3:.1f} ms/step", flush=True)

    ref = runs["none"]["theta"]
    base_norm = float(torch.linalg.vector_norm(ref - theta_retrain))
    lf_ref, lf_retrain = loss(ref), loss(theta_retrain)
    rows: list[dict[str, Any]] = []
    for name, r in runs.items():
        th = r["theta"]
        lf = loss(th)
        rows.append({"method": name, "residual": float(torch.linalg.vector_norm(th - theta_retrain)) / base_norm,
                     "gap": (lf - lf_ref) / (lf_retrain - lf_ref), "forget_loss": lf, "step_ms": r["step_s"] * 1e3,
                     "run_s": r["seconds"], "requests": r["requests"]})
    rows.append({"method": "retrain (exclude author)", "residual": 0.0, "gap": 1.0, "forget_loss": lf_retrain,
                 "step_ms": float("nan"), "run_s": retrain.seconds, "requests": []})

    print(f"\n‖θ_none − θ_retrain‖ = {base_norm:.4g}; forget loss: none {lf_ref:.4f}, retrain {lf_retrain:.4f}\n")
    print("| method | residual | gap closed | forget loss | ms/step | request @25% apply / wait (steps) "
          "| @50% | @75% |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{q['apply_steps']:.1f} / {q['wait_steps']:.1f}" for q in row["requests"]] or ["–"] * 3
        ms = f"{row['step_ms']:.1f}" if math.isfinite(row["step_ms"]) else "–"
        print(f"| {row['method']} | {row['residual']:.4f} | {row['gap']:.3f} | {row['forget_loss']:.4f} | {ms} | "
              + " | ".join(cells) + " |")

    # reconcile the lmcleaner K=100 store (K=20 in --quick): rewrite it to retraining without the author
    name = "lmcleaner ggn K=20" if args.quick else "lmcleaner ggn K=100"
    store = runs[name]["store"]
    t0 = time.perf_counter()
    rep = reconcile(store)
    rec_s = time.perf_counter() - t0
    cmp = compare_stores(store, wd / "retrain.zarr")
    recon = {"store": name, "seconds": rec_s, "steps_replayed": rep.get("steps_replayed"),
             "cost_training_steps": rec_s / runs[name]["step_s"], "residual_ratio_replaced": rep.get("residual_ratio"),
             **cmp}
    d = cmp["max_abs_diff"]
    print(f"\nreconcile after {name}: {rec_s:.1f} s = {recon['cost_training_steps']:.1f} training steps "
          f"({rep.get('steps_replayed')} steps replayed of {T}); residual ratio of the model it replaced "
          f"(its own reference) {rep.get('residual_ratio', float('nan')):.4f}")
    print(f"equals record --exclude {AUTHOR[0]}-{AUTHOR[-1]} bitwise (steps, checkpoints, model): "
          f"{'yes' if cmp['bitwise_equal'] else 'no'}; max abs difference grad {d['grad']:.3g}, "
          f"checkpoints {d['checkpoints']:.3g}, model {d['model']:.3g}")
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"steps": T, "request_steps": at, "author": [AUTHOR[0], AUTHOR[-1]],
                                         "reference": "none", "rows": rows, "reconcile": recon}, indent=1))


if __name__ == "__main__":
    main()
