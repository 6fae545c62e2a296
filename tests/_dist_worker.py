"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2`: record a store with 2 ranks,
then unlearn it (replay, lmcleaner with ggn and with krylov) with 2 ranks, through the library calls the CLI makes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)


def main(workdir: Path, data: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_config

    from lmclean.dist import init_from_env
    from lmclean.errors import LmcleanError
    from lmclean.train.trainer import train
    from lmclean.unlearn.request import ForgetSpec, Requester
    from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

    d = init_from_env()
    store = workdir / "run2.zarr"
    result = train(tiny_config(data, **DIST_CONFIG), store)
    out: dict[str, object] = {"final_loss": result.final_loss}
    for method in METHODS:
        copy = workdir / f"run2-{method}.zarr"
        if d.main:
            shutil.copytree(store, copy)
        d.barrier()
        report = unlearn(copy, ForgetSpec(ids=FORGET), options_for(method),
                         OutputSpec(out=workdir / f"out2-{method}"), Requester())
        out[method] = report["delta_norm"]
    try:
        unlearn(store, ForgetSpec(ids=FORGET), UnlearnOptions(method="auto"), OutputSpec(out=workdir / "x"), Requester())
    except LmcleanError as exc:
        out["auto_refused"] = str(exc)
    if d.main:
        (workdir / "dist.json").write_text(json.dumps(out))


DIST_CONFIG = {"train.epochs": 2, "train.batch_size": 5, "record.checkpoint_every": 3}
FORGET = "103,107"
METHODS = ("replay", "lmcleaner", "krylov")  # krylov: lmcleaner --hvp krylov (its anchor's products all-reduced)


def options_for(method: str):  # noqa: ANN201
    """The UnlearnOptions each compared run uses, on 2 ranks and on 1."""
    from lmclean.unlearn.lmcleaner import PropagationSettings
    from lmclean.unlearn.operators import OperatorSettings
    from lmclean.unlearn.service import UnlearnOptions

    if method == "krylov":
        return UnlearnOptions(method="lmcleaner", propagation=PropagationSettings(
            operator=OperatorSettings(hvp="krylov", refresh=3, krylov_dim=3, anchor_fraction=1.0)))
    return UnlearnOptions(method=method)

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
