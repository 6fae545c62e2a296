"""The trajectory store round trip: every recorded row, checkpoints, θ replay, bf16, damage, versions."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny_config, write_rows

from lmclean.errors import InputNotFoundError, StoreError, StoreVersionError
from lmclean.objective import CausalLMObjective, loss_of
from lmclean.store import format as fmt
from lmclean.store.reader import TrajectoryStore
from lmclean.store.shard import ENTRY, EMPTY
from lmclean.store.summary import summarize
from lmclean.store.writer import store_size_bytes
from lmclean.train.model import model_from_config_dict
from lmclean.optim import lr_at
from lmclean.train.recorder import checkpoint_plan
from lmclean.train.trainer import TrainResult, train

# 24 samples, batch 4, 2 epochs = 12 steps; checkpoints every 5 -> 0, 5, 10 and the final 12.
STEPS, CHECKPOINTS = 12, [0, 5, 10, 12]
SGD = {"train.momentum": 0.9, "train.weight_decay": 0.01, "record.checkpoint_every": 5, "train.warmup_steps": 2}
ADAMW = {"train.optimizer": "adamw", "train.lr": 0.01, "train.weight_decay": 0.1, "record.checkpoint_every": 5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    """Three tiny recordings shared by the module: SGD fp32, SGD bf16 (same run), AdamW fp32."""
    tmp = tmp_path_factory.mktemp("store")
    data = write_rows(tmp / "data.jsonl")
    return {
        "sgd": train(tiny_config(data, **SGD), tmp / "sgd.zarr"),
        "bf16": train(tiny_config(data, **SGD, **{"record.precision": "bf16"}), tmp / "bf16.zarr"),
        "adamw": train(tiny_config(data, **ADAMW), tmp / "adamw.zarr"),
    }


def _saved_theta(store: TrajectoryStore) -> torch.Tensor:
    """θ of the Hugging Face model saved in STORE/model, flattened in manifest order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(store.model_dir)
    params = dict(model.named_parameters())
    return torch.cat([params[e.name].detach().reshape(-1) for e in store.manifest.entries])


def _chunk(store: Path, array: str, row: int) -> Path:
    """The chunk file holding one row, named by the array's own chunking and chunk key encoding."""
    arr = zarr.open_array(str(store / array), mode="r")
    rows = arr.metadata.chunk_grid.chunk_shape[0]
    return store / array / arr.metadata.encode_chunk_key((row // rows,) + (0,) * (arr.ndim - 1))


def _shard_entry(store: Path, array: str, row: int) -> tuple[Path, int]:
    """The shard file holding one row of a sharded array, and the byte position of its index entry."""
    arr = zarr.open_array(str(store / array), mode="r")
    return _chunk(store, array, row), ENTRY.size * (row % fmt.shard_rows(arr))


def _drop_row(store: Path, array: str, row: int) -> None:
    """Lose one row of a sharded array as if it was never written: blank its shard index entry and
    re-seal the index (a valid index that references no row)."""
    from lmclean.store.shard import encode_index

    path, pos = _shard_entry(store, array, row)
    rows = fmt.shard_rows(zarr.open_array(str(store / array), mode="r"))
    with path.open("r+b") as f:
        entries = np.frombuffer(f.read(ENTRY.size * rows), dtype="<u8").reshape(rows, 2).copy()
        entries[pos // ENTRY.size] = EMPTY
        f.seek(0)
        f.write(encode_index(entries))


def _shard_row_extent(store: Path, array: str, row: int) -> tuple[int, int]:
    """(offset, nbytes) of one row inside its shard file."""
    path, pos = _shard_entry(store, array, row)
    with path.open("rb") as f:
        f.seek(pos)
        return ENTRY.unpack(f.read(ENTRY.size))


def _copy(result: TrainResult, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.zarr"
    shutil.copytree(result.store, dst)
    return dst


def test_every_step_row_round_trips(runs: dict[str, TrainResult]) -> None:
    res = runs["sgd"]
    store = TrajectoryStore(res.store)
    cfg, plan, dataset = res.run.cfg, res.run.plan, res.run.dataset
    assert (store.committed_steps, store.planned_steps, store.closed) == (STEPS, STEPS, True)
    model = model_from_config_dict(store.meta["model_config"])  # an independent skeleton
    for t, theta, _ in store.iter_states(0, STEPS - 1):
        rec = store.step(t)
        assert rec.lr == lr_at(t, STEPS, cfg.train)
        assert rec.sample_ids.tolist() == plan[t]
        assert rec.weights.tolist() == [1 / len(plan[t])] * len(plan[t])
        for row, n, sid in zip(rec.tokens, rec.lengths, rec.sample_ids):
            assert tuple(row[:n].tolist()) == dataset.by_id[int(sid)].token_ids
        # the stored gradient is the gradient of the stored loss at θ[t], recomputed from scratch
        params = {k: v.clone().requires_grad_(True) for k, v in store.manifest.views(theta).items()}
        obj = CausalLMObjective(model, torch.from_numpy(rec.tokens).long(), torch.from_numpy(rec.lengths).long(),
                                torch.from_numpy(rec.weights))
        loss = loss_of(obj, params)
        grads = torch.autograd.grad(loss, list(params.values()))
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(loss.item(), rec.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(store.grad(t), flat, rtol=1e-5, atol=1e-7)
        assert rec.grad_norm == pytest.approx(float(flat.double().norm()), rel=1e-5)


def test_checkpoints_at_planned_steps_and_replay_reaches_them_bitwise(runs: dict[str, TrainResult]) -> None:
    store = TrajectoryStore(runs["sgd"].store)
    assert store.checkpoint_steps == CHECKPOINTS == checkpoint_plan(STEPS, 5) == store.meta["checkpoint_plan"]
    states = {t: (theta.clone(), {k: v.clone() for k, v in st.items()}) for t, theta, st in store.iter_states(0, STEPS)}
    for c in CHECKPOINTS[1:]:  # replay from step 0 lands on every later checkpoint, optimizer state included
        ck_theta, ck_state = store.checkpoint(c)
        assert torch.equal(states[c][0], ck_theta)
        assert torch.equal(states[c][1]["momentum_buffer"], ck_state["momentum_buffer"])
    theta11, _ = store.theta_at(11)  # from checkpoint 10 + one step
    assert torch.equal(theta11, states[11][0])
    with pytest.raises(StoreError, match="no committed checkpoint at step 3"):
        store.checkpoint(3)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_theta_rebuilt_at_the_last_step_equals_the_saved_model_bitwise(runs: dict[str, TrainResult], name: str) -> None:
    store = TrajectoryStore(runs[name].store)
    saved = _saved_theta(store)
    final, _ = store.theta_at(store.committed_steps)
    assert torch.equal(final, saved)
    for t, theta, _ in store.iter_states(0, STEPS):  # every step replayed from the step-0 checkpoint
        pass
    assert t == STEPS and torch.equal(theta, saved)
    assert not torch.equal(store.checkpoint(0)[0], saved)  # training moved θ


# bf16 gradients keep 8 significant bits. Replaying all 12 steps from step 0 with them: measured
# max |Δθ| 3.4e-4 (θ entries up to 1.2) and ‖Δθ‖ = 0.07% of ‖θ[12] − θ[0]‖; from the step-10
# checkpoint 7e-6. Stated tolerance: max |Δθ| <= 1e-3 and ‖Δθ‖ <= 0.5% of the total update.
BF16_ATOL, BF16_REL_UPDATE = 1e-3, 5e-3


def test_bf16_store_is_the_rounded_gradient_smaller_and_replays_within_tolerance(runs: dict[str, TrainResult]) -> None:
    fp32, bf16 = TrajectoryStore(runs["sgd"].store), TrajectoryStore(runs["bf16"].store)
    arr = zarr.open_array(str(bf16.path / "steps" / "grad"), mode="r")
    assert arr.dtype == np.uint16 and bf16.meta["precision"] == "bf16"
    assert zarr.open_array(str(fp32.path / "steps" / "grad"), mode="r").dtype == np.float32
    for t in range(STEPS):  # exactly the fp32 gradient rounded to bfloat16
        assert torch.equal(bf16.grad(t), fp32.grad(t).bfloat16().float())
    saved = _saved_theta(bf16)
    assert torch.equal(saved, _saved_theta(fp32))  # recording precision does not change training
    for _, theta, _ in bf16.iter_states(0, STEPS):
        pass
    err = theta - saved
    assert 0 < err.abs().max() <= BF16_ATOL
    assert err.norm() <= BF16_REL_UPDATE * (saved - bf16.checkpoint(0)[0]).norm()
    for _, theta, _ in bf16.iter_states(10, STEPS):  # the nearest checkpoint bounds the error
        pass
    assert (theta - saved).abs().max() <= BF16_ATOL / 20
    assert store_size_bytes(bf16.path, "steps/grad") < 0.6 * store_size_bytes(fp32.path, "steps/grad")


def test_missing_chunks_are_errors_naming_array_and_step_never_zeros(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    path = _copy(runs["sgd"], tmp_path)
    _drop_row(path, "steps/grad", 5)
    _chunk(path, "steps/sample_ids", 3).unlink()
    _chunk(path, "checkpoints/theta", 2).unlink()  # row 2 = the checkpoint of step 10
    store = TrajectoryStore(path)
    with pytest.raises(StoreError, match=r"array steps/grad has no data at step 5 \(chunk file missing\)"):
        store.grad(5)
    with pytest.raises(StoreError, match="array steps/grad has no data at step 5"):
        for _ in store.iter_states(0, STEPS):
            pass
    with pytest.raises(StoreError, match="array steps/sample_ids has no data at step 3"):
        store.step(3)
    with pytest.raises(StoreError, match="array steps/sample_ids has no data at step 0"):
        store.all_sample_ids()  # a block of steps per chunk: the first step of the lost block
    with pytest.raises(StoreError, match=r"array checkpoints/theta has no data at row 2 \(checkpoint of step 10\)"):
        store.theta_at(11)
    assert torch.equal(store.grad(4), TrajectoryStore(runs["sgd"].store).grad(4))  # the rest reads fine


def test_corrupted_chunk_is_an_error(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    path = _copy(runs["sgd"], tmp_path)
    offset, nbytes = _shard_row_extent(path, "steps/grad", 2)
    with _chunk(path, "steps/grad", 2).open("r+b") as f:
        f.seek(offset)
        f.write(b"not a blosc frame")
    with pytest.raises(StoreError, match="array steps/grad at step 2 fails its checksum"):
        TrajectoryStore(path).grad(2)
    last = STEPS - 1
    offset, nbytes = _shard_row_extent(path, "steps/grad", last)
    os.truncate(_chunk(path, "steps/grad", last), offset + nbytes // 2)  # a shard cut short
    with pytest.raises(StoreError, match=f"array steps/grad at step {last} is unreadable.*truncated"):
        TrajectoryStore(path).grad(last)
    _chunk(path, "steps/grad", 0).unlink()  # the whole shard: every row in it is missing
    with pytest.raises(StoreError, match=r"array steps/grad has no data at step 0 \(chunk file missing\)"):
        TrajectoryStore(path).grad(0)


def test_block_rows_read_directly_match_zarr_and_follow_rewrites(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    """The reader decodes chunk files itself (zarr costs ~1 ms a read) and keeps the last block
    chunk: every row must equal zarr's, a truncated block chunk is an error, and a block chunk
    rewritten after it was cached (scrub, resume) is read again."""
    path = _copy(runs["sgd"], tmp_path)
    store = TrajectoryStore(path)
    for name in ("steps/sample_ids", "steps/weights", "steps/tokens", "steps/lr", "steps/loss", "steps/grad_norm",
                 "steps/lengths", "steps/grad"):
        ref = np.asarray(zarr.open_array(str(path / name), mode="r")[:STEPS])
        got = np.stack([store._row(name, t) for t in range(STEPS)])
        assert np.array_equal(got, ref, equal_nan=True), name
        assert store._readers[name] is not None, name  # read directly, not through zarr
    for name in ("checkpoints/theta", "checkpoints/momentum_buffer", "checkpoints/step", "samples/id",
                 "samples/fingerprint"):  # the same codec path (checksums included) on every other array
        ref = np.asarray(zarr.open_array(str(path / name), mode="r")[:])
        assert np.array_equal(store.rows(name, len(ref), "row"), ref, equal_nan=True), name
    tokens = zarr.open_array(str(path / "steps/tokens"), mode="r+")
    before = store.step(1).tokens
    tokens[1] = np.zeros(tokens.shape[1:], dtype=np.int32)  # zarr rewrites the block chunk holding step 1
    assert before.any() and not store.step(1).tokens.any()
    _chunk(path, "steps/sample_ids", 0).write_bytes(b"\x28\xb5\x2f\xfd")  # a zstd magic number, nothing after
    with pytest.raises(StoreError, match="array steps/sample_ids at step 0 fails its checksum"):
        TrajectoryStore(path).step(0)


@pytest.mark.parametrize("version", [1, 3])
def test_other_format_version_is_refused(runs: dict[str, TrainResult], tmp_path: Path, version: int) -> None:
    """Version 1 (no checksums) is not read: its stores are re-recorded, there is no second code path."""
    path = _copy(runs["sgd"], tmp_path)
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["lmclean"])
    meta["format_version"] = version
    group.attrs["lmclean"] = meta
    with pytest.raises(StoreVersionError) as info:
        TrajectoryStore(path)
    msg = str(info.value)
    assert f"format version {version}" in msg and "reads version 2" in msg and "re-record it" in msg and "\n" not in msg
    assert ("written before chunk checksums" in msg) == (version == 1)


def test_not_a_store_is_a_one_line_error(tmp_path: Path) -> None:
    for path in [tmp_path / "missing", tmp_path]:
        with pytest.raises(InputNotFoundError, match=f"no lmclean store at {path};"):
            TrajectoryStore(path)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(StoreError, match="not an lmclean store"):
        TrajectoryStore(tmp_path / "plain.zarr")


def test_only_committed_steps_are_visible(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    """A store whose COMMIT.json says 7 steps (as after a crash) shows 7, whatever chunks lie beyond."""
    path = _copy(runs["sgd"], tmp_path)
    (path / "COMMIT.json").write_text(json.dumps({"committed_steps": 7, "checkpoints": [0, 5], "closed": False}))
    store = TrajectoryStore(path)
    assert (store.committed_steps, store.closed, store.checkpoint_steps) == (7, False, [0, 5])
    assert len(store.scalars("loss")) == 7 and store.all_sample_ids().shape == (7, 4)
    with pytest.raises(StoreError, match=r"step 7 is not recorded .* committed steps are 0..6"):
        store.step(7)
    with pytest.raises(StoreError, match="beyond the 7 committed steps"):
        next(store.iter_states(0, 8))
    with pytest.raises(StoreError, match="no committed checkpoint at step 10"):
        store.checkpoint(10)
    assert torch.equal(store.theta_at(7)[0], TrajectoryStore(runs["sgd"].store).theta_at(7)[0])


def test_summary_reports_steps_bytes_and_compression(runs: dict[str, TrainResult]) -> None:
    store = TrajectoryStore(runs["sgd"].store)
    s = summarize(store)
    P = store.manifest.size
    assert s["steps"] == {"committed": STEPS, "planned": STEPS, "closed": True, "epochs": 2.0, "batch_size": 4}
    assert s["model"]["parameters"] == P == runs["sgd"].run.manifest.size
    assert s["bytes"]["gradients_raw_fp32"] == STEPS * P * 4
    grad_disk = store_size_bytes(store.path, "steps/grad")
    assert s["bytes"]["compression_vs_fp32"] == round(STEPS * P * 4 / grad_disk, 3) > 1
    assert s["samples"] == {"in_dataset": 24, "seen": 24, "excluded": 0}
    assert s["checkpoints"] == CHECKPOINTS and len(s["loss"]["sparkline"]) == STEPS
    assert s["loss"]["last"] < s["loss"]["first"]


def test_layout_is_the_documented_format(runs: dict[str, TrainResult]) -> None:
    """Shapes, dtypes, chunks, key separators, fills and codecs as in docs/store-format.md."""
    store = TrajectoryStore(runs["sgd"].store)
    P, T, B, L, K = store.manifest.size, STEPS, 4, 48, len(CHECKPOINTS)
    R, RT = min(256, T), min(16, T)
    expected = {  # name: (shape, dtype, chunks, separator, fill, compressor)
        "steps/grad": ((T, P), "float32", (min(T, 256), P), ".", "nan", "sharding_indexed"),
        "steps/tokens": ((T, B, L), "int32", (RT, B, L), ".", -2, "zstd"),
        "steps/lr": ((T,), "float64", (R,), ".", "nan", "zstd"),
        "steps/loss": ((T,), "float64", (R,), ".", "nan", "zstd"),
        "steps/grad_norm": ((T,), "float64", (R,), ".", "nan", "zstd"),
        "steps/sample_ids": ((T, B), "int64", (R, B), ".", -2, "zstd"),
        "steps/weights": ((T, B), "float64", (R, B), ".", "nan", "zstd"),
        "steps/lengths": ((T, B), "int32", (R, B), ".", -2, "zstd"),
        "checkpoints/step": ((K,), "int64", (1,), ".", -2, None),  # None: no compressor, the checksum only
        "checkpoints/theta": ((K, P), "float32", (1, P), ".", "nan", "blosc"),
        "checkpoints/momentum_buffer": ((K, P), "float32", (1, P), ".", "nan", "blosc"),
        "samples/id": ((24,), "int64", (24,), "/", None, "zstd"),
        "samples/fingerprint": ((24, 32), "uint8", (24, 32), "/", None, None),
    }
    for name, (shape, dtype, chunks, sep, fill, codec) in expected.items():
        meta = json.loads((store.path / name / "zarr.json").read_text())
        assert tuple(meta["shape"]) == shape and meta["data_type"] == dtype, name
        assert tuple(meta["chunk_grid"]["configuration"]["chunk_shape"]) == chunks, name
        assert meta["chunk_key_encoding"]["configuration"]["separator"] == sep, name
        if fill is not None:
            assert str(meta["fill_value"]).lower() == str(fill), name
        names = [c["name"] for c in meta["codecs"]]
        assert names == ([codec] if codec == "sharding_indexed" else ["bytes"] + ([codec] if codec else []) + ["crc32c"]), \
            (name, names)
    # the gradient: shards of one-row chunks, a checksummed index at the start; fp32 rows in blosc
    # lz4 without shuffle (record.codec auto) and their checksum, checkpoints likewise
    sharding = json.loads((store.path / "steps/grad/zarr.json").read_text())["codecs"][0]["configuration"]
    assert tuple(sharding["chunk_shape"]) == (1, P) and sharding["index_location"] == "start"
    assert [c["name"] for c in sharding["index_codecs"]] == ["bytes", "crc32c"]
    assert [c["name"] for c in sharding["codecs"]] == ["bytes", "blosc", "crc32c"]
    theta_codec = json.loads((store.path / "checkpoints/theta/zarr.json").read_text())["codecs"][1]["configuration"]
    for blosc in (sharding["codecs"][1]["configuration"], theta_codec):
        assert (blosc["cname"], blosc["clevel"], blosc["shuffle"], blosc["typesize"]) == ("lz4", 1, "noshuffle", 4)
    meta = store.meta
    for key in ["format_version", "lmclean_version", "created", "config", "model_config", "manifest", "param_count",
                "optimizer", "schedule", "tokenizer", "pad_id", "planned_steps", "batch_size", "max_length",
                "checkpoint_every", "checkpoint_plan", "precision", "codec", "excluded_ids", "loss"]:
        assert key in meta, key
    assert meta["optimizer"] == {"name": "sgd", "momentum": 0.9, "weight_decay": 0.01}
    assert [e["offset"] for e in meta["manifest"]] == [sum(e["numel"] for e in meta["manifest"][:i]) for i in range(len(meta["manifest"]))]
    assert json.loads((store.path / "COMMIT.json").read_text()) == {"committed_steps": T, "checkpoints": CHECKPOINTS, "closed": True}


@pytest.mark.parametrize("token_rows", [1, 16], ids=["one-step-token-chunks", "16-step-token-chunks"])
def test_interrupted_record_resumes_to_the_uninterrupted_store(tmp_path: Path, token_rows: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C at step 7 (mid token block, mid gradient shard), then `--resume`: the tokens,
    gradients and final θ equal an uninterrupted run's, whatever the rows per tokens chunk (the
    writer takes them from the array's metadata)."""
    cfg = tiny_config(write_rows(tmp_path / "data.jsonl"), **{"record.checkpoint_every": 4})
    monkeypatch.setattr(fmt, "TOKEN_ROWS", token_rows)
    whole = train(cfg, tmp_path / "whole.zarr")

    def stop_at_7(step: int, total: int, loss: float, lr: float) -> None:
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut.zarr", on_step=stop_at_7)
    assert 0 < TrajectoryStore(tmp_path / "cut.zarr").committed_steps < whole.steps
    monkeypatch.undo()  # today's writer, whatever layout the store has
    train(cfg, tmp_path / "cut.zarr", resume=True)
    a, b = TrajectoryStore(tmp_path / "whole.zarr"), TrajectoryStore(tmp_path / "cut.zarr")
    rows = zarr.open_array(str(tmp_path / "cut.zarr" / "steps/tokens"), mode="r").metadata.chunk_grid.chunk_shape[0]
    assert rows == min(token_rows, whole.steps)
    assert fmt.shard_rows(b.root["steps/grad"]) == whole.steps
    assert all(torch.equal(a.grad(t), b.grad(t)) for t in range(whole.steps))
    for name in ("steps/tokens", "steps/sample_ids", "steps/lengths"):
        assert np.array_equal(np.asarray(zarr.open_array(str(a.path / name), mode="r")[:]),
                              np.asarray(zarr.open_array(str(b.path / name), mode="r")[:])), name
    assert torch.equal(a.checkpoint(a.committed_steps)[0], b.checkpoint(b.committed_steps)[0])


# -- corruption is detected (issue 10, section 3) ----------------------------------------------
# Each of these was read silently by format version 1 (no checksums): wrong numbers with exit 0.
# The helpers use only raw bytes and zarr metadata, so the same test runs against either format.


def _flip(path: Path, start: int, n: int) -> None:
    with path.open("r+b") as f:
        f.seek(start)
        data = f.read(n)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def _checksummed(store: Path, array: str) -> bool:
    return json.loads((store / array / "zarr.json").read_text())["codecs"][-1]["name"] == "crc32c"


def test_flipped_bytes_inside_a_gradient_row_fail_its_checksum(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    path = _copy(runs["sgd"], tmp_path)
    offset, nbytes = _shard_row_extent(path, "steps/grad", 7)
    _flip(_chunk(path, "steps/grad", 7), offset + nbytes // 2, 16)  # inside lz4's literals: still decodes
    store = TrajectoryStore(path)
    with pytest.raises(StoreError) as info:
        store.grad(7)
    assert str(info.value) == (f"store {path}: array steps/grad at step 7 fails its checksum; the store is damaged: "
                               f"run `lmclean check {path}`")
    with pytest.raises(StoreError, match="array steps/grad at step 7 fails its checksum"):
        store.theta_at(9)  # θ replay from the checkpoint of step 5 reads row 7: it stops there
    with pytest.raises(ValueError, match="checksum"):  # zarr-python verifies the same checksum
        zarr.open_array(str(path / "steps/grad"), mode="r")[7]
    assert torch.equal(store.grad(6), TrajectoryStore(runs["sgd"].store).grad(6))  # the other rows read


def test_swapped_shard_index_entries_fail_the_index_checksum(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    """Both entries still point to whole, valid rows: only the checksum over the index tells."""
    path = _copy(runs["sgd"], tmp_path)
    shard, pos2 = _shard_entry(path, "steps/grad", 2)
    _, pos3 = _shard_entry(path, "steps/grad", 3)
    with shard.open("r+b") as f:
        f.seek(pos2)
        two, three = f.read(ENTRY.size), f.read(ENTRY.size)
        f.seek(pos2)
        f.write(three + two)
    store = TrajectoryStore(path)
    for t in (2, 3, 9):  # every row of the shard: its index can no longer be trusted
        with pytest.raises(StoreError, match=rf"array steps/grad at step {t} fails its checksum \(the index of "
                                             r"shard c\.0\.0, steps 0\.\.11\); the store is damaged: run `lmclean check"):
            store.grad(t)
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_array(str(path / "steps/grad"), mode="r")[2]


def test_flipped_bytes_of_the_sample_ids_chunk_fail_its_checksum(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    """A flip that zstd still decodes (found by trying): without a checksum, other sample ids."""
    import numcodecs

    path = _copy(runs["sgd"], tmp_path)
    chunk = _chunk(path, "steps/sample_ids", 0)
    data = chunk.read_bytes()
    payload = data[:-4] if _checksummed(path, "steps/sample_ids") else data
    good = np.frombuffer(numcodecs.Zstd().decode(payload), dtype="<i8")
    for pos in range(len(payload) - 1, 0, -1):
        bad = bytearray(payload)
        bad[pos] ^= 0x01
        try:
            ids = np.frombuffer(numcodecs.Zstd().decode(bytes(bad)), dtype="<i8")
        except Exception:  # noqa: BLE001 - this flip zstd notices; look for one it does not
            continue
        if ids.shape == good.shape and not np.array_equal(ids, good):
            break
    else:
        pytest.fail("no silently decodable flip found")
    chunk.write_bytes(data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:])
    store = TrajectoryStore(path)
    with pytest.raises(StoreError, match="array steps/sample_ids at step 3 fails its checksum"):
        store.step(3)
    with pytest.raises(StoreError, match="array steps/sample_ids at step 0 fails its checksum"):
        store.sample_positions(5)  # which steps hold a sample: never from damaged ids


@pytest.mark.parametrize(("marker", "message"), [
    ({"committed_steps": 40, "checkpoints": [0, 5, 10, 12], "closed": False},
     "claims 40 committed steps, but the store plans 12"),
    ({"committed_steps": 7, "checkpoints": [0, 5, 10], "closed": False}, "lists checkpoint 10 beyond its 7 committed steps"),
    ({"committed_steps": 7, "checkpoints": [0, 3], "closed": False}, "checkpoint 3, which is not in the checkpoint plan"),
    ({"committed_steps": 7, "checkpoints": [0, 5], "closed": True}, "says the run is closed with 7 of 12 steps"),
    ({"committed_steps": "12", "checkpoints": [0, 5, 10, 12], "closed": True}, "claims '12' committed steps"),
    ({"committed_steps": 12, "checkpoints": [5, 0], "closed": False}, "not ascending distinct steps"),
])
def test_commit_marker_claims_are_validated(runs: dict[str, TrainResult], tmp_path: Path, marker: dict, message: str) -> None:
    """An inflated committed count used to show as a "3.1x compression" summary: now an error
    saying what is wrong and what to do."""
    path = _copy(runs["sgd"], tmp_path)
    (path / "COMMIT.json").write_text(json.dumps(marker))
    with pytest.raises(StoreError) as info:
        summarize(TrajectoryStore(path))
    msg = str(info.value)
    assert message in msg and f"run `lmclean check {path}`" in msg and "\n" not in msg


def test_missing_or_unreadable_commit_marker_says_what_to_do(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    path = _copy(runs["sgd"], tmp_path)
    (path / "COMMIT.json").write_text("{\"committed_steps\": 1")
    with pytest.raises(StoreError, match=r"COMMIT.json is not readable JSON \(.*\); the commit marker is damaged"):
        TrajectoryStore(path).committed_steps
    (path / "COMMIT.json").unlink()
    with pytest.raises(StoreError, match=r"has no COMMIT.json \(its commit marker\).*re-record it"):
        TrajectoryStore(path).committed_steps


def test_writer_removes_temp_files_a_killed_writer_left(runs: dict[str, TrainResult], tmp_path: Path) -> None:
    """Temp names carry the writer's pid, so a killed writer's leftovers are not overwritten by
    the next one: reopening the store for writing (resume) removes them."""
    from lmclean.store.writer import StoreWriter

    path = _copy(runs["sgd"], tmp_path)
    left = [path / "steps/grad/.c.0.0.4242.partial", path / "steps/lr/.c.0.4242.partial",
            path / "checkpoints/theta/.c.1.0.4242.partial"]
    for p in left:
        p.write_bytes(b"half a chunk")
    StoreWriter(path, committed_steps=STEPS, checkpoints=CHECKPOINTS).abort()
    assert not any(p.exists() for p in left)
    assert not list(path.rglob("*.partial")) and TrajectoryStore(path).committed_steps == STEPS
