"""The built-in trainer through the Recorder: determinism, `--exclude`, and the user-loop API."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_rows

from lmclean.errors import DataError, ModelMismatchError, StoreError, StoreExistsError
from lmclean.objective import CausalLMObjective, loss_of
from lmclean.store.reader import TrajectoryStore
from lmclean.params import ParamManifest
from lmclean.optim import SGDRule
from lmclean.train.recorder import Recorder
from lmclean.train.trainer import TrainResult, train

ROOT = Path(__file__).resolve().parents[1]
SGD = {"train.momentum": 0.9, "train.weight_decay": 0.01, "record.checkpoint_every": 5}
EMPTY_STEP = 3  # every sample of this step's batch is excluded


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    tmp = tmp_path_factory.mktemp("rec")
    return train(tiny_config(write_rows(tmp / "data.jsonl"), **SGD), tmp / "full.zarr")


def _saved(store: TrajectoryStore) -> torch.Tensor:
    theta, _ = store.checkpoint(store.committed_steps)
    return theta


def test_same_config_gives_bitwise_identical_runs(full_run: TrainResult, tmp_path: Path) -> None:
    again = train(full_run.run.cfg, tmp_path / "again.zarr")
    a, b = TrajectoryStore(full_run.store), TrajectoryStore(again.store)
    assert a.all_sample_ids().tolist() == b.all_sample_ids().tolist()
    for t in range(a.committed_steps):
        assert torch.equal(a.grad(t), b.grad(t))
    assert torch.equal(_saved(a), _saved(b))
    from safetensors.torch import load_file

    wa, wb = load_file(a.model_dir / "model.safetensors"), load_file(b.model_dir / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_exclude_drops_samples_keeps_weights_order_and_empty_steps(full_run: TrainResult, tmp_path: Path) -> None:
    full = TrajectoryStore(full_run.store)
    plan = full_run.run.plan
    excluded = set(plan[EMPTY_STEP]) | {plan[EMPTY_STEP + 2][0]}
    res = train(full_run.run.cfg, tmp_path / "excl.zarr", exclude=sorted(excluded))
    ex = TrajectoryStore(res.store)
    assert ex.meta["excluded_ids"] == sorted(excluded)
    assert res.run.plan == plan  # the batch plan is fixed by the full data set
    assert ex.committed_steps == full.committed_steps == len(plan)
    first = min(t for t, batch in enumerate(plan) if excluded & set(batch))
    assert first == EMPTY_STEP
    for t in range(full.committed_steps):
        a, b = full.step(t), ex.step(t)
        assert b.sample_ids.tolist() == [i for i in a.sample_ids.tolist() if i not in excluded]  # same order
        assert not excluded & set(b.sample_ids.tolist())
        assert b.weights.tolist() == [1 / len(plan[t])] * len(b.sample_ids)  # weights of the original batch
        assert b.lr == a.lr
        if t < first:  # identical to the full run up to the first step with an excluded sample
            assert torch.equal(ex.grad(t), full.grad(t)) and b.loss == a.loss
    # the step whose batch became empty still happens, with a zero gradient
    empty = ex.step(EMPTY_STEP)
    assert len(empty.sample_ids) == 0 and empty.loss == 0.0 and empty.grad_norm == 0.0
    assert not ex.grad(EMPTY_STEP).any()
    theta_full = {t: th.clone() for t, th, _ in full.iter_states(0, first + 1)}
    theta_ex = {t: th.clone() for t, th, _ in ex.iter_states(0, first + 1)}
    for t in range(first + 1):
        assert torch.equal(theta_ex[t], theta_full[t])
    assert not torch.equal(theta_ex[first + 1], theta_full[first + 1])
    # the momentum still moves θ across the empty step, and the replay is still exact
    for _, theta, _ in ex.iter_states(0, ex.committed_steps):
        pass
    assert torch.equal(theta, _saved(ex))


def test_exclude_of_an_unknown_id_is_refused_before_anything_is_written(full_run: TrainResult, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--exclude names sample id 5 that is not in"):
        train(full_run.run.cfg, tmp_path / "x.zarr", exclude=[5, 100])
    assert not (tmp_path / "x.zarr").exists()


def _doc_example() -> str:
    text = (ROOT / "docs" / "recorder.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_recorder_example_in_the_docs_runs_and_replays_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_doc_example(), "docs/recorder.md", "exec"), ns)
    store, model, T = ns["store"], ns["model"], ns["T"]
    assert (store.committed_steps, store.closed, store.checkpoint_steps) == (T, True, [0, 4, 8])
    assert store.rule == SGDRule(momentum=0.9, weight_decay=0.01)
    assert store.scalars("lr").tolist() == [0.1 * (1 - t / T) for t in range(T)]
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(ns["theta_t"], final)  # θ[T] replayed from step 0 = the real run, bitwise
    assert ns["stats"].steps == T and ns["stats"].grad_bytes_on_disk > 0
    # the doc's hand-written loss is CausalLMObjective's: its recorded gradient matches a recompute
    theta3, _ = store.theta_at(3)
    rec = store.step(3)
    params = {k: v.clone().requires_grad_(True) for k, v in store.manifest.views(theta3).items()}
    obj = CausalLMObjective(model, torch.from_numpy(rec.tokens).long(), torch.from_numpy(rec.lengths).long(),
                            torch.from_numpy(rec.weights))
    grads = torch.autograd.grad(loss_of(obj, params), list(params.values()))
    torch.testing.assert_close(store.grad(3), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-5, atol=1e-7)


def _small_recorder(path: Path, **kw) -> Recorder:
    model = torch.nn.Linear(3, 2)
    return Recorder.create(path, manifest=ParamManifest.from_model(model), rule=SGDRule(), planned_steps=3,
                           batch_size=2, max_length=4, checkpoint_every=2, sample_ids=[1, 2, 3],
                           fingerprints=["00" * 32] * 3, **kw)


def _row(**kw):
    args = dict(lr=0.1, loss=1.0, sample_ids=[1, 2], weights=[0.5, 0.5], input_ids=torch.ones(2, 3, dtype=torch.long),
                lengths=torch.tensor([3, 2]), grad=torch.ones(8), theta=torch.zeros(8), opt_state={})
    args.update(kw)
    return args


def test_recorder_api_misuse_is_reported(tmp_path: Path) -> None:
    rec = _small_recorder(tmp_path / "a.zarr")
    with pytest.raises(DataError, match="2 sample ids, 1 weights"):
        rec.record_step(0, **_row(weights=[1.0]))
    with pytest.raises(DataError, match="exceeds the store's batch_size 2 x max_length 4"):
        rec.record_step(0, **_row(input_ids=torch.ones(2, 9, dtype=torch.long)))
    with pytest.raises(ModelMismatchError, match="gradient has 5 entries, the manifest 8"):
        rec.record_step(0, **_row(grad=torch.ones(5)))
    with pytest.raises(ValueError, match="checkpoint step: pass theta"):
        rec.record_step(0, **_row(theta=None))
    rec.record_step(0, **_row())
    rec.record_step(2, **_row())  # out of order: surfaces as a StoreError from the writer thread
    with pytest.raises(StoreError, match="step 2 recorded out of order: the store expects step 1"):
        rec.close(3, torch.zeros(8), {})
    assert TrajectoryStore(tmp_path / "a.zarr").committed_steps == 1  # what was written stays readable
    with pytest.raises(StoreExistsError, match="already exists"):
        _small_recorder(tmp_path / "a.zarr")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="not an lmclean store; refusing"):
        _small_recorder(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_close_with_missing_steps_is_an_error(tmp_path: Path) -> None:
    rec = _small_recorder(tmp_path / "b.zarr")
    rec.record_step(0, **_row())
    with pytest.raises(StoreError, match="1 steps committed at close, expected 3"):
        rec.close(3, torch.zeros(8), {})
    store = TrajectoryStore(tmp_path / "b.zarr")
    assert not store.closed and store.step(0).sample_ids.tolist() == [1, 2]
    assert np.array_equal(store.grad(0).numpy(), np.ones(8, dtype=np.float32))


def test_writer_queue_is_bounded_training_waits_for_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from lmclean.store.writer import StoreWriter

    gate = threading.Event()
    original = StoreWriter._write_step

    def slow_write(self, row):  # a disk that stalls until the gate opens
        gate.wait(10)
        original(self, row)

    monkeypatch.setattr(StoreWriter, "_write_step", slow_write)
    rec = _small_recorder(tmp_path / "q.zarr", queue_size=1)
    rec.record_step(0, **_row(theta=torch.zeros(8)))  # checkpoint row + step row
    rec.record_step(1, **_row(theta=None))
    third = threading.Thread(target=lambda: rec.record_step(2, **_row(theta=torch.zeros(8))))
    third.start()
    third.join(0.3)
    assert third.is_alive() and rec.writer._queue.qsize() <= 1  # blocked: back-pressure, not buffering
    gate.set()
    third.join(10)
    assert not third.is_alive()
    rec.close(3, torch.zeros(8), {})
    store = TrajectoryStore(tmp_path / "q.zarr")
    assert store.closed and store.committed_steps == 3 and store.checkpoint_steps == [0, 2, 3]


def test_progress_rate_ignores_the_first_step() -> None:
    from lmclean.cli.record import _Rate

    rate = _Rate()
    assert np.isnan(rate.tick())
    rate.t0 -= 1.0  # pretend the first step was a second ago
    assert 0.9 < rate.tick() < 1.1
