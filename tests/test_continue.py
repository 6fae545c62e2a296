"""`record --continue`: training on from the current model equals training on, or retraining without
the forgotten samples, and survives a kill."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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


# -- record --continue --data: more samples ---------------------------------------------------------------------

MORE_IDS = list(range(200, 208))


def _more(path: Path, ids: list[int] = MORE_IDS) -> Path:
    import json

    rows = [{"id": i, "question": f"What is thing {i}?", "answer": f"Thing {i} is a {['cup', 'box', 'kite'][i % 3]}."}
            for i in ids]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _segmented_cfg(data: Path, steps: int):
    """The config `record --continue --data` leaves: the recorded one with the total step count."""
    return tiny_config(data, **{"train.epochs": N, "train.steps": steps, "train.schedule": "constant",
                                "train.momentum": 0.9})


def _assert_same_store(a_path: Path, b_path: Path) -> None:
    """Every step row, checkpoint and the final model bitwise equal."""
    a, b = TrajectoryStore(a_path), TrajectoryStore(b_path)
    assert a.closed and b.closed and a.committed_steps == b.committed_steps
    for t in range(a.committed_steps):
        ra, rb = a.step(t), b.step(t)
        assert (ra.sample_ids == rb.sample_ids).all() and (ra.weights == rb.weights).all() and ra.lr == rb.lr, t
        assert (ra.tokens == rb.tokens).all() and torch.equal(a.grad(t), b.grad(t)), t
    assert torch.equal(_final(a_path), _final(b_path))
    ma, mb = _model(a_path / "model"), _model(b_path / "model")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in mb)


def test_continue_with_data_trains_on_the_union_like_the_segmented_run(recorded: tuple[Path, Path], store: Path,
                                                                       tmp_path: Path) -> None:
    more = _more(tmp_path / "more.jsonl")
    result, summary = continue_training(store, epochs=M, data=more)
    assert result.start_step == 8 and result.steps == 14  # one epoch of the 24-sample union: 6 steps
    assert summary["data"] == {"path": str(more.absolute()), "first_step": 8, "samples": 8}
    s = TrajectoryStore(store)
    assert [(g["first_step"], g["samples"]) for g in s.meta["data_segments"]] == [(0, 16), (8, 8)]
    assert list(s.sample_fingerprints) == [*range(100, 116), *MORE_IDS]  # appended, old rows unchanged
    later = [i for t in range(8, 14) for i in s.step(t).sample_ids.tolist()]
    assert sorted(later) == [*range(100, 116), *MORE_IDS]  # the epoch after the continue permutes the union
    assert all(not set(MORE_IDS) & set(s.step(t).sample_ids.tolist()) for t in range(8))
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".samples")) == []
    # the same plan recorded from scratch: the first data file, then the second from step 8
    ref = train(_segmented_cfg(recorded[1], 14), tmp_path / "ref.zarr", more=[(str(more), 8)]).store
    assert TrajectoryStore(ref).meta["data_segments"] == s.meta["data_segments"]
    _assert_same_store(store, ref)
    assert check_store(store).ok
    assert load_history(store).current.kind == "continue" and verify_store(store, store / "model")["ok"]


def test_segmented_plan_keeps_the_old_plan_as_prefix() -> None:
    from lmclean.train.data import batch_plan, segmented_plan

    old, new = list(range(10)), list(range(10)) + [50, 51, 52]
    for first in (5, 6, 7):  # 10 ids in batches of 4: 3 steps an epoch; 6 is an epoch boundary, 5 and 7 are not
        plan = segmented_plan([(old, 0), (new, first)], 4, 7, first + 8, True)
        assert plan[:first] == batch_plan(old, 4, 7, None, first, True)
        assert len(plan) == first + 8 and {50, 51, 52} <= {i for b in plan[first:] for i in b}
        epoch0 = -(-first // 3)  # epochs begun before the segment (one cut short): the index of its first
        perm = np.random.default_rng([7, epoch0]).permutation(13)
        assert plan[first] == [new[k] for k in perm[:4]]
    assert segmented_plan([(old, 0)], 4, 7, 9, True) == batch_plan(old, 4, 7, None, 9, True)


def test_continue_with_data_after_unlearning_keeps_tombstones_and_unlearns_new_samples(
        recorded: tuple[Path, Path], store: Path, tmp_path: Path) -> None:
    from lmclean.store.scrub import tombstones

    more = _more(tmp_path / "more.jsonl")
    unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="replay"), OutputSpec(out=tmp_path / "u1"))
    before = tombstones(store)
    continue_training(store, epochs=M, data=more)
    assert tombstones(store) == before and set(before) == {103}  # the grown table keeps them, new rows live
    s = TrajectoryStore(store)
    assert all(103 not in s.step(t).sample_ids.tolist() for t in range(8, 14))
    unlearn(store, ForgetSpec(ids="203"), UnlearnOptions(method="replay"), OutputSpec(out=tmp_path / "u2"))
    assert set(tombstones(store)) == {103, 203}
    ref = train(_segmented_cfg(recorded[1], 14), tmp_path / "ref.zarr", more=[(str(more), 8)],
                exclude=[103, 203]).store
    flat = lambda d: torch.cat([d[k].reshape(-1) for k in sorted(d)])  # noqa: E731
    got, want = flat(_model(tmp_path / "u2")), flat(_model(ref / "model"))
    print("replay of a new sample vs exclude", _rel(got, want))
    assert _rel(got, want) < REL
    assert check_store(store).ok and verify_store(store, tmp_path / "u2")["ok"]


@pytest.mark.parametrize("point", ["grow:after-stage", "grow:before-samples-switch", "grow:between-samples-renames",
                                   "grow:after-samples-switch", "continue:mid-train"])
def test_kill_during_continue_with_data_then_recover_gives_the_same_model(recorded: tuple[Path, Path], store: Path,
                                                                          tmp_path: Path, point: str) -> None:
    more = _more(tmp_path / "more.jsonl")
    twin = tmp_path / "twin.zarr"
    shutil.copytree(store, twin)
    continue_training(twin, epochs=M, data=more)
    env = {**os.environ, "LMCLEAN_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    if point == "grow:between-samples-renames":
        env["LMCLEAN_NO_RENAME_EXCHANGE"] = "1"  # the two-rename switch (file systems without an exchange)
    code = ("import sys, torch; torch.set_num_threads(1); from lmclean.train.continue_run import continue_training; "
            f"continue_training({str(store)!r}, epochs={M}, data=__import__('pathlib').Path({str(more)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                          timeout=300)
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    if point == "grow:after-stage":  # before the growth's first write: the store is as it was, the continue reruns
        assert TrajectoryStore(store).closed and (store / ".samples-grown").is_dir()
        continue_training(store, epochs=M, data=more)
    else:
        killed = TrajectoryStore(store)
        assert not killed.closed and killed.planned_steps == 14
        if point == "continue:mid-train":  # every data file's fingerprints are checked
            good = more.read_bytes()
            _more(more, [*MORE_IDS[:-1], 299])
            cfg, base, excluded = stored_config(store)
            with pytest.raises(Exception, match="more.jsonl differs from the recorded data set"):
                train(cfg, store, exclude=excluded, base=base, resume=True)
            more.write_bytes(good)
        cfg, base, excluded = stored_config(store)
        train(cfg, store, exclude=excluded, base=base, resume=True)
    assert not [p for p in store.iterdir() if p.name.startswith(".samples")]
    _assert_same_store(store, twin)
    assert check_store(store).ok and verify_store(store, store / "model")["ok"]


def test_continue_with_colliding_or_missing_data_is_refused(store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from conftest import error_line
    from lmclean.cli.main import app
    from lmclean.errors import DataError

    bad = _more(tmp_path / "bad.jsonl", [200, 201, 110, 111])
    with pytest.raises(DataError, match=r"sample id 110 is already recorded"):
        continue_training(store, epochs=M, data=bad)
    s = TrajectoryStore(store)
    assert s.closed and s.planned_steps == 8 and s.corrections == [] and "data_segments" not in s.meta
    assert not [p for p in store.iterdir() if p.name.startswith(".samples")]
    runner = CliRunner()
    line = error_line(runner.invoke(app, ["record", "--store", str(store), "--continue", "--epochs", "1",
                                          "--data", str(bad)]))
    assert "sample id 110 is already recorded" in line
    assert "does not exist" in error_line(runner.invoke(app, ["record", "--store", str(store), "--continue", "--steps",
                                                              "2", "--data", str(tmp_path / "nope.jsonl")]))
    done = runner.invoke(app, ["record", "--store", str(store), "--continue", "--steps", "3", "--json", "--data",
                               str(_more(tmp_path / "ok.jsonl"))])
    assert done.exit_code == 0, done.output
    import json

    assert json.loads(done.stdout)["data"]["samples"] == 8 and TrajectoryStore(store).committed_steps == 11
    # the union's ids are used now: a second data file may not reuse them either
    assert "sample id 203 is already recorded" in error_line(runner.invoke(
        app, ["record", "--store", str(store), "--continue", "--steps", "1", "--data",
              str(_more(tmp_path / "again.jsonl", [300, 203]))]))
    assert check_store(store).ok
