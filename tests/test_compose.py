"""Sequential requests compose (issue 10 §1): each unlearning starts from the store's current model.

Forget A, then B: the second output must carry A's correction too. With `--curvature-batch full` and
the data kept (`--keep-data`: A's tokens stay, so every later curvature product sees the same batches)
lmcleaner's sequential result equals forgetting A ∪ B in one sweep to float rounding (superposition);
replay composes by re-running without A ∪ B, i.e. exactly what `record --exclude A,B` records.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import error_line, tiny_config, write_rows
from typer.testing import CliRunner

from lmclean.audit import AuditLog, model_digest
from lmclean.audit.history import load_history
from lmclean.cli.main import app
from lmclean.store.reader import TrajectoryStore
from lmclean.params import flat_params
from lmclean.train.model import load_model
from lmclean.train.trainer import train

pytestmark = pytest.mark.slow
A, B = 103, 110


@pytest.fixture
def recorded(recorded_store: Path) -> Path:
    return recorded_store


@pytest.fixture
def store(store_copy: Path) -> Path:
    return store_copy


def _run(*args: str) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _theta(path: Path, store: Path) -> torch.Tensor:
    return flat_params(load_model(path), TrajectoryStore(store).manifest).double()


def _unlearn(store: Path, out: Path, ids: str, *extra: str) -> None:
    result = _run("unlearn", store, "--forget", ids, "--out", out, *extra)
    assert result.exit_code == 0, result.output


def test_second_request_starts_from_the_first_output(recorded: Path, store: Path, tmp_path: Path) -> None:
    opts = ("--method", "lmcleaner", "--curvature-batch", "full", "--keep-data")
    _unlearn(store, tmp_path / "u1", str(A), *opts)
    _unlearn(store, tmp_path / "u2", str(B), *opts)
    both = tmp_path / "both.zarr"
    shutil.copytree(recorded, both)  # the same recorded run, no unlearning yet
    _unlearn(both, tmp_path / "u12", f"{A},{B}", *opts)
    alone = tmp_path / "alone.zarr"
    shutil.copytree(recorded, alone)
    _unlearn(alone, tmp_path / "b-alone", str(B), *opts)
    theta0 = _theta(store / "model", store)
    u2, u12 = _theta(tmp_path / "u2", store), _theta(tmp_path / "u12", store)
    b_alone = _theta(tmp_path / "b-alone", store)
    # superposition: sequential == joint to float32 rounding; "B alone" (A's influence back) is far off
    size = torch.linalg.vector_norm(u12 - theta0)
    assert torch.linalg.vector_norm(u2 - u12) <= 1e-4 * size
    assert torch.linalg.vector_norm(b_alone - u12) >= 0.1 * size
    history = load_history(store)
    assert [link.kind for link in history.chain] == ["record", "unlearn", "unlearn"]
    assert history.current_path == tmp_path / "u2"
    assert history.chain[-1].output_digest == model_digest(tmp_path / "u2")


def test_replay_composes_by_excluding_everything_forgotten(store: Path, tmp_path: Path) -> None:
    _unlearn(store, tmp_path / "u1", str(A), "--method", "rollback")
    _unlearn(store, tmp_path / "u2", str(B), "--method", "replay")
    reference = tmp_path / "ref.zarr"
    train(tiny_config(write_rows(tmp_path / "data.jsonl", n=16), **{"train.epochs": 3}), reference, exclude=[A, B])
    u2, ref = _theta(tmp_path / "u2", store), _theta(reference / "model", store)
    assert torch.linalg.vector_norm(u2 - ref) <= 1e-5 * torch.linalg.vector_norm(ref)
    report = (tmp_path / "u2" / "unlearn_report.json").read_text()
    assert f'"also_excluded_ids": [\n  {A}\n ]' in report


def test_verify_names_a_missing_request(store: Path, tmp_path: Path) -> None:
    _unlearn(store, tmp_path / "u1", str(A), "--method", "rollback")
    _unlearn(store, tmp_path / "u2", str(B), "--method", "rollback", "--request-id", "req-B")
    assert _run("audit", "verify", store, "--model", tmp_path / "u2").exit_code == 0
    line = error_line(_run("audit", "verify", store, "--model", tmp_path / "u1"))
    assert "req-B" in line
    line = error_line(_run("audit", "verify", store, "--model", store / "model"))
    assert "does not include" in line
    stranger = tmp_path / "stranger"
    shutil.copytree(tmp_path / "u2", stranger)
    (stranger / "model.safetensors").write_bytes((tmp_path / "u1" / "model.safetensors").read_bytes()[:-4] + b"abcd")
    assert "no record" in error_line(_run("audit", "verify", store, "--model", stranger))


def test_current_model_missing_or_changed_is_an_error(store: Path, tmp_path: Path) -> None:
    _unlearn(store, tmp_path / "u1", str(A), "--method", "rollback")
    shutil.move(tmp_path / "u1", tmp_path / "moved")
    line = error_line(_run("unlearn", store, "--forget", str(B), "--method", "rollback", "--out", tmp_path / "u2"))
    assert "current model" in line and "--base" in line and not (tmp_path / "u2").exists()
    # the same weights elsewhere are the current model: accepted as --base
    _unlearn(store, tmp_path / "u2", str(B), "--method", "rollback", "--base", str(tmp_path / "moved"))


def test_base_outside_the_chain_needs_base_unrelated(store: Path, tmp_path: Path) -> None:
    _unlearn(store, tmp_path / "u1", str(A), "--method", "rollback")
    # the recorded model is in the chain but lacks request A
    line = error_line(_run("unlearn", store, "--forget", str(B), "--method", "rollback", "--base", store / "model",
                           "--out", tmp_path / "u2"))
    assert "does not include" in line and "--base-unrelated" in line
    _unlearn(store, tmp_path / "u2", str(B), "--method", "rollback", "--base", str(store / "model"), "--base-unrelated")
    assert AuditLog(store).records()[-1]["base_unrelated"] is True


def test_keep_data_request_cannot_be_repeated(store: Path, tmp_path: Path) -> None:
    _unlearn(store, tmp_path / "u1", str(A), "--method", "rollback", "--keep-data")
    line = error_line(_run("unlearn", store, "--forget", str(A), "--method", "rollback", "--out", tmp_path / "u2"))
    assert "already unlearned by audit record 1" in line
    assert not (tmp_path / "u2").exists()
