"""LMCleanCallback: a stock transformers.Trainer run recorded into a store, checked against the
Trainer itself (bitwise θ), lmclean's own gradient of the stored batch, replay vs the Trainer's
exact retraining, refusals, and resume_from_checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lmclean.errors import DataError, UnsupportedError  # noqa: E402
from lmclean.integrations.transformers import LMCleanCallback  # noqa: E402
from lmclean.store.reader import TrajectoryStore  # noqa: E402

N_SAMPLES = 10  # micro-batches of 2, accumulation 2: steps of 2, 2 and 1 micro-batches per epoch, 2 epochs


def make_model(seed: int = 0, **config: Any) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      attn_implementation="eager", **config)
    return LlamaForCausalLM(cfg).float()


def make_data(n: int = N_SAMPLES) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + int(torch.randint(0, 8, (1,), generator=g))
        rows.append({"id": 100 + i, "input_ids": torch.randint(3, 260, (length,), generator=g).tolist(),
                     "prompt_len": 1 + i % 3})
    return rows


def collate(rows: list[dict[str, Any]], left: bool = False) -> dict[str, torch.Tensor]:
    """Pads with 0; labels are the input ids with the prompt prefix and the padding masked (-100)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for k, r in enumerate(rows):
        n = len(r["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        ids[k, span] = torch.tensor(r["input_ids"])
        mask[k, span] = 1
        labels[k, span] = torch.tensor(r["input_ids"])
        labels[k, span.start : span.start + r["prompt_len"]] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "id": torch.tensor([r["id"] for r in rows])}


def make_args(out: Path, **overrides: Any) -> TrainingArguments:
    kw: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=2,
        learning_rate=1e-2, weight_decay=0.1, max_grad_norm=2.0, seed=0, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False)
    kw.update(overrides)
    return TrainingArguments(**kw)


def run(tmp: Path, name: str, *, callback: bool = True, model: torch.nn.Module | None = None,
        collator: Any = collate, extra_callbacks: tuple = (), resume: str | None = None,
        cb_kwargs: dict[str, Any] | None = None, **overrides: Any) -> tuple[Trainer, LMCleanCallback | None]:
    cb = LMCleanCallback(tmp / f"{name}.zarr", id_column="id", **(cb_kwargs or {})) if callback else None
    trainer = Trainer(model=model if model is not None else make_model(), args=make_args(tmp / name, **overrides),
                      train_dataset=make_data(), data_collator=collator,
                      callbacks=([cb] if cb else []) + list(extra_callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def final_theta(trainer: Trainer, store: TrajectoryStore) -> torch.Tensor:
    params = dict(trainer.model.named_parameters())
    return torch.cat([params[e.name].detach().reshape(-1) for e in store.manifest.entries])


def replayed_from_start(store: TrajectoryStore) -> torch.Tensor:
    """θ[T] rebuilt from checkpoint 0 and every stored gradient (no later checkpoint is used)."""
    T = store.committed_steps
    for t, theta, _ in store.iter_states(0, T):
        if t == T:
            return theta.clone()
    raise AssertionError("no state at T")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    tmp = tmp_path_factory.mktemp("hf")
    trainer, _ = run(tmp, "full", cb_kwargs={"checkpoint_every": 100}, logging_strategy="steps", logging_steps=1)
    return tmp, trainer


def test_theta_rebuilt_from_store_is_bitwise_the_trainers(recorded: tuple[Path, Trainer]) -> None:
    """Accumulation 2, clipping, two weight-decay groups, the default (fused) AdamW: checkpoint 0 plus
    the stored gradients replay to exactly the Trainer's final parameters."""
    tmp, trainer = recorded
    store = TrajectoryStore(tmp / "full.zarr")
    T = store.committed_steps
    assert store.closed and T == trainer.state.global_step == 6
    assert store.checkpoint_steps == [0, T]  # the replay below uses only step 0's checkpoint
    clips = store.scalars("clip")
    assert (clips < 1).any() and (clips == 1).any() and (clips <= 1).all(), clips  # both kinds of step
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]  # the Trainer's pre-clip norms
    assert torch.allclose(torch.tensor(store.scalars("grad_norm")), torch.tensor(logged, dtype=torch.float64), rtol=1e-6)
    logged_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert torch.allclose(torch.tensor(store.scalars("loss")), torch.tensor(logged_loss, dtype=torch.float64), rtol=1e-5)
    assert len(store.rule.groups) >= 2  # the Trainer's decay / no-decay split
    theta_T = final_theta(trainer, store)
    assert torch.equal(replayed_from_start(store), theta_T)
    assert torch.equal(store.theta_at(T)[0], theta_T)
    assert (tmp / "full.zarr" / "model" / "config.json").is_file()


def test_recorded_gradient_is_lmcleans_gradient_of_the_stored_batch(recorded: tuple[Path, Trainer]) -> None:
    """g[t] = clip[t]·∇(Σ_i w_i meanCE_i)(θ[t]) from the stored tokens, loss mask and weights."""
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    tmp, _ = recorded
    store = TrajectoryStore(tmp / "full.zarr")
    assert store.meta["label_mask"]
    traj = open_trajectory(store)
    masked = 0
    for t, theta, _ in store.iter_states(0, store.committed_steps - 1):
        rec = store.step(t)
        masked += int((~rec.loss_mask).sum())
        assert abs(rec.weights.sum() - 1.0) < 1e-12  # nothing excluded: the weights are n_i / N
        mine = flat_grad(traj.objective(t, rec.sample_ids.tolist()), store.manifest, theta) * rec.clip
        stored = store.grad(t)
        rel = float(torch.linalg.vector_norm(mine - stored) / torch.linalg.vector_norm(stored))
        assert rel < 1e-5, (t, rel)
    assert masked > 0  # the prompt prefixes were masked out of the loss


def test_model_without_loss_kwargs_is_recorded_with_per_microbatch_means(tmp_path: Path) -> None:
    """A model the Trainer does not pass num_items_in_batch to: its mean loss is divided by the number
    of micro-batches, so w_i = n_i / (n_microbatch · G); the recomputed gradient still matches, and
    excluding a sample rescales the model's mean to the full micro-batch's count (fixed denominator)."""
    from lmclean.unlearn import ForgetSet, replay
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    def model() -> LlamaForCausalLM:
        m = make_model()
        m.accepts_loss_kwargs = False
        return m

    trainer, _ = run(tmp_path, "mean", model=model(), num_train_epochs=1)
    store = TrajectoryStore(tmp_path / "mean.zarr")
    traj = open_trajectory(store)
    assert torch.equal(replayed_from_start(store), final_theta(trainer, store))
    for t, theta, _ in store.iter_states(0, store.committed_steps - 1):
        rec = store.step(t)
        mine = flat_grad(traj.objective(t, rec.sample_ids.tolist()), store.manifest, theta) * rec.clip
        stored = store.grad(t)
        assert float(torch.linalg.vector_norm(mine - stored) / torch.linalg.vector_norm(stored)) < 1e-5
    excluded, _ = run(tmp_path, "mean_ex", model=model(), num_train_epochs=1, cb_kwargs={"exclude": [104]})
    reference = final_theta(excluded, store)
    theta_hat = store.theta_at(store.committed_steps)[0] + replay(traj, ForgetSet({104})).delta
    err = float(torch.linalg.vector_norm(theta_hat - reference))
    assert err <= 1e-4 * float(torch.linalg.vector_norm(final_theta(trainer, store) - reference)), err


@pytest.mark.parametrize("which", ["one sample", "a whole micro-batch"])
def test_replay_without_samples_equals_the_trainer_run_excluding_them(recorded: tuple[Path, Trainer], which: str) -> None:
    """lmclean's replay of the recorded store without F = the Trainer trained with
    LMCleanCallback(exclude=F) (same seed and batch order, fixed denominator). A micro-batch whose
    rows are all excluded still runs (zero loss) and the step keeps its other micro-batch."""
    from lmclean.unlearn import ForgetSet, replay
    from lmclean.unlearn.service import open_trajectory

    tmp, trainer = recorded
    store = TrajectoryStore(tmp / "full.zarr")
    forget = [104] if which == "one sample" else sorted(int(i) for i in store.step(0).sample_ids[:2])  # micro-batch 1
    name = "ex" + "_".join(map(str, forget))
    excluded_trainer, _ = run(tmp, name, cb_kwargs={"exclude": forget, "checkpoint_every": 100})
    ex_store = TrajectoryStore(tmp / f"{name}.zarr")
    assert ex_store.meta["excluded_ids"] == forget
    kept = [{int(i) for i in ex_store.step(t).sample_ids} for t in range(ex_store.committed_steps)]
    assert not set(forget) & set().union(*kept)
    assert ex_store.step(0).weights.sum() < 1  # fixed denominator: the forgotten samples' share is gone
    reference = final_theta(excluded_trainer, ex_store)
    assert torch.equal(replayed_from_start(ex_store), reference)

    result = replay(open_trajectory(store), ForgetSet(set(forget)))
    theta_hat = store.theta_at(store.committed_steps)[0] + result.delta
    theta = final_theta(trainer, store)
    err = float(torch.linalg.vector_norm(theta_hat - reference))
    effect = float(torch.linalg.vector_norm(theta - reference))
    assert err <= 1e-5 * float(torch.linalg.vector_norm(reference)), err
    assert err <= 1e-4 * effect, (err, effect)  # not trivially close: excluding F moved θ


def test_peft_adapter_run_is_recorded_exactly(tmp_path: Path) -> None:
    """LoRA through the Trainer: only the adapter is recorded, the frozen base is saved with the
    store, θ replays bitwise and lmclean (rebuilding base + adapter) recomputes the gradients."""
    peft = pytest.importorskip("peft")
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    base = make_model()
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    trainer, _ = run(tmp_path, "lora", model=model, learning_rate=5e-2, num_train_epochs=1)
    store = TrajectoryStore(tmp_path / "lora.zarr")
    assert store.meta["model"]["kind"] == "peft" and all("lora_" in e.name for e in store.manifest.entries)
    assert (tmp_path / "lora.zarr" / "model" / "adapter_config.json").is_file()
    assert torch.equal(replayed_from_start(store), final_theta(trainer, store))
    traj = open_trajectory(store)
    for t, theta, _ in store.iter_states(0, store.committed_steps - 1):
        rec = store.step(t)
        mine = flat_grad(traj.objective(t, rec.sample_ids.tolist()), store.manifest, theta) * rec.clip
        stored = store.grad(t)
        assert float(torch.linalg.vector_norm(mine - stored) / torch.linalg.vector_norm(stored)) < 1e-5
    # replay without a sample = the Trainer's own LoRA run excluding it (same base, same adapter init)
    from lmclean.unlearn import ForgetSet, replay

    base2 = make_model()
    torch.manual_seed(3)
    model2 = peft.get_peft_model(base2, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0))
    excluded, _ = run(tmp_path, "lora_ex", model=model2, learning_rate=5e-2, num_train_epochs=1,
                      cb_kwargs={"exclude": [104]})
    reference = final_theta(excluded, store)
    theta_hat = store.theta_at(store.committed_steps)[0] + replay(traj, ForgetSet({104})).delta
    err = float(torch.linalg.vector_norm(theta_hat - reference))
    effect = float(torch.linalg.vector_norm(final_theta(trainer, store) - reference))
    assert err <= 1e-5 * float(torch.linalg.vector_norm(reference)) and err <= 1e-3 * effect, (err, effect)


def test_refuses_unsupported_optimizer(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="Adafactor") as info:
        run(tmp_path, "ada", optim="adafactor")
    assert "\n" not in str(info.value) and "AdamW" in str(info.value)
    assert not (tmp_path / "ada.zarr").exists()


def test_refuses_left_padding(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="right padding") as info:
        run(tmp_path, "left", collator=lambda rows: collate(rows, left=True))
    assert "\n" not in str(info.value)


def test_refuses_dropout(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="set dropout to 0"):
        run(tmp_path, "drop", model=make_model(attention_dropout=0.1))


def test_refuses_dropped_id_column_and_an_existing_store(recorded: tuple[Path, Trainer], tmp_path: Path) -> None:
    from lmclean.errors import ConfigError, StoreExistsError

    with pytest.raises(ConfigError, match="remove_unused_columns=False"):
        run(tmp_path, "cols", remove_unused_columns=True)
    tmp, _ = recorded
    before = TrajectoryStore(tmp / "full.zarr").committed_steps
    with pytest.raises(StoreExistsError, match="overwrite=True") as info:
        run(tmp, "full")
    assert "\n" not in str(info.value) and TrajectoryStore(tmp / "full.zarr").committed_steps == before


class StrictLlama(LlamaForCausalLM):
    """Raises on any input it does not know (the id column must never reach it)."""

    def forward(self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None,  # type: ignore[override]
                num_items_in_batch: Any = None, **unknown: Any) -> Any:
        if unknown:
            raise TypeError(f"unexpected model inputs {sorted(unknown)}")
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                               num_items_in_batch=num_items_in_batch)


def test_model_never_sees_the_id_column(tmp_path: Path) -> None:
    strict = lambda: StrictLlama(make_model().config)  # noqa: E731
    with pytest.raises(TypeError, match="id"):  # the check can fail: without the callback the id reaches it
        run(tmp_path, "bare", callback=False, model=strict(), max_steps=1)
    trainer, _ = run(tmp_path, "strict", model=strict(), max_steps=2)
    assert TrajectoryStore(tmp_path / "strict.zarr").committed_steps == trainer.state.global_step == 2
    assert "forward" not in vars(trainer.model)  # unwrapped at the end


class Interrupt(TrainerCallback):
    """Stops training after `step` (control.should_training_stop), or raises once the Trainer has saved
    its checkpoint there (a crash: the Trainer calls no callback after it)."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.how == "stop":
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.how == "raise":
            raise RuntimeError("simulated crash")


SAVING = dict(save_strategy="steps", save_steps=2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    tmp = tmp_path_factory.mktemp("whole")
    trainer, _ = run(tmp, "whole", **SAVING)
    return tmp / "whole.zarr", trainer


@pytest.mark.parametrize("how", ["stop", "raise"])
def test_resume_from_checkpoint_continues_the_store(tmp_path: Path, uninterrupted: tuple[Path, Trainer], how: str) -> None:
    """Interrupted after step 4 (a Trainer save step), resumed from checkpoint-4 by a new Trainer and
    callback: the store equals an uninterrupted run's, gradient for gradient and θ bitwise."""
    from lmclean.audit import AuditLog

    if how == "raise":
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(tmp_path, "parts", extra_callbacks=(Interrupt(4, how),), **SAVING)
    else:
        run(tmp_path, "parts", extra_callbacks=(Interrupt(4, how),), **SAVING)
        part = TrajectoryStore(tmp_path / "parts.zarr")
        assert not part.closed and part.committed_steps == 4 and 4 in part.checkpoint_steps
    resumed, _ = run(tmp_path, "parts", resume=str(tmp_path / "parts" / "checkpoint-4"), **SAVING)
    whole_path, whole = uninterrupted
    a, b = TrajectoryStore(whole_path), TrajectoryStore(tmp_path / "parts.zarr")
    assert b.closed and a.committed_steps == b.committed_steps == 6
    for t in range(6):
        assert torch.equal(a.grad(t), b.grad(t)), t
        assert (a.step(t).sample_ids == b.step(t).sample_ids).all()
    assert torch.equal(replayed_from_start(b), final_theta(whole, a))
    assert torch.equal(b.theta_at(6)[0], final_theta(resumed, b))
    # like `lmclean record`: the interrupted run appends nothing, the run that completes the store "resume"
    assert [r["kind"] for r in AuditLog(tmp_path / "parts.zarr").records()] == ["resume"]
    assert [r["kind"] for r in AuditLog(whole_path).records()] == ["record"]


def test_bf16_trainer_run_records_and_replays_under_the_same_autocast(tmp_path: Path) -> None:
    """Trainer(bf16=True): the forward runs under bf16 autocast with fp32 master weights. The store
    says so; θ still rebuilds bitwise; lmclean's recomputed gradient matches under autocast (and not
    without it); replay without a sample equals the Trainer's own bf16 run excluding it."""
    from lmclean.unlearn import ForgetSet, replay
    from lmclean.unlearn.common import flat_grad
    from lmclean.unlearn.service import open_trajectory

    trainer, _ = run(tmp_path, "bf16", bf16=True, num_train_epochs=1)
    store = TrajectoryStore(tmp_path / "bf16.zarr")
    assert store.meta["autocast"] == "bf16"
    assert torch.equal(replayed_from_start(store), final_theta(trainer, store))
    traj = open_trajectory(store)
    theta0 = store.checkpoint(0)[0]
    rec = store.step(0)
    stored = store.grad(0)

    def rel(obj: object) -> float:
        mine = flat_grad(obj, store.manifest, theta0) * rec.clip
        return float(torch.linalg.vector_norm(mine - stored) / torch.linalg.vector_norm(stored))

    ids = rec.sample_ids.tolist()
    exact = rel(traj.objective(0, ids, micro=True))  # the recorded micro-batches, at their padded widths
    single = rel(traj.objective(0, ids))  # one batch: bf16 rounding depends on the batch shape
    fp32 = traj.objective(0, ids, micro=True)
    for part in fp32.parts:
        part.autocast = None
    assert exact < 1e-5 < single and rel(fp32) > 1e-4, (exact, single, rel(fp32))
    excluded, _ = run(tmp_path, "bf16_ex", bf16=True, num_train_epochs=1, cb_kwargs={"exclude": [104]})
    reference = final_theta(excluded, store)
    theta_hat = store.theta_at(store.committed_steps)[0] + replay(traj, ForgetSet({104})).delta
    err = float(torch.linalg.vector_norm(theta_hat - reference))
    effect = float(torch.linalg.vector_norm(final_theta(trainer, store) - reference))
    # measured: 5.7e-8 of the exclusion effect (3.9e-2 when replay ignored the micro-batch shapes)
    assert err <= 1e-5 * effect, (err, effect)


def test_fp16_is_refused(tmp_path: Path) -> None:
    """transformers refuses fp16 on CPU before any callback runs, so the callback's own check is
    called directly with the arguments of a GPU fp16 run."""
    args = make_args(tmp_path / "fp16")
    object.__setattr__(args, "fp16", True)
    cb = LMCleanCallback(tmp_path / "fp16.zarr", id_column="id")
    model = make_model()
    with pytest.raises(UnsupportedError, match="fp16") as info:
        cb._check_run(args, model, torch.optim.AdamW(model.parameters()))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "fp16.zarr").exists()
