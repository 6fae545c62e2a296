"""`lmclean reconcile`: the store becomes exactly what retraining without every forgotten sample
records (bitwise, fp32 CPU: replay computes each gradient as the trainer does), across correction
events, and a crash at any point leaves the old store or the new one."""

from __future__ import annotations

import json
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
from lmclean.store.swap import intent_path
from lmclean.train.continue_run import continue_training
from lmclean.train.trainer import train
from lmclean.unlearn.reconcile import reconcile
from lmclean.unlearn.request import ForgetSpec
from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

ARRAYS = ("grad", "sample_ids", "weights", "tokens", "lengths", "loss", "lr", "grad_norm", "clip")


def _cfg(data: Path, epochs: int = 2):
    return tiny_config(data, **{"train.epochs": epochs, "train.schedule": "constant", "train.momentum": 0.9})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("reconcile")
    data = write_rows(tmp / "data.jsonl", n=16)
    train(_cfg(data), tmp / "run.zarr")
    return tmp / "run.zarr", data


@pytest.fixture(scope="module")
def excluded(recorded: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`record --exclude 103,110` of the same config: what reconcile must produce."""
    return train(_cfg(recorded[1]), tmp_path_factory.mktemp("ref") / "ref.zarr", exclude=[103, 110]).store


@pytest.fixture(scope="module")
def after_requests(recorded: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store after lmcleaner for 103, then rollback for 110 (current model: approximate, U2)."""
    tmp = tmp_path_factory.mktemp("requests")
    store = tmp / "run.zarr"
    shutil.copytree(recorded[0], store)
    unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp / "u1"))
    unlearn(store, ForgetSpec(ids="110"), UnlearnOptions(method="rollback"), OutputSpec(out=tmp / "u2"))
    return store


def _u2(after_requests: Path) -> Path:
    return after_requests.parent / "u2"  # the audit names it by absolute path: copies of the store share it


@pytest.fixture
def two_requests(after_requests: Path, tmp_path: Path) -> Path:
    """A private copy of `after_requests` (reconcile rewrites it; the unlearned outputs stay shared)."""
    store = tmp_path / "run.zarr"
    shutil.copytree(after_requests, store)
    return store


def assert_same_store(got: Path, want: Path) -> None:
    """Every step array, every checkpoint and the model, bitwise."""
    a, b = TrajectoryStore(got), TrajectoryStore(want)
    T = b.committed_steps
    assert a.closed and a.committed_steps == T and a.checkpoint_steps == b.checkpoint_steps
    assert a.corrections == [] and a.meta["excluded_ids"] == b.meta["excluded_ids"]
    for name in ARRAYS:
        assert a.rows(f"steps/{name}", T).tobytes() == b.rows(f"steps/{name}", T).tobytes(), name
    for c in b.checkpoint_steps:
        (ta, sa), (tb, sb) = a.checkpoint(c), b.checkpoint(c)
        assert torch.equal(ta, tb) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sb), c
    ma, mb = load_file(got / "model" / "model.safetensors"), load_file(want / "model" / "model.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in mb)


def assert_reconciled(store: Path, ref: Path) -> None:
    assert_same_store(store, ref)
    assert check_store(store).ok
    history = load_history(store)
    assert history.current is not None and history.current.kind == "reconcile"
    assert history.current_path == store / "model" and sorted(history.forgotten_ids) == [103, 110]
    report = verify_store(store, store / "model")
    assert report["ok"], report["problem"]
    assert [p.name for p in store.parent.iterdir() if p.name.startswith(f".{store.name}.")] == []


def test_reconcile_after_two_requests_equals_the_exclude_run(two_requests: Path, excluded: Path,
                                                             after_requests: Path) -> None:
    store = two_requests
    (store / "requests").mkdir()
    (store / "requests" / "r-x.json").write_text("{}\n")  # the queue is carried over
    log_before = (store / "audit.jsonl").read_text()
    report = reconcile(store)
    print("reconcile", {k: report[k] for k in ("residual_ratio", "steps_replayed", "seconds")})
    assert report["reconciled"] and report["forgotten_ids"] == [103, 110] and report["first_step"] == 0
    assert report["steps_replayed"] == report["cost_training_steps"] == 8 and report["gradients"] == 8
    assert report["replaced_model"] == str(_u2(after_requests))
    # rollback of two samples out of 16 leaves a real residual, well below doing nothing
    assert 0.05 < report["residual_ratio"] < 0.95
    assert_reconciled(store, excluded)
    assert (store / "audit.jsonl").read_text().startswith(log_before)  # the log is the old one, plus a record
    record = json.loads((store / "audit.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "reconcile" and record["reconcile"]["residual_ratio"] == report["residual_ratio"]
    assert record["output_path"] == str(store.absolute() / "model") and record["forget_ids"] == [103, 110]
    assert (store / "requests" / "r-x.json").is_file()
    assert sorted(TrajectoryStore(store).meta["excluded_ids"]) == [103, 110]
    again = reconcile(store)
    assert not again["reconciled"] and "nothing to reconcile" in again["note"]


def test_residual_ratio_of_an_exact_model_is_zero(recorded: tuple[Path, Path], excluded: Path, tmp_path: Path) -> None:
    """replay already gave exact retraining: the model reconcile replaces has residual 0."""
    store = tmp_path / "run.zarr"
    shutil.copytree(recorded[0], store)
    unlearn(store, ForgetSpec(ids="103,110"), UnlearnOptions(method="replay"), OutputSpec(out=tmp_path / "u"))
    report = reconcile(store)
    assert report["residual_ratio"] < 1e-6 and report["reference_norm"] > 1e-2
    assert_reconciled(store, excluded)


def test_reconcile_after_continue_across_a_correction(recorded: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "run.zarr"
    shutil.copytree(recorded[0], store)
    unlearn(store, ForgetSpec(ids="103"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp_path / "u1"))
    continue_training(store, epochs=1)
    unlearn(store, ForgetSpec(ids="110"), UnlearnOptions(method="lmcleaner"), OutputSpec(out=tmp_path / "u2"))
    assert [e.step for e in TrajectoryStore(store).corrections] == [8]
    report = reconcile(store)
    assert report["corrections_removed"] == 1 and report["steps"] == 12 and 0 < report["residual_ratio"] < 1
    ref = train(_cfg(recorded[1], 3), tmp_path / "ref.zarr", exclude=[103, 110]).store
    assert_reconciled(store, ref)
    # training on from the reconciled store is training on from the exclude run
    continue_training(store, steps=2)
    s = TrajectoryStore(store)
    assert s.committed_steps == 14 and s.corrections == [] and check_store(store).ok


CRASH_POINTS = ["reconcile:mid-replay", "reconcile:before-intent", "reconcile:after-intent", "reconcile:after-swap"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_leaves_the_old_or_the_new_store(point: str, two_requests: Path, excluded: Path,
                                               after_requests: Path) -> None:
    store = two_requests
    old_grads = TrajectoryStore(store).rows("steps/grad", 8).tobytes()
    env = {**os.environ, "LMCLEAN_CRASH_AT": point, "OMP_NUM_THREADS": "1"}
    code = ("import sys, torch; torch.set_num_threads(1); from lmclean.unlearn.reconcile import reconcile; "
            f"reconcile({str(store)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                          timeout=300)
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    committed = point not in ("reconcile:mid-replay", "reconcile:before-intent")
    assert intent_path(store).is_file() == committed
    if point == "reconcile:after-swap":  # exchanged: STORE is the new store, any command reads it
        assert_same_store(store, excluded)
        assert check_store(store).ok and verify_store(store, store / "model")["ok"]
        aside = [p for p in store.parent.iterdir() if p.name.startswith(f".{store.name}.reconcile-")]
        (aside[0] / "requests").mkdir(exist_ok=True)
        (aside[0] / "requests" / "late.json").write_text("{}\n")  # queued into the old store during the swap
    else:  # the old store, untouched and valid, with its approximate current model
        assert TrajectoryStore(store).rows("steps/grad", 8).tobytes() == old_grads
        assert check_store(store).ok
        assert verify_store(store, _u2(after_requests))["ok"]
    report = reconcile(store)  # finishes (or rolls back and redoes) what the crash interrupted
    assert report["reconciled"] == (not committed)
    assert (report["finished_interrupted"] is not None) == committed
    assert_reconciled(store, excluded)
    if point == "reconcile:after-swap":
        assert (store / "requests" / "late.json").is_file()


def test_a_store_written_after_the_commit_point_rolls_the_swap_back(two_requests: Path, recorded: tuple[Path, Path],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the intent, then an unlearning on the old store by a writer that does not finish
    swaps (lmclean's own commands do: see the next test): the next reconcile must not swap in a
    store whose log lacks that record."""
    from lmclean.store import swap

    store = two_requests
    monkeypatch.setattr(swap, "finish_pending_swap", lambda path: None)
    env = {**os.environ, "LMCLEAN_CRASH_AT": "reconcile:after-intent", "OMP_NUM_THREADS": "1"}
    code = ("import torch; torch.set_num_threads(1); from lmclean.unlearn.reconcile import reconcile; "
            f"reconcile({str(store)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                          timeout=300)
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    unlearn(store, ForgetSpec(ids="105"), UnlearnOptions(method="rollback"), OutputSpec(out=tmp_path / "u3"))
    monkeypatch.undo()
    report = reconcile(store)
    assert report["finished_interrupted"].endswith("rolled back an interrupted reconcile: the store was written to "
                                                   "since; reconcile it again")
    assert report["reconciled"] and report["forgotten_ids"] == [103, 105, 110]
    ref = train(_cfg(recorded[1]), tmp_path / "ref.zarr", exclude=[103, 105, 110]).store
    assert_same_store(store, ref)
    assert verify_store(store, store / "model")["ok"]


def test_an_unlearning_after_the_commit_point_finishes_the_swap_first(two_requests: Path, recorded: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    """A crash after the intent, then `unlearn`: it finishes the reconcile before taking the lock, so
    the request lands on the reconciled store and nothing is redone."""
    store = two_requests
    env = {**os.environ, "LMCLEAN_CRASH_AT": "reconcile:after-intent", "OMP_NUM_THREADS": "1"}
    code = ("import torch; torch.set_num_threads(1); from lmclean.unlearn.reconcile import reconcile; "
            f"reconcile({str(store)!r})")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent, capture_output=True,
                          timeout=300)
    assert proc.returncode == 86, proc.stderr.decode()[-2000:]
    assert intent_path(store).is_file()
    unlearn(store, ForgetSpec(ids="105"), UnlearnOptions(method="replay"), OutputSpec(out=tmp_path / "u3"))
    assert not intent_path(store).is_file()
    assert TrajectoryStore(store).meta["excluded_ids"] == [103, 110]  # the reconciled store took the request
    assert verify_store(store, tmp_path / "u3")["ok"]


def test_two_rename_fallback_is_finished_after_a_crash_between_the_renames(
        two_requests: Path, excluded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the file system cannot exchange two directories, the swap is two renames; a crash
    between them leaves no STORE until the next `lmclean reconcile` rolls the swap forward."""
    from lmclean.store import swap
    from lmclean.store.lock import LOCK_FILENAME

    class Crash(BaseException):
        pass

    def crash_at(name: str) -> None:
        if name == "reconcile:between-renames":
            raise Crash

    store = two_requests
    monkeypatch.setattr(swap, "_exchange", lambda a, b: False)
    monkeypatch.setattr(swap, "crash_point", crash_at)
    with pytest.raises(Crash):
        reconcile(store)
    assert not store.exists() and intent_path(store).is_file()
    new = swap.build_path(store)
    (new / LOCK_FILENAME).unlink()  # a real crash leaves a dead process's lock, which StoreLock clears
    old = store.with_name(f".{store.name}.old-{os.getpid()}")
    (old / "requests").mkdir(exist_ok=True)
    (old / "requests" / "late.json").write_text("{}\n")
    monkeypatch.setattr(swap, "crash_point", lambda name: None)
    report = reconcile(store)
    assert not report["reconciled"] and report["finished_interrupted"] is not None
    assert_reconciled(store, excluded)
    assert (store / "requests" / "late.json").is_file()


def test_cli_reconcile(two_requests: Path, excluded: Path) -> None:
    from typer.testing import CliRunner

    from conftest import error_line
    from lmclean.cli.main import app

    runner = CliRunner()
    done = runner.invoke(app, ["reconcile", str(two_requests), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["steps_replayed"] == 8
    assert_reconciled(two_requests, excluded)
    again = runner.invoke(app, ["reconcile", str(two_requests)])
    assert again.exit_code == 0 and "nothing to reconcile" in again.stderr
    assert "no lmclean store" in error_line(runner.invoke(app, ["reconcile", str(two_requests.parent / "none")]))


def test_adapter_store_keeps_its_base_and_equals_the_exclude_run(tmp_path: Path) -> None:
    """A LoRA store: the adapter is what is recorded and replayed; STORE/base (the frozen base with
    no directory of its own) is carried over, and the adapter output equals the exclude run's."""
    lora = {"model.lora": json.dumps({"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0})}
    data = write_rows(tmp_path / "data.jsonl", n=8)
    cfg = tiny_config(data, **{"train.schedule": "constant"}, **lora)
    store = train(cfg, tmp_path / "run.zarr").store
    assert (store / "base" / "config.json").is_file()
    unlearn(store, ForgetSpec(ids="102"), UnlearnOptions(method="rollback"), OutputSpec(out=tmp_path / "u"))
    report = reconcile(store)
    assert report["reconciled"] and (store / "base" / "config.json").is_file()
    ref = train(cfg, tmp_path / "ref.zarr", exclude=[102]).store
    a, b = TrajectoryStore(store), TrajectoryStore(ref)
    for name in ARRAYS:
        assert a.rows(f"steps/{name}", 4).tobytes() == b.rows(f"steps/{name}", 4).tobytes(), name
    ma = load_file(store / "model" / "adapter_model.safetensors")
    mb = load_file(ref / "model" / "adapter_model.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in mb)
    assert check_store(store).ok and verify_store(store, store / "model")["ok"]
