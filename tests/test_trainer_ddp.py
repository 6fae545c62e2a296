"""LMCleanCallback under DDP: one `torchrun --nproc-per-node 2` launch (gloo, CPU) of a stock Trainer
(tests/_trainer_ddp_worker.py) records one store holding the global step; checked against the DDP run
itself (θ bitwise, the Trainer's logged norms and losses), lmclean's gradient of the stored batch
(the global weights w_i = n_i / N), the DDP run with `exclude=` (replayed out in one process), the
ids the distributed sampler fed, a `gradients="recompute"` store, and the refusal of live requests
(`unlearn=`). Runtime ~40 s idle (the launch: 2 processes, 4 short Trainer runs)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from _trainer_ddp_worker import EXCLUDE  # noqa: E402
from conftest import torchrun  # noqa: E402

from lmclean.store.reader import TrajectoryStore  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("trainer_ddp")
    torchrun("_trainer_ddp_worker.py", work)
    return work, json.loads((work / "summary.json").read_text())


def _flat(params: dict[str, torch.Tensor], store: TrajectoryStore) -> torch.Tensor:
    return torch.cat([params[e.name].reshape(-1) for e in store.manifest.entries])


def test_store_rebuilds_the_ddp_trained_model(runs: tuple[Path, dict]) -> None:
    """θ[T] from checkpoint 0 and the stored (all-reduced, clipped) gradients is bitwise the DDP run's
    final θ, which is the same on both ranks; norms and losses are the Trainer's logged ones."""
    work, summary = runs
    store = TrajectoryStore(work / "full.zarr")
    T = store.committed_steps
    assert store.closed and T == 4 and store.checkpoint_steps == [0, T] and store.meta["world_size"] == 2
    assert summary["full_ranks_equal"]
    final = _flat(torch.load(work / "full-final.pt"), store)
    assert torch.equal(store.theta_at(T)[0], final)
    # the pre-clip norm is taken after DDP's all-reduce: the Trainer's own (logged) norm
    torch.testing.assert_close(torch.tensor(store.scalars("grad_norm")),
                               torch.tensor(summary["full_grad_norms"], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.tensor(store.scalars("loss")),
                               torch.tensor(summary["full_losses"], dtype=torch.float64), rtol=1e-5, atol=0)
    clips = store.scalars("clip")
    assert (clips < 1).any() and (clips == 1).any(), clips  # max_grad_norm 2: some steps clip


@pytest.mark.parametrize("name", ["full", "local", "mean"])
def test_stored_weights_are_the_applied_loss(runs: tuple[Path, dict], name: str) -> None:
    """g[t] = clip[t]·∇(Σ_i w_i meanCE_i)(θ[t]) over both ranks' rows: w_i = n_i / N with N the target
    count over every rank (average_tokens_across_devices, run "full"), w_i = n_i / (N_r·2) with each
    rank's own count N_r without it (run "local"), w_i = n_i / (n_micro·G·2) for a model that takes no
    num_items_in_batch (run "mean"); float32 sums in another order: 1e-5."""
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    work, summary = runs
    store = TrajectoryStore(work / f"{name}.zarr")
    assert torch.equal(store.theta_at(store.committed_steps)[0], _flat(torch.load(work / f"{name}-final.pt"), store))
    torch.testing.assert_close(torch.tensor(store.scalars("loss")),
                               torch.tensor(summary[f"{name}_losses"], dtype=torch.float64), rtol=1e-5, atol=0)
    traj = open_trajectory(store)
    rank0_share = []  # Σ w_i over rank 0's rows (micro-batch k came from rank k mod 2)
    for t, theta, _ in store.iter_states(0, store.committed_steps - 1):
        rec = store.step(t)
        assert abs(rec.weights.sum() - 1.0) < 1e-12
        rank0_share.append(float(rec.weights[rec.micro % 2 == 0].sum()))
        mine = flat_grad(traj.objective(t, rec.sample_ids.tolist()), store.manifest, theta) * rec.clip
        stored = store.grad(t)
        assert float(torch.linalg.vector_norm(mine - stored) / torch.linalg.vector_norm(stored)) < 1e-5, t
    halves = [abs(x - 0.5) < 1e-12 for x in rank0_share]
    assert all(halves) if name != "full" else not all(halves), rank0_share  # only "full" weighs ranks by tokens


def test_replay_in_one_process_equals_the_ddp_run_excluding_the_sample(runs: tuple[Path, dict]) -> None:
    """`lmclean unlearn --method replay --forget 105` of the DDP store, in this one process, is the
    DDP run trained with exclude=[105]. Tolerance: 1e-6 of ‖θ‖ (float32: the replay sums each batch's
    gradient in one process, the DDP run in two halves)."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from lmclean.cli.main import app

    work, _ = runs
    shutil.copytree(work / "full.zarr", work / "full-copy.zarr")
    result = CliRunner().invoke(app, ["unlearn", str(work / "full-copy.zarr"), "--forget", str(EXCLUDE),
                                      "--method", "replay", "--out", str(work / "replayed")])
    assert result.exit_code == 0, result.output
    store = TrajectoryStore(work / "full.zarr")
    mine = _flat(load_file(work / "replayed" / "model.safetensors"), store)
    reference = _flat(torch.load(work / "ex-final.pt"), store)
    moved = float(torch.linalg.vector_norm(_flat(torch.load(work / "full-final.pt"), store) - reference))
    err = float(torch.linalg.vector_norm(mine - reference))
    assert moved > 1e-3 and err <= 1e-6 * float(torch.linalg.vector_norm(reference)), (err, moved)
    assert TrajectoryStore(work / "ex.zarr").meta["excluded_ids"] == [EXCLUDE]


def test_store_lists_every_sample_the_distributed_sampler_fed(runs: tuple[Path, dict]) -> None:
    work, _ = runs
    for name, dropped in (("full", set()), ("ex", {EXCLUDE})):
        fed = [json.loads((work / f"fed-{name}-{r}.json").read_text()) for r in range(2)]
        assert fed[0] and fed[1] and fed[0] != fed[1]  # each rank had its own share
        store = TrajectoryStore(work / f"{name}.zarr")
        stored = [int(i) for t in range(store.committed_steps) for i in store.step(t).sample_ids]
        assert sorted(stored) == sorted(i for i in fed[0] + fed[1] if i not in dropped)


def test_recompute_store_rebuilds_the_ddp_trained_model(runs: tuple[Path, dict]) -> None:
    """gradients="recompute": no rows; θ[T] rebuilt by recomputing each step's gradient in one process
    from the stored batch is the DDP run's θ to float32 rounding (1e-4 of the distance travelled, as
    for one process: tests/test_recompute.py)."""
    from lmclean.unlearn.trajectory import recompute_grad

    work, _ = runs
    store = TrajectoryStore(work / "rc.zarr")
    T = store.committed_steps
    assert store.recompute and T == 4
    *_, (t, theta, _) = store.iter_states(0, T, grad=recompute_grad(store))
    want = _flat(torch.load(work / "rc-final.pt"), store)
    rel = float(torch.linalg.vector_norm(theta - want) / torch.linalg.vector_norm(want - store.checkpoint(0)[0]))
    assert t == T and rel < 1e-4, rel


def test_live_requests_are_refused_under_ddp(runs: tuple[Path, dict]) -> None:
    _, summary = runs
    assert summary["online_refused"].startswith("UnsupportedError: ") and "unlearn --pending" in summary["online_refused"]
    assert "\n" not in summary["online_refused"] and not summary["online_store_exists"]


@pytest.mark.parametrize("flag", ["fsdp", "deepspeed", "parallelism_config"])
def test_sharded_runs_are_refused_in_one_line(flag: str) -> None:
    from types import SimpleNamespace

    from lmclean.errors import UnsupportedError
    from lmclean.integrations._ddp import group

    args = SimpleNamespace(world_size=2, parallel_mode=SimpleNamespace(value="distributed"), **{flag: "on"})
    with pytest.raises(UnsupportedError, match=f"not {flag}; train with plain DDP") as err:
        group(args)
    assert "\n" not in str(err.value)


def test_resume_is_refused_under_ddp() -> None:
    from lmclean.dist import Dist
    from lmclean.errors import UnsupportedError
    from lmclean.integrations._ddp import refuse_under_ddp

    refuse_under_ddp(Dist(0, 1), live_requests=True, resume=True)  # one process: both allowed
    with pytest.raises(UnsupportedError, match="resume_from_checkpoint yet; record the run again from step 0"):
        refuse_under_ddp(Dist(1, 2), live_requests=False, resume=True)
