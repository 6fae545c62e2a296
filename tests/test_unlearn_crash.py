"""Kill `lmclean unlearn` at every boundary of its multi-step write (issue: audit and safety).

Each case runs the real CLI in a subprocess that dies (os._exit, no cleanup) at a named crash point,
(one of them inside the propagation sweep), and then checks: no partial model directory, an audit log that
verifies, no half-scrubbed chunk once the next writer has opened the store, and a store that still
unlearns.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import tiny_config, write_rows

from lmclean.audit import AuditLog, finish_pending_scrub, model_digest
from lmclean.store.scrub import tombstones
from lmclean.audit.publish import PENDING_UNLEARN, finish_pending_unlearn
from lmclean.train.trainer import train

pytestmark = pytest.mark.slow
FORGET = 105


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data = write_rows(tmp_path / "data.jsonl", n=16)
    path = tmp_path / "run.zarr"
    train(tiny_config(data, **{"train.epochs": 3}), path)
    return path


def _unlearn(store: Path, out: Path, crash_at: str | None = None, **popen) -> subprocess.Popen:  # noqa: ANN003
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCLEAN_TEST_THREADS": "1"}
    if crash_at:
        env["LMCLEAN_CRASH_AT"] = crash_at
    cmd = [sys.executable, "-m", "lmclean", "unlearn", str(store), "--forget", str(FORGET),
           "--method", "rollback", "--out", str(out)]  # the boundaries do not depend on the method
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _forgotten_rows(store: Path) -> int:
    """Token rows of the forget sample that are still non-zero, over every step."""
    root = zarr.open_group(str(store), mode="r")
    ids, tokens = np.asarray(root["steps/sample_ids"][:]), np.asarray(root["steps/tokens"][:])
    return int(sum(tokens[t, b].any() for t, b in zip(*np.nonzero(ids == FORGET))))


def _check_consistent(store: Path, out: Path) -> None:
    # The model directory is complete (weights + report) or absent; no temp dirs are left visible.
    if out.exists():
        assert (out / "model.safetensors").exists() and (out / "unlearn_report.json").exists()
    assert AuditLog(store).verify().ok


@pytest.mark.parametrize("point", ["unlearn:mid-sweep", "unlearn:after-compute", "save-model:before-rename",
                                   "unlearn:after-model", "unlearn:after-audit", "unlearn:after-publish",
                                   "scrub:after-chunk"])
def test_crash_at_each_boundary_leaves_a_consistent_store(store: Path, tmp_path: Path, point: str) -> None:
    out = tmp_path / "out"
    proc = _unlearn(store, out, crash_at=point)
    proc.wait(timeout=300)
    assert proc.returncode == 86, proc.stderr.read().decode()
    _check_consistent(store, out)
    audited = point in ("unlearn:after-audit", "unlearn:after-publish", "scrub:after-chunk")
    # the output appears only together with its audit record: before the record, never; after it,
    # the model is staged and the next writer moves it into place
    assert out.exists() == (point in ("unlearn:after-publish", "scrub:after-chunk"))
    assert bool(AuditLog(store).find(lambda r: r.get("kind") == "unlearn")) == audited
    # The next writer completes an interrupted publish and scrub (from the intent files or the log).
    finish_pending_unlearn(store)
    finish_pending_scrub(store)
    assert out.exists() == audited
    if audited:
        assert model_digest(out) == AuditLog(store).records()[-1]["output_model_digest"]
    assert not (store / PENDING_UNLEARN).exists()
    if audited:
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing staged left
    assert (_forgotten_rows(store) == 0) == audited
    assert (FORGET in tombstones(store)) == audited
    if not audited:  # nothing was promised: the request can simply be run again
        again = _unlearn(store, out)
        assert again.wait(timeout=300) == 0, again.stderr.read().decode()
        assert _forgotten_rows(store) == 0 and AuditLog(store).verify().ok
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # crashed saves cleaned up
