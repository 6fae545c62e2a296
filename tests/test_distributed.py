"""torchrun with 2 CPU processes (gloo) records and unlearns what one process does.

One `torchrun --nproc-per-node 2` launch (tests/_dist_worker.py) records a tiny store and unlearns
it with replay and lmcleaner (ggn, krylov); the same is run here in one process, and the two are compared. The
ranks sum half-batch gradients (and curvature products): the same sums in another order, so
tensors agree to float32 rounding (rtol 1e-5, atol 1e-6), never bit for bit; what is copied
(ids, tokens, weights, lr) agrees exactly.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import tiny_config, torchrun, write_rows

sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import DIST_CONFIG, FORGET, METHODS, options_for  # noqa: E402

ROUNDING = {"rtol": 1e-5, "atol": 1e-6}  # float32 sums of the same terms in another order


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(workdir, the 2-rank worker's summary): 2-rank store run2.zarr and outputs, 1-rank run1.zarr and outputs."""
    from lmclean.train.trainer import train
    from lmclean.unlearn.request import ForgetSpec, Requester
    from lmclean.unlearn.service import OutputSpec, unlearn

    work = tmp_path_factory.mktemp("dist")
    data = write_rows(work / "data.jsonl", n=16)
    torchrun("_dist_worker.py", work, data)
    train(tiny_config(data, **DIST_CONFIG), work / "run1.zarr")
    for method in METHODS:
        shutil.copytree(work / "run1.zarr", work / f"run1-{method}.zarr")
        unlearn(work / f"run1-{method}.zarr", ForgetSpec(ids=FORGET), options_for(method),
                OutputSpec(out=work / f"out1-{method}"), Requester())
    return work, json.loads((work / "dist.json").read_text())


def test_two_rank_store_holds_the_one_rank_trajectory(runs: tuple[Path, dict]) -> None:
    from lmclean.store.reader import TrajectoryStore

    work, _ = runs
    one, two = TrajectoryStore(work / "run1.zarr"), TrajectoryStore(work / "run2.zarr")
    assert two.closed and two.committed_steps == one.committed_steps > 0
    assert two.checkpoint_steps == one.checkpoint_steps
    np.testing.assert_array_equal(two.scalars("lr"), one.scalars("lr"))
    np.testing.assert_allclose(two.scalars("loss"), one.scalars("loss"), rtol=1e-6)
    for t in range(one.committed_steps):
        a, b = one.step(t), two.step(t)
        for name in ("sample_ids", "weights", "tokens", "lengths"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=f"step {t} {name}")
        torch.testing.assert_close(two.grad(t), one.grad(t), **ROUNDING)
    for step in one.checkpoint_steps:
        torch.testing.assert_close(two.checkpoint(step)[0], one.checkpoint(step)[0], **ROUNDING)


def test_each_rank_wrote_its_columns_and_zarr_reads_them_whole(runs: tuple[Path, dict]) -> None:
    from lmclean.store.reader import TrajectoryStore

    work, _ = runs
    store = TrajectoryStore(work / "run2.zarr")
    P = int(store.meta["param_count"])
    assert store.meta["grad_columns"] == 2
    files = sorted(p.name for p in (work / "run2.zarr" / "steps" / "grad").glob("c.*"))
    assert files == ["c.0.0", "c.0.1"]  # one shard file per rank: rank r wrote columns [r·W, (r+1)·W)
    assert json.loads((work / "run2.zarr" / "writers" / "rank1.json").read_text())["durable_steps"] == store.committed_steps
    grad = zarr.open_array(str(work / "run2.zarr" / "steps" / "grad"), mode="r")
    assert grad.shape == (store.planned_steps, P) and grad.chunks == (1, -(-P // 2))
    np.testing.assert_array_equal(grad[2], store.grad(2).numpy())


def test_two_rank_store_passes_check_and_final_model_matches(runs: tuple[Path, dict]) -> None:
    from safetensors.torch import load_file

    from lmclean.store.check import check_store

    work, _ = runs
    report = check_store(work / "run2.zarr")
    assert not report.problems, report.problems
    one, two = load_file(work / "run1.zarr/model/model.safetensors"), load_file(work / "run2.zarr/model/model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], **ROUNDING)


@pytest.mark.parametrize("method", METHODS)
def test_two_rank_unlearn_equals_one_rank(runs: tuple[Path, dict], method: str) -> None:
    from safetensors.torch import load_file

    from lmclean.audit import AuditLog

    work, summary = runs
    one = load_file(work / f"out1-{method}" / "model.safetensors")
    two = load_file(work / f"out2-{method}" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], **ROUNDING)
    events = [r["kind"] for r in AuditLog(work / f"run2-{method}.zarr").records()]
    assert events.count("unlearn") == 1  # rank 0 alone audits
    report = json.loads((work / f"out1-{method}" / "unlearn_report.json").read_text())
    assert summary[method] == pytest.approx(report["delta_norm"], rel=1e-5)
    if method == "krylov":  # the anchors' Lanczos products were taken (and, on 2 ranks, all-reduced)
        assert report["hvp"] == "krylov" and report["curvature_products"] > 0


def test_auto_is_refused_under_torchrun(runs: tuple[Path, dict]) -> None:
    assert "--method auto" in runs[1]["auto_refused"] and "name the method" in runs[1]["auto_refused"]


def test_share_splits_every_item_once() -> None:
    from lmclean.dist import Dist

    for n in range(0, 9):
        for world in (1, 2, 3):
            parts = [list(range(n))[Dist(r, world).share(n)] for r in range(world)]
            assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_process_writes_and_resumes_every_column_of_a_split_store(tmp_path: Path, precision: str) -> None:
    """A store split into 3 column chunks (P = 8: W = 3, the last chunk padded) written by one process
    (as `record --resume` of a torchrun store is), crash-resumed mid-shard: rows read back whole."""
    from lmclean.params import ParamManifest
    from lmclean.optim import SGDRule
    from lmclean.store.reader import TrajectoryStore
    from lmclean.train.recorder import Recorder

    model = torch.nn.Linear(3, 2)
    rows = [torch.randn(8, generator=torch.Generator().manual_seed(t)) for t in range(4)]
    rec = Recorder.create(tmp_path / "s", manifest=ParamManifest.from_model(model), rule=SGDRule(), planned_steps=4,
                          batch_size=2, max_length=4, checkpoint_every=2, sample_ids=[1, 2, 3], precision=precision,
                          fingerprints=["00" * 32] * 3, extra={"grad_columns": 3})

    def record(r: Recorder, t: int) -> None:
        r.record_step(t, lr=0.1, loss=1.0, sample_ids=[1, 2], weights=[0.5, 0.5], lengths=torch.tensor([3, 2]),
                      input_ids=torch.ones(2, 3, dtype=torch.long), grad=rows[t], theta=torch.zeros(8), opt_state={})

    for t in range(3):
        record(rec, t)
    rec.abort()  # committed through step 2; resume from the checkpoint at step 2
    rec = Recorder.reopen(tmp_path / "s", 2)
    for t in range(2, 4):
        record(rec, t)
    rec.close(4, torch.zeros(8), {})
    store = TrajectoryStore(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s/steps/grad").glob("c.*")) == ["c.0.0", "c.0.1", "c.0.2"]
    for t in range(4):
        want = rows[t].bfloat16().float() if precision == "bf16" else rows[t]
        torch.testing.assert_close(store.grad(t), want, rtol=0, atol=0)
