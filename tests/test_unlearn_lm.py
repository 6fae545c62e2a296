"""LMCleaner on a tiny causal LM recorded by `lmclean record` (design note, test 4), end to end.

Ground truth is `record --exclude` (exact retraining). Exact replay must reproduce it to float
rounding; GGN propagation must land closer to it than rollback, in parameter distance and in
forget-set loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config, write_rows

from lmclean.store import TrajectoryStore
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay, rollback
from lmclean.unlearn.service import open_trajectory

FORGET = {101, 107}
# Plain SGD at a moderate step size: the regime where training is not chaotic (a chaotic run, e.g.
# lr 0.05 with momentum 0.9 on the example, moves ‖θ − θ_retrain‖ by as much as ‖θ‖ and no
# linearisation can follow it; benchmarks/fidelity.py shows both regimes).
SETTINGS = {"train.epochs": 4, "train.lr": 0.1, "train.momentum": 0.0, "train.schedule": "constant"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrajectoryStore, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("lm")
    data = write_rows(tmp / "data.jsonl", n=24)
    cfg = tiny_config(data, **SETTINGS)
    train(cfg, tmp / "full.zarr")
    train(cfg, tmp / "retrain.zarr", exclude=sorted(FORGET))
    ref = TrajectoryStore(tmp / "retrain.zarr")
    return TrajectoryStore(tmp / "full.zarr"), ref.checkpoint(ref.committed_steps)[0]


def _forget_loss(traj, theta: torch.Tensor) -> float:  # noqa: ANN001
    total = 0.0
    for t, ids in sorted(ForgetSet(sample_ids=FORGET).affected(traj).items())[:2]:
        with torch.no_grad():
            obj = traj.objective(t, ids)
            total += float(obj.loss_from_outputs(obj.outputs(traj.manifest.views(theta))))
    return total


@pytest.mark.slow
def test_ggn_beats_rollback_and_replay_is_exact(runs: tuple[TrajectoryStore, torch.Tensor]) -> None:
    store, theta_ref = runs
    traj = open_trajectory(store)
    theta = store.checkpoint(store.committed_steps)[0]
    forget = ForgetSet(sample_ids=FORGET)
    base = torch.linalg.vector_norm(theta - theta_ref)

    def residual(delta: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(theta + delta - theta_ref) / base)

    # Replay recomputes every gradient from the stored tokens: float32 summation order only.
    assert residual(replay(traj, forget).delta) < 1e-3
    ggn = propagate(traj, forget, PropagationSettings(K=800, operator=OperatorSettings(hvp="ggn")))
    rb = rollback(traj, forget)
    assert ggn.products > 0 and ggn.divergence == "ok"
    # Measured: ggn 0.479, half-strength (0.5·Δ) 0.663, 1.5·Δ 0.610, K = 0 0.511, rollback 0.704. The
    # bound 0.55 is one a half-right propagation (half or 1.5x the correction) fails.
    assert residual(ggn.delta) < 0.55 < min(residual(0.5 * ggn.delta), residual(1.5 * ggn.delta), residual(rb.delta))
    lf = {name: _forget_loss(traj, theta + d) for name, d in
          {"orig": torch.zeros_like(theta), "ggn": ggn.delta, "rollback": rb.delta}.items()}
    lf["ref"] = _forget_loss(traj, theta_ref)
    assert lf["ref"] > lf["orig"]  # the model did learn the forget samples
    assert abs(lf["ggn"] - lf["ref"]) < abs(lf["rollback"] - lf["ref"])


@pytest.mark.slow
def test_ggn_beats_rollback_on_an_adamw_run(tmp_path: Path) -> None:
    """The same check for a run trained with AdamW (sample level, linearised Adam moments):
    measured residual 0.73 vs rollback's 0.99, and a forget loss closer to retraining's."""
    data = write_rows(tmp_path / "data.jsonl", n=24)
    cfg = tiny_config(data, **{"train.epochs": 6, "train.lr": 0.003, "train.optimizer": "adamw",
                               "train.schedule": "constant"})
    train(cfg, tmp_path / "full.zarr")
    train(cfg, tmp_path / "retrain.zarr", exclude=sorted(FORGET))
    ref = TrajectoryStore(tmp_path / "retrain.zarr")
    theta_ref = ref.checkpoint(ref.committed_steps)[0]
    store = TrajectoryStore(tmp_path / "full.zarr")
    traj = open_trajectory(store)
    theta = store.checkpoint(store.committed_steps)[0]
    forget = ForgetSet(sample_ids=FORGET)
    ggn = propagate(traj, forget, PropagationSettings(K=800, operator=OperatorSettings(hvp="ggn")))
    rb = rollback(traj, forget)
    base = torch.linalg.vector_norm(theta - theta_ref)
    res = {name: float(torch.linalg.vector_norm(theta + d - theta_ref) / base) for name, d in
           {"ggn": ggn.delta, "rollback": rb.delta}.items()}
    assert ggn.divergence == "ok" and res["ggn"] < 0.9 * res["rollback"], res
    lf = {name: _forget_loss(traj, theta + d) for name, d in
          {"orig": torch.zeros_like(theta), "ggn": ggn.delta, "rollback": rb.delta}.items()}
    lf["ref"] = _forget_loss(traj, theta_ref)
    assert lf["ref"] > lf["orig"]  # the model did learn the forget samples
    assert abs(lf["ggn"] - lf["ref"]) < abs(lf["rollback"] - lf["ref"]), lf
