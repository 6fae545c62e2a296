"""What a new user meets first: `record --resume` needs only the store, saved models have the usual
file modes, and loading a model prints no Transformers progress bar."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_MODEL, error_line, write_rows
from lmclean.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A store recorded with --set overrides, an --exclude and a data path relative to its config,
    killed after training but before its final model was saved."""
    tmp = tmp_path_factory.mktemp("first-hour")
    write_rows(tmp / "data.jsonl")
    cfg = tmp / "run.yaml"
    cfg.write_text(yaml.safe_dump({"seed": 0, "model": {"config": TINY_MODEL}, "data": {"path": "data.jsonl", "max_length": 48},
                                   "train": {"optimizer": "sgd", "lr": 0.1, "batch_size": 4, "epochs": 1},
                                   "record": {"checkpoint_every": 2}}))
    store = tmp / "run.zarr"
    killed = subprocess.run([sys.executable, "-m", "lmclean", "record", str(cfg), "--store", str(store),
                             "--set", "train.lr=0.2", "--set", "train.momentum=0.5", "--exclude", "101"],
                            env={**os.environ, "LMCLEAN_CRASH_AT": "save-model:before-rename"}, capture_output=True, text=True)
    assert killed.returncode == 86, killed.stderr
    assert not (store / "model").exists()
    return cfg, store


def test_resume_takes_the_stores_config_without_repeating_it(interrupted: tuple[Path, Path]) -> None:
    _, store = interrupted
    line = error_line(runner.invoke(app, ["record", "--store", str(store), "--resume", "--set", "train.lr=0.3"]))
    assert "train.lr: 0.2 -> 0.3" in line  # an override on top of the store's config is still checked
    result = runner.invoke(app, ["record", "--store", str(store), "--resume", "--json"])  # no config, no --set
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["excluded"] == 1 and (store / "model" / "config.json").exists()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmclean.train.data import load_tokenizer
    from lmclean.train.model import fresh_model, save_model

    out = tmp_path_factory.mktemp("saved") / "model"
    tokenizer = load_tokenizer("byte")
    save_model(fresh_model(TINY_MODEL, len(tokenizer), 48, 0), tokenizer, out)
    return out


def test_saved_model_files_have_the_usual_mode(saved_model: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved_model.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_loading_a_model_prints_no_progress_bar(saved_model: Path) -> None:
    code = f"from lmclean.train.model import load_model; load_model({str(saved_model)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr == "", done.stderr
