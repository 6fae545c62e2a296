"""Crash safety: `lmclean record` killed mid-run (SIGKILL, Ctrl-C) leaves a readable, resumable store.

The recording runs in a subprocess (OMP_NUM_THREADS=1); the uninterrupted reference run and the
resume run in this process with torch limited to one thread too, so all three compute alike.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, one_thread, write_rows
from typer.testing import CliRunner

from lmclean import config as config_mod
from lmclean.cli.main import app
from lmclean.store.check import check_store
from lmclean.store.reader import TrajectoryStore
from lmclean.train.trainer import train

STEPS = 240  # a few seconds on one core: long enough to be killed mid-run


def _config(tmp: Path) -> Path:
    cfg = {"seed": 1, "model": {"config": TINY_MODEL}, "data": {"path": str(write_rows(tmp / "data.jsonl")), "max_length": 48},
           "train": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01, "lr": 0.05, "batch_size": 4, "steps": STEPS},
           "record": {"checkpoint_every": 20}}
    path = tmp / "crash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LMCLEAN_DEBUG", None)
    code = "import sys; from lmclean.cli.main import app; sys.argv[0] = 'lmclean'; app()"
    return subprocess.Popen([sys.executable, "-c", code, "record", str(cfg), "--store", str(store)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_commits(proc: subprocess.Popen, store: Path, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((store / "COMMIT.json").read_text())
        except (OSError, ValueError):
            state = {"committed_steps": 0, "closed": False}
        if state["closed"] or proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the recording ended before it could be interrupted (rc {proc.returncode}): {err[-2000:]}")
        if state["committed_steps"] >= at_least:
            return state["committed_steps"]
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no {at_least} committed steps within {timeout} s")


def _final_theta(store: Path) -> torch.Tensor:
    s = TrajectoryStore(store)
    return s.checkpoint(s.committed_steps)[0]


@pytest.mark.slow
def test_sigkill_mid_record_leaves_a_store_that_resume_completes_bitwise(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    store = tmp_path / "killed.zarr"
    proc = _start(cfg, store)
    seen = _wait_for_commits(proc, store, at_least=30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    s = TrajectoryStore(store)  # the store opens and shows only complete steps
    committed = s.committed_steps
    assert seen <= committed < STEPS and not s.closed
    assert s.checkpoint_steps == list(range(0, committed + 1, 20))[: len(s.checkpoint_steps)] and len(s.checkpoint_steps) >= 2
    s.step(committed - 1)
    s.theta_at(committed)  # θ at the last committed step is rebuildable
    report = check_store(store)  # every chunk on disk, rows past the commit included, passes its checksum
    assert report.ok, report.problems
    assert report.checkpoints_matched == s.checkpoint_steps[1:]
    runner = CliRunner()
    info = json.loads(runner.invoke(app, ["inspect-log", str(store), "--json"]).stdout)
    assert info["steps"]["committed"] == committed < info["steps"]["planned"] == STEPS and not info["steps"]["closed"]

    with one_thread():
        resumed = runner.invoke(app, ["record", str(cfg), "--store", str(store), "--resume", "--json"])
        assert resumed.exit_code == 0, resumed.output
        assert json.loads(resumed.stdout)["resumed_from"] == max(c for c in s.checkpoint_steps if c <= committed)
        reference = train(config_mod.load(cfg), tmp_path / "reference.zarr")

    done = TrajectoryStore(store)
    assert done.closed and done.committed_steps == STEPS and check_store(store, replay=False).ok
    assert torch.equal(_final_theta(store), _final_theta(reference.store))
    for t in (0, committed - 1, committed, STEPS - 1):  # rows before and after the crash point
        assert torch.equal(done.grad(t), TrajectoryStore(reference.store).grad(t))
    from safetensors.torch import load_file

    a, b = load_file(store / "model" / "model.safetensors"), load_file(reference.store / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_mid_record_exits_non_zero_and_leaves_a_readable_store(tmp_path: Path) -> None:
    store = tmp_path / "interrupted.zarr"
    proc = _start(_config(tmp_path), store)
    seen = _wait_for_commits(proc, store, at_least=20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    s = TrajectoryStore(store)
    assert seen <= s.committed_steps < STEPS and not s.closed
    s.step(s.committed_steps - 1)  # queued steps were flushed and committed, all readable
    for _, theta, _ in s.iter_states(s.checkpoint_steps[-1], s.committed_steps):
        pass
    assert torch.isfinite(theta).all()
