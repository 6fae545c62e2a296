"""What treating a correction event as the identity costs (issue 13, docs/algorithm.md).

A later lmcleaner request for sample B, seen before the jump of an earlier request for A, propagates
through the jump with the identity. Compared on the tiny bundled setup (16 samples, SGD momentum
0.9, constant lr), against exact retraining without A and B for N + M epochs:
  (a) record N epochs, lmcleaner A, `record --continue` M epochs, lmcleaner B (through the jump);
  (b) record N + M epochs, one lmcleaner sweep for A ∪ B (no jump; the post-hoc method);
  (c) as (a) but replay for B (exact: jumps vanish from the counterfactual).
Usage: python benchmarks/jump_cost.py [--workdir runs/bench-jump]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_config, write_rows  # noqa: E402

from lmclean.train.continue_run import continue_training  # noqa: E402
from lmclean.train.model import load_model  # noqa: E402
from lmclean.train.trainer import train  # noqa: E402
from lmclean.store.reader import TrajectoryStore  # noqa: E402
from lmclean.unlearn.request import ForgetSpec  # noqa: E402
from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn  # noqa: E402
from lmclean.params import flat_params  # noqa: E402

N, M, A, B = 3, 2, "103", "105"


def cfg(data: Path, epochs: int):  # noqa: ANN201
    return tiny_config(data, **{"train.epochs": epochs, "train.schedule": "constant", "train.momentum": 0.9})


def theta(path: Path, manifest) -> torch.Tensor:  # noqa: ANN001
    return flat_params(load_model(path), manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-jump"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    data = write_rows(w / "data.jsonl", n=16)
    ref = train(cfg(data, N + M), w / "ref.zarr", exclude=[int(A), int(B)]).store
    manifest = TrajectoryStore(ref).manifest
    t_ref = theta(ref / "model", manifest)
    long = train(cfg(data, N + M), w / "long.zarr").store
    t_long = theta(long / "model", manifest)
    base = float((t_long - t_ref).norm())
    rows = []
    lm = UnlearnOptions(method="lmcleaner")  # --hvp ggn (the default), K 800
    unlearn(long, ForgetSpec(ids=f"{A},{B}"), lm, OutputSpec(out=w / "joint"))
    rows.append(("(b) N+M epochs, one lmcleaner sweep for A∪B (no jump)", theta(w / "joint", manifest)))
    for name, method in (("(a) lmcleaner A, continue, lmcleaner B (identity through the jump)", lm),
                         ("(c) lmcleaner A, continue, replay B (exact)", UnlearnOptions(method="replay"))):
        tag = "a" if method is lm else "c"
        store = train(cfg(data, N), w / f"{tag}.zarr").store
        unlearn(store, ForgetSpec(ids=A), lm, OutputSpec(out=w / f"{tag}-A"))
        continue_training(store, epochs=M)
        unlearn(store, ForgetSpec(ids=B), method, OutputSpec(out=w / f"{tag}-B"))
        rows.append((name, theta(w / f"{tag}-B", manifest)))
    print(f"‖θ(N+M epochs) − θ_retrain‖ = {base:.4g}  (A = {A}, B = {B}, N = {N}, M = {M} epochs)\n")
    print("| sequence | residual ratio vs retraining without A, B |")
    print("|---|---|")
    for name, t in rows:
        print(f"| {name} | {float((t - t_ref).norm()) / base:.4f} |")


if __name__ == "__main__":
    main()
