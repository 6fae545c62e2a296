"""Stores on object storage: every command on s3:// (moto's server, a real S3 API) and memory://.

Covered: record killed with SIGKILL mid-run and resumed on the URL, equal bit for bit to an
uninterrupted local run; two writers racing for one store (one wins, the other one error line, exit
1); unlearn (which scrubs), audit verify, inspect-log and request on the URL; the lease and the
conditional pushes (If-None-Match / If-Match) that stand in for O_EXCL and rename.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_MODEL, error_line, one_thread, write_rows
from typer.testing import CliRunner

from lmclean import config as config_mod
from lmclean.cli.main import app
from lmclean.errors import StoreLockedError
from lmclean.store import remote
from lmclean.store.reader import TrajectoryStore
from lmclean.store.scrub import tombstones
from lmclean.train.trainer import train

pytest.importorskip("obstore")
moto_server = pytest.importorskip("moto.server")
BUCKET = "lmclean-test"
STEPS = 120
CKPT = 20


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free local port, and the AWS_* variables that point obstore at it."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMCLEAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(tmp: Path) -> Path:
    cfg = {"seed": 1, "model": {"config": TINY_MODEL}, "data": {"path": str(write_rows(tmp / "data.jsonl")), "max_length": 48},
           "train": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05, "batch_size": 4, "steps": STEPS},
           "record": {"checkpoint_every": CKPT}}
    path = tmp / "remote.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(cfg: Path, url: str, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMCLEAN_SYNC_SECONDS": "0.3", "LMCLEAN_CACHE": str(cache)}
    env.pop("LMCLEAN_DEBUG", None)
    # each step 0.1 s slower: the job is surely still running when the test kills it, on a loaded machine too
    code = ("import sys, time; from lmclean.store.writer import StoreWriter as W; put = W.put; "
            "W.put = lambda self, item: (time.sleep(0.1), put(self, item))[1]; "
            "from lmclean.cli.main import app; sys.argv[0] = 'lmclean'; app()")
    return subprocess.Popen([sys.executable, "-c", code, "record", str(cfg), "--store", url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _remote_commit(key: str) -> dict:
    import boto3

    try:
        body = boto3.client("s3").get_object(Bucket=BUCKET, Key=f"{key}/COMMIT.json")["Body"].read()
        return json.loads(body)
    except Exception:  # not pushed yet
        return {"committed_steps": 0, "closed": False}


def _pulled(url: str, tmp: Path) -> TrajectoryStore:
    """The remote store as a fresh machine sees it: pulled into a new cache."""
    os.environ["LMCLEAN_CACHE"] = str(tmp / "fresh-cache")
    with remote.open_location(url, "test") as local:
        return TrajectoryStore(local)


@pytest.mark.slow
def test_s3_race_kill_resume_unlearn_verify(s3: dict[str, str], tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    url = f"s3://{BUCKET}/runs/killed.zarr"
    # two writers (separate caches, as on two machines) race for one new store: exactly one wins
    procs = [_start(cfg, url, tmp_path / f"cache-{i}") for i in range(2)]
    deadline, seen = time.monotonic() + 120, 0
    while time.monotonic() < deadline and not seen:
        seen = _remote_commit("runs/killed.zarr")["committed_steps"] > CKPT
        assert not all(p.poll() is not None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        time.sleep(0.05)
    assert seen, "no steps pushed within 120 s"
    losers = [p for p in procs if p.poll() is not None]
    assert len(losers) == 1, "exactly one writer must lose the race"
    winner = next(p for p in procs if p is not losers[0])
    winner.send_signal(signal.SIGKILL)
    winner.wait(timeout=30)
    _, loser_err = losers[0].communicate()
    lines = loser_err.strip().splitlines()
    assert losers[0].returncode == 1 and len(lines) == 1 and lines[0].startswith("error: store s3://"), loser_err
    assert "locked by `record`" in lines[0]

    pushed = _pulled(url, tmp_path)  # what survived the kill: a readable store at the last pushed commit
    committed = pushed.committed_steps
    assert CKPT < committed < STEPS and not pushed.closed

    runner = CliRunner()
    # resumed where it was killed: the staging copy there is ahead of the bucket and must be reset to it
    os.environ["LMCLEAN_CACHE"] = str(tmp_path / f"cache-{procs.index(winner)}")
    with one_thread():
        resumed = runner.invoke(app, ["record", "--store", url, "--resume", "--json"])
        assert resumed.exit_code == 0, resumed.output
        assert json.loads(resumed.stdout)["resumed_from"] == committed // CKPT * CKPT
        reference = train(config_mod.load(cfg), tmp_path / "reference.zarr")
    done, ref = _pulled(url, tmp_path / "after"), TrajectoryStore(reference.store)
    assert done.closed and done.committed_steps == STEPS
    assert torch.equal(done.checkpoint(STEPS)[0], ref.checkpoint(STEPS)[0])
    for t in (0, committed - 1, committed, STEPS - 1):
        assert torch.equal(done.grad(t), ref.grad(t))

    info = json.loads(runner.invoke(app, ["inspect-log", url, "--json"]).stdout)
    assert info["steps"]["committed"] == STEPS
    unlearned = runner.invoke(app, ["unlearn", url, "--forget", "101,102", "--method", "rollback", "--json"])
    assert unlearned.exit_code == 0, unlearned.output
    report = json.loads(unlearned.stdout)
    assert report["scrubbed_steps"] > 0
    verified = runner.invoke(app, ["audit", "verify", url, "--json"])
    assert verified.exit_code == 0, verified.output
    result = json.loads(verified.stdout)
    assert result["problem"] is None and result["scrub"]["tombstoned"] == 2, result
    scrubbed = _pulled(url, tmp_path / "scrubbed")  # the tokens are gone from the bucket, not just the cache
    assert sorted(tombstones(scrubbed.path)) == [101, 102]
    for step in report["steps_touched"][:3]:
        rec, orig = scrubbed.step(step), ref.step(step)
        gone = np.isin(rec.sample_ids, [101, 102])
        assert gone.any() and not np.array_equal(rec.tokens[gone], orig.tokens[gone])
        assert np.array_equal(rec.tokens[~gone], orig.tokens[~gone])
    assert json.loads(remote.RemoteLocation(url).get(remote.LEASE_KEY)[0])["expires"] == 0  # released

    # `request` only adds objects (If-None-Match), no lease: it queues while a job holds the store
    lease = remote.Lease(remote.RemoteLocation(url), "record", seconds=30)
    lease.acquire()
    try:
        queued = runner.invoke(app, ["request", url, "--forget", "103", "--json"])
        assert queued.exit_code == 0, queued.output
    finally:
        lease.release()
    listed = runner.invoke(app, ["request", url, "--list", "--json"])
    assert [r["ids"] for r in json.loads(listed.stdout)] == [[103]]


def test_a_held_lease_refuses_a_second_writer_in_one_line(s3: dict[str, str], tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/runs/leased.zarr"
    lease = remote.Lease(remote.RemoteLocation(url), "record", seconds=30)
    lease.acquire()
    try:
        line = error_line(CliRunner().invoke(app, ["record", "--store", url, "--set", "train.steps=2"]))
        assert "is locked by `record`" in line and url in line
        assert not list(Path(os.environ["LMCLEAN_CACHE"]).rglob("COMMIT.json"))  # nothing ran
    finally:
        lease.release()


def test_racing_lease_takers_exactly_one_wins() -> None:
    url = "memory://race/run.zarr"
    start, results = threading.Barrier(8), []

    def take() -> None:
        lease = remote.Lease(remote.RemoteLocation(url), "record", seconds=30)
        start.wait()
        try:
            lease.acquire()
            results.append(lease)
        except StoreLockedError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, remote.Lease)]
    assert len(winners) == 1 and all("is locked by `record`" in r for r in results if isinstance(r, str))
    winners[0].release()
    again = remote.Lease(remote.RemoteLocation(url), "unlearn")
    again.acquire()  # a released (expired) lease is taken over
    again.release()


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "memory://expiry/run.zarr"
    old = remote.Lease(remote.RemoteLocation(url), "record", seconds=0.2)
    old.acquire()
    old._stop.set()  # a holder that hangs: no heartbeat
    time.sleep(0.3)
    new = remote.Lease(remote.RemoteLocation(url), "unlearn", seconds=30)
    new.acquire()
    with pytest.raises(StoreLockedError, match="lost its lease"):
        old.renew()
    new.release()


def test_memory_push_is_conditional_on_the_version_pulled(tmp_path: Path) -> None:
    """Two staging copies of one store: a stale one can neither overwrite nor re-create an object."""
    url = "memory://cond/run.zarr"
    with remote.open_location(url, "a", "write") as a:
        a.mkdir()
        (a / "COMMIT.json").write_text('{"n": 1}')
        (a / "data").write_bytes(b"v1")
    loc = remote.RemoteLocation(url)
    stale = remote.Staging(loc, tmp_path / "stale")
    stale.pull()
    assert (stale.store / "data").read_bytes() == b"v1"
    with remote.open_location(url, "b", "write") as b:  # another writer moves the store on
        (b / "data").write_bytes(b"v2")
        (b / "new").write_bytes(b"n")
    time.sleep(0.01)
    (stale.store / "data").write_bytes(b"stale")
    with pytest.raises(StoreLockedError, match="was changed by another writer"):
        stale.push("write", None)
    (stale.store / "data").unlink()
    (stale.store / "new").parent.mkdir(exist_ok=True)
    (stale.store / "new").write_bytes(b"mine")
    with pytest.raises(StoreLockedError, match="was changed by another writer"):
        stale.push("write", None)
    assert loc.get("data")[0] == b"v2" and loc.get("new")[0] == b"n"
    with remote.open_location(url, "c") as c:  # a reader pulls only what changed, and drops what went
        assert (c / "data").read_bytes() == b"v2" and sorted(p.name for p in c.iterdir()) == ["COMMIT.json", "data", "new"]


def _wait(condition, timeout: float = 30.0) -> None:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_background_push_while_running_and_requests_reach_the_job() -> None:
    url = "memory://background/run.zarr"
    loc = remote.RemoteLocation(url)
    with remote.open_location(url, "record", "write", sync_every=0.05) as job:
        job.mkdir()
        (job / "data").write_bytes(b"row1")
        (job / "COMMIT.json").write_text('{"n": 1}')
        _wait(lambda: loc.etag("COMMIT.json") is not None)  # pushed while the job runs
        assert loc.get("data")[0] == b"row1"
        with remote.open_location(url, "request", "append") as other:  # another machine queues a request
            (other / "requests").mkdir()
            (other / "requests" / "r1.json").write_text('{"id": "r1"}')
        _wait(lambda: (job / "requests" / "r1.json").exists())  # and the running job sees it
        (job / "data").write_bytes(b"row1row2")
        (job / "COMMIT.json").write_text('{"n": 2}')
    assert loc.get("data")[0] == b"row1row2" and loc.get("COMMIT.json")[0] == b'{"n": 2}'
    assert loc.get("requests/r1.json")[0] == b'{"id": "r1"}'
