"""`lmclean record`, `inspect-log` and `export` through the Typer app, including every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import error_line as _error_line, TINY_MODEL, write_rows
from typer.testing import CliRunner

from lmclean.cli.main import app
from lmclean.store.reader import TrajectoryStore

runner = CliRunner()


def _config(tmp: Path, data: Path, **train: object) -> Path:
    cfg = {"seed": 0, "model": {"config": TINY_MODEL},
           "data": {"path": str(data), "max_length": 48},
           "train": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.1, "batch_size": 4, "epochs": 2, **train},
           "record": {"checkpoint_every": 5}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    tmp = tmp_path_factory.mktemp("cli")
    data = write_rows(tmp / "data.jsonl")
    cfg = _config(tmp, data)
    store = tmp / "run.zarr"
    result = _invoke("record", cfg, "--store", store, "--set", "train.lr=0.2", "--set", "train.weight_decay=0.01", "--json")
    assert result.exit_code == 0, result.output
    return cfg, store, json.loads(result.stdout)


def test_record_writes_the_store_and_a_json_summary(recorded: tuple[Path, Path, dict]) -> None:
    _, store, summary = recorded
    assert summary["steps"] == 12 and summary["store"] == str(store) and summary["excluded"] == 0
    assert summary["grad_compression"] > 1 and summary["bytes_on_disk"] > 0
    s = TrajectoryStore(store)
    assert s.closed and s.committed_steps == 12
    assert s.meta["config"]["train"]["lr"] == 0.2 and s.meta["config"]["train"]["weight_decay"] == 0.01  # --set applied
    assert (store / "model" / "model.safetensors").exists() and (store / "model" / "tokenizer_config.json").exists()


def test_record_plain_output_shows_progress_and_summary(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "data.jsonl", n=8)
    result = _invoke("record", _config(tmp_path, data, epochs=1), "--store", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # messages and progress on stderr; stdout is for data
    assert "2/2" in result.stderr and "steps/s" in result.stderr
    assert "recorded 2 steps" in result.stderr and "Writing model shards" not in result.stderr


def test_inspect_log_plain_json_sample_and_step(recorded: tuple[Path, Path, dict]) -> None:
    _, store, _ = recorded
    s = TrajectoryStore(store)
    plain = _invoke("inspect-log", store)
    assert plain.exit_code == 0, plain.output
    for text in ["12 committed of 12 planned (complete)", f"{s.manifest.size:,} parameters", "sgd (momentum=0.9",
                 "checkpoints", "4 at steps 0, 5, 10, 12", "24 in data set, 24 seen", "bytes/param/step"]:
        assert text in plain.stdout, text
    sid = int(s.step(4).sample_ids[1])
    data = json.loads(_invoke("inspect-log", store, "--json", "--sample", sid, "--step", 4).stdout)
    assert data["steps"]["committed"] == 12 and data["model"]["parameters"] == s.manifest.size
    assert data["lr"]["max"] == pytest.approx(0.2) and data["checkpoints"] == [0, 5, 10, 12]
    assert {"step": 4, "position": 1} in data["sample"]["occurrences"]
    assert [(o["step"], o["position"]) for o in data["sample"]["occurrences"]] == s.sample_positions(sid)
    assert data["step"]["sample_ids"] == s.step(4).sample_ids.tolist()
    assert data["step"]["grad_norm"] == pytest.approx(float(s.grad(4).double().norm()), rel=1e-6)
    shown = _invoke("inspect-log", store, "--sample", sid, "--step", 4)
    assert f"sample {sid} (fingerprint" in shown.stdout and "seen 2 times" in shown.stdout
    assert "step 4: lr" in shown.stdout


@pytest.mark.parametrize("step", [7, None])
def test_export_writes_a_loadable_model_at_a_step(recorded: tuple[Path, Path, dict], tmp_path: Path, step: int | None) -> None:
    from transformers import AutoModelForCausalLM

    _, store, _ = recorded
    out = tmp_path / "exported"
    args = ["export", store, "--out", out] + (["--step", step] if step is not None else [])
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    s = TrajectoryStore(store)
    theta, _ = s.theta_at(12 if step is None else step)
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    for name, view in s.manifest.views(theta).items():
        assert torch.equal(params[name].detach(), view), name
    assert (out / "tokenizer_config.json").exists()


# -- bad input: exit 1, one line, nothing on disk changed -------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    line = _error_line(_invoke("record", tmp_path / "nope.yaml", "--store", tmp_path / "s.zarr"))
    assert "nope.yaml does not exist" in line
    assert not (tmp_path / "s.zarr").exists()


def test_malformed_config_key_names_key_and_allowed_values(tmp_path: Path) -> None:
    cfg = _config(tmp_path, write_rows(tmp_path / "d.jsonl"))
    line = _error_line(_invoke("record", cfg, "--store", tmp_path / "s.zarr", "--set", "train.optimizer=adam"))
    assert "train.optimizer" in line and "['sgd', 'adamw']" in line
    line = _error_line(_invoke("record", cfg, "--store", tmp_path / "s.zarr", "--set", "train.bogus=1"))
    assert "unknown config key `train.bogus`" in line
    assert not (tmp_path / "s.zarr").exists()


def test_data_row_without_template_field_names_file_and_line(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", n=5)
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"id": 999, "question": "q?"})
    data.write_text("\n".join(lines) + "\n")
    line = _error_line(_invoke("record", _config(tmp_path, data), "--store", tmp_path / "s.zarr"))
    assert f"{data}:4:" in line and "['answer']" in line
    assert not (tmp_path / "s.zarr").exists()


def test_duplicate_ids(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", n=5)
    data.write_text(data.read_text() + data.read_text().splitlines()[1] + "\n")
    line = _error_line(_invoke("record", _config(tmp_path, data), "--store", tmp_path / "s.zarr"))
    assert "duplicate sample id 101 (first on line 2)" in line and f"{data}:6:" in line
    assert not (tmp_path / "s.zarr").exists()


def test_existing_store_without_resume_or_overwrite_is_untouched(recorded: tuple[Path, Path, dict]) -> None:
    cfg, store, _ = recorded
    before = _snapshot(store)
    line = _error_line(_invoke("record", cfg, "--store", store))
    assert "already exists" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(store) == before


def test_resume_with_a_different_config_shows_the_difference(recorded: tuple[Path, Path, dict]) -> None:
    cfg, store, _ = recorded
    before = _snapshot(store)
    line = _error_line(_invoke("record", cfg, "--store", store, "--resume", "--set", "train.lr=0.3",
                               "--set", "train.weight_decay=0.01"))
    assert "--resume config differs" in line and "train.lr: 0.2 -> 0.3" in line
    assert _snapshot(store) == before
    line = _error_line(_invoke("record", cfg, "--store", store, "--resume", "--overwrite"))
    assert "exclude each other" in line
    assert _snapshot(store) == before


def test_resume_of_a_complete_store_is_refused(recorded: tuple[Path, Path, dict]) -> None:
    cfg, store, _ = recorded
    before = _snapshot(store)
    line = _error_line(_invoke("record", cfg, "--store", store, "--resume", "--set", "train.lr=0.2",
                               "--set", "train.weight_decay=0.01"))
    assert "already complete (12 steps)" in line
    assert _snapshot(store) == before


def test_unknown_exclude_id_and_bad_spec(tmp_path: Path) -> None:
    cfg = _config(tmp_path, write_rows(tmp_path / "d.jsonl"))
    line = _error_line(_invoke("record", cfg, "--store", tmp_path / "s.zarr", "--exclude", "101,5000-5001"))
    assert "--exclude names sample id 5000" in line and "2 unknown ids" in line
    line = _error_line(_invoke("record", cfg, "--store", tmp_path / "s.zarr", "--exclude", "3-x"))
    assert "ranges like 60-79" in line
    assert not (tmp_path / "s.zarr").exists()


def test_store_commands_on_a_missing_store(tmp_path: Path) -> None:
    line = _error_line(_invoke("inspect-log", tmp_path / "none.zarr"))
    assert f"no lmclean store at {tmp_path / 'none.zarr'}" in line
    line = _error_line(_invoke("export", tmp_path / "none.zarr", "--out", tmp_path / "out"))
    assert "no lmclean store" in line and not (tmp_path / "out").exists()


def test_bad_step_and_sample_arguments(recorded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, store, _ = recorded
    assert "step 12 is not recorded" in _error_line(_invoke("inspect-log", store, "--step", 12))
    assert "sample id 7 is not in store" in _error_line(_invoke("inspect-log", store, "--sample", 7))
    line = _error_line(_invoke("export", store, "--out", tmp_path / "o", "--step", 13))
    assert "--step 13 is not a recorded step" in line and "0..12" in line and not (tmp_path / "o").exists()


def test_export_refuses_to_replace_an_existing_directory(recorded: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, store, _ = recorded
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    line = _error_line(_invoke("export", store, "--out", out))
    assert f"{out} already exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _invoke("export", store, "--out", out, "--overwrite").exit_code == 0
    assert (out / "model.safetensors").exists() and not (out / "notes.txt").exists()


def test_os_errors_are_one_line(tmp_path: Path) -> None:
    cfg = _config(tmp_path, write_rows(tmp_path / "d.jsonl"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _error_line(_invoke("record", cfg, "--store", blocker / "s.zarr"))  # parent is a file
    assert str(blocker) in line
    assert blocker.read_text() == "x"


def test_saved_model_directory_has_the_usual_permissions(recorded: tuple[Path, Path, dict]) -> None:
    import os

    _, store, _ = recorded
    umask = os.umask(0)
    os.umask(umask)
    assert (store / "model").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
