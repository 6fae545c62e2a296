"""`record --continue`: training on from the current model equals training on, or retraining without
the forgotten samples, and survives a kill."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config, write_rows
from lmclean.audit.history import load_history
from lmclean.audit.verify import verify_store
from lmclean.store.check import check_store
from lmclean.store.reader import TrajectoryStore
from lmclean.train.continue_run import continue_training
from lmclean.train.trainer import stored_config, train
from lmclean.unlearn.request import ForgetSpec
from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

N, M = 2, 1  # epochs recorded, epochs continued (16 samples, batch 4: 4 steps an epoch)
REL = 1e-6  # fp32 CPU: replay/exclude runs agree to ~1e-7 relative (measured below the bound)


def _cfg(data: Path, epochs: int):
    return tiny_config(data, **{"train.epochs": epochs, "train.schedule": "constant", "train.momentum": 0.9})


def _final(store: Path) -> torch.Tensor:
    s = TrajectoryStore(store)
    return s.theta_at(s.committed_steps)[0]


def _model(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("continue")
    data = write_rows(tmp / "data.jsonl", n=16)
    train(_cfg(data, N), tmp / "run.zarr")
    return tmp / "run.zarr", data


@pytest.fixture
def store(recorded: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "run.zarr"
    shutil.copytree(recorded[0], copy)
    return copy


def test_continue_equals_the_longer_run_bitwise(recorded: tuple[Path, Path], store: Path, tmp_path: Path) -> None:
    result, summary = continue_training(store, epochs=M)
    assert summary["correction"] is None and result.start_step == 8 and result.steps == 12
    ref = train(_cfg(recorded[1], N + M), tmp_path / "ref.zarr").store
    a, b = TrajectoryStore(store), TrajectoryStore(ref)
    assert a.closed and a.committed_steps == b.committed_steps == 12 and a.corrections == []
    for t in range(12):
        assert torch.equal(a.grad(t), b.grad(t)), t
        ra, rb = a.step(t), b.step(t)
        assert (ra.sample_ids == rb.sample_ids).all() and (ra.weights == rb.weights).all() and ra.lr == rb.lr
    for c in b.checkpoint_steps:  # the continued store also keeps its old final checkpoint (8)
        ta, sa = a.checkpoint(c)
        tb, sb = b.checkpoint(c)
        assert torch.equal(ta, tb) and all(torch.equal(sa[k], sb[k]) for k in sb), c
    ma, mb = _model(store / "model"), _model(ref / "model")
    assert all(torch.equal(ma[k], mb[k]) for k in mb)
    assert check_store(store).ok
    history = load_history(store)
    assert history.current.kind == "continue" and history.current_path == store / "model"
    assert verify_store(store, store / "model")["ok"]


def test_continue_after_replay_equals_retraining_without_the_samples(recorded: tuple[Path, Path], store: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "u1"
    unlearn(store, ForgetSpec(ids="103,110"), UnlearnOptions(method="replay"), OutputSpec(out=out))
    delta = load_file(out / "optimizer_delta.safetensors")
    assert set(delta) == {"momentum_buffer"} and float(delta["momentum_buffer"].norm()) > 0
    _, summary = continue_training(store, epochs=M)
    assert summary["correction"]["method"] == "replay" and summary["dropped_ids"] == [103, 110]
    s = TrajectoryStore(store)
    assert [(e.step, e.method) for e in s.corrections] == [(8, "replay")]
    assert all(not {103, 110} & set(s.step(t).sample_ids.tolist()) for t in range(8, 12))
    ref = train(_cfg(recorded[1], N + M), tmp_path / "ref.zarr", exclude=[103, 110]).store
    print("replay+continue vs exclude", _rel(_final(store), _final(ref)),
          "recorded vs exclude", _rel(_final(recorded[0]), _final(ref)))
    assert _rel(_final(store), _final(ref)) < REL
    assert check_store(store).ok
    history = load_history(store)
    assert sorted(history.forgotten_ids) == [103, 110]  # forgotten ids persist past the continue
    assert verify_store(store, store / "model")["ok"]


def test_replay_across_a_jump_is_exact_retraining(recorded: tuple[Path, Path], store: Path, tmp_path: Path) -> None:
    unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp_path / "u1"))
    assert load_file(tmp_path / "u1" / "optimizer_delta.safetensors").keys() == {"momentum_buffer"}
    continue_training(store, epochs=M)
    assert [e.method for e in TrajectoryStore(store).corrections] == ["lmcleaner"]
    unlearn(store, ForgetSpec(ids="105"), UnlearnOptions(method="replay"), OutputSpec(out=tmp_path / "u2"))
    got = _model(tmp_path / "u2")
    ref = train(_cfg(recorded[1], N + M), tmp_path / "ref.zarr", exclude=[103, 105]).store
    want = _model(ref / "model")
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(d)])  # noqa: E731
    print("replay across jump vs exclude", _rel(flat(got), flat(want)))
    assert _rel(flat(got), flat(want)) < REL


def test_kill_during_continue_then_resume_gives_the_same_model(recorded: tuple[Path, Path], store: Path,
                                                               tmp_path: Path) -> None:
    unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp_path / "u1"))
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    continue_training(twin, epochs=M)
    env = {**os.environ, "LMCLEAN_CRASH_AT": "continue:mid-train", "OMP_NUM_THREADS": "1"}
    code = ("import sys, torch; torch.set_num_threads(1); from lmclean.train.continue_run import continue_training; "
            f"continue_training({str(store)!r}, epochs={M})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                          timeout=300)
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    killed = TrajectoryStore(store)
    assert not killed.closed and killed.planned_steps == 12 and [e.step for e in killed.corrections] == [8]
    cfg, base, excluded = stored_config(store)
    train(cfg, store, exclude=excluded, base=base, resume=True)
    assert torch.equal(_final(store), _final(twin))
    ma, mb = _model(store / "model"), _model(twin / "model")
    assert all(torch.equal(ma[k], mb[k]) for k in mb)
    assert check_store(store).ok and verify_store(store, store / "model")["ok"]


@pytest.mark.parametrize("method", ["lmcleaner", "replay"])
def test_state_delta_is_the_optimizer_state_of_retraining(method: str) -> None:
    """On a quadratic (constant Hessian) the propagated v_m, and replay's carried state, are the
    exact change of SGD's momentum buffer that retraining without F makes (float64)."""
    from test_unlearn_quadratic import exact, make_run

    from lmclean.optim import SGDRule
    from lmclean.unlearn import ForgetSet, propagate, replay

    run = make_run(SGDRule(momentum=0.9, weight_decay=0.01))
    forget = {3, 17}
    _, states = run.run(exclude=forget)
    want = states[-1]["momentum_buffer"] - run.opt_states[-1]["momentum_buffer"]
    res = (propagate(run, ForgetSet(sample_ids=forget), exact(K=10_000)) if method == "lmcleaner"
           else replay(run, ForgetSet(sample_ids=forget)))
    assert float(want.norm()) > 1e-2 and set(res.state_delta) == {"momentum_buffer"}
    torch.testing.assert_close(res.state_delta["momentum_buffer"], want, rtol=0, atol=1e-8)


def test_cli_continue_and_its_errors(store: Path) -> None:
    import json

    from typer.testing import CliRunner

    from conftest import error_line
    from lmclean.cli.main import app

    runner = CliRunner()
    assert "--continue" in error_line(runner.invoke(app, ["record", "--store", str(store), "--steps", "2"]))
    assert "--exclude" in error_line(runner.invoke(app, ["record", "--store", str(store), "--continue", "--steps", "2",
                                                         "--exclude", "3"]))
    assert "exactly one of" in error_line(runner.invoke(app, ["record", "--store", str(store), "--continue"]))
    done = runner.invoke(app, ["record", "--store", str(store), "--continue", "--steps", "2", "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["steps"] == 10 and summary["continued_from"] == 8 and summary["correction"] is None
    s = TrajectoryStore(store)
    assert s.closed and s.committed_steps == 10 and s.meta["config"]["train"]["steps"] == 10
    again = runner.invoke(app, ["record", "--store", str(store), "--continue", "--epochs", "1", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["steps"] == 14  # 10 + one epoch of 4 steps (the plan goes on mid-epoch)
    assert check_store(store).ok


def test_adamw_store_continues_after_lmcleaner_with_both_moment_deltas(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "data.jsonl", n=8)
    cfg = tiny_config(data, **{"train.epochs": 2, "train.schedule": "constant", "train.optimizer": "adamw",
                               "train.lr": 0.01})
    store = train(cfg, tmp_path / "adam.zarr").store
    unlearn(store, ForgetSpec(ids="102"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp_path / "u"))
    assert load_file(tmp_path / "u" / "optimizer_delta.safetensors").keys() == {"exp_avg", "exp_avg_sq"}
    _, summary = continue_training(store, epochs=1)
    assert summary["optimizer_delta"] == ["exp_avg", "exp_avg_sq"]
    s = TrajectoryStore(store)
    theta, state = s.theta_at(s.corrections[0].step)
    assert bool((state["exp_avg_sq"] >= 0).all()) and bool(torch.isfinite(_final(store)).all())
    assert check_store(store).ok
