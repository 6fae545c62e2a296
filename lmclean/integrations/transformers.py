"""Record a stock `transformers.Trainer` run into an lmclean store: `LMCleanCallback`.

    trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
                      train_dataset=ds, data_collator=collate,
                      callbacks=[LMCleanCallback("runs/ft.zarr", id_column="id")])
    trainer.train()

Each optimizer step is recorded at `on_pre_optimizer_step`, where the Trainer has clipped the
gradient and θ[t] is not yet updated. The batch, the sample ids and the Trainer's token count come
from a wrapper around `model.forward` (it also hides the id column from the model); the pre-clip
norm from gradient hooks. `exclude=[ids]` trains the same run with those samples dropped from
their micro-batches and the loss denominator kept: the exact-retraining reference.

Deletion requests queued while it trains (`lmclean request`) are taken at the next step boundary
(`on_step_begin`) by lmclean/train/online.py, as a running `lmclean record` takes them (`unlearn=`).

Under DDP (`torchrun`) every rank captures its micro-batches and rank 0 alone records the global
step (lmclean/integrations/_ddp.py; docs/distributed.md, "The Trainer callback under DDP").
"""

from __future__ import annotations

import atexit
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lmclean.adapters import describe_for_store, ensure_base, save_output
from lmclean.audit import AuditLog, finish_pending_scrub, record_event
from lmclean.audit.publish import finish_pending_unlearn
from lmclean.config import LmcleanConfig
from lmclean.dist import Dist
from lmclean.errors import ConfigError, DataError, StoreError, StoreExistsError
from lmclean.integrations._capture import (ForwardCapture, GradNorms, base_config, check_run, online_settings,
                                           pretrained_dir, save_steps, scan_dataset, step_batch, write_back, zero_loss)
from lmclean.integrations._ddp import SyncedGradNorms, agree_all, collective, gather_micro, refuse_under_ddp
from lmclean.integrations._ddp import group as ddp_group
from lmclean.optim import rule_from_torch, rule_to_dict
from lmclean.params import ParamManifest, flat_grads, flat_params
from lmclean.store.lock import StoreLock
from lmclean.store.reader import TrajectoryStore
from lmclean.train.online import OnlineRequests
from lmclean.train.recorder import Recorder, torch_optimizer_state

logger = logging.getLogger(__name__)
SOURCE = "transformers.Trainer"
_ACTIVE: dict[Path, list["LMCleanCallback"]] = {}  # store -> callbacks holding its lock in this process


class LMCleanCallback(TrainerCallback):
    """Records the Trainer's steps into the store at `store` (see the module docstring).

    ``checkpoint_every`` steps a full θ + optimizer state is saved (also at every Trainer save step
    when ``save_strategy="steps"``, so ``resume_from_checkpoint`` can continue the store).
    ``max_length`` defaults to the longest ``input_ids`` of the training set. ``codec`` defaults to
    ``none``: a real model's fp32 gradients barely compress (3.96 against 4.00 bytes per parameter
    per step with lz4 on the 10.9M-parameter benchmark), and encoding them took writer CPU from
    training (benchmarks/README.md, "Trainer fine-tunes"). ``exact_update``
    switches a fused/foreach optimizer to torch's single-tensor path, which replay matches bitwise.
    ``gradients="recompute"`` writes no gradient rows (θ is rebuilt by recomputing them from the
    stored batches: docs/store-format.md). At ``on_train_begin`` of a new store the projected store
    size and unlearning cost are logged in one line (logger ``lmclean.integrations.transformers``,
    INFO) and kept as ``callback.projected`` (lmclean/store/projection.py: `StoreProjection`).
    """

    def __init__(self, store: str | Path, *, id_column: str = "id", exclude: list[int] | None = None,
                 checkpoint_every: int = 50, max_length: int | None = None, overwrite: bool = False,
                 precision: str = "fp32", codec: str = "none", save_model: bool = True,
                 exact_update: bool = True, unlearn: dict[str, Any] | None = None, gradients: str = "stored") -> None:
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every={checkpoint_every} must be at least 1")
        self.unlearn = online_settings(unlearn)
        self._unlearn_given = unlearn is not None
        self._d = Dist(0, 1)  # under DDP: this rank (rank 0 alone owns the store; lmclean/integrations/_ddp.py)
        self._online: OnlineRequests | None = None
        self.path = Path(store)
        self.id_column, self.exclude = id_column, sorted({int(i) for i in exclude or []})
        self.checkpoint_every, self.max_length, self.overwrite = checkpoint_every, max_length, overwrite
        self.precision, self.codec, self.save_model, self.exact_update = precision, codec, save_model, exact_update
        self.gradients = gradients  # "recompute": no gradient rows (docs/store-format.md, record.gradients)
        self.projected: Any = None  # the StoreProjection logged at on_train_begin (a new store)
        self.recorder: Any = None
        self.stats: Any = None  # RecordStats of the last completed run
        self._lock: Any = None
        self._capture: ForwardCapture | None = None
        self._norms: GradNorms | SyncedGradNorms | None = None

    # -- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, train_dataloader: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        # a train() that raised never reached on_train_end: close its run (this callback's, or another
        # instance's on the same store in this process), so the store is unlocked and resumable
        for stale in [self, *_ACTIVE.get(self.path.resolve(), [])]:
            if stale.recorder is not None or stale._lock is not None:
                stale.abort()
        self._d = ddp_group(args)  # DDP: every rank hooks its model, rank 0 alone records (raises alike on every rank)
        error: BaseException | None = None
        try:
            self._begin(args, state, model, getattr(optimizer, "optimizer", optimizer), train_dataloader,
                        processing_class)
        except BaseException as exc:  # noqa: BLE001 - raised below, on every rank under DDP
            self.abort()
            error = exc
        try:
            agree_all(self._d, error)
        except BaseException:
            self.abort()
            raise

    def _begin(self, args: Any, state: Any, model: Any, optimizer: Any, train_dataloader: Any,
               processing_class: Any) -> None:
        self._check_run(args, model, optimizer)
        self.manifest = ParamManifest.from_model(model)
        self.rule = rule_from_torch(optimizer, model, self.manifest)
        if self.exact_update:
            for group in optimizer.param_groups:  # read at every step(): single-tensor is what replay mirrors
                group["foreach"] = False
                if group.get("fused"):
                    group["fused"] = False
        self.model, self.optimizer = model, optimizer
        self.pad_id = int(getattr(processing_class, "pad_token_id", None) or 0)
        self.started = time.perf_counter()
        self.start_step = int(state.global_step)
        self.max_grad_norm = float(args.max_grad_norm or 0.0)
        self.model_meta = describe_for_store(model)  # meta["model"]: what unlearning rebuilds the model from
        d = self._d
        refuse_under_ddp(d, live_requests=self._unlearn_given, resume=self.start_step > 0)
        if d.main:
            cfg = LmcleanConfig()
            cfg.record.unlearn, cfg.train.device = self.unlearn, str(getattr(args, "device", "cpu"))
            # before the reopen (it unlists events past the Trainer checkpoint); that θ is pre-jump
            self._online = None if d.active else OnlineRequests.open(cfg, self.path, self.start_step > 0,
                                                                     restart=self.start_step, pre_jump=True)
            if self.start_step > 0:
                self._reopen(state, model, train_dataloader)
            else:
                self._create(args, state, model, train_dataloader)
            ensure_base(model, self.path, self.model_meta, self.recorder.meta.get("model", {"kind": "full"}))
        trainable = [p for p in model.parameters() if p.requires_grad]
        self._norms = SyncedGradNorms(trainable) if d.active else GradNorms(trainable)
        self._capture = ForwardCapture(model, self.id_column, set(self.exclude), lambda: zero_loss(trainable))
        self._capture.active = True
        # the Trainer's num_items_in_batch is the count over every rank (w_i = n_i / N); else each rank's own
        self._averaged = bool(getattr(args, "average_tokens_across_devices", True))
        if self._online is not None:  # its exclusions go straight into the wrapper's set
            self._online.bind(self.recorder, self._capture.exclude, self.start_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Pending deletion requests, before the step's first forward (once per optimizer step)."""
        if self.recorder is None or self._online is None:
            return
        try:
            self._take_requests(int(state.global_step))
        except BaseException:
            self.abort()
            raise

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if self.recorder is None and not (self._d.active and self._capture is not None):
            return
        try:
            collective(self._d, lambda: self._record(int(state.global_step)))
        except BaseException:
            self.abort()
            raise

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Checkpoint θ[s] as soon as step s−1 is done: a Trainer save at s (or a stop) finds it there."""
        if self.recorder is None or not self.recorder.needs_checkpoint(int(state.global_step)):
            return
        try:
            self.recorder.checkpoint(int(state.global_step), flat_params(self.model, self.manifest).float().cpu(),
                                     torch_optimizer_state(self.optimizer, self.model, self.manifest, self.rule))
        except BaseException:
            self.abort()
            raise

    def on_train_end(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                     processing_class: Any = None, **kwargs: Any) -> None:
        if self.recorder is None and not (self._d.active and self._capture is not None):
            return
        # DDP: the peers return once rank 0 has closed the store (or stop with its error)
        collective(self._d, lambda: self._end(int(state.global_step), processing_class))

    def _end(self, final: int, processing_class: Any) -> None:
        try:
            self._unhook()
            if self.recorder is None:  # a DDP peer
                return
            if final < self.recorder.meta["planned_steps"]:
                logger.warning("LMCleanCallback: training stopped at step %d of %d; store %s is left resumable "
                               "(resume_from_checkpoint continues it)", final, self.recorder.meta["planned_steps"],
                               self.path)
                self.abort()
                return
            self._close(final, processing_class)
        except BaseException:
            self.abort()
            raise
        finally:
            self._release()

    def abort(self) -> None:
        """Commit what was recorded, unhook the model and release the store (it stays resumable).
        The Trainer has no exception hook: call this if `trainer.train()` raises and you go on."""
        self._unhook()
        try:
            if self.recorder is not None:
                self.recorder.abort()
        finally:
            self.recorder = None
            self._release()

    # -- steps ---------------------------------------------------------------------------------
    def _record(self, t: int) -> None:
        micro = self._capture.take() if self._capture else []
        if self._d.active:  # every rank's micro-batches, on rank 0; a peer has recorded its part
            micro = gather_micro(self._d, micro, self._averaged)
            if not self._d.main:
                if self._norms:
                    self._norms.reset()
                return
        if not micro:
            raise StoreError(f"LMCleanCallback: step {t} ran no training forward through the model; a custom "
                             "compute_loss or training_step must call model(**inputs)")
        batch = step_batch(micro, self.pad_id)
        norm = self._norms.total() if self._norms else 0.0
        clip = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
        ck = self.recorder.needs_checkpoint(t)
        self.recorder.record_step(
            t, lr=float(self.optimizer.param_groups[0]["lr"]), loss=batch.loss, sample_ids=batch.ids,
            weights=batch.weights, input_ids=batch.input_ids, lengths=batch.lengths,
            grad=None if self.recorder.recompute else flat_grads(self.model, self.manifest).detach().float().cpu(),
            grad_norm=norm, clip=clip,
            loss_mask=batch.loss_mask, micro=batch.micro, widths=batch.widths, theta=flat_params(self.model, self.manifest).float().cpu() if ck else None,
            opt_state=torch_optimizer_state(self.optimizer, self.model, self.manifest, self.rule) if ck else None)
        if self._norms:
            self._norms.reset()

    def _take_requests(self, t: int) -> None:
        """OnlineRequests on flat copies of θ and the optimizer state; what it changed is copied back
        into the parameters and `optimizer.state` in place (their dtype and device)."""
        online = self._online
        if online is None or not online.wants(t):
            return
        theta = flat_params(self.model, self.manifest).detach().clone()
        opt_state = torch_optimizer_state(self.optimizer, self.model, self.manifest, self.rule)
        before, before_state = theta.clone(), {k: v.clone() for k, v in opt_state.items()}
        online.maybe_apply(t, theta, opt_state)
        write_back(self.model, self.optimizer, self.manifest, theta, opt_state, before, before_state, t)

    # -- set-up ----------------------------------------------------------------------------------
    def _check_run(self, args: Any, model: Any, optimizer: Any) -> None:
        check_run(args, model, optimizer, self.id_column)

    def _create(self, args: Any, state: Any, model: torch.nn.Module, train_dataloader: Any) -> None:
        dataset = getattr(train_dataloader, "dataset", None)
        ids, fps, longest = scan_dataset(dataset, self.id_column)
        unknown = sorted(set(self.exclude) - set(ids))
        if unknown:
            raise DataError(f"exclude names sample id {unknown[0]} that is not in the train_dataset "
                            f"({len(unknown)} unknown ids)")
        max_length = self.max_length or longest
        if not max_length:
            raise DataError("LMCleanCallback cannot tell the longest sample (rows have no input_ids); "
                            "pass LMCleanCallback(..., max_length=N)")
        from lmclean.store.projection import (
            project,  # what this run will write and cost: one log line
        )

        self.projected = project(
            params=self.manifest.size, steps=int(state.max_steps), max_length=int(max_length),
            batch_size=int(args.per_device_train_batch_size * args.gradient_accumulation_steps * self._d.world),
            checkpoint_every=self.checkpoint_every, state_buffers=len(self.rule.state_names()),
            gradients=self.gradients, precision=self.precision, micro_batches=True)
        logger.info("LMCleanCallback: %s", self.projected.line())
        if self.path.exists() and self.overwrite and (self.path / "zarr.json").exists():
            self._acquire(StoreLock(self.path, "record --overwrite (transformers.Trainer)"))
        config = {"source": SOURCE, "training_args": json.loads(args.to_json_string()),
                  "id_column": self.id_column}
        self.config = config
        if self.path.exists() and not self.overwrite:
            raise StoreExistsError(f"store {self.path} already exists; pass LMCleanCallback(..., overwrite=True) to "
                                   "replace it, or resume_from_checkpoint to continue its run")
        self.recorder = Recorder.create(
            self.path, manifest=self.manifest, rule=self.rule, planned_steps=int(state.max_steps),
            batch_size=int(args.per_device_train_batch_size * args.gradient_accumulation_steps * self._d.world),
            max_length=int(max_length), checkpoint_every=self.checkpoint_every,
            extra_checkpoints=save_steps(args, state), sample_ids=ids, fingerprints=fps,
            precision=self.precision, codec=self.codec, gradients=self.gradients, config=config,
            model_config=base_config(model),
            pad_id=self.pad_id, excluded_ids=self.exclude, overwrite=self.overwrite,
            max_grad_norm=self.max_grad_norm or None, label_mask=True, micro_batches=True,
            extra={"model": self.model_meta, "source": SOURCE, "seed": int(args.seed), "id_column": self.id_column,
                   # bf16=True: the Trainer's forward runs under bf16 autocast with fp32 master weights;
                   # replay and curvature recompute under the same autocast (lmclean/objective.py)
                   "autocast": "bf16" if getattr(args, "bf16", False) else None,
                   "device": str(getattr(args, "device", "cpu")),
                   **({"world_size": self._d.world} if self._d.active else {})})
        if self._lock is None:
            self._acquire(StoreLock(self.path, "record (transformers.Trainer)"))

    def _reopen(self, state: Any, model: torch.nn.Module, train_dataloader: Any) -> None:
        """Continue the store at the Trainer checkpoint's step, refusing a store of another run."""
        step = self.start_step
        if not (self.path / "zarr.json").exists():
            raise StoreError(f"resuming the Trainer at step {step} but store {self.path} does not exist; "
                             "record from step 0 or point LMCleanCallback at the run's store")
        self._acquire(StoreLock(self.path, "record --resume (transformers.Trainer)"))
        AuditLog(self.path).require_intact()
        finish_pending_unlearn(self.path)
        finish_pending_scrub(self.path)
        store = TrajectoryStore(self.path)
        if store.closed:
            raise StoreError(f"store {self.path} is already complete ({store.committed_steps} steps); nothing to resume")
        meta = store.meta
        mine = {"manifest": self.manifest.to_list(), "optimizer": rule_to_dict(self.rule),
                "excluded_ids": self.exclude, "planned_steps": int(state.max_steps)}
        for key, value in mine.items():
            if json.loads(json.dumps(value)) != meta.get(key):
                raise ConfigError(f"resume: the run's {key} differs from store {self.path}'s; resume the same run")
        if step not in store.checkpoint_steps or store.committed_steps < step:
            raise StoreError(f"store {self.path} has no checkpoint at the Trainer's step {step} (checkpoints: "
                             f"{store.checkpoint_steps}); resume from a Trainer checkpoint the store covers")
        ids, fps, _ = scan_dataset(getattr(train_dataloader, "dataset", None), self.id_column)
        if dict(zip(ids, fps)) != store.sample_fingerprints:
            raise DataError(f"resume: the train_dataset differs from the data recorded in store {self.path}; "
                            "resume with the same data")
        theta, _ = store.checkpoint(step)
        if not torch.equal(theta, flat_params(model, self.manifest).float().cpu()):
            raise DataError(f"resume: the Trainer checkpoint's weights differ from store {self.path} at step {step}; "
                            "resume from this run's checkpoint")
        self.config = meta.get("config", {})
        self.recorder = Recorder.reopen(self.path, step)

    def _close(self, final: int, processing_class: Any) -> None:
        model_dir = self.path / "model" if self.save_model else None

        def save() -> None:
            if model_dir is not None:
                save_output(self.model, processing_class, model_dir)

        self.stats = self.recorder.close(
            final, flat_params(self.model, self.manifest).float().cpu(),
            torch_optimizer_state(self.optimizer, self.model, self.manifest, self.rule), before_closed=save)
        self.recorder = None
        resumed = self.start_step > 0
        record_event(self.path, "resume" if resumed else "record", self.config, self.stats.steps, model_dir,
                     time.perf_counter() - self.started, start_step=self.start_step if resumed else None,
                     excluded_ids=self.exclude, model_before_dir=None if resumed else pretrained_dir(self.model))

    # -- plumbing ----------------------------------------------------------------------------------
    def _unhook(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._norms is not None:
            self._norms.remove()
            self._norms = None

    def _acquire(self, lock: Any) -> None:
        lock.acquire()
        self._lock = lock
        _ACTIVE.setdefault(self.path.resolve(), []).append(self)

    def _release(self) -> None:
        held = _ACTIVE.get(self.path.resolve(), [])
        if self in held:
            held.remove(self)
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()


@atexit.register
def _abort_at_exit() -> None:
    """A run that raised and was never resumed: commit what it recorded and unlock the store."""
    for held in list(_ACTIVE.values()):
        for cb in list(held):
            cb.abort()
