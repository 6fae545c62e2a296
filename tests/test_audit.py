"""Tests for lmclean.audit: the hash-chained log, tamper detection, digests and the store lock."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lmclean.audit import (
    GENESIS_PREV,
    KEY_ENV,
    AuditLog,
    canonical_json,
    content_fingerprint,
    file_digest,
    model_digest,
)
from lmclean.store.lock import LOCK_FILENAME, StoreLock, read_lock
from lmclean.audit.log import key_fingerprint
from lmclean.errors import AuditError, DataError, InputNotFoundError, StoreLockedError

KEY = "s3cret-key"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def make_log(store: Path, n: int = 4) -> AuditLog:
    log = AuditLog(store)
    for i in range(n):
        log.append({"kind": "unlearn", "request_id": f"r{i}", "forget_ids": [i, i + 1]})
    return log


def lines(log: AuditLog) -> list[str]:
    return log.path.read_text(encoding="utf-8").splitlines()


def write_lines(log: AuditLog, new: list[str]) -> None:
    log.path.write_text("".join(x + "\n" for x in new), encoding="utf-8")


def rechain(records: list[dict], key: bytes | None = None) -> list[str]:
    """An attacker's full rewrite: recompute seq, prev, digest (and hmac if the key is known)."""
    import hmac

    out, prev = [], GENESIS_PREV
    for seq, rec in enumerate(records):
        rec = {**rec, "seq": seq, "prev": prev}
        body = {k: v for k, v in rec.items() if k not in ("digest", "hmac")}
        raw = canonical_json(body).encode()
        rec["digest"] = prev = hashlib.sha256(raw).hexdigest()
        if key is not None:
            rec["hmac"] = hmac.new(key, raw, hashlib.sha256).hexdigest()
        out.append(canonical_json(rec))
    return out


# -- the chain ----------------------------------------------------------------------------------


def test_chain_fields_and_verify(tmp_path: Path) -> None:
    log = make_log(tmp_path, 3)
    recs = log.records()
    assert [r["seq"] for r in recs] == [0, 1, 2]
    assert recs[0]["prev"] == GENESIS_PREV
    assert recs[1]["prev"] == recs[0]["digest"] and recs[2]["prev"] == recs[1]["digest"]
    assert all(r["time"].endswith("Z") and r["signed"] is False and r["hmac"] is None for r in recs)
    res = log.verify()
    assert (res.ok, res.n_records, res.first_bad_seq, res.problem) == (True, 3, None, None)
    assert res.signatures_checked is False and res.note is None


def test_append_returns_stored_record_and_keeps_extra_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    rec = log.append({"kind": "record", "anything": ("tuple", 1), "naïve": "é", "k": {2: "x"}})
    assert log.records() == [rec]
    assert rec["anything"] == ["tuple", 1] and rec["k"] == {"2": "x"}
    assert log.verify().ok


def test_append_rejects_chain_fields(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"\['digest', 'seq'\] are filled by AuditLog.append"):
        AuditLog(tmp_path).append({"seq": 5, "digest": "x"})


def test_append_needs_existing_store(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        AuditLog(tmp_path / "missing").append({"kind": "record"})


def test_missing_log_is_empty(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    assert log.records() == [] and not log.exists()
    assert log.verify().ok and log.verify().n_records == 0


def _edit(ls: list[str]) -> list[str]:
    rec = json.loads(ls[1])
    rec["forget_ids"] = [99]
    return [ls[0], canonical_json(rec), *ls[2:]]


def _renumber_after_delete(ls: list[str]) -> list[str]:
    """Delete record 1, then fix seq and digest of each later record but not its prev."""
    out = [ls[0]]
    for seq, line in enumerate(ls[2:], start=1):
        rec = json.loads(line)
        rec["seq"] = seq
        body = {k: v for k, v in rec.items() if k not in ("digest", "hmac")}
        rec["digest"] = hashlib.sha256(canonical_json(body).encode()).hexdigest()
        out.append(canonical_json(rec))
    return out


TAMPER_CASES: list[tuple[str, Callable[[list[str]], list[str]], int, str]] = [
    ("edited", _edit, 1, "record 1: digest mismatch (content edited)"),
    (
        "deleted",
        lambda ls: [ls[0], *ls[2:]],
        1,
        "record 1 (line 2): seq is 2, expected 1 (record deleted or reordered)",
    ),
    (
        "deleted_first",
        lambda ls: ls[1:],
        0,
        "record 0 (line 1): seq is 1, expected 0 (record deleted or reordered)",
    ),
    (
        "reordered",
        lambda ls: [ls[0], ls[2], ls[1], ls[3]],
        1,
        "record 1 (line 2): seq is 2, expected 1 (record deleted or reordered)",
    ),
    (
        "deleted_renumbered",
        _renumber_after_delete,
        1,
        "record 1: prev does not match digest of record 0 (record deleted or reordered)",
    ),
]


@pytest.mark.parametrize(
    ("name", "tamper", "bad", "problem"), TAMPER_CASES, ids=[c[0] for c in TAMPER_CASES]
)
def test_tamper_detected(
    tmp_path: Path, name: str, tamper: Callable[[list[str]], list[str]], bad: int, problem: str
) -> None:
    log = make_log(tmp_path)
    write_lines(log, tamper(lines(log)))
    res = log.verify()
    assert (res.ok, res.first_bad_seq, res.problem) == (False, bad, problem)


def test_truncated_last_line(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    log.path.write_bytes(log.path.read_bytes()[:-20])
    expected = f"audit log {log.path} line 4 is truncated or not JSON: "
    with pytest.raises(AuditError) as ei:
        log.records()
    assert str(ei.value).startswith(expected)
    res = log.verify()
    assert not res.ok and res.first_bad_seq == 3 and res.problem.startswith(expected)
    with pytest.raises(AuditError, match="refusing to append to a damaged log"):
        log.append({"kind": "unlearn"})


# -- signatures ---------------------------------------------------------------------------------


def test_signed_chain_with_and_without_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 3)
    assert all(r["signed"] is True and len(r["hmac"]) == 64 for r in log.records())
    res = log.verify()
    assert res.ok and res.signatures_checked and res.n_signed == 3
    assert log.verify(KEY.encode()).ok
    monkeypatch.delenv(KEY_ENV)
    res = log.verify()
    assert res.ok and not res.signatures_checked
    assert "signatures not checked" in res.note


def test_wrong_key_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 2)
    res = log.verify(b"wrong")
    assert not res.ok and res.first_bad_seq == 0
    assert res.problem == "record 0: HMAC mismatch (wrong key, or the chain was rewritten)"


def test_unsigned_record_fails_when_key_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 3)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuditError, match="signed since key enrolment at record 0; set LMCLEAN_AUDIT_KEY"):
        log.append({"kind": "unlearn"})
    recs = log.records()  # an unsigned record chained on by hand: caught with or without the key
    write_lines(log, lines(log) + rechain([*recs, {"kind": "unlearn", "signed": False, "hmac": None}])[3:])
    problem = ("record 3 is unsigned, but a key was enrolled at record 0: every record from the "
               "enrolment on must be signed")
    for key in (None, KEY):
        res = log.verify(key, use_env=False)
        assert (res.ok, res.first_bad_seq, res.problem) == (False, 3, problem)


def test_stripped_signature_detected_without_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 3)
    monkeypatch.delenv(KEY_ENV)
    ls = lines(log)
    rec = json.loads(ls[1])
    rec["hmac"] = None
    write_lines(log, [ls[0], canonical_json(rec), ls[2]])
    res = log.verify()
    assert not res.ok and res.problem == (
        "record 1: marked signed but hmac is missing (signature stripped)"
    )


def test_full_rewrite_only_caught_with_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path)
    monkeypatch.delenv(KEY_ENV)
    recs = log.records()
    recs[2]["forget_ids"] = []
    write_lines(log, rechain(recs))  # old hmacs kept: the attacker cannot recompute them
    assert log.verify().ok
    res = log.verify(KEY)
    assert not res.ok and res.first_bad_seq == 2 and "HMAC mismatch" in res.problem


# -- writers verify first; key enrolment -------------------------------------------------------


@pytest.mark.parametrize(("name", "tamper", "bad", "problem"), TAMPER_CASES, ids=[c[0] for c in TAMPER_CASES])
def test_append_refuses_a_broken_chain(
    tmp_path: Path, name: str, tamper: Callable[[list[str]], list[str]], bad: int, problem: str
) -> None:
    log = make_log(tmp_path)
    write_lines(log, tamper(lines(log)))
    before = log.path.read_bytes()
    expected = (f"audit log {log.path}: {problem}; refusing to append to a broken chain "
                f"(run `lmclean audit verify {tmp_path}`)")
    for call in (lambda: log.append({"kind": "unlearn"}), log.require_intact):
        with pytest.raises(AuditError) as ei:
            call()
        assert str(ei.value) == expected
    assert log.path.read_bytes() == before


def test_append_with_a_key_checks_the_signatures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 3)
    recs = log.records()
    recs[2]["forget_ids"] = [7]
    write_lines(log, rechain(recs))  # a consistent chain without the key: only the HMAC shows it
    with pytest.raises(AuditError, match=r"record 2: HMAC mismatch .*run `lmclean audit verify"):
        log.append({"kind": "unlearn"})


def test_key_set_on_an_empty_log_enrols_with_record_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 2)
    first, second = log.records()
    assert first["key_fingerprint"] == key_fingerprint(KEY.encode()) and "key_fingerprint" not in second
    assert KEY not in log.path.read_text()
    res = log.verify()
    assert res.ok and res.enrolled_at == 0 and res.current_key_at == 0 and res.note is None


def test_key_set_after_recording_needs_enrolment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, 2)
    monkeypatch.setenv(KEY_ENV, KEY)
    res = log.verify()
    assert (res.ok, res.first_bad_seq) == (False, 0)
    assert res.problem == ("record 0 is unsigned and no key is enrolled in this log: run "
                           f"`lmclean audit enroll {tmp_path}` to start signing with {KEY_ENV}")
    with pytest.raises(AuditError, match=r"has 2 records but no key enrolment, .*run `lmclean audit enroll "):
        log.append({"kind": "unlearn"})
    rec, created = log.enroll()
    assert created and rec["seq"] == 2 and rec["kind"] == "key-enrolled" and rec["signed"] is True
    assert rec["key_fingerprint"] == key_fingerprint(KEY.encode()) and rec["previous_key_fingerprint"] is None
    log.append({"kind": "unlearn"})
    res = log.verify()
    assert res.ok and res.enrolled_at == 2 and res.signatures_checked
    assert res.note == "records 0..1 precede key enrolment at record 2 and are covered by the hash chain only"
    assert log.enroll() == (rec, False)  # the same key again: nothing to do
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(AuditError, match="signed since key enrolment at record 2; set LMCLEAN_AUDIT_KEY"):
        log.append({"kind": "unlearn"})
    with pytest.raises(AuditError, match="set LMCLEAN_AUDIT_KEY to the key to enrol"):
        log.enroll()


def test_enrolment_anchors_the_unsigned_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, 2)
    monkeypatch.setenv(KEY_ENV, KEY)
    log.enroll()
    recs = log.records()
    recs[0]["forget_ids"] = []
    write_lines(log, rechain(recs))  # prefix edited and the whole chain recomputed, old hmac kept
    res = log.verify()
    assert (res.ok, res.first_bad_seq) == (False, 2) and "HMAC mismatch" in res.problem


def test_another_key_needs_rotate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    log = make_log(tmp_path, 2)
    monkeypatch.setenv(KEY_ENV, "new-key")
    with pytest.raises(AuditError, match=r"already has a key enrolled at record 0 \(fingerprint [0-9a-f]{12}…\) "
                                         r"and LMCLEAN_AUDIT_KEY is another key .*pass --rotate"):
        log.enroll()
    with pytest.raises(AuditError, match="record 0: HMAC mismatch"):
        log.append({"kind": "unlearn"})
    rec, created = log.enroll(rotate=True)
    assert created and rec["seq"] == 2 and rec["previous_key_fingerprint"] == key_fingerprint(KEY.encode())
    log.append({"kind": "unlearn"})
    res = log.verify()
    assert res.ok and (res.enrolled_at, res.current_key_at) == (0, 2)
    assert res.note == "records 0..1 were signed with an earlier key (rotated at record 2); covered by the hash chain only"
    res = log.verify(KEY)
    assert (res.ok, res.first_bad_seq) == (False, 2) and "HMAC mismatch" in res.problem


def test_forged_enrolment_and_unsigned_tail_fail_without_key(tmp_path: Path) -> None:
    log = make_log(tmp_path, 2)
    recs = log.records()
    write_lines(log, rechain([*recs, {"kind": "key-enrolled", "signed": False, "hmac": None}]))
    res = log.verify()
    assert (res.ok, res.first_bad_seq, res.problem) == (False, 2, "record 2 enrols a key but is unsigned (forged)")


# -- atomic append, queries ---------------------------------------------------------------------


def test_append_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, 2)
    before = log.path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        log.append({"kind": "unlearn"})
    assert log.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl"]


def test_find_and_latest(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append({"kind": "record"})
    log.append({"kind": "unlearn", "output_model_digest": "aa"})
    log.append({"kind": "unlearn", "output_model_digest": "bb"})
    log.append({"kind": "unlearn", "output_model_digest": "aa", "request_id": "last"})
    assert [r["seq"] for r in log.find(lambda r: r["kind"] == "unlearn")] == [1, 2, 3]
    assert log.latest(where={"output_model_digest": "aa"})["request_id"] == "last"
    assert log.latest(where=lambda r: r.get("output_model_digest") == "bb")["seq"] == 2
    assert log.latest(where={"output_model_digest": "cc"}) is None
    assert log.latest()["seq"] == 3


# -- digests ------------------------------------------------------------------------------------


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w.a": rng.standard_normal((3, 4)).astype(np.float32),
        "w.b": rng.standard_normal(5).astype(np.float64),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


def test_model_digest_stable_across_resave(tmp_path: Path) -> None:
    w = _weights()
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    save_file(w, a / "model.safetensors", metadata={"format": "np"})
    save_file({"w.b": w["w.b"]}, b / "model-00001-of-00002.safetensors", metadata={"x": "1"})
    save_file({"ids": w["ids"], "w.a": w["w.a"]}, b / "model-00002-of-00002.safetensors")
    assert model_digest(a) == model_digest(b) == model_digest(a / "model.safetensors")
    assert len(model_digest(a)) == 64


def test_model_digest_sensitive_to_one_weight(tmp_path: Path) -> None:
    w = _weights()
    save_file(w, tmp_path / "m1.safetensors")
    before = model_digest(tmp_path)
    w["w.a"][1, 2] = np.nextafter(w["w.a"][1, 2], np.float32(10))
    save_file(w, tmp_path / "m1.safetensors")
    assert model_digest(tmp_path) != before


def test_model_digest_bfloat16_and_dtype(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_pt

    t = torch.linspace(-1, 1, 8)
    save_pt({"x": t.to(torch.bfloat16)}, tmp_path / "a.safetensors")
    d_bf16 = model_digest(tmp_path)
    save_pt({"x": t.to(torch.float16)}, tmp_path / "a.safetensors")
    assert model_digest(tmp_path) != d_bf16  # same bytes size, different dtype
    save_pt({"x": t.to(torch.bfloat16)}, tmp_path / "a.safetensors", metadata={"m": "v"})
    assert model_digest(tmp_path) == d_bf16


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_model_digest_missing(tmp_path: Path, make: str) -> None:
    target = tmp_path / "model"
    if make == "empty":
        target.mkdir()
    with pytest.raises(InputNotFoundError, match=r"safetensors|does not exist"):
        model_digest(target)


def test_model_digest_rejects_bad_files(tmp_path: Path) -> None:
    save_file({"x": np.zeros(2, np.float32)}, tmp_path / "a.safetensors")
    save_file({"x": np.ones(2, np.float32)}, tmp_path / "b.safetensors")
    with pytest.raises(DataError, match=r"appears in both a\.safetensors and b\.safetensors"):
        model_digest(tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DataError, match="not a safetensors file"):
        model_digest(tmp_path)


def test_file_digest(tmp_path: Path) -> None:
    (f := tmp_path / "f.txt").write_bytes(b"hello")
    assert file_digest(f) == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(InputNotFoundError):
        file_digest(tmp_path / "nope")


def test_content_fingerprint_definition() -> None:
    ids = [1, 2, -100, 50257]
    expected = hashlib.sha256(struct.pack("<4i", *ids)).hexdigest()
    assert content_fingerprint(ids) == expected
    assert content_fingerprint(np.array(ids, dtype=np.int64)) == expected
    assert content_fingerprint([]) == hashlib.sha256(b"").hexdigest()
    for bad in ([2**31], [1.5], [[1, 2]]):
        with pytest.raises(DataError):
            content_fingerprint(bad)


# -- lock ---------------------------------------------------------------------------------------


def test_lock_excludes_second_holder(tmp_path: Path) -> None:
    with StoreLock(tmp_path, "unlearn") as lock:
        info = json.loads((tmp_path / LOCK_FILENAME).read_text())
        assert info["pid"] == os.getpid() and info["purpose"] == "unlearn"
        assert info["since"].endswith("Z") and read_lock(tmp_path) == info
        with pytest.raises(StoreLockedError, match=rf"locked by pid {os.getpid()} \(unlearn\)"):
            StoreLock(tmp_path, "record").acquire()
        assert lock.held and not lock.stale_cleared
    assert not (tmp_path / LOCK_FILENAME).exists() and read_lock(tmp_path) is None


def test_stale_lock_is_cleared(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = {
        "pid": proc.pid,
        "host": socket.gethostname(),
        "since": "2020-01-01T00:00:00Z",
        "purpose": "record",
    }
    (tmp_path / LOCK_FILENAME).write_text(json.dumps(stale))
    with StoreLock(tmp_path, "unlearn") as lock:
        assert lock.stale_cleared and lock.stale_info == stale
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lock_on_other_host_is_not_cleared(tmp_path: Path) -> None:
    other = {"pid": 1, "host": "elsewhere", "since": "T", "purpose": "record"}
    (tmp_path / LOCK_FILENAME).write_text(json.dumps(other))
    with pytest.raises(StoreLockedError, match="pid 1 on host elsewhere"):
        StoreLock(tmp_path, "unlearn").acquire()


def test_unreadable_lock_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILENAME).write_text("")
    with pytest.raises(StoreLockedError, match="unreadable lock file"):
        StoreLock(tmp_path, "unlearn").acquire()


def test_lock_released_after_exception(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"), StoreLock(tmp_path, "unlearn"):
        raise ValueError("boom")
    assert not (tmp_path / LOCK_FILENAME).exists()
    with StoreLock(tmp_path, "again"):
        pass


def test_release_leaves_foreign_lock(tmp_path: Path) -> None:
    lock = StoreLock(tmp_path, "unlearn")
    lock.acquire()
    (tmp_path / LOCK_FILENAME).write_text(json.dumps({"pid": 1, "host": "h"}))
    lock.release()
    assert (tmp_path / LOCK_FILENAME).exists()
