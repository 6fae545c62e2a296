"""Correction events in the store: θ rebuilt on both sides of a jump, kept across reopen, checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmclean.optim import AdamWRule, SGDRule
from lmclean.params import ParamManifest
from lmclean.store.check import check_store
from lmclean.store.corrections import apply_correction
from lmclean.store.grow import grow_store
from lmclean.store.reader import TrajectoryStore
from lmclean.train.recorder import Recorder

T, EVERY, JUMP = 12, 4, 6  # the event sits between checkpoints 4 and 8


def _record(path: Path, rule, jumps: dict[int, tuple[torch.Tensor, dict]], steps: range = range(T),
            recorder: Recorder | None = None, theta: torch.Tensor | None = None, state: dict | None = None,
            seed: int = 0):
    """Record `steps` of a run with random gradients, jumping at `jumps`; returns the true θ[t] (post-jump)
    and states, and the final (θ, state)."""
    manifest = ParamManifest.from_model(torch.nn.Linear(3, 2))
    if recorder is None:
        recorder = Recorder.create(path, manifest=manifest, rule=rule, planned_steps=T, batch_size=2, max_length=4,
                                   checkpoint_every=EVERY, sample_ids=list(range(4)), fingerprints=["ab" * 32] * 4)
        theta = torch.randn(manifest.size, generator=torch.Generator().manual_seed(1))
        state = rule.init_state(theta)
    gen = torch.Generator().manual_seed(seed)
    truth = {}
    for t in steps:
        if t in jumps:
            d, ds = jumps[t]
            recorder.correct(t, d, ds, request_id=f"r{t}", method="lmcleaner", theta=theta, opt_state=state)
            apply_correction(theta, state, d, ds)
        truth[t] = (theta.clone(), {k: v.clone() for k, v in state.items()})
        g = torch.randn(manifest.size, generator=gen)
        recorder.record_step(t, lr=0.05, loss=1.0, sample_ids=[t % 4], weights=[0.5],
                             input_ids=torch.ones(1, 3, dtype=torch.long), lengths=torch.tensor([3]), grad=g,
                             theta=theta, opt_state=state)
        rule.step(theta, g, 0.05, state, t)
    return recorder, truth, theta, state


def _jump(rule, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # (exp_avg_sq only grows: a negative one would take √ of a negative number)
    return torch.randn(8, generator=gen), {n: torch.randn(8, generator=gen).abs() * 0.1 for n in rule.state_names()}


RULES = [SGDRule(momentum=0.9, weight_decay=0.01), AdamWRule(beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01)]


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "adamw"])
def test_theta_rebuilt_on_both_sides_of_a_jump_from_every_checkpoint(tmp_path: Path, rule) -> None:
    path = tmp_path / "s.zarr"
    jumps = {JUMP: _jump(rule), EVERY * 2: _jump(rule, 7)}  # one between checkpoints, one on checkpoint 8
    rec, truth, theta, state = _record(path, rule, jumps)
    rec.close(T, theta, state)
    store = TrajectoryStore(path)
    assert [(e.step, e.request_id, e.method) for e in store.corrections] == [(6, "r6", "lmcleaner"),
                                                                            (8, "r8", "lmcleaner")]
    assert store.corrections[0].state == tuple(sorted(rule.state_names()))
    for t in range(T):  # θ[t] post-jump, bitwise, whichever checkpoint the rebuild starts from
        got, got_state = store.theta_at(t)
        assert torch.equal(got, truth[t][0]), t
        for k in got_state:
            assert torch.equal(got_state[k], truth[t][1][k]), (t, k)
        for c in [s for s in store.checkpoint_steps if s <= t]:
            for s, th, _ in store.iter_states(c, t):
                pass
            assert s == t and torch.equal(th, truth[t][0]), (c, t)
    # the checkpoint at 8 holds θ before the jump at 8
    pre, _ = store.checkpoint(8)
    assert torch.equal(pre + jumps[8][0], truth[8][0]) and not torch.equal(pre, truth[8][0])
    report = check_store(path)
    assert report.ok, report.problems
    assert report.checkpoints_matched == [4, 8, 12]


def test_reopen_keeps_events_up_to_the_restart_and_drops_later_ones(tmp_path: Path) -> None:
    rule = RULES[0]
    path = tmp_path / "s.zarr"
    rec, truth, theta, state = _record(path, rule, {JUMP: _jump(rule), 9: _jump(rule, 9)})
    rec.close(T, theta, state)
    rec = Recorder.reopen(path, 8)  # keeps the event at 6, drops the one at 9 (like the steps past 8)
    rec.writer.close()
    store = TrajectoryStore(path)
    assert [e.step for e in store.corrections] == [6]
    assert store.committed_steps == 8 and not store.closed
    # resume: the same steps again, without the dropped event, then a new one at 10
    theta, state = store.theta_at(8)
    rec = Recorder.reopen(path, 8)
    rec, truth2, theta, state = _record(path, rule, {10: _jump(rule, 10)}, range(8, T), rec, theta, state,
                                        seed=3)
    rec.close(T, theta, state)
    store = TrajectoryStore(path)
    assert [(e.index, e.step) for e in store.corrections] == [(0, 6), (1, 10)]  # the dropped c1 is replaced
    for t in range(8, T):
        assert torch.equal(store.theta_at(t)[0], truth2[t][0]), t
    assert check_store(path).ok


def test_an_event_is_invisible_until_committed_and_a_damaged_one_is_reported(tmp_path: Path) -> None:
    rule = RULES[0]
    path = tmp_path / "s.zarr"
    rec, _, theta, state = _record(path, rule, {JUMP: _jump(rule)})
    rec.close(T, theta, state)
    marker = json.loads((path / "COMMIT.json").read_text())
    (path / "COMMIT.json").write_text(json.dumps({k: v for k, v in marker.items() if k != "corrections"}))
    assert TrajectoryStore(path).corrections == []  # written but not listed: no event
    assert not check_store(path).ok  # ... and replay across the jump no longer matches checkpoint 8
    (path / "COMMIT.json").write_text(json.dumps(marker))
    chunk = path / "corrections" / "c0" / "theta" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 1
    chunk.write_bytes(bytes(data))
    report = check_store(path)
    assert not report.ok and report.first.array == "corrections/c0/theta", report.problems


def test_grow_extends_every_array_and_the_plan(tmp_path: Path) -> None:
    rule = RULES[0]
    path = tmp_path / "s.zarr"
    rec, truth, theta, state = _record(path, rule, {JUMP: _jump(rule)})
    rec.close(T, theta, state)
    plan = grow_store(path, 19, meta_updates={"dropped_ids": [3]})
    assert plan == [0, 4, 8, 12, 16, 19]
    store = TrajectoryStore(path)
    assert store.planned_steps == 19 and store.meta["dropped_ids"] == [3] and not store.closed
    assert store.committed_steps == T and [e.step for e in store.corrections] == [JUMP]
    assert store.root["steps/grad"].shape[0] == 19 and store.root["checkpoints/theta"].shape[0] == 6
    assert torch.equal(store.theta_at(T)[0], theta)
    rec = Recorder.reopen(path, T)
    gen = torch.Generator().manual_seed(4)
    for t in range(T, 19):
        g = torch.randn(8, generator=gen)
        rec.record_step(t, lr=0.05, loss=1.0, sample_ids=[0], weights=[0.5], input_ids=torch.ones(1, 3, dtype=torch.long),
                        lengths=torch.tensor([3]), grad=g, theta=theta, opt_state=state)
        rule.step(theta, g, 0.05, state, t)
    rec.close(19, theta, state)
    store = TrajectoryStore(path)
    assert store.closed and torch.equal(store.theta_at(19)[0], theta)
    assert np.isfinite(store.scalars("lr")).all()
    report = check_store(path)
    assert report.ok and report.checkpoints_matched == [4, 8, 12, 16, 19], report.problems
