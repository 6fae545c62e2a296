"""The built-in trainer: a deterministic SGD/AdamW loop over a causal LM that records as it trains.

Same config + seed -> same batch order and bitwise the same weights. `exclude` trains the identical
run with those samples dropped from their batches and every other weight unchanged (the
exact-retraining reference of the unlearning literature).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmclean import config as config_mod
from lmclean.config import LmcleanConfig
from lmclean.device import deterministic, float_dtype_on, resolve_device
from lmclean.errors import ConfigError, DataError, StoreError
from lmclean.objective import CausalLMObjective
from lmclean.store.reader import TrajectoryStore
from lmclean.train.data import Dataset, collate, load_segments, load_tokenizer, more_data, segments_meta
from lmclean.params import ParamManifest, bind_flat, flat_grads, flat_params
from lmclean.adapters import describe_for_store, ensure_base, save_output
from lmclean.train.model import fresh_model, load_model
from lmclean.optim import lr_at, make_rule
from lmclean.train.online import OnlineRequests
from lmclean.train.recorder import Recorder, RecordStats
from lmclean import dist
from lmclean.train import distributed

StepCallback = Callable[[int, int, float, float], None]  # (step, total, loss, lr)
StartCallback = Callable[[int, int], None]  # (first step, total): set-up done, training starts


@dataclass
class TrainResult:
    store: Path | None
    steps: int
    start_step: int
    final_loss: float
    seconds: float
    stats: RecordStats | None
    model_dir: Path | None
    run: "Run"
    device: str = "cpu"  # where it trained (train.device resolved)


@dataclass
class Run:
    """Everything a training run is made of, built deterministically from the config."""

    cfg: LmcleanConfig
    tokenizer: Any
    dataset: Dataset
    model: torch.nn.Module
    manifest: ParamManifest
    plan: list[list[int]]


def prepare(cfg: LmcleanConfig, base: Path | None = None, more: list[tuple[str, int]] | None = None) -> Run:
    """`more`: data files added later (path, first step; `record --continue --data`)."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    dataset = load_segments(cfg.data, tokenizer, base, more or [])
    if cfg.model.path:
        torch.manual_seed(cfg.seed)
        model = load_model(cfg.model.path)
    else:
        model = fresh_model(cfg.model.config, len(tokenizer), cfg.data.max_length, cfg.seed)
    if cfg.model.lora is not None:  # only the adapters train (and are recorded); the base stays frozen
        from lmclean.adapters import wrap_lora

        model = wrap_lora(model, cfg.model.lora, seed=cfg.seed)
    model.train()
    t = cfg.train
    plan = dataset.plan(t.batch_size, cfg.seed, t.epochs, t.steps, t.shuffle)
    return Run(cfg, tokenizer, dataset, model, ParamManifest.from_model(model), plan)


def batch_tensors(run: Run, ids: list[int], weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (b, L), lengths (b,), weights (b,) float64 for the kept samples of one step."""
    pad = run.tokenizer.pad_token_id or 0
    input_ids, lengths = collate([run.dataset.by_id[i].token_ids for i in ids], pad)
    return input_ids, lengths, torch.full((len(ids),), weight, dtype=torch.float64)


class _NullRecorder:
    """Stands in for the Recorder when training without recording (benchmarks' baseline)."""

    def record_step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, *args: Any, before_closed: Callable[[], None] | None = None, **kwargs: Any) -> None:
        if before_closed is not None:
            before_closed()
        return None

    def abort(self) -> None:
        pass


def train(cfg: LmcleanConfig, store: Path | None, *, exclude: list[int] | None = None, resume: bool = False,
          overwrite: bool = False, base: Path | None = None, on_step: StepCallback | None = None,
          save_final: bool = True, on_start: StartCallback | None = None,
          more: list[tuple[str, int]] | None = None) -> TrainResult:
    """Train and record into `store` (None: train only), holding the store lock, and append the
    run to the store's audit log ("record" or "resume"). `more`: data files added at later steps
    (path, first step), as `record --continue --data` leaves them (a resume reads them from the store)."""
    kwargs = dict(exclude=exclude, overwrite=overwrite, base=base, on_step=on_step, save_final=save_final,
                  on_start=on_start, more=more)
    if store is None:
        with deterministic(resolve_device(cfg.train.device)):  # CUDA: the kernels replay will run
            return _train(cfg, None, resume=False, **kwargs)
    store = Path(store)
    d = dist.current()  # torchrun: rank 0 does all of the below; the others train their shares (docs/distributed.md)
    if d.active:
        distributed.refuse_unsupported(cfg, resume, d)
        distributed.reset_gate(d)
        if not d.main:
            with deterministic(resolve_device(cfg.train.device)):
                return distributed.run_peer(lambda: _train(cfg, store, resume=False, **kwargs), d)
    try:
        return _train_locked(cfg, store, resume, exclude, kwargs, d)
    except BaseException as exc:
        distributed.fail_gate(d, exc)  # peers still waiting for the store: they stop too
        raise


def _train_locked(cfg: LmcleanConfig, store: Path, resume: bool, exclude: list[int] | None, kwargs: dict[str, Any],
                  d: dist.Dist) -> TrainResult:
    from lmclean.audit import finish_pending_scrub, record_event
    from lmclean.store.append import finish_pending_growth
    from lmclean.store.lock import StoreLock
    from lmclean.store.swap import finish_pending_swap

    on_start, overwrite = kwargs["on_start"], kwargs["overwrite"]
    finish_pending_swap(store)  # a reconcile interrupted after its commit point
    holder: list[StoreLock] = []
    if (store / "zarr.json").exists() and (resume or overwrite):
        # Take the lock before touching the store, and keep it: --overwrite clears the store in place
        # (everything but the lock file), so no unlearn can open a half-deleted or half-new store.
        holder.append(StoreLock(store, "record --resume" if resume else "record --overwrite"))
        holder[0].acquire()
        if resume:
            try:
                from lmclean.audit import AuditLog
                from lmclean.audit.publish import finish_pending_unlearn

                AuditLog(store).require_intact()  # first: a forged record must not be scrubbed or resumed over
                finish_pending_growth(store)  # first: the samples table an interrupted `--continue --data` grew
                finish_pending_unlearn(store)
                finish_pending_scrub(store)
            except BaseException:
                holder[0].release()
                raise
    began = time.perf_counter()

    def locked_start(start: int, total: int) -> None:  # the store exists from here on: lock it
        if not holder:
            holder.append(StoreLock(store, "record --resume" if resume else "record"))
            holder[0].acquire()
        if on_start:
            on_start(start, total)

    kwargs["on_start"] = locked_start
    try:
        with deterministic(resolve_device(cfg.train.device)):  # CUDA: the kernels replay will run
            result = _train(cfg, store, resume=resume, **kwargs)
        record_event(store, "resume" if resume else "record", cfg, result.steps, result.model_dir,
                     time.perf_counter() - began, start_step=result.start_step if resume else None,
                     excluded_ids=sorted(exclude or []))
        d.barrier()  # torchrun: the peers return once the store is closed and audited
        return result
    finally:
        if holder:
            holder[0].release()


def _train(cfg: LmcleanConfig, store: Path | None, *, exclude: list[int] | None = None, resume: bool = False,
           overwrite: bool = False, base: Path | None = None, on_step: StepCallback | None = None,
           save_final: bool = True, on_start: StartCallback | None = None,
           more: list[tuple[str, int]] | None = None) -> TrainResult:
    if resume and store is not None and more is None:  # the data files a `record --continue --data` added
        more = more_data(TrajectoryStore(store).meta)
    run = prepare(cfg, base, more)
    excluded = set(exclude or [])
    unknown = sorted(excluded - set(run.dataset.by_id))
    if unknown:
        raise DataError(f"--exclude names sample id {unknown[0]} that is not in {run.dataset.path} ({len(unknown)} unknown ids)")
    rule = make_rule(cfg.train)
    total = len(run.plan)
    device = resolve_device(cfg.train.device)
    autocast = None if cfg.train.autocast == "off" else cfg.train.autocast  # meta["autocast"], objective.autocast
    run.model.to(device)
    theta = flat_params(run.model, run.manifest).clone()  # (P,) the single source of truth, on the device
    bind_flat(run.model, run.manifest, theta)
    state = rule.init_state(theta)
    start = 0
    recorder: Any
    model_meta = describe_for_store(run.model) if store is not None else None  # meta["model"]
    d = dist.current() if store is not None else dist.Dist()
    # deletion requests at step boundaries (before the reopen); torchrun: applied by `unlearn --pending` instead
    online = None if d.active else OnlineRequests.open(cfg, store, resume)
    if store is None:
        recorder, save_final = _NullRecorder(), False
    elif not d.main:  # torchrun rank r > 0: writes its gradient columns only
        recorder, save_final = distributed.peer_recorder(store, d, cfg.record.queue_size), False
    elif resume:
        recorder, start = _reopen(store, cfg, sorted(excluded), theta, state, run)
        excluded = excluded | set(recorder.meta.get("dropped_ids", []))  # forgotten before `record --continue`
    else:
        recorder = Recorder.create(
            store, manifest=run.manifest, rule=rule, planned_steps=total, batch_size=cfg.train.batch_size,
            max_length=cfg.data.max_length, checkpoint_every=cfg.record.checkpoint_every,
            sample_ids=run.dataset.ids, fingerprints=[s.fingerprint for s in run.dataset.samples],
            precision=cfg.record.precision, codec=cfg.record.codec, config=config_mod.to_dict(cfg),
            model_config=run.model.config.to_dict(), tokenizer=cfg.tokenizer,
            pad_id=run.tokenizer.pad_token_id or 0, excluded_ids=sorted(excluded), overwrite=overwrite,
            queue_size=cfg.record.queue_size, gradients=cfg.record.gradients, extra={"data_path": str(run.dataset.path), "seed": cfg.seed,
                   "truncated_samples": run.dataset.truncated, "model": model_meta,
                   "device": str(device), "autocast": autocast, **distributed.store_meta(d),
                   **({"data_segments": segments_meta(run.dataset)} if run.dataset.more else {})})
        distributed.start_gate(d)
    loss_value = float("nan")
    try:
        if on_start:
            on_start(start, total)
        if store is not None and d.main:  # the frozen base the store's adapters need (STORE/base when it has no directory)
            ensure_base(run.model, Path(store), model_meta, recorder.meta.get("model", {"kind": "full"}))
        began = time.perf_counter()
        if online is not None:
            online.bind(recorder, excluded, start)
        for t in range(start, total):
            if online is not None:  # pending requests: corrected θ/state, their samples added to `excluded`
                online.maybe_apply(t, theta, state)
            batch = run.plan[t]
            kept = [i for i in batch if i not in excluded]
            lr = lr_at(t, total, cfg.train)
            input_ids, lengths, weights = batch_tensors(run, kept, 1.0 / len(batch))
            for p in run.model.parameters():
                p.grad = None

            def share(rows: slice) -> tuple[float, torch.Tensor]:  # torchrun: this rank's rows of the step
                obj = CausalLMObjective(run.model, input_ids[rows].to(device), lengths[rows].to(device),
                                        weights[rows].to(device, float_dtype_on(device)), autocast=autocast)
                loss = obj.loss_from_outputs(obj.outputs(dict(run.model.named_parameters())))
                loss.backward()
                return float(loss.detach()), flat_grads(run.model, run.manifest)

            # every sample of a step excluded: the step still happens, with no data term (zero gradient)
            loss_value, grad = distributed.share_grad(d, len(kept), share, lambda: torch.zeros_like(theta))
            recorder.record_step(t, lr=lr, loss=loss_value, sample_ids=kept, weights=weights,
                                 input_ids=input_ids, lengths=lengths, grad=grad, theta=theta, opt_state=state)
            with torch.no_grad():
                rule.step(theta, grad, lr, state, t)
            if on_step:
                on_step(t, total, loss_value, lr)
        model_dir = Path(store) / "model" if save_final and store is not None else None
        timing: list[float] = []

        def finish() -> None:  # the writes are flushed and verified; the store is not closed yet
            timing.append(time.perf_counter() - began)  # training time, recording included
            if model_dir is not None:
                # the final model is saved before the store is marked closed: a crash in between
                # leaves a store that `--resume` completes (nothing left to train; it saves the model)
                save_output(run.model, run.tokenizer, model_dir)

        stats = recorder.close(total, theta, state, before_closed=finish)
        seconds = timing[0] if timing else time.perf_counter() - began
    except BaseException:
        recorder.abort()
        raise
    return TrainResult(Path(store) if store else None, total, start, loss_value, seconds, stats, model_dir, run, str(device))


def stored_config(store: Path, overrides: list[str] | None = None) -> tuple[LmcleanConfig, Path | None, list[int]]:
    """What `store` was recorded with: its config (``overrides`` applied on top), the directory its
    relative data path resolved against, and its excluded ids. `record --resume` without a config
    file continues with these, so nothing has to be repeated on the command line."""
    import copy

    meta = TrajectoryStore(store).meta
    cfg = config_mod.from_dict(config_mod.apply_overrides(copy.deepcopy(meta["config"]), overrides or []))
    rel, used = Path(cfg.data.path), Path(str(meta.get("data_path", "")))
    n = len(rel.parts)
    base = Path(*used.parts[:-n]) if not rel.is_absolute() and len(used.parts) > n and used.parts[-n:] == rel.parts else None
    return cfg, base, list(meta.get("excluded_ids", []))


def _resume_differences(stored: dict[str, Any], cfg: LmcleanConfig) -> list[str]:
    """Config changes that forbid --resume. `train.device` may change (where the run goes on, not
    what it computes); keys added to lmclean after the store was written count as their defaults."""
    filled = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for section, keys in config_mod.to_dict(LmcleanConfig()).items():
        if section not in filled:
            filled[section] = keys
        elif isinstance(keys, dict) and isinstance(filled[section], dict):
            filled[section] = {**keys, **filled[section]}  # a section's keys only: values stay as stored
    return [d for d in config_mod.diff(filled, config_mod.to_dict(cfg)) if not d.startswith("train.device:")]


def _reopen(store: Path, cfg: LmcleanConfig, excluded: list[int], theta: torch.Tensor,
            state: dict[str, torch.Tensor], run: Run) -> tuple[Recorder, int]:
    """Continue a store from its last committed checkpoint, refusing if the config or data differ."""
    existing = TrajectoryStore(store)
    differences = _resume_differences(existing.meta["config"], cfg)
    if existing.meta.get("excluded_ids", []) != excluded:
        differences.append(f"exclude: {existing.meta.get('excluded_ids')} -> {excluded}")
    if differences:
        raise ConfigError(f"--resume config differs from the store's: {'; '.join(differences)}; use the same config or --overwrite")
    recorded = existing.sample_fingerprints
    current = {s.id: s.fingerprint for s in run.dataset.samples}
    if recorded != current:
        changed = sorted(i for i in set(recorded) | set(current) if recorded.get(i) != current.get(i))
        raise DataError(f"--resume: the data in {run.dataset.path_of(changed[0])} differs from the recorded data set "
                        f"({len(changed)} samples differ, first id {changed[0]}); restore the data or use --overwrite")
    if existing.closed:
        raise StoreError(f"store {store} is already complete ({existing.committed_steps} steps); nothing to resume")
    committed = existing.committed_steps
    restart = existing.nearest_checkpoint(committed) if existing.checkpoint_steps else 0
    if existing.checkpoint_steps:
        ck_theta, ck_state = existing.theta_at(restart)  # after the correction events at restart (jumps)
        theta.copy_(ck_theta)
        for k, v in ck_state.items():
            state[k].copy_(v)
    return Recorder.reopen(store, restart, cfg.record.queue_size), restart
