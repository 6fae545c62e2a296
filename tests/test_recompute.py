"""`record.gradients: recompute`: no gradient rows; θ[t] rebuilt by recomputing each step's gradient.

Reference: the same run recorded with `gradients: stored` (fp32 rows are the training gradients
bit for bit). On CPU the recomputation runs the training computation again, so θ[t] and every
method's result must agree bitwise; the stated tolerance (TOL, float32 rounding) is only there so
a platform whose kernels are not run-to-run deterministic reports the size of the difference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import one_thread, tiny_config, write_rows

from lmclean.errors import LmcleanError
from lmclean.store import TrajectoryStore
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate, replay, rollback
from lmclean.unlearn.service import open_trajectory
from lmclean.unlearn.trajectory import recompute_grad

TOL = 0.0  # bitwise on CPU (see the module docstring)
FORGET = {101, 107}
SETTINGS = {"train.epochs": 2, "train.momentum": 0.9, "train.schedule": "cosine", "record.checkpoint_every": 5}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrajectoryStore, TrajectoryStore]:
    tmp = tmp_path_factory.mktemp("recompute")
    data = write_rows(tmp / "data.jsonl", n=16)
    with one_thread():
        train(tiny_config(data, **SETTINGS), tmp / "stored.zarr")
        train(tiny_config(data, **SETTINGS, **{"record.gradients": "recompute"}), tmp / "recompute.zarr")
    return TrajectoryStore(tmp / "stored.zarr"), TrajectoryStore(tmp / "recompute.zarr")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b)) if TOL == 0 else float((a - b).abs().max()) <= TOL * float(b.abs().max())


def test_no_gradient_rows_everything_else_kept(pair: tuple[TrajectoryStore, TrajectoryStore]) -> None:
    stored, rec = pair
    assert rec.meta["gradients"] == "recompute" and stored.meta["gradients"] == "stored"
    assert "grad" not in rec.root["steps"] and not (rec.path / "steps" / "grad").exists()
    assert rec.committed_steps == stored.committed_steps == 8 and rec.checkpoint_steps == stored.checkpoint_steps
    for t in range(rec.committed_steps):
        a, b = rec.step(t), stored.step(t)
        assert (a.lr, a.loss, a.clip) == (b.lr, b.loss, b.clip) and (a.tokens == b.tokens).all()
        assert (a.sample_ids == b.sample_ids).all() and (a.weights == b.weights).all()
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-6)
    with pytest.raises(LmcleanError, match="records no gradient rows"):
        rec.grad(0)
    with pytest.raises(LmcleanError, match="recompute_grad"):  # θ between checkpoints needs the gradient callable
        rec.theta_at(3)


def test_theta_rebuilt_by_recompute_equals_stored(pair: tuple[TrajectoryStore, TrajectoryStore]) -> None:
    stored, rec = pair
    with one_thread():
        got = {t: th.clone() for t, th, _ in rec.iter_states(0, rec.committed_steps, grad=recompute_grad(rec))}
    for t, theta, _ in stored.iter_states(0, stored.committed_steps):
        assert _same(got[t], theta), t
    assert _same(got[rec.committed_steps], rec.checkpoint(rec.committed_steps)[0])  # and the saved final θ


@pytest.mark.parametrize("method", ["replay", "rollback", "lmcleaner"])
def test_methods_agree_on_both_modes(pair: tuple[TrajectoryStore, TrajectoryStore], method: str) -> None:
    forget = ForgetSet(sample_ids=FORGET)
    deltas = []
    with one_thread():
        for store in pair:
            traj = open_trajectory(store)
            if method == "replay":
                deltas.append(replay(traj, forget).delta)
            elif method == "rollback":
                deltas.append(rollback(traj, forget).delta)
            else:
                deltas.append(propagate(traj, forget, PropagationSettings(K=4, operator=OperatorSettings(hvp="ggn"))).delta)
    assert deltas[0].abs().max() > 0 and _same(deltas[1], deltas[0])


def test_stored_grad_outside_a_sweep(pair: tuple[TrajectoryStore, TrajectoryStore]) -> None:
    stored, rec = pair
    with one_thread():
        assert _same(open_trajectory(rec).stored_grad(6), stored.grad(6))  # θ[6] rebuilt from checkpoint 5 first


def test_check_export_and_cli(pair: tuple[TrajectoryStore, TrajectoryStore], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lmclean.cli.main import app
    from lmclean.export import export_step

    stored, rec = pair
    runner = CliRunner()
    with one_thread():
        result = runner.invoke(app, ["check", str(rec.path)])
        assert result.exit_code == 0 and "θ replayed over 8 steps" in result.output, result.output
        export_step(rec.path, tmp_path / "m3", step=3)
    from transformers import AutoModelForCausalLM

    from lmclean.params import flat_params

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m3")
    assert _same(flat_params(model, rec.manifest).float(), stored.theta_at(3)[0])


def test_unlearn_twice_and_reconcile(pair: tuple[TrajectoryStore, TrajectoryStore], tmp_path: Path) -> None:
    """The first unlearning scrubs 103: the recompute store pins g[t] of its steps first, so the
    second (whose sweep crosses those steps) and reconcile still rebuild θ exactly as the stored store."""
    import shutil

    from safetensors.torch import load_file

    from lmclean.store.pinned import pinned_steps
    from lmclean.unlearn.reconcile import reconcile
    from lmclean.unlearn.request import ForgetSpec
    from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

    models = {}
    for name, src in zip(("stored", "recompute"), pair):
        store = shutil.copytree(src.path, tmp_path / name / "run.zarr")
        with one_thread():
            report = unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="lmcleaner"),
                             OutputSpec(out=store.parent / "u1"))
            # θ rebuilt by recomputation meets checkpoint 5 exactly on the CPU (a stored store: not measured)
            assert report["recompute_drift"] == (0.0 if name == "recompute" else None), report["recompute_drift"]
            held = set(TrajectoryStore(store).occurrences([103]))
            assert pinned_steps(store) == (held if name == "recompute" else set()) and held
            unlearn(store, ForgetSpec(ids="110"), UnlearnOptions(method="replay"), OutputSpec(out=store.parent / "u2"))
            reconcile(store)
        models[name] = [load_file(p / "model.safetensors") for p in (store.parent / "u1", store.parent / "u2",
                                                                       store / "model")]
    rec = TrajectoryStore(tmp_path / "recompute" / "run.zarr")
    assert rec.recompute and "grad" not in rec.root["steps"]  # the reconciled store records no rows either
    assert pinned_steps(rec.path) == set()  # and needs no pinned ones (103 is gone from its batches)
    assert pinned_steps(pair[1].path) == set()  # (the fixture's store was never scrubbed)
    for a, b in zip(models["recompute"], models["stored"]):
        assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in b)


def test_scrubbed_step_without_pinned_row_refuses(pair: tuple[TrajectoryStore, TrajectoryStore]) -> None:
    from lmclean.errors import UnsupportedError
    from lmclean.unlearn.trajectory import StoreTrajectory

    rec = pair[1]
    t = min(rec.occurrences([103]))
    traj = StoreTrajectory(rec, open_trajectory(rec).model, tombstoned={103})  # as if scrubbed without a pin
    with pytest.raises(UnsupportedError, match=f"step {t}'s batch held sample 103") as info:
        for _ in traj.states(0, t + 1):
            pass
    assert "\n" not in str(info.value)


def test_trainer_callback_recompute(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Trainer run (accumulation, clipping, label masks, AdamW) recorded with gradients="recompute":
    θ[T] rebuilt from checkpoint 0 by recomputation equals the Trainer's final θ to float32 rounding
    (the Trainer's loss is the model's own, lmclean's the stored objective: ~1e-7 per gradient, stored
    rows agree with lmclean's recomputation to 1e-5, tests/test_trainer_callback.py), and the
    projection is logged at on_train_begin."""
    import logging

    pytest.importorskip("transformers")
    from test_trainer_callback import final_theta, run

    with one_thread(), caplog.at_level(logging.INFO, logger="lmclean.integrations.transformers"):
        trainer, cb = run(tmp_path, "rc", cb_kwargs={"checkpoint_every": 100, "gradients": "recompute"})
    assert cb is not None and cb.projected.gradients == "recompute" and cb.projected.families["gradients"].bytes == 0
    assert any("projected store" in r.getMessage() for r in caplog.records)
    store = TrajectoryStore(tmp_path / "rc.zarr")
    T = store.committed_steps
    assert store.recompute and store.checkpoint_steps == [0, T] and (store.scalars("clip") < 1).any()
    with one_thread():
        *_, (t, theta, _) = store.iter_states(0, T, grad=recompute_grad(store))
    want = final_theta(trainer, store)
    rel = float(torch.linalg.vector_norm(theta - want) / torch.linalg.vector_norm(want - store.checkpoint(0)[0]))
    print(f"trainer recompute: θ[T] relative difference {rel:.3g}")
    assert t == T and rel < 1e-4, rel


def test_continue_a_recompute_store(pair: tuple[TrajectoryStore, TrajectoryStore], tmp_path: Path) -> None:
    """`record --continue` trains on (no rows written) and the grown store rebuilds and checks exactly."""
    import shutil

    from lmclean.store.check import check_store
    from lmclean.train.continue_run import continue_training

    store = shutil.copytree(pair[1].path, tmp_path / "run.zarr")
    with one_thread():
        continue_training(store, steps=3)
        report = check_store(store, recompute=recompute_grad)
    grown = TrajectoryStore(store)
    assert grown.committed_steps == 11 and grown.closed and "grad" not in grown.root["steps"]
    assert report.ok and report.steps_replayed == 11, report.problems


def test_interrupted_recompute_record_resumes_bitwise(pair: tuple[TrajectoryStore, TrajectoryStore],
                                                      tmp_path: Path) -> None:
    """Interrupted after step 6, `--resume` restarts from checkpoint 5 and ends where the
    uninterrupted recompute run ended (bitwise), still without gradient rows."""
    data = pair[1].meta["data_path"]
    cfg = tiny_config(Path(data), **SETTINGS, **{"record.gradients": "recompute"})
    store = tmp_path / "run.zarr"

    def stop(t: int, total: int, loss: float, lr: float) -> None:
        if t == 6:
            raise KeyboardInterrupt

    with one_thread():
        with pytest.raises(KeyboardInterrupt):
            train(cfg, store, on_step=stop)
        assert 5 <= TrajectoryStore(store).committed_steps < 8
        train(cfg, store, resume=True)
    done = TrajectoryStore(store)
    assert done.closed and "grad" not in done.root["steps"]
    assert torch.equal(done.checkpoint(8)[0], pair[1].checkpoint(8)[0])
