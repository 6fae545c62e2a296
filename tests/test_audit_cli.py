"""`lmclean audit show|verify` and the audit record builders (record_event, unlearn_event)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from conftest import tiny_overrides, write_rows
from lmclean import config
from lmclean.audit import (
    KEY_ENV,
    AuditLog,
    model_digest,
    record_event,
    unlearn_event,
    v_norm_summary,
)
from lmclean.store.scrub import scrub_samples
from lmclean.cli.main import app
from lmclean.errors import AuditError, DataError
from lmclean.store.reader import TrajectoryStore
from lmclean.train.trainer import train

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    # the consoles were created when lmclean.cli was first imported, perhaps under another COLUMNS
    # (pytest-xdist workers): give the tables their 200 columns whatever it was
    from rich.console import Console

    from lmclean.cli import audit as audit_cmd

    monkeypatch.setattr(audit_cmd, "out", Console(width=200, highlight=False, soft_wrap=True))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, config.LmcleanConfig]:
    root = tmp_path_factory.mktemp("audit_cli")
    cfg = config.load(None, tiny_overrides(write_rows(root / "data.jsonl")))
    train(cfg, root / "store.zarr")
    return root / "store.zarr", cfg


def perturbed_copy(model_dir: Path, out: Path, delta: float = 1e-3) -> Path:
    """A stand-in for an unlearned model: the recorded one with every weight shifted."""
    shutil.copytree(model_dir, out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: (v + np.asarray(delta, dtype=v.dtype)).astype(v.dtype) for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})
    return out


def add_unlearn(store: Path, out: Path, request_id: str, ids: list[int], before: Path, *, keep_data: bool = False) -> dict:
    fps = TrajectoryStore(store).sample_fingerprints
    return unlearn_event(
        store, request_id=request_id, reason="GDPR art. 17", requested_by="dpo@example.org",
        forget_ids=ids, forget_fingerprints=[fps[i] for i in ids], level="sample", method="lmcleaner",
        K=8, hvp="ggn", damping=1e-4, noise_sigma=0.0, steps_touched=[3, 5], curvature_products=12,
        v_norms=[0.5, 0.9, 0.25], divergence_check="passed (max growth 1.8 < 10)",
        model_before_dir=before, output_dir=out, keep_data=keep_data, wall_time=0.5)


@pytest.fixture
def audited(recorded, tmp_path: Path) -> tuple[Path, Path, dict]:
    """A store with a `record` record and one `unlearn` record (scrubbed) plus the unlearned model."""
    src, cfg = recorded
    store = Path(shutil.copytree(src, tmp_path / "store.zarr"))  # `train` logged the `record` record
    out = perturbed_copy(store / "model", tmp_path / "unlearned")
    rec = add_unlearn(store, out, "r-1", [100, 105], store / "model")
    scrub_samples(store, [100, 105], rec["seq"])
    return store, out, rec


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


# -- the record builders ---------------------------------------------------------------------------


def test_record_and_unlearn_events_fill_the_documented_fields(audited) -> None:
    store, out, rec = audited
    first, second = AuditLog(store).records()
    assert first["kind"] == "record" and first["steps"] == 12 and first["model_digest_before"] is None
    assert first["output_model_digest"] == model_digest(store / "model") and len(first["dataset_digest"]) == 64
    assert second == rec and rec["seq"] == 1
    assert rec["model_digest_before"] == first["output_model_digest"]
    assert rec["output_model_digest"] == model_digest(out) != first["output_model_digest"]
    assert rec["v_norm_summary"] == {"first": 0.5, "max": 0.9, "last": 0.25, "n": 3, "n_nonfinite": 0}
    assert rec["forget_fingerprints"] == [TrajectoryStore(store).sample_fingerprints[i] for i in (100, 105)]
    assert rec["keep_data"] is False and rec["lmclean_version"]
    assert AuditLog(store).verify().ok


def test_unlearn_event_refuses_reused_request_id_and_bad_fingerprints(audited) -> None:
    store, out, _ = audited
    with pytest.raises(DataError, match=r"request id 'r-1' was already used by audit record 1"):
        add_unlearn(store, out, "r-1", [101], out)
    with pytest.raises(DataError, match=r"1 entries for 2 forget_ids"):
        unlearn_event(store, request_id="r-2", reason=None, requested_by=None, forget_ids=[1, 2],
                      forget_fingerprints=["a" * 64], level="sample", method="rollback", K=None, hvp=None,
                      damping=None, noise_sigma=0, steps_touched=[], curvature_products=0, v_norms=[],
                      divergence_check="n/a", model_before_dir=out, output_dir=out, keep_data=True, wall_time=0)
    assert len(AuditLog(store).records()) == 2
    assert v_norm_summary([]) == {"first": None, "max": None, "last": None, "n": 0, "n_nonfinite": 0}
    assert v_norm_summary([1.0, float("nan")])["n_nonfinite"] == 1


# -- show ------------------------------------------------------------------------------------------


def test_show_table_detail_and_json(audited) -> None:
    store, _, rec = audited
    res = invoke("audit", "show", store)
    assert res.exit_code == 0, res.output
    assert "unlearn" in res.stdout and "r-1" in res.stdout and "current model:" in res.stdout
    wide = invoke("audit", "show", store, "--wide").stdout
    assert rec["output_model_digest"][:12] in wide and "lmcleaner" in wide and "0.25" in wide
    assert "chain intact: 2 records" in res.stderr

    res = invoke("audit", "show", store, "--id", "1")
    assert res.exit_code == 0, res.output
    assert "GDPR art. 17" in res.stdout and rec["forget_fingerprints"][1] in res.stdout
    assert "dpo@example.org" in res.stdout

    res = invoke("audit", "show", store, "--json")
    data = json.loads(res.stdout)
    assert [r["kind"] for r in data] == ["record", "unlearn"] and data[1] == rec
    assert json.loads(invoke("audit", "show", store, "--id", "1", "--json").stdout) == rec

    res = invoke("audit", "show", store, "--id", "5")
    assert res.exit_code == 1 and "has no record 5 (records 0..1)" in res.stderr


def test_show_store_without_log(recorded, tmp_path: Path) -> None:
    store = Path(shutil.copytree(recorded[0], tmp_path / "bare.zarr"))
    (store / "audit.jsonl").unlink()  # as left by a Recorder-API run, which logs nothing
    res = invoke("audit", "show", store)
    assert res.exit_code == 0 and "no audit records yet" in res.stderr
    assert json.loads(invoke("audit", "show", store, "--json").stdout) == []
    res = invoke("audit", "verify", store)
    assert res.exit_code == 1 and "has no audit log" in res.stderr


# -- verify ----------------------------------------------------------------------------------------


def test_verify_happy_path_with_models(audited) -> None:
    store, out, _ = audited
    res = invoke("audit", "verify", store)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("ok: 2 records, chain intact") and "2 scrubbed samples" in res.stdout

    res = invoke("audit", "verify", store, "--model", out)
    assert res.exit_code == 0, res.output
    assert "output of record 1 (unlearn, request r-1)" in res.stdout and "lineage 0 -> 1" in res.stdout

    res = invoke("audit", "verify", store, "--model", store / "model")
    # the recorded model no longer includes every request: verify names the one it lacks
    assert res.exit_code == 1 and "does not include the later unlearning request r-1" in res.stderr

    log_only = store.parent / "kept_log"  # the store deleted, its log kept: the model still verifies
    log_only.mkdir()
    shutil.copy(store / "audit.jsonl", log_only)
    res = invoke("audit", "verify", log_only, "--model", out)
    assert res.exit_code == 0 and "output of record 1" in res.stdout

    data = json.loads(invoke("audit", "verify", store, "--model", out, "--json").stdout)
    assert data["ok"] is True and data["problem"] is None and data["records"] == 2
    assert data["model"]["lineage"] == [0, 1] and data["model"]["digest"] == model_digest(out)


def test_verify_names_a_tampered_record(audited) -> None:
    store, out, _ = audited
    log = AuditLog(store)
    lines = log.path.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["forget_ids"] = [100]  # quietly drop a sample from the request
    lines[1] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    log.path.write_text("\n".join(lines) + "\n")
    res = invoke("audit", "verify", store, "--model", out)
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: audit log {log.path}: record 1: digest mismatch (content edited)"
    assert res.stdout == ""
    data = json.loads(invoke("audit", "verify", store, "--json").stdout)
    assert data["ok"] is False and data["first_bad_seq"] == 1 and "digest mismatch" in data["problem"]
    assert "chain broken" in invoke("audit", "show", store).stderr


def test_verify_truncated_log_names_the_line(audited) -> None:
    store, _, _ = audited
    log = AuditLog(store)
    text = log.path.read_text()
    log.path.write_text(text[: len(text) - 40])  # the last record cut short
    res = invoke("audit", "verify", store)
    assert res.exit_code == 1
    assert " ".join(res.stderr.split()).startswith(f"error: audit log {log.path} line 2 is truncated or not JSON")
    assert invoke("audit", "show", store).exit_code == 1


def test_verify_wrong_model_dir(audited, tmp_path: Path) -> None:
    store, out, _ = audited
    other = perturbed_copy(out, tmp_path / "other", delta=0.5)
    res = invoke("audit", "verify", store, "--model", other)
    assert res.exit_code == 1
    line = " ".join(res.stderr.split())  # one message (Rich may wrap it at the terminal width)
    assert line.startswith("error: model ") and line.count("error:") == 1
    assert "which no record in the audit log" in line and "the store's current model is" in line


def test_verify_broken_lineage_and_unscrubbed_samples(audited, tmp_path: Path) -> None:
    store, out, _ = audited
    stray = perturbed_copy(out, tmp_path / "stray", delta=0.25)  # a model no record produced
    out2 = perturbed_copy(out, tmp_path / "second", delta=0.125)
    add_unlearn(store, out2, "r-2", [101], stray, keep_data=True)
    res = invoke("audit", "verify", store, "--model", out2)
    assert res.exit_code == 1
    assert "audit record 2 (request r-2) started from weights" in res.stderr and "one lineage" in res.stderr

    out3 = perturbed_copy(out, tmp_path / "third", delta=0.0625)
    add_unlearn(store, out3, "r-3", [102], out, keep_data=False)  # says scrubbed, never scrubbed
    res = invoke("audit", "verify", store)
    assert res.exit_code == 1
    assert "record 3 (request r-3) says its samples were scrubbed, but sample 102 is not tombstoned" in res.stderr


def test_verify_with_the_key(recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, cfg = recorded
    store = Path(shutil.copytree(src, tmp_path / "signed.zarr"))
    (store / "audit.jsonl").unlink()  # start a fresh chain, signed from its first record
    monkeypatch.setenv(KEY_ENV, "k1")
    record_event(store, "record", cfg, 12, store / "model", 1.0)
    res = invoke("audit", "verify", store, "--model", store / "model")
    assert res.exit_code == 0 and "signatures checked" in res.stdout
    monkeypatch.setenv(KEY_ENV, "wrong")
    res = invoke("audit", "verify", store)
    assert res.exit_code == 1 and "record 0: HMAC mismatch" in res.stderr
    monkeypatch.delenv(KEY_ENV)
    res = invoke("audit", "verify", store)
    assert res.exit_code == 0 and "1 of 1 records are signed; signatures not checked" in res.stderr


def test_unlearn_refuses_a_forged_record_before_any_work(recorded, tmp_path: Path) -> None:
    """The attack: a hand-written record asks to scrub sample 101; unlearn must not act on it or sign over it."""
    src, cfg = recorded
    store = Path(shutil.copytree(src, tmp_path / "forged.zarr"))
    first = AuditLog(store).records()[0]
    forged = {"kind": "unlearn", "request_id": "r-forged", "forget_ids": [101], "keep_data": False, "seq": 1,
              "time": first["time"], "prev": first["digest"], "signed": False, "digest": "0" * 64, "hmac": None}
    with (store / "audit.jsonl").open("a") as f:
        f.write(json.dumps(forged) + "\n")
    log_before = (store / "audit.jsonl").read_bytes()
    tokens_before = {p: p.read_bytes() for p in (store / "steps").rglob("*") if p.is_file()}
    res = invoke("unlearn", store, "--forget", "105", "--method", "rollback", "--out", tmp_path / "out")
    assert res.exit_code == 1, res.output
    assert res.stderr.strip() == (f"error: audit log {store / 'audit.jsonl'}: record 1: digest mismatch (content edited); "
                                  f"refusing to append to a broken chain (run `lmclean audit verify {store}`)")
    assert "Traceback" not in res.output
    assert (store / "audit.jsonl").read_bytes() == log_before
    assert {p: p.read_bytes() for p in (store / "steps").rglob("*") if p.is_file()} == tokens_before  # nothing scrubbed
    assert not (store / "samples" / "tombstone").exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(AuditError, match="record 1: digest mismatch"):  # `record --resume` refuses it as well
        train(cfg, store, resume=True)
    assert (store / "audit.jsonl").read_bytes() == log_before and not (store / "samples" / "tombstone").exists()


def test_enroll_a_key_set_after_recording(recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, cfg = recorded
    store = Path(shutil.copytree(src, tmp_path / "late.zarr"))  # record 0 written without a key
    monkeypatch.setenv(KEY_ENV, "k1")
    res = invoke("audit", "verify", store)
    assert res.stderr.strip() == (f"error: audit log {store / 'audit.jsonl'}: record 0 is unsigned and no key is enrolled "
                                  f"in this log: run `lmclean audit enroll {store}` to start signing with {KEY_ENV}")
    with pytest.raises(AuditError, match=f"run `lmclean audit enroll {store}` first"):
        record_event(store, "resume", cfg, 12, store / "model", 1.0)
    res = invoke("audit", "enroll", store)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("enrolled key ") and "at record 1" in res.stdout and "k1" not in (store / "audit.jsonl").read_text()
    res = invoke("audit", "enroll", store)
    assert res.exit_code == 0 and res.stdout.startswith("already enrolled")
    record_event(store, "resume", cfg, 12, store / "model", 1.0)  # now signed
    res = invoke("audit", "verify", store, "--model", store / "model")
    assert res.exit_code == 0 and "signatures checked" in res.stdout
    assert "record 0 precedes key enrolment at record 1 and is covered by the hash chain only" in res.stderr
    monkeypatch.setenv(KEY_ENV, "k2")
    res = invoke("audit", "enroll", store)
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1 and "pass --rotate" in res.stderr
    res = invoke("audit", "enroll", store, "--rotate", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["record"]["seq"] == 3
    assert invoke("audit", "verify", store).exit_code == 0
    monkeypatch.delenv(KEY_ENV)
    res = invoke("audit", "enroll", store)
    assert res.stderr.strip() == f"error: set {KEY_ENV} to the key to enrol in the audit log of {store}"


def test_missing_store_is_one_line(tmp_path: Path) -> None:
    for cmd in (["show"], ["verify"], ["verify", "--json"]):
        res = invoke("audit", *cmd, tmp_path / "nope.zarr")
        assert res.exit_code == 1
        assert res.stderr.strip() == f"error: store directory {tmp_path / 'nope.zarr'} does not exist; check the path"


def test_help_explains_the_commands() -> None:
    res = invoke("audit", "--help")
    assert res.exit_code == 0 and "show" in res.stdout and "verify" in res.stdout
    res = invoke("audit", "verify", "--help")
    assert "--model" in res.stdout and "LMCLEAN_AUDIT_KEY" in res.stdout
