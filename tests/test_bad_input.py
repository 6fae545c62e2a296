"""Every bad input is one `error:` line on stderr, exit code 1, no traceback, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_rows
from typer.testing import CliRunner

from lmclean.cli.main import app

runner = CliRunner()
HUGE = str(2**70)
MAX_LENGTH = 66  # cuts some of write_rows' samples, not all


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_error(result) -> str:  # noqa: ANN001 - a typer.testing Result
    """The single `error:` line of a failed command; exit 1 and no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lmclean.lock"}


def record_args(data: Path, store: Path, *extra: str) -> list[str]:
    sets = [x for kv in tiny_overrides(data, **{"data.max_length": MAX_LENGTH}) for x in ("--set", kv)]
    return ["record", "--store", str(store), *sets, *extra]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("bad_input")
    res = invoke(*record_args(write_rows(root / "data.jsonl"), root / "run.zarr", "--json"))
    assert res.exit_code == 0, res.output
    return root / "run.zarr", json.loads(res.stdout)


@pytest.fixture
def work(recorded: tuple[Path, dict], tmp_path: Path):
    """(store, scratch dir); afterwards, asserts that neither changed on disk."""
    store, _ = recorded
    before_store, before_tmp = files(store), set(tmp_path.iterdir())
    yield store, tmp_path
    assert files(store) == before_store
    assert set(tmp_path.iterdir()) == before_tmp


# -- data files and id specs ---------------------------------------------------------------------


def _bad_bytes(path: Path) -> Path:
    write_rows(path, n=4)
    with path.open("ab") as f:
        f.write(b'{"id": 9, "question": "caf\xe9?", "answer": "x"}\n')
    return path


def test_record_non_utf8_row(tmp_path: Path) -> None:
    data = _bad_bytes(tmp_path / "d.jsonl")
    line = one_error(invoke(*record_args(data, tmp_path / "s.zarr")))
    assert line == f"error: {data}:5: not UTF-8 (byte 0xe9 at column 27); save the file as UTF-8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_record_huge_id_in_data_file(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": 2**70, "question": "q", "answer": "a"}) + "\n")
    line = one_error(invoke(*record_args(data, tmp_path / "s.zarr")))
    assert f"{data}:1: id {HUGE} is too large" in line and "int64" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_record_huge_exclude_id(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "d.jsonl", n=4)
    line = one_error(invoke(*record_args(data, tmp_path / "s.zarr", "--exclude", f"1,{HUGE}")))
    assert f"id {HUGE} in '1,{HUGE}' is too large" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_unlearn_huge_forget_id_and_huge_range(work) -> None:
    store, tmp = work
    assert "is too large" in one_error(invoke("unlearn", store, "--forget", HUGE, "--out", tmp / "o"))
    assert "more than 1,000,000 ids" in one_error(invoke("unlearn", store, "--forget", "0-999999999999", "--out", tmp / "o"))


def test_eval_non_utf8_row_and_huge_forget_id(work) -> None:
    store, tmp = work
    data = _bad_bytes(tmp / "d.jsonl")
    line = one_error(invoke("eval", store / "model", "--data", data, "--forget", "100", "--device", "cpu"))
    assert line.startswith(f"error: {data}:5: not UTF-8")
    line = one_error(invoke("eval", store / "model", "--data", data, "--forget", HUGE, "--device", "cpu"))
    assert "is too large" in line
    data.unlink()


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("seed: 0\ntrain:\n  lr: [0.1\n  batch_size: 4\n")
    line = one_error(invoke("record", cfg, "--store", tmp_path / "s.zarr"))
    assert line.startswith(f"error: config file {cfg} is not valid YAML: line 4, column 13: ")
    assert "line 3, column 7" in line  # where the unclosed list started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# -- a full disk while writing a model -----------------------------------------------------------


def test_full_disk_while_writing_a_model(work, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import SafetensorError
    from transformers import modeling_utils

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull,\n'
                              'message: "No space left on device" })')

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    store, tmp = work
    line = one_error(invoke("export", store, "--out", tmp / "m"))
    assert line.startswith(f"error: could not write the model to {tmp / 'm'}: Error while serializing: ")
    assert "No space left on device" in line and "free disk space" in line


# -- option values and combinations: refused at parse time, before any work ---------------------

BAD_OPTIONS = [
    (["--damping", "-1"], "'--damping'"),
    (["--curvature-batch", "fulll"], "'fulll' is not one of 'retained', 'full'"),
    (["--on-divergence", "dmap"], "'dmap' is not one of 'stop', 'damp'"),
    (["--hvp", "lowrank", "--refresh", "0"], "'--refresh'"),
    (["--hvp", "lowrank", "--rank", "0"], "'--rank'"),
    (["--K", "-1"], "'--K'"),
    (["--method", "replay", "--fraction", "0"], "'--fraction': 0 is not in (0, 1]"),
    (["--method", "replay", "--fraction", "1.5"], "'--fraction': 1.5 is not in (0, 1]"),
    (["--curvature-fraction", "0"], "'--curvature-fraction': 0 is not in (0, 1]"),
    (["--noise", "-1"], "'--noise'"),
    (["--level", "x"], "'x' is not one of 'sample', 'batch'"),
    (["--method", "x"], "'x' is not one of 'lmcleaner', 'rollback', 'replay'"),
    (["--hvp", "x"], "'x' is not one of 'ggn', 'exact', 'krylov', 'kfac', 'ekfac', 'ekfac-rq', 'diag', 'lowrank', 'fisher'"),
    (["--tail", "x"], "'x' is not one of 'carry', 'krylov', 'ekfac', 'kfac', 'lowrank', 'diag'"),
    (["--seed", "-1"], "'--seed'"),
    # combinations that cannot work
    (["--fraction", "0.5"], "--fraction is used only with --method replay, not with --method lmcleaner"),
    (["--method", "rollback", "--fraction", "0.5"], "--fraction is used only with --method replay"),
    (["--method", "replay", "--tail", "lowrank"], "--tail is used only with --method lmcleaner, not with --method replay"),
    (["--method", "rollback", "--hvp", "ggn"], "--hvp is used only with --method lmcleaner, not with --method rollback"),
    (["--method", "replay", "--damping", "0.1"], "--damping is used only with --method lmcleaner"),
    (["--method", "rollback", "--K", "5"], "--K is used only with --method lmcleaner or replay"),
    (["--rank", "4"], "--rank is used only with --hvp lowrank or --tail lowrank, not with --hvp ggn --tail carry"),
    (["--hvp", "exact", "--refresh", "5"], "--refresh is used only with --hvp/--tail krylov, lowrank, diag, kfac, ekfac or ekfac-rq"),
    (["--hvp", "lowrank", "--curvature-fraction", "0.5"], "--curvature-fraction is used only with --hvp ggn or exact"),
    (["--hvp", "lowrank", "--rank", "10000000"], "--rank 10000000 exceeds the model's"),
]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize(("args", "needle"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_unlearn_option_refused_before_work(work, args: list[str], needle: str, dry_run: bool) -> None:
    store, tmp = work
    extra = ["--dry-run"] if dry_run else []
    line = one_error(invoke("unlearn", store, "--forget", "101", "--out", tmp / "o", *args, *extra))
    assert needle in line


@pytest.mark.parametrize(("command", "needle"), [
    (["inspect-log", "{store}", "--step", "-1"], "'--step'"),
    (["inspect-log", "{store}", "--sample", "-5"], "'--sample'"),
    (["export", "{store}", "--out", "{tmp}/o", "--step", "-1"], "'--step'"),
    (["eval", "{store}/model", "--data", "x.jsonl", "--forget", "1", "--device", "gpu"], "'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    (["eval", "{store}/model", "--data", "x.jsonl", "--forget", "1", "--batch-size", "0"], "'--batch-size'"),
    (["unlearn"], "Missing argument"),
])
def test_other_commands_refuse_bad_values(work, command: list[str], needle: str) -> None:
    store, tmp = work
    line = one_error(invoke(*(c.format(store=store, tmp=tmp) for c in command)))
    assert needle in line


# -- samples cut to max_length are counted -------------------------------------------------------


def test_truncated_samples_are_counted_and_kept(recorded: tuple[Path, dict], tmp_path: Path) -> None:
    from lmclean.store.reader import TrajectoryStore
    from lmclean.train.data import load_tokenizer

    store, summary = recorded
    tok = load_tokenizer("byte")
    rows = [json.loads(line) for line in (store.parent / "data.jsonl").read_text().splitlines()]
    expected = sum(len(tok(f"Q: {r['question']}\nA: {r['answer']}")["input_ids"]) > MAX_LENGTH for r in rows)
    assert 0 < expected < len(rows)
    assert (summary["truncated_samples"], summary["samples"], summary["max_length"]) == (expected, len(rows), MAX_LENGTH)
    assert TrajectoryStore(store).meta["truncated_samples"] == expected
    res = invoke(*record_args(store.parent / "data.jsonl", tmp_path / "again.zarr", "--set", "train.epochs=1"))
    assert res.exit_code == 0, res.output
    assert f"{expected} of {len(rows)} samples were truncated to max_length {MAX_LENGTH}" in " ".join(res.stderr.split())
