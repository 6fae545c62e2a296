"""`lmclean unlearn` through the Typer app: outputs, report, audit, scrub, refusals, bad input."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line as _error_line, tiny_config, write_rows
from typer.testing import CliRunner

from lmclean.audit import AuditLog
from lmclean.store.lock import StoreLock
from lmclean.store.scrub import tombstones
from lmclean.cli.main import app
from lmclean.errors import DivergenceError
from lmclean.store import TrajectoryStore
from lmclean.params import flat_params
from lmclean.train.model import load_model
from lmclean.train.trainer import train
from lmclean.unlearn import ForgetSet, OperatorSettings, PropagationSettings, propagate
from lmclean.unlearn.service import open_trajectory

runner = CliRunner()


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "tokens" not in p.parts and p.name not in ("audit.jsonl", ".lmclean.lock")}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    data = write_rows(tmp_path / "data.jsonl", n=16)
    path = tmp_path / "run.zarr"
    train(tiny_config(data, **{"train.momentum": 0.9, "train.weight_decay": 0.01}), path)
    return path


def test_each_method_writes_a_loadable_model_and_report_without_touching_the_store(store: Path, tmp_path: Path) -> None:
    before = _snapshot(store)
    recorded = TrajectoryStore(store).checkpoint(TrajectoryStore(store).committed_steps)[0]
    theta = recorded  # each request starts from the previous one's output (they compose)
    for i, method in enumerate(["rollback", "lmcleaner", "replay"]):
        out = tmp_path / f"out-{method}"
        r = _invoke("unlearn", store, "--forget", f"{101 + i}", "--method", method, "--out", out, "--json", "--keep-data")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert report["method"] == method and report["output"] == str(out) and report["steps_touched"]
        assert json.loads((out / "unlearn_report.json").read_text())["method"] == method
        if method == "lmcleaner":  # every sweep setting is in the report
            assert report["propagation"]["operator"] == dataclasses.asdict(OperatorSettings(hvp="ggn"))
            assert report["propagation"]["tail"] == "carry" and report["propagation"]["stabilize"] is True
        model = load_model(out)
        new = flat_params(model, TrajectoryStore(store).manifest)
        assert torch.isfinite(new).all() and not torch.equal(new, theta)
        start = recorded if method == "replay" else theta  # replay re-runs from the recorded trajectory
        torch.testing.assert_close(torch.linalg.vector_norm(new - start).item(), report["delta_norm"], rtol=1e-4, atol=1e-6)
        theta = new
    assert _snapshot(store) == before  # recorded data and model never modified
    assert not list(tmp_path.glob(".out-*partial*"))  # no temp dirs left


def test_unlearn_is_audited_scrubs_by_default_and_refuses_to_repeat(store: Path, tmp_path: Path) -> None:
    r = _invoke("unlearn", store, "--forget", "103", "--method", "rollback", "--out", tmp_path / "o1",
                "--reason", "test deletion", "--requested-by", "qa", "--request-id", "req-1")
    assert r.exit_code == 0, r.output
    rec = AuditLog(store).records()[-1]
    assert rec["kind"] == "unlearn" and rec["request_id"] == "req-1" and rec["reason"] == "test deletion"
    assert rec["forget_ids"] == [103] and len(rec["forget_fingerprints"]) == 1 and rec["keep_data"] is False
    assert tombstones(store) == {103: rec["seq"]}
    again = _error_line(_invoke("unlearn", store, "--forget", "103", "--out", tmp_path / "o2"))
    assert f"audit record {rec['seq']}" in again and "req-1" in again
    assert not (tmp_path / "o2").exists()
    verify = _invoke("audit", "verify", store, "--model", tmp_path / "o1")
    assert verify.exit_code == 0, verify.output


def test_forget_data_matches_rows_by_fingerprint(store: Path, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (store.parent / "data.jsonl").read_text().splitlines()]
    (tmp_path / "f.jsonl").write_text(json.dumps(rows[5]) + "\n")
    r = _invoke("unlearn", store, "--forget-data", tmp_path / "f.jsonl", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sample_ids"] == [rows[5]["id"]]
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "never seen?", "answer": "no"}) + "\n")
    line = _error_line(_invoke("unlearn", store, "--forget-data", tmp_path / "g.jsonl"))
    assert "g.jsonl:1" in line and "matches no recorded sample" in line


def test_batch_level_and_steps(store: Path, tmp_path: Path) -> None:
    r = _invoke("unlearn", store, "--steps", "1,3", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["level"] == "batch" and plan["steps"] == [1, 3] and plan["collateral_samples"] == 8
    r = _invoke("unlearn", store, "--forget", "104", "--level", "batch", "--out", tmp_path / "b", "--json", "--keep-data")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["level"] == "batch"


def test_dry_run_writes_nothing(store: Path, tmp_path: Path) -> None:
    r = _invoke("unlearn", store, "--forget", "101", "--dry-run", "--json", "--out", tmp_path / "x")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["curvature_products_needed"] > 0 and plan["estimated_seconds"] >= 0
    assert not (tmp_path / "x").exists() and not AuditLog(store).find(lambda rec: rec.get("kind") == "unlearn")


@pytest.mark.parametrize("args, needle", [
    (["--forget", "9999"], "sample id 9999 is not in store"),
    (["--forget", "abc"], "cannot read ids"),
    ([], "nothing to forget"),
    (["--forget", "101", "--hvp", "newton"], "'newton' is not one of 'ggn', 'exact', 'krylov', 'kfac', 'ekfac', 'ekfac-rq', 'diag', 'lowrank', 'fisher'"),
    (["--forget", "101", "--method", "magic"], "'magic' is not one of 'lmcleaner', 'rollback', 'replay'"),
    (["--steps", "999"], "is not a recorded step"),
    (["--forget", "101", "--hvp", "lowrank", "--anchor-fraction", "0"], "'--anchor-fraction': 0 is not in (0, 1]"),
])
def test_bad_input_is_one_line(store: Path, args: list[str], needle: str) -> None:
    assert needle in _error_line(_invoke("unlearn", store, *args))


def test_missing_store_and_lock(store: Path, tmp_path: Path) -> None:
    assert "no lmclean store" in _error_line(_invoke("unlearn", tmp_path / "nope.zarr", "--forget", "1"))
    with StoreLock(store, "another unlearn"):
        line = _error_line(_invoke("unlearn", store, "--forget", "101", "--out", tmp_path / "o"))
    assert "locked by pid" in line and not (tmp_path / "o").exists()


def test_adamw_store_unlearns_at_sample_level_and_refuses_batch_level(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "data.jsonl", n=8)
    train(tiny_config(data, **{"train.optimizer": "adamw", "train.lr": 0.01}), tmp_path / "a.zarr")
    line = _error_line(_invoke("unlearn", tmp_path / "a.zarr", "--forget", "101", "--level", "batch"))
    assert "adamw" in line and "--method replay" in line
    lm = _invoke("unlearn", tmp_path / "a.zarr", "--forget", "101", "--out", tmp_path / "l", "--keep-data", "--json")
    assert lm.exit_code == 0, lm.output
    report = json.loads((tmp_path / "l" / "unlearn_report.json").read_text())
    assert report["method"] == "lmcleaner" and report["curvature_products"] > 0
    ok = _invoke("unlearn", tmp_path / "a.zarr", "--forget", "102", "--method", "replay", "--out", tmp_path / "r", "--keep-data")
    assert ok.exit_code == 0, ok.output


def test_divergence_guard_names_the_step(store: Path) -> None:
    """Negative damping makes (I − η(H + μI)) expand by (1 − ημ) per step: the guard must stop it."""
    traj = open_trajectory(TrajectoryStore(store))
    forget = ForgetSet(steps={0})  # seven steps of propagation follow
    bad = PropagationSettings(K=800, damping=-1000.0, operator=OperatorSettings(hvp="ggn"))
    with pytest.raises(DivergenceError, match=r"diverged at step \d+"):
        propagate(traj, forget, bad)
    bad.on_divergence = "damp"  # retry with more damping instead of stopping
    res = propagate(traj, forget, bad)
    assert torch.isfinite(res.delta).all() and res.divergence.startswith("recovered")


def test_divergence_guard_holds_where_every_step_is_a_yardstick() -> None:
    """AdamW: every step up to the last affected one raises the post-injection yardstick, so a
    correction that grows at each of those steps never exceeds 50× it; the guard against 50× ‖θ‖
    still stops it (a correction 50 times the whole model is no answer), naming that bound."""
    from lmclean.optim import AdamWRule
    from lmclean.unlearn import InMemoryTrajectory

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)
    batches = [[i, (i + 1) % 12, (i + 5) % 12] for i in range(12)]  # sample 0 in the first and the last steps
    model = torch.nn.Linear(3, 2).double()
    run = InMemoryTrajectory(model, X, Y, batches, [0.05] * 12, AdamWRule(), 0.1 * torch.randn(8, generator=g, dtype=torch.float64))
    assert max(run.occurrences({0})) == len(batches) - 1
    bad = PropagationSettings(K=800, damping=-1e4, operator=OperatorSettings(hvp="ggn"))
    with pytest.raises(DivergenceError, match=r"diverged at step \d+: .* over 50× the parameters' own norm"):
        propagate(run, ForgetSet(sample_ids={0}), bad)
    fine = propagate(run, ForgetSet(sample_ids={0}), PropagationSettings(K=800, operator=OperatorSettings(hvp="ggn")))
    assert torch.isfinite(fine.delta).all() and float(fine.delta.norm()) > 0
