"""Scrubbing forgotten samples from a recorded store: tokens gone from every chunk, others intact,
tombstones, idempotence, crash recovery, and the refusal to unlearn a sample twice."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from lmclean import config
from lmclean.audit import (
    AlreadyUnlearnedError,
    AuditLog,
    check_not_tombstoned,
    finish_pending_scrub,
)
from lmclean.store.scrub import PENDING_FILENAME, pending_scrub, scrub_samples, tombstones
from lmclean.errors import DataError, StoreError
from lmclean.store import format as fmt
from lmclean.store.reader import TrajectoryStore
from lmclean.train.trainer import train
from conftest import tiny_overrides, write_rows


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, tuple[int, ...]], dict[int, str]]:
    """A tiny recorded store (built once), the data set's token ids and texts by sample id.

    Two steps per tokens chunk (12 steps: 6 chunks), so a scrub rewrites chunks holding one or two
    touched steps and leaves untouched chunks; everything reads the rows per chunk from the metadata."""
    root = tmp_path_factory.mktemp("scrub")
    data = write_rows(root / "data.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fmt, "TOKEN_ROWS", 2)
        result = train(config.load(None, tiny_overrides(data)), root / "store.zarr")
    samples = result.run.dataset.samples
    return root / "store.zarr", {s.id: s.token_ids for s in samples}, {s.id: s.text for s in samples}


@pytest.fixture
def store(recorded, tmp_path: Path) -> Path:
    return Path(shutil.copytree(recorded[0], tmp_path / "store.zarr"))


def forget_pair(store: Path) -> list[int]:
    """Two samples that share no batch, so both kinds of chunk (one or two rows hit) can occur."""
    ids = np.asarray(zarr.open_array(str(store / "steps/sample_ids"), mode="r")[:])
    first = int(ids[0, 0])
    return [first, int(ids[-1, -1]) if int(ids[-1, -1]) != first else int(ids[-1, 0])]


def tokens(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_array(str(store / "steps/tokens"), mode="r")[:])


def token_rows(store: Path) -> int:
    """Steps per chunk of steps/tokens, from its metadata."""
    return int(zarr.open_array(str(store / "steps/tokens"), mode="r").metadata.chunk_grid.chunk_shape[0])


def file_hashes(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def rows_holding(toks: np.ndarray, seq: tuple[int, ...]) -> list[tuple[int, int]]:
    """(step, position) of every stored row that starts with the token sequence ``seq``."""
    n = len(seq)
    hits = np.all(toks[:, :, :n] == np.asarray(seq, dtype=np.int32), axis=2)
    return [(int(t), int(p)) for t, p in zip(*np.nonzero(hits))]


def test_scrub_removes_forgotten_tokens_and_keeps_the_rest(store: Path, recorded) -> None:
    _, token_ids, texts = recorded
    forget = forget_pair(store)
    ids = np.asarray(zarr.open_array(str(store / "steps/sample_ids"), mode="r")[:])
    lengths_before = np.asarray(zarr.open_array(str(store / "steps/lengths"), mode="r")[:])
    before, hashes_before = tokens(store), file_hashes(store)
    for i in forget:  # the check below is meaningful: the rows are there before scrubbing
        assert rows_holding(before, token_ids[i]) == [tuple(x) for x in np.argwhere(ids == i)]

    result = scrub_samples(store, forget, audit_seq=1)

    hit = np.isin(ids, forget)
    assert result.steps == tuple(sorted({int(t) for t in np.nonzero(hit.any(axis=1))[0]}))
    assert result.rows_scrubbed == int(hit.sum()) and result.tombstoned == {i: 1 for i in forget}
    after = tokens(store)
    # every tokens chunk decoded: no forgotten sequence anywhere, its rows all zeros
    for i in forget:
        assert rows_holding(after, token_ids[i]) == []
    assert not after[hit].any()
    # other samples' rows are bitwise unchanged, and so are the chunks of untouched steps
    assert np.array_equal(after[~hit], before[~hit])
    hashes_after = file_hashes(store)
    rows = token_rows(store)
    touched = {t // rows for t in result.steps}
    untouched = [c for c in range(-(-ids.shape[0] // rows)) if c not in touched]
    assert untouched and all(hashes_after[f"steps/tokens/c.{c}.0.0"] == hashes_before[f"steps/tokens/c.{c}.0.0"]
                             for c in untouched)
    # the batch structure stays known
    assert np.array_equal(np.asarray(zarr.open_array(str(store / "steps/sample_ids"), mode="r")[:]), ids)
    assert np.array_equal(np.asarray(zarr.open_array(str(store / "steps/lengths"), mode="r")[:]), lengths_before)
    # grep every file on disk for the forgotten samples' raw byte strings
    needles = [np.asarray(token_ids[i], dtype="<i4").tobytes() for i in forget]
    needles += [texts[i].encode("utf-8") for i in forget]
    for path in store.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert not any(n in blob for n in needles), f"{path} still holds forgotten data"
    assert tombstones(store) == {i: 1 for i in forget}
    assert not (store / PENDING_FILENAME).exists()
    assert not list(store.rglob("*.partial"))
    s = TrajectoryStore(store)  # the store still reads normally
    assert s.step(result.steps[0]).tokens.shape[0] == int((ids[result.steps[0]] >= 0).sum())


def test_scrub_is_idempotent_and_keeps_the_first_seq(store: Path) -> None:
    forget = forget_pair(store)
    scrub_samples(store, forget, audit_seq=2)
    snapshot = file_hashes(store)
    again = scrub_samples(store, forget, audit_seq=2)
    assert (again.rows_scrubbed, again.chunks_rewritten) == (0, 0)
    assert file_hashes(store) == snapshot
    later = scrub_samples(store, forget, audit_seq=7)  # a later request keeps the first removal's seq
    assert later.tombstoned == {i: 2 for i in forget} and file_hashes(store) == snapshot


def test_tombstones_without_array_and_unknown_id(store: Path) -> None:
    assert tombstones(store) == {}
    check_not_tombstoned(store, [100, 101])  # nothing scrubbed: nothing to refuse
    snapshot = file_hashes(store)
    with pytest.raises(DataError, match=r"sample id 999 is not in store"):
        scrub_samples(store, [100, 999], audit_seq=0)
    with pytest.raises(DataError, match=r"sample ids 998, 999 are not in store"):
        scrub_samples(store, [998, 999], audit_seq=0)
    assert file_hashes(store) == snapshot  # refused before touching anything


def crash_after_first_chunk(monkeypatch: pytest.MonkeyPatch, store: Path, where: str = "steps/tokens/c.") -> list[Path]:
    real, done = os.replace, []

    def flaky(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if str(store / where) in str(dst):
            if done:
                raise OSError("simulated crash")
            done.append(Path(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    return done


def test_crash_mid_scrub_is_completed_by_finish_pending_scrub(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded
) -> None:
    forget = forget_pair(store)
    clean = Path(shutil.copytree(store, tmp_path / "clean.zarr"))
    scrub_samples(clean, forget, audit_seq=3)
    before = tokens(store)

    done = crash_after_first_chunk(monkeypatch, store)
    with pytest.raises(OSError, match="simulated crash"):
        scrub_samples(store, forget, audit_seq=3)
    monkeypatch.undo()

    assert len(done) == 1
    intent = pending_scrub(store)
    assert intent is not None and intent["sample_ids"] == sorted(forget) and intent["audit_seq"] == 3
    assert tombstones(store) == {}  # tombstones are written last
    mid = tokens(store)  # each chunk is either old or new: one scrubbed, the rest untouched
    changed = [t for t in range(mid.shape[0]) if not np.array_equal(mid[t], before[t])]
    assert len(changed) == 1 and not list(store.rglob("*.partial"))

    results = finish_pending_scrub(store)
    assert [r.audit_seq for r in results] == [3]
    assert not (store / PENDING_FILENAME).exists()
    assert file_hashes(store) == file_hashes(clean)
    assert finish_pending_scrub(store) == []


def test_crash_before_tombstones_is_completed(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    forget = forget_pair(store)
    real = os.replace

    def fail_tombstone(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        if "samples/tombstone" in str(dst):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_tombstone)
    with pytest.raises(OSError):
        scrub_samples(store, forget, audit_seq=4)
    monkeypatch.undo()
    assert tombstones(store) == {} and pending_scrub(store) is not None
    assert not (store / "samples/tombstone/zarr.json").exists()
    finish_pending_scrub(store)
    assert tombstones(store) == {i: 4 for i in forget}


def test_finish_pending_scrub_reconciles_with_the_audit_log(store: Path) -> None:
    """A crash between the audit append and the scrub: the log says scrubbed, the store does not."""
    forget = forget_pair(store)
    log = AuditLog(store)
    log.append({"kind": "record"})
    rec = log.append({"kind": "unlearn", "request_id": "r-9", "forget_ids": forget, "keep_data": False})
    log.append({"kind": "unlearn", "request_id": "r-10", "forget_ids": [101], "keep_data": True})
    results = finish_pending_scrub(store)
    assert [r.audit_seq for r in results] == [rec["seq"]]
    assert tombstones(store) == {i: rec["seq"] for i in forget}


def test_double_unlearn_is_refused_naming_the_record(store: Path) -> None:
    forget = forget_pair(store)
    log = AuditLog(store)  # record 0 is the `record` run itself
    rec = log.append({"kind": "unlearn", "request_id": "r-gdpr-17", "forget_ids": forget, "keep_data": False})
    scrub_samples(store, forget, rec["seq"])
    with pytest.raises(AlreadyUnlearnedError) as info:
        check_not_tombstoned(store, [forget[0]])
    msg = str(info.value)
    assert msg == (f"sample {forget[0]} was already unlearned by audit record 1 "
                   f"(request r-gdpr-17, {rec['time']}); nothing to do")
    live = next(i for i in range(100, 124) if i not in forget)
    with pytest.raises(DataError, match=r"samples .* were already unlearned by audit record 1 .*; remove them"):
        check_not_tombstoned(store, [*forget, live])
    check_not_tombstoned(store, [live])


@pytest.mark.parametrize("damage", ["replaced", "one-byte-flip"])
@pytest.mark.parametrize("array", ["steps/tokens", "steps/sample_ids"])
def test_damaged_chunks_are_reported_precisely_before_anything_is_rewritten(store: Path, array: str,
                                                                             damage: str) -> None:
    """A damaged sample-ids chunk would scrub the wrong samples, a damaged tokens chunk would be
    re-encoded under a fresh checksum: both are refused, naming array and step, with no file changed."""
    forget = forget_pair(store)
    ids = np.asarray(zarr.open_array(str(store / "steps/sample_ids"), mode="r")[:])
    t = int(np.nonzero(np.isin(ids, forget).any(axis=1))[0][0])
    arr = zarr.open_array(str(store / array), mode="r")
    rows = int(arr.metadata.chunk_grid.chunk_shape[0])
    chunk = store / array / arr.metadata.encode_chunk_key((t // rows,) + (0,) * (arr.ndim - 1))
    data = chunk.read_bytes()
    chunk.write_bytes(b"not zstd" if damage == "replaced" else
                      data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:])
    before = file_hashes(store)
    with pytest.raises(StoreError, match=rf"array {array} at step {t // rows * rows} fails its checksum; the store "
                                         r"is damaged: run `lmclean check"):
        scrub_samples(store, forget, audit_seq=0)
    assert file_hashes(store) == before


def test_missing_tombstone_chunk_is_not_read_as_live(store: Path) -> None:
    forget = forget_pair(store)
    scrub_samples(store, forget, audit_seq=0)
    (store / "samples/tombstone/c/0").unlink()
    with pytest.raises(StoreError, match=r"samples/tombstone chunk 0 is missing"):
        tombstones(store)


KILL_SCRIPT = """
import os, sys
from pathlib import Path
from lmclean.store.scrub import scrub_samples
store, after = Path(sys.argv[1]), int(sys.argv[2])
real, seen = os.replace, []
def dying(src, dst):
    if "steps/tokens/c." in str(dst):
        if len(seen) == after:
            os._exit(9)  # the process dies here: no cleanup, the temp chunk file stays behind
        seen.append(dst)
    real(src, dst)
os.replace = dying
scrub_samples(store, [int(x) for x in sys.argv[3:]], 5)
"""


@pytest.mark.parametrize("after", [0, 1])
def test_killed_process_leaves_a_completable_store(store: Path, tmp_path: Path, after: int) -> None:
    """A real process death (no exception handlers run) before/after the first chunk's rename."""
    import subprocess
    import sys

    forget = forget_pair(store)
    clean = Path(shutil.copytree(store, tmp_path / "clean.zarr"))
    scrub_samples(clean, forget, audit_seq=5)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(store), str(after), *map(str, forget)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert pending_scrub(store) is not None and tombstones(store) == {}
    assert list(store.rglob(".*.partial"))  # the dead process's temp file
    finish_pending_scrub(store)
    assert not list(store.rglob("*.partial"))
    assert file_hashes(store) == file_hashes(clean)
