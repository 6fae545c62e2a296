"""Paths the benchmarks rely on, each pinned by a test that fails when it breaks (issue 11 §2):
the stabiliser at the edge of stability, and `--noise` on the written model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import tiny_config, write_rows
from test_unlearn_quadratic import make_run
from typer.testing import CliRunner

from lmclean.cli.main import app
from lmclean.store.reader import TrajectoryStore
from lmclean.params import flat_params
from lmclean.train.model import load_model
from lmclean.optim import SGDRule
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate


def _norms_after_last_injection(res, last: int) -> list[float]:  # noqa: ANN001 - a SweepResult
    return [n for t, n in res.v_norms if t >= last]


def test_stabiliser_keeps_the_propagation_non_expansive_at_the_edge_of_stability() -> None:
    """lr 1.2 on this least-squares run puts η·λmax(H) above 2 on its early steps: the plain
    linearised step (I − ηH) expands v along the top eigenvector (measured: 4.7 -> 10.3 over 11
    steps), the stabilised one never expands it (4.7 -> 0.57, 6 steps clipped)."""
    run = make_run(SGDRule(), lr=1.2, epochs=1, n=48)
    forget = ForgetSet(sample_ids={run.batches[0][0]})
    last = max(forget.affected(run))
    ggn = OperatorSettings(hvp="ggn")
    plain = propagate(run, forget, PropagationSettings(K=10_000, damping=0.0, stabilize=False, operator=ggn,
                                                       divergence_factor=1e9))
    stable = propagate(run, forget, PropagationSettings(K=10_000, damping=0.0, stabilize=True, operator=ggn))
    after_plain = _norms_after_last_injection(plain, last)
    after_stable = _norms_after_last_injection(stable, last)
    assert after_plain[-1] > 2 * after_plain[0]  # unstabilised: grows (the regime is really unstable)
    assert stable.clipped_steps > 0
    assert all(b <= a * (1 + 1e-12) for a, b in zip(after_stable, after_stable[1:]))  # never grows


def test_noise_adds_the_seeded_gaussian_to_the_written_model(tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    train(tiny_config(write_rows(tmp_path / "data.jsonl", n=8)), store)
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    runner = CliRunner()
    common = ["--forget", "101", "--method", "rollback"]
    assert runner.invoke(app, ["unlearn", str(store), *common, "--out", str(tmp_path / "plain")]).exit_code == 0
    res = runner.invoke(app, ["unlearn", str(twin), *common, "--noise", "0.01", "--seed", "7",
                              "--out", str(tmp_path / "noisy")])
    assert res.exit_code == 0, res.output
    manifest = TrajectoryStore(store).manifest
    plain = flat_params(load_model(tmp_path / "plain"), manifest)
    noisy = flat_params(load_model(tmp_path / "noisy"), manifest)
    expected = 0.01 * torch.randn(plain.shape, generator=torch.Generator().manual_seed(7), dtype=plain.dtype)
    torch.testing.assert_close(noisy - plain, expected, rtol=0, atol=1e-6)
