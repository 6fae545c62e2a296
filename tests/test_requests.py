"""Deletion requests: the durable queue (`lmclean request`), `unlearn --pending`, and requests taken
by a running `record` at step boundaries (exactness with replay, lmcleaner against the do-nothing
baseline, and kill -9 at each crash point followed by `record --resume`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL, error_line, one_thread, tiny_config, write_rows
from typer.testing import CliRunner

from lmclean.audit.log import AuditLog
from lmclean.cli.main import app
from lmclean.requests import enqueue, list_requests, pending
from lmclean.store.check import check_store
from lmclean.store.reader import TrajectoryStore
from lmclean.store.scrub import tombstones
from lmclean.train.trainer import train

runner = CliRunner()
FORGET = [101, 105]
AT = 8  # the request is queued after step AT: the run applies it at the boundary of step AT + 1


def _final(store: Path) -> torch.Tensor:
    s = TrajectoryStore(store)
    return s.checkpoint(s.committed_steps)[0]


def _assert_scrubbed(store: Path, ids: set[int]) -> None:
    """Every recorded token row of `ids` is zeros (a resumed run re-records rows before the request)."""
    s = TrajectoryStore(store)
    seen = s.occurrences(ids)
    assert seen
    for t in seen:
        rec = s.step(t)
        rows = [k for k, i in enumerate(rec.sample_ids) if int(i) in ids]
        assert not rec.tokens[rows].any(), f"step {t} still holds tokens of {ids}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the queue -----------------------------------------------------------------------------------

def test_queue_round_trip_list_and_refusals(store_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import lmclean.cli.request as request_cmd

    monkeypatch.setattr(request_cmd, "out", Console(width=160, highlight=False))  # the table, whatever the terminal
    done = runner.invoke(app, ["request", str(store_copy), "--forget", "101,103", "--reason", "GDPR art. 17",
                               "--requested-by", "dpo@example.org", "--json"])
    assert done.exit_code == 0, done.output
    first = json.loads(done.stdout)
    assert first["status"] == "pending" and first["ids"] == [101, 103] and first["reason"] == "GDPR art. 17"
    assert (store_copy / "requests" / f"{first['id']}.json").is_file()
    rows = tmp_path / "rows.jsonl"  # --forget-data: rows matched by fingerprint (sample 104 of write_rows)
    rows.write_text(json.dumps({"id": 104, "question": "Who is person 4?",
                                "answer": "Person 4 lives in town 6 and likes maps."}) + "\n")
    second = enqueue(store_copy, data=rows, requested_by="w")
    assert second.ids == [104] and second.id != first["id"]
    listed = json.loads(runner.invoke(app, ["request", str(store_copy), "--list", "--json"]).stdout)
    assert [r["id"] for r in listed] == [first["id"], second.id] and {r["status"] for r in listed} == {"pending"}
    table = runner.invoke(app, ["request", str(store_copy), "--list"])
    assert table.exit_code == 0 and first["id"] in table.stdout and "pending" in table.stdout
    assert "999" in error_line(runner.invoke(app, ["request", str(store_copy), "--forget", "999"]))
    assert "nothing to forget" in error_line(runner.invoke(app, ["request", str(store_copy)]))
    assert check_store(store_copy).ok  # the requests directory is no part of the store's arrays


def test_unlearn_pending_applies_queued_requests_in_one_sweep(store_copy: Path) -> None:
    empty = runner.invoke(app, ["unlearn", str(store_copy), "--pending"])
    assert empty.exit_code == 0 and empty.stderr.count("\n") == 1 and "no pending" in empty.stderr
    a = enqueue(store_copy, ids="101,103", reason="r1")
    b = enqueue(store_copy, ids="103,107", requested_by="w2")
    done = runner.invoke(app, ["unlearn", str(store_copy), "--pending", "--method", "replay", "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    unlearns = [r for r in AuditLog(store_copy).records() if r.get("kind") == "unlearn"]
    assert len(unlearns) == 1 and unlearns[0]["forget_ids"] == [101, 103, 107]  # one sweep: the union
    by_id = {r.id: r for r in list_requests(store_copy)}
    for r in (a, b):
        got = by_id[r.id]
        assert got.status == "applied" and got.audit_seq == unlearns[0]["seq"] and got.wait_seconds >= 0
        assert got.audit_request_id == unlearns[0]["request_id"] == report["request_id"]
    assert set(tombstones(store_copy)) == {101, 103, 107}
    # forgotten now: refused when queued, with one line
    assert "already unlearned" in error_line(runner.invoke(app, ["request", str(store_copy), "--forget", "107"]))
    # a request whose samples were forgotten after it was queued is refused by --pending, with the reason
    c = enqueue(store_copy, ids="110")
    assert runner.invoke(app, ["unlearn", str(store_copy), "--forget", "110", "--method", "rollback"]).exit_code == 0
    again = runner.invoke(app, ["unlearn", str(store_copy), "--pending"])
    assert again.exit_code == 0, again.output
    refused = {r.id: r for r in list_requests(store_copy)}[c.id]
    assert refused.status == "refused" and "110" in refused.error and not pending(store_copy)


# -- requests taken by a running `record` ------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The exclude reference (record --exclude FORGET) and the "exclude from later batches only" run."""
    tmp = tmp_path_factory.mktemp("online")
    data = write_rows(tmp / "data.jsonl", n=16)
    out: dict[str, object] = {"tmp": tmp, "data": data}
    train(_cfg(data), tmp / "exclude.zarr", exclude=FORGET)
    out["exclude"] = _final(tmp / "exclude.zarr")
    out["none"] = _online(tmp / "none.zarr", data, "none")
    return out


def _cfg(data: Path, method: str = "lmcleaner"):  # noqa: ANN202
    return tiny_config(data, **{"train.epochs": 4, "train.schedule": "constant", "record.unlearn.method": method})


def _online(store: Path, data: Path, method: str) -> torch.Tensor:
    def on_step(t: int, total: int, loss: float, lr: float) -> None:
        if t == AT:
            enqueue(store, ids=",".join(map(str, FORGET)), reason="test")

    train(_cfg(data, method), store, on_step=on_step)
    (req,) = list_requests(store)
    assert req.status == "applied" and req.step == AT + 1 and req.method == method and req.wait_seconds > 0
    assert set(tombstones(store)) == set(FORGET)
    _assert_scrubbed(store, set(FORGET))
    (record,) = [r for r in AuditLog(store).records() if r.get("kind") == "online-unlearn"]
    assert record["forget_ids"] == FORGET and record["step"] == AT + 1 and record["request_id"] == req.audit_request_id
    return _final(store)


def test_request_while_recording_with_replay_equals_the_exclude_run(runs: dict) -> None:
    theta = _online(runs["tmp"] / "replay.zarr", runs["data"], "replay")
    events = TrajectoryStore(runs["tmp"] / "replay.zarr").corrections
    assert [(e.step, e.method) for e in events] == [(AT + 1, "replay")]
    assert _rel(theta, runs["exclude"]) < 1e-6  # measured 1.1e-8 (fp32 rounding of θ + (θ' − θ))
    assert _rel(runs["none"], runs["exclude"]) > 1e-3  # the samples' influence is not negligible here
    assert check_store(runs["tmp"] / "replay.zarr").ok  # θ replays exactly through the jump


def test_request_while_recording_with_lmcleaner_halves_the_do_nothing_residual(runs: dict) -> None:
    theta = _online(runs["tmp"] / "lmcleaner.zarr", runs["data"], "lmcleaner")
    ratio = float((theta - runs["exclude"]).norm() / (runs["none"] - runs["exclude"]).norm())
    assert ratio <= 0.5, ratio  # measured 0.39


def test_request_queued_while_no_job_runs_is_applied_when_the_run_resumes(runs: dict) -> None:
    store = runs["tmp"] / "interrupted.zarr"

    def stop(t: int, total: int, loss: float, lr: float) -> None:
        if t == 9:
            raise KeyboardInterrupt  # Ctrl-C: the store stays resumable from checkpoint 8

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(runs["data"], "replay"), store, on_step=stop)
    req = enqueue(store, ids=",".join(map(str, FORGET)))
    train(_cfg(runs["data"], "replay"), store, resume=True)
    (got,) = list_requests(store)
    assert got.id == req.id and got.status == "applied" and got.step == 8  # the first boundary of the resumed run
    assert _rel(_final(store), runs["exclude"]) < 1e-6


# -- kill -9 while a request is applied, then `record --resume` ------------------------------------

DRIVER = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from lmclean import config as config_mod
from lmclean.requests import enqueue
from lmclean.train.trainer import train
cfg_path, store, at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def on_step(t, total, loss, lr):
    if t == at:
        enqueue(store, ids="101,105", reason="crash test")
train(config_mod.load(cfg_path), store, on_step=on_step, base=cfg_path.parent)
"""


def _crash_config(tmp: Path) -> Path:
    cfg = {"seed": 1, "model": {"config": TINY_MODEL}, "data": {"path": str(write_rows(tmp / "data.jsonl", n=16)),
                                                                 "max_length": 48},
           "train": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 4, "epochs": 4,
                     "schedule": "constant"},
           "record": {"checkpoint_every": 4, "unlearn": {"method": "lmcleaner", "K": 3}}}
    path = tmp / "crash.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LMCLEAN_CRASH_AT", None)
    if crash:
        env["LMCLEAN_CRASH_AT"] = crash
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def crash_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The never-killed runs, in this process on one thread."""
    from lmclean import config as config_mod

    tmp = tmp_path_factory.mktemp("crash")
    cfg = _crash_config(tmp)
    out: dict[str, object] = {"cfg": cfg}
    for at in (5, 7):  # applied at step 6 (between checkpoints) and at step 8 (a checkpoint step)
        store = tmp / f"ref{at}.zarr"

        def on_step(t: int, total: int, loss: float, lr: float, store: Path = store, at: int = at) -> None:
            if t == at:
                enqueue(store, ids="101,105", reason="crash test")

        with one_thread():
            train(config_mod.load(cfg), store, on_step=on_step, base=cfg.parent)
        out[at] = _final(store)
    return out


@pytest.mark.parametrize(("point", "at"), [("request:after-compute", 5), ("request:after-correct", 5),
                                           ("request:after-audit", 5), ("request:after-correct", 7)])
def test_kill_while_applying_a_request_then_resume_gives_the_same_model(crash_reference: dict, tmp_path: Path,
                                                                        point: str, at: int) -> None:
    store = tmp_path / "killed.zarr"
    killed = _run(["-c", DRIVER, str(crash_reference["cfg"]), str(store), str(at)], crash=point)
    assert killed.returncode == 86, killed.stderr[-3000:]  # os._exit at the crash point
    (req,) = list_requests(store)
    assert req.status == "pending" and req.step == at + 1  # claimed for its step, not yet applied
    with one_thread():
        resumed = runner.invoke(app, ["record", "--store", str(store), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert torch.equal(_final(store), crash_reference[at])  # bitwise: the jump is re-applied, never recomputed
    (req,) = list_requests(store)
    assert req.status == "applied" and req.step == at + 1
    online = [r for r in AuditLog(store).records() if r.get("kind") == "online-unlearn"]
    assert len(online) == 1 and online[0]["request_id"] == req.audit_request_id
    assert online[0]["recovered"] == (point == "request:after-correct")  # the audit record written on resume
    assert set(tombstones(store)) == {101, 105}
    _assert_scrubbed(store, {101, 105})
    assert [e.step for e in TrajectoryStore(store).corrections] == [at + 1]
    report = check_store(store)
    assert report.ok, report.first
