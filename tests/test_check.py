"""`lmclean check` / `check_store`: every chunk, the commit marker and θ replay, each failure named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import tiny_config, write_rows
from typer.testing import CliRunner

from lmclean.cli.main import app
from lmclean.store import format as fmt
from lmclean.store.check import check_store
from lmclean.store.codec import array_codec
from lmclean.store.shard import ENTRY
from lmclean.train.trainer import train

runner = CliRunner()
STEPS, CHECKPOINTS = 12, [0, 4, 8, 12]  # 24 samples, batch 4, 2 epochs; checkpoints every 4


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("check")
    data = write_rows(tmp / "data.jsonl")
    return {"fp32": train(tiny_config(data, **{"train.momentum": 0.9}), tmp / "fp32.zarr").store,
            "bf16": train(tiny_config(data, **{"train.optimizer": "adamw", "train.lr": 0.01,
                                               "record.precision": "bf16"}), tmp / "bf16.zarr").store}


@pytest.fixture
def store(recorded: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded["fp32"], tmp_path / "store.zarr"))


def _chunk(store: Path, name: str, index: int) -> Path:
    arr = zarr.open_array(str(store / name), mode="r")
    return store / name / arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))


def error_line(result) -> str:  # noqa: ANN001 - a typer.testing Result
    """The error line of a failed check: exit 1, the last stderr line (progress lines come first)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return line


def _rewrite(store: Path, name: str, index: int, change) -> None:  # noqa: ANN001 - (chunk) -> None
    """Change a chunk's values and re-encode it with a valid checksum: damage only replay can see."""
    codec = array_codec(zarr.open_array(str(store / name), mode="r"))
    path = _chunk(store, name, index)
    values = codec.decode(path.read_bytes()).copy()
    change(values)
    path.write_bytes(bytes(codec.encode(values)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_whole_store_checks_out(recorded: dict[str, Path], precision: str) -> None:
    seen: list[tuple[str, int, int]] = []
    report = check_store(recorded[precision], progress=lambda *a: seen.append(a))
    assert report.ok and report.problems == [] and report.committed_steps == STEPS
    assert report.checkpoints_matched == CHECKPOINTS[1:] and report.steps_replayed == STEPS
    assert report.chunks_verified >= STEPS + len(CHECKPOINTS)
    assert {phase for phase, _, _ in seen} == {"verifying chunks", "replaying θ"}
    result = runner.invoke(app, ["check", str(recorded[precision])])
    assert result.exit_code == 0, result.output
    assert f"ok: {STEPS} of {STEPS} steps committed" in result.stdout


def test_flipped_gradient_bytes_exit_1_naming_array_and_step(store: Path) -> None:
    path = _chunk(store, "steps/grad", 0)
    entries = np.frombuffer(path.read_bytes()[: STEPS * ENTRY.size], dtype="<u8").reshape(STEPS, 2)
    offset, nbytes = (int(v) for v in entries[6])
    data = bytearray(path.read_bytes())
    data[offset + nbytes // 2: offset + nbytes // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))
    line = error_line(runner.invoke(app, ["check", str(store)]))
    assert line == f"error: store {store}: array steps/grad at step 6 fails its checksum; the store is damaged: " \
                   f"run `lmclean check {store}`"
    result = runner.invoke(app, ["check", str(store), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    first = report["problems"][0]
    assert report["ok"] is False and (first["array"], first["step"]) == ("steps/grad", 6)


def test_swapped_index_entries_and_damaged_blocks_are_all_reported(store: Path) -> None:
    shard = _chunk(store, "steps/grad", 0)
    data = bytearray(shard.read_bytes())
    data[2 * ENTRY.size: 4 * ENTRY.size] = data[3 * ENTRY.size: 4 * ENTRY.size] + data[2 * ENTRY.size: 3 * ENTRY.size]
    shard.write_bytes(bytes(data))
    ids = _chunk(store, "steps/sample_ids", 0)
    raw = ids.read_bytes()
    ids.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    report = check_store(store)
    assert not report.ok and report.steps_replayed == 0  # no replay over damaged chunks
    assert [(p.array, p.step) for p in report.problems] == [("steps/grad", 0), ("steps/sample_ids", 0)]
    assert "(the index of shard c.0.0, steps 0..11)" in report.problems[0].message


def test_commit_marker_is_checked_against_the_arrays(store: Path) -> None:
    marker = store / fmt.COMMIT_FILE
    marker.write_text(json.dumps({"committed_steps": 40, "checkpoints": CHECKPOINTS, "closed": True}))
    report = check_store(store)
    assert report.first is not None and report.first.array == "COMMIT.json"
    assert "claims 40 committed steps, but the store plans 12" in report.first.message
    # a missing checkpoint row the marker lists
    marker.write_text(json.dumps({"committed_steps": STEPS, "checkpoints": CHECKPOINTS, "closed": True}))
    _chunk(store, "checkpoints/theta", 2).unlink()
    line = error_line(runner.invoke(app, ["check", str(store), "--no-replay"]))
    assert "COMMIT.json lists the checkpoint of step 8, but array checkpoints/theta has no row 2" in line


def test_commit_count_beyond_what_was_written_is_caught(recorded: dict[str, Path], tmp_path: Path) -> None:
    """A marker inflated within the planned steps: the rows it counts were never written."""
    data = write_rows(tmp_path / "data.jsonl")

    def stop_at_6(step: int, total: int, loss: float, lr: float) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, **{"train.momentum": 0.9}), tmp_path / "cut.zarr", on_step=stop_at_6)
    marker = tmp_path / "cut.zarr" / fmt.COMMIT_FILE
    state = json.loads(marker.read_text())
    n = state["committed_steps"]
    assert 0 < n < STEPS
    assert check_store(tmp_path / "cut.zarr").ok
    marker.write_text(json.dumps({**state, "committed_steps": n + 1}))
    report = check_store(tmp_path / "cut.zarr")
    assert report.first is not None and report.first.step == n
    assert f"has no data at committed step {n}" in report.first.message


@pytest.mark.parametrize(("array", "index", "where"), [
    ("steps/lr", 0, "replaying steps 4..7 from the checkpoint of step 4 does not give checkpoints/theta of step 8"),
    ("checkpoints/momentum_buffer", 1,
     "replaying steps 0..3 from the checkpoint of step 0 does not give checkpoints/momentum_buffer of step 4"),
])
def test_theta_replay_catches_what_checksums_cannot(store: Path, array: str, index: int, where: str) -> None:
    """Chunks rewritten with valid checksums but values that do not follow from the trajectory."""
    def change(values: np.ndarray) -> None:
        if array == "steps/lr":
            values[5] *= 1.5  # the learning rate of step 5
        else:
            values[0, :10] += 1e-3
    _rewrite(store, array, index, change)
    report = check_store(store)
    assert not report.ok and where in report.first.message  # type: ignore[union-attr]
    assert check_store(store, replay=False).ok  # every chunk is intact: only replay sees it
