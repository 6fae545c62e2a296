"""record.keep_steps: a store that drops gradient rows and checkpoints older than its window (issue 14 §1).

One tiny run (24 samples, batch 4, 2 epochs = 12 steps, checkpoints every 2) recorded twice: with
every step kept, and with keep_steps 5. Training does not depend on what is recorded, so the two
stores hold the same trajectory; the windowed one keeps θ and gradients of steps 6..11 (the newest
checkpoint at or before 12 − 5 = 7 is 6). Each sample is seen once per epoch: at a step < 6
(outside the window) and at a step >= 6 (inside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import error_line, one_thread, tiny_config, write_rows
from lmclean.cli.main import app
from lmclean.errors import DataError, StoreError
from lmclean.store.check import check_store
from lmclean.store.reader import TrajectoryStore
from lmclean.store.writer import store_size_bytes
from lmclean.train.trainer import train
from lmclean.unlearn.request import ForgetSpec
from lmclean.unlearn.service import OutputSpec, UnlearnOptions, unlearn

KEEP, RETAINED, STEPS = 5, 6, 12
CFG = {"record.checkpoint_every": 2, "train.momentum": 0.9}
runner = CliRunner()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("keep")
    data = write_rows(tmp / "data.jsonl")
    with one_thread():
        train(tiny_config(data, **CFG), tmp / "all.zarr")
        train(tiny_config(data, **CFG, **{"record.keep_steps": KEEP}), tmp / "window.zarr")
    return {"all": tmp / "all.zarr", "window": tmp / "window.zarr", "data": data}


def _copy(src: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _shard_files(store: Path) -> list[str]:
    return sorted(p.name for p in (store / "steps" / "grad").iterdir() if p.name.startswith("c."))


def test_rows_and_checkpoints_before_the_window_are_deleted(stores: dict[str, Path]) -> None:
    w, a = TrajectoryStore(stores["window"]), TrajectoryStore(stores["all"])
    marker = json.loads((w.path / "COMMIT.json").read_text())
    assert marker == {"committed_steps": STEPS, "checkpoints": [6, 8, 10, 12], "closed": True, "retained_from": RETAINED}
    assert w.retained_from == RETAINED and w.keep_steps == KEEP and a.retained_from == 0
    S = int(w.root["steps/grad"].metadata.chunk_grid.chunk_shape[0])
    assert S == 2  # ceil(keep_steps / 4) rows per shard for a windowed store
    assert _shard_files(w.path) == sorted(f"c.{s}.0" for s in range(RETAINED // S, STEPS // S))
    plan = w.meta["checkpoint_plan"]
    kept_ck = sorted(p.name for p in (w.path / "checkpoints" / "theta").iterdir() if p.name.startswith("c."))
    assert kept_ck == sorted(f"c.{plan.index(c)}.0" for c in (6, 8, 10, 12))
    assert store_size_bytes(w.path, "steps/grad") < 0.6 * store_size_bytes(a.path, "steps/grad")
    assert store_size_bytes(w.path) < store_size_bytes(a.path)
    for t in range(RETAINED, STEPS):  # what is kept is the same trajectory, row for row
        assert torch.equal(w.grad(t), a.grad(t))
    for t in range(STEPS):  # batches are kept for every step: they say when a sample was seen
        assert np.array_equal(w.step(t).sample_ids, a.step(t).sample_ids)
        assert np.array_equal(w.step(t).tokens, a.step(t).tokens)
    for _, theta, _ in w.iter_states(RETAINED, STEPS):
        pass
    assert torch.equal(theta, a.checkpoint(STEPS)[0])
    report = check_store(w.path)
    assert report.ok, report.problems
    assert report.checkpoints_matched == [8, 10, 12]


def test_steps_before_the_window_are_refused_in_one_line(stores: dict[str, Path]) -> None:
    w = TrajectoryStore(stores["window"])
    for call, what in ((lambda: w.grad(3), "its gradient row g[3] was dropped"),
                       (lambda: next(iter(w.iter_states(5, 7))), "θ[5] cannot be rebuilt")):
        with pytest.raises(StoreError) as exc:
            call()
        assert str(exc.value) == (f"store {w.path} keeps steps 6..11 only (record.keep_steps: 5); step "
                                  f"{what.split('[')[1].split(']')[0]} left the window: {what}")


def test_inspect_log_shows_the_window(stores: dict[str, Path]) -> None:
    result = runner.invoke(app, ["inspect-log", str(stores["window"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["window"] == {"keep_steps": KEEP, "retained_from": RETAINED}
    result = runner.invoke(app, ["inspect-log", str(stores["window"])])
    assert "keep_steps 5: gradients and θ of steps 6..11 kept" in " ".join(result.stdout.split())


def _seen(store: Path) -> dict[int, list[int]]:
    s = TrajectoryStore(store)
    return {sid: [t for t, _ in s.sample_positions(sid)] for sid in s.sample_fingerprints}


def test_in_window_request_equals_the_unwindowed_store(stores: dict[str, Path], tmp_path: Path) -> None:
    """A batch-level request for step 9 (inside the window): the same unlearned model, bitwise, as
    the same request on the store that kept every step."""
    outs = {}
    for name in ("all", "window"):
        store = _copy(stores[name], tmp_path, f"{name}.zarr")
        with one_thread():
            report = unlearn(store, ForgetSpec(steps="9", level="batch"), UnlearnOptions(method="lmcleaner", device="cpu"),
                             OutputSpec(out=tmp_path / f"out-{name}"))
        outs[name] = report
    assert outs["window"]["outside_window"] == {"policy": "refuse", "keep_steps": KEEP, "retained_from": RETAINED,
                                                "carried_steps": []}
    assert outs["all"]["outside_window"] is None
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f"out-{n}" / "model.safetensors")) for n in ("all", "window"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert outs["all"]["delta_norm"] == outs["window"]["delta_norm"] > 0


def test_request_seen_outside_the_window_is_refused_with_when_and_the_window(stores: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    store = _copy(stores["window"], tmp_path, "w.zarr")
    sid = next(s for s, steps in sorted(_seen(store).items()))
    steps = _seen(store)[sid]
    early, late = [t for t in steps if t < RETAINED], [t for t in steps if t >= RETAINED]
    assert len(early) == 1 and len(late) == 1  # once per epoch
    result = runner.invoke(app, ["unlearn", str(store), "--forget", str(sid), "--device", "cpu", "-o", str(tmp_path / "o")])
    assert error_line(result) == (
        f"error: sample {sid} was seen at step {early[0]} (and at 1 step inside the window), "
        f"before the store's retention window (record.keep_steps: 5 keeps θ and gradients of steps 6..11), so that "
        "influence cannot be corrected; pass --outside-window carry to correct the in-window steps only (the report "
        "and audit record list the carried steps)")
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError):
        unlearn(store, ForgetSpec(ids=str(sid)), UnlearnOptions(device="cpu"), OutputSpec(out=tmp_path / "o2"))
    result = runner.invoke(app, ["unlearn", str(store), "--forget", "1", "--outside-window", "drop"])
    assert "Invalid value for '--outside-window': 'drop' is not one of 'refuse', 'carry'" in error_line(result)


def test_carry_corrects_the_in_window_occurrences_and_reports_the_carried(stores: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """carry = the in-window part of the request: the same model as rollback of that sample from
    the in-window steps on the full store, computed by hand (share of the update at each step)."""
    store = _copy(stores["window"], tmp_path, "w.zarr")
    sid = sorted(_seen(store))[0]
    early = [t for t in _seen(store)[sid] if t < RETAINED]
    with one_thread():
        report = unlearn(store, ForgetSpec(ids=str(sid)), UnlearnOptions(method="rollback", device="cpu",
                                                                          outside_window="carry"),
                         OutputSpec(out=tmp_path / "out"))
    assert report["outside_window"]["carried_steps"] == early
    assert all(t >= RETAINED for t in report["steps_touched"]) and report["steps_touched"]
    assert any(f"steps {early}" in n and "not corrected" in n for n in report["notes"])
    audit = [json.loads(line) for line in (store / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["carried_outside_window"] == early
    # the reference: the in-window occurrences' rollback on the unwindowed store, by hand (SGD momentum:
    # rollback subtracts lr · ∇ℓ_forget(θ[t]) at each affected step)
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    full = TrajectoryStore(stores["all"])
    traj = open_trajectory(full, "cpu")
    late = [t for t in _seen(stores["all"])[sid] if t >= RETAINED]
    delta = torch.zeros(full.manifest.size)
    with one_thread():
        for t, theta, _ in traj.states(late[0], late[-1]):
            if t in late:
                delta += traj.batch(t).lr * flat_grad(traj.objective(t, [sid], micro=True), full.manifest, theta)
    from lmclean.adapters import load_for_store
    from lmclean.params import flat_params

    w = TrajectoryStore(store)
    got = flat_params(load_for_store(w, tmp_path / "out"), w.manifest) - w.checkpoint(STEPS)[0]
    assert delta.norm() > 0
    torch.testing.assert_close(got, delta, rtol=0, atol=1e-6 * float(delta.abs().max()) + 1e-7)  # θ̂ − θ[τ]: fp32 rounding


def test_reconcile_refuses_a_windowed_store_naming_the_window(stores: dict[str, Path], tmp_path: Path) -> None:
    """Reconcile rebuilds the run from step 0, which a windowed store no longer holds: one line naming
    the window (not a missing checkpoint), and the store is left as it was."""
    store = _copy(stores["window"], tmp_path, "w.zarr")
    sid = sorted(_seen(store))[0]
    with one_thread():
        unlearn(store, ForgetSpec(ids=str(sid)), UnlearnOptions(method="rollback", device="cpu", outside_window="carry",
                                                                check_steps=0), OutputSpec(out=tmp_path / "out"))
    before = {p.relative_to(store): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".lock"}
    line = error_line(runner.invoke(app, ["reconcile", str(store)]))
    assert line == (f"error: store {store} keeps steps {RETAINED}..{STEPS - 1} only (record.keep_steps: {KEEP}): reconcile "
                    "rebuilds the whole run from step 0, whose θ and gradients left the window; reconcile needs a store "
                    "recorded without record.keep_steps")
    after = {p.relative_to(store): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["out", "w.zarr"]


def test_windowed_record_resumes_to_the_uninterrupted_store(stores: dict[str, Path], tmp_path: Path) -> None:
    def stop_at_9(step: int, total: int, loss: float, lr: float) -> None:
        if step == 9:
            raise KeyboardInterrupt

    cfg = tiny_config(stores["data"], **CFG, **{"record.keep_steps": KEEP})
    with one_thread():
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "cut.zarr", on_step=stop_at_9)
        cut = TrajectoryStore(tmp_path / "cut.zarr")
        assert 0 < cut.retained_from < cut.committed_steps < STEPS
        train(cfg, tmp_path / "cut.zarr", resume=True)
    a, b = TrajectoryStore(stores["window"]), TrajectoryStore(tmp_path / "cut.zarr")
    assert b.commit_state() == a.commit_state()
    assert _shard_files(b.path) == _shard_files(a.path)
    assert all(torch.equal(a.grad(t), b.grad(t)) for t in range(RETAINED, STEPS))
    assert torch.equal(a.checkpoint(STEPS)[0], b.checkpoint(STEPS)[0])


def test_keep_steps_must_be_positive(data_file: Path) -> None:
    from lmclean.errors import ConfigError

    with pytest.raises(ConfigError, match="record.keep_steps"):
        tiny_config(data_file, **{"record.keep_steps": 0})


@pytest.mark.parametrize(("marker", "message"), [
    ({"retained_from": 7}, "but not the checkpoint of step 7 they start from"),
    ({"retained_from": -1}, "has retained_from = -1, not a step in 0..12"),
    ({"retained_from": True}, "has retained_from = True"),
    ({"checkpoints": [6, 8, 12]}, "says the run is closed with 12 of 12 steps and checkpoints [6, 8, 12]"),
])
def test_retained_from_claims_are_validated(stores: dict[str, Path], marker: dict, message: str) -> None:
    from lmclean.store.commit import validate_commit

    w = TrajectoryStore(stores["window"])
    good = json.loads((w.path / "COMMIT.json").read_text())
    tmp = w.path.parent / "bad-marker"
    tmp.mkdir(exist_ok=True)
    (tmp / "COMMIT.json").write_text(json.dumps({**good, **marker}))
    with pytest.raises(StoreError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_commit(tmp, w.meta)
