"""Never destroy a user's files (issue 10 §2): outputs are refused before any work, the store is
locked before `record --overwrite` touches it, and Ctrl-C says what is true."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import error_line, tiny_config, write_rows
from typer.testing import CliRunner

from lmclean.audit import AuditLog
from lmclean.store.lock import read_lock
from lmclean.cli.main import app
from lmclean.train import recorder
from lmclean.train.trainer import train

FORGET = 103


@pytest.fixture
def store(store_copy: Path) -> Path:
    return store_copy


def _run(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _unlearn_to(store: Path, out: Path, *extra: object) -> object:
    return _run("unlearn", store, "--forget", FORGET, "--method", "rollback", "--out", out, *extra)


def test_unlearn_refuses_an_existing_output(store: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert "--overwrite" in error_line(_unlearn_to(store, mine))
    assert (mine / "notes.txt").read_text() == "precious"
    assert len(AuditLog(store).records()) == 1  # refused before any work: no record
    result = _unlearn_to(store, mine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (mine / "model.safetensors").exists() and not (mine / "notes.txt").exists()


@pytest.mark.parametrize("where", ["store", "store/model", "store/sub", "parent"])
def test_unlearn_never_writes_into_or_over_a_store(store: Path, where: str) -> None:
    target = {"store": store, "store/model": store / "model", "store/sub": store / "sub", "parent": store.parent}[where]
    before = _snapshot(store)
    for extra in ((), ("--overwrite",)):
        line = error_line(_unlearn_to(store, target, *extra))
        assert "store" in line
    assert _snapshot(store) == before


def test_export_and_eval_follow_the_same_rule(store: Path, tmp_path: Path) -> None:
    before = _snapshot(store)
    assert "store" in error_line(_run("export", store, "--out", store / "model"))
    assert "store" in error_line(_run("export", store, "--out", store.parent, "--overwrite"))
    report = tmp_path / "report.json"
    report.write_text("{}")
    data = tmp_path / "data.jsonl"
    assert "--overwrite" in error_line(_run("eval", store / "model", "--data", data, "--forget", FORGET, "--out", report))
    assert report.read_text() == "{}"
    assert "store" in error_line(_run("eval", store / "model", "--data", data, "--forget", FORGET,
                                      "--out", store / "report.json"))
    assert _snapshot(store) == before


def test_record_overwrite_locks_the_store_before_deleting(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holders: list[dict | None] = []
    real = shutil.rmtree

    def watched(path: object, *args: object, **kwargs: object) -> None:
        holders.append(read_lock(store))
        real(path, *args, **kwargs)

    monkeypatch.setattr(recorder.shutil, "rmtree", watched)
    train(tiny_config(write_rows(tmp_path / "data.jsonl", n=12)), store, overwrite=True)
    assert holders and all(h is not None and h.get("purpose") == "record --overwrite" for h in holders)
    assert read_lock(store) is None  # released at the end


def test_ctrl_c_during_unlearn_says_nothing_was_written(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmclean.unlearn import service

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(service, "run_method", interrupted)
    result = _unlearn_to(store, tmp_path / "out")
    assert result.exit_code == 130
    assert "nothing was written and the store is unchanged" in result.stderr
    assert "committed work is kept" not in result.stderr
    assert not (tmp_path / "out").exists() and len(AuditLog(store).records()) == 1
    assert json.loads(json.dumps(read_lock(store))) is None
