"""How exactly do sequential requests compose? Two requests F1 then F2, against one request F1 ∪ F2.

For lmcleaner the second request adds v(F2) to the first output. Whether that equals the joint
v(F1 ∪ F2) depends on the curvature each product sees:
  full + data kept      every product uses the recorded batch: exactly linear (superposition)
  full + F1 scrubbed    F1's tokens are gone, so request 2's products miss F1's terms
  retained              request 2's products exclude F2 but include F1 (kept) or not (scrubbed),
                        the joint ones exclude both: a second-order difference
A curvature whose basis is built from the propagated vector (krylov) is not linear in the forget set
even with `full`: its rows measure by how much.
Printed per case, side by side in this one process: ‖seq − joint‖ / ‖joint − θ‖ and the residual
ratio of each against exact retraining without F1 ∪ F2 (`record --exclude`).

  python benchmarks/compose.py [--epochs 3] [--f1 3,4] [--f2 10,11] [--hvp ggn,krylov]
  python benchmarks/compose.py --stores runs/tofu/original.zarr runs/tofu/retrained.zarr \
      --f1 3960-3979 --f2 3980-3999 --hvp krylov      # TOFU forget01's two authors, one after the other
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from lmclean import config as config_mod
from lmclean.store import TrajectoryStore
from lmclean.train.data import parse_id_spec
from lmclean.train.model import model_from_config_dict
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, rollback
from lmclean.unlearn.trajectory import StoreTrajectory

ROOT = Path(__file__).resolve().parent.parent


def trajectory(store: TrajectoryStore, tombstoned: set[int]) -> StoreTrajectory:
    model = model_from_config_dict(store.meta["model_config"])
    model.eval()
    return StoreTrajectory(store, model, tombstoned)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--f1", default="3,4")
    ap.add_argument("--f2", default="10,11")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-compose")
    ap.add_argument("--stores", type=Path, nargs=2, metavar=("FULL", "RETRAINED"),
                    help="existing stores instead of recording tiny.yaml: the full run and its record --exclude F1 ∪ F2")
    ap.add_argument("--hvp", default="ggn", help="comma-separated curvatures for the lmcleaner rows (ggn, krylov, ...)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    f1, f2 = set(parse_id_spec(args.f1)), set(parse_id_spec(args.f2))
    if args.stores:
        full, ref = args.stores
        label = f"{full}"
    else:
        cfg_path = ROOT / "examples" / "tiny.yaml"
        cfg = config_mod.load(cfg_path, [f"train.epochs={args.epochs}"])
        full, ref = args.workdir / "full.zarr", args.workdir / "retrain.zarr"
        if not (full / "COMMIT.json").exists():
            train(cfg, full, overwrite=True, base=cfg_path.parent)
        if not (ref / "COMMIT.json").exists():
            train(cfg, ref, exclude=sorted(f1 | f2), overwrite=True, base=cfg_path.parent)
        label = f"tiny.yaml, {args.epochs} epochs"
    store, reference = TrajectoryStore(full), TrajectoryStore(ref)
    theta = store.checkpoint(store.committed_steps)[0].double()
    retrained = reference.checkpoint(reference.committed_steps)[0].double()
    base = float(torch.linalg.vector_norm(theta - retrained))
    print(f"{label} ({store.committed_steps} steps), F1 = {args.f1}, F2 = {args.f2}; ‖θ − θ_retrain‖ = {base:.4g}")
    print(f"{'case':38s} {'‖seq−joint‖/‖joint−θ‖':>22s} {'residual seq':>13s} {'residual joint':>15s}", flush=True)
    for hvp in args.hvp.split(","):
        for batch in ("full", "retained"):
            settings = dataclasses.replace(PropagationSettings(curvature_batch=batch, operator=OperatorSettings(hvp=hvp)),
                                           K=store.committed_steps)
            joint = propagate(trajectory(store, set()), ForgetSet(sample_ids=f1 | f2), settings).delta.double()
            first = propagate(trajectory(store, set()), ForgetSet(sample_ids=f1), settings).delta.double()
            for kept in (True, False):
                second = propagate(trajectory(store, set() if kept else f1), ForgetSet(sample_ids=f2), settings).delta.double()
                seq = first + second
                rel = float(torch.linalg.vector_norm(seq - joint) / torch.linalg.vector_norm(joint))
                res_seq = float(torch.linalg.vector_norm(theta + seq - retrained)) / base
                res_joint = float(torch.linalg.vector_norm(theta + joint - retrained)) / base
                name = f"lmcleaner {hvp} {batch}, F1 {'kept' if kept else 'scrubbed'}"
                print(f"{name:38s} {rel:22.3e} {res_seq:13.4f} {res_joint:15.4f}", flush=True)
    joint = rollback(trajectory(store, set()), ForgetSet(sample_ids=f1 | f2)).delta.double()
    seq = (rollback(trajectory(store, set()), ForgetSet(sample_ids=f1)).delta
           + rollback(trajectory(store, f1), ForgetSet(sample_ids=f2)).delta).double()
    rel = float(torch.linalg.vector_norm(seq - joint) / torch.linalg.vector_norm(joint))
    print(f"{'rollback, F1 scrubbed':38s} {rel:22.3e} "
          f"{float(torch.linalg.vector_norm(theta + seq - retrained)) / base:13.4f} "
          f"{float(torch.linalg.vector_norm(theta + joint - retrained)) / base:15.4f}")


if __name__ == "__main__":
    main()
