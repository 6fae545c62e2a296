"""The record configuration: a tree of dataclasses loaded from YAML, with a default and help per key.

The whole config is saved in the store, so `record --resume` and `unlearn` can say exactly what
differs. Unknown keys and out-of-range values are errors that name the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lmclean.device import check_device_spec
from lmclean.errors import ConfigError, InputNotFoundError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str | None = _f(None, "Local Hugging Face model directory to fine-tune (no downloads).")
    config: dict[str, Any] = _f(
        {
            "model_type": "llama",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "Transformers config keys for a freshly initialised model (used when `path` is empty).",
    )
    lora: dict[str, Any] | None = _f(
        None, "Train LoRA adapters only (the base stays frozen): {r: 8, alpha: 16, target_modules: [q_proj, "
        "v_proj], dropout: 0.0}; empty = train every weight. See lmclean/adapters.py.",
    )


@dataclass
class DataConfig:
    path: str = _f("examples/data/authors.jsonl", "JSON Lines file with one training sample per row.")
    id_field: str | None = _f("id", "Row field holding the sample id (an int); empty = the row number.")
    template: str | None = _f(
        "Q: {question}\nA: {answer}", "Python format string over the row's fields that makes the text."
    )
    text_field: str | None = _f(None, "Row field holding the text (used instead of `template`).")
    max_length: int = _f(160, "Maximum tokens per sample; longer samples are truncated.")


@dataclass
class TrainConfig:
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "Update rule: sgd (momentum, weight_decay) or adamw.")
    lr: float = _f(0.05, "Peak learning rate.")
    momentum: float = _f(0.0, "SGD momentum (0 = plain SGD).")
    weight_decay: float = _f(0.0, "Weight decay: coupled (L2) for sgd, decoupled for adamw.")
    betas: list[float] = _f([0.9, 0.999], "AdamW (beta1, beta2).")
    eps: float = _f(1e-8, "AdamW epsilon.")
    schedule: Literal["constant", "cosine", "linear"] = _f("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = _f(0, "Linear warmup steps from 0 to `lr`.")
    min_lr_ratio: float = _f(0.0, "Final lr as a fraction of `lr` for cosine and linear schedules.")
    batch_size: int = _f(8, "Samples per step.")
    epochs: int | None = _f(30, "Passes over the data (used when `steps` is empty).")
    steps: int | None = _f(None, "Total optimizer steps (overrides `epochs`).")
    shuffle: bool = _f(True, "Reshuffle the sample order every epoch (seeded).")
    device: str = _f("auto", "Where to train: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps (`--device`).")
    autocast: Literal["off", "bf16"] = _f(
        "off", "Mixed precision. bf16: the forward pass runs under torch.autocast(bfloat16) with fp32 master weights, "
        "gradients and optimizer state (like Trainer(bf16=True)); unlearning recomputes under the same autocast. "
        "off: fp32 throughout.")


@dataclass
class OnlineUnlearnConfig:
    method: Literal["lmcleaner", "replay", "rollback", "none"] = _f(
        "lmcleaner", "How a running `record` applies a queued deletion request (`lmclean request`) at its next step: "
        "lmcleaner (propagate through the recorded curvature), replay (exact re-run from the first affected step), "
        "rollback (no propagation), none (only drop the samples from later batches: the do-nothing baseline).")
    K: int | None = _f(None, "Steps to propagate past the last affected step (empty: the method's default, 800 for "
                       "lmcleaner, to the end for replay).")
    hvp: Literal["ggn", "exact", "kfac", "ekfac", "ekfac-rq", "diag", "lowrank", "fisher"] = _f(
        "ggn", "Curvature for lmcleaner (as `lmclean unlearn --hvp`).")


@dataclass
class RecordConfig:
    checkpoint_every: int = _f(50, "Save parameters and optimizer state every this many steps.")
    precision: Literal["fp32", "bf16", "int8"] = _f(
        "fp32", "Stored gradient precision. bf16 (lossy, ~2x smaller); int8: one int8 per parameter and a float32 "
        "scale per 256 (lossy, ~3-4x smaller; θ rebuilt from it is approximate, replay stops being exact).")
    keep_steps: int | None = _f(
        None, "Retention window: keep the gradient rows (and the checkpoints needed) of the last N steps only; older "
        "shard files are deleted as training goes on. Empty: keep every step. Unlearning a sample seen only "
        "before the window is refused unless `unlearn --outside-window carry`.")
    gradients: Literal["stored", "recompute"] = _f(
        "stored", "stored: every step's gradient row is written. recompute: no gradient rows (batches, scalars and "
        "checkpoints only, ~0.1-0.5 bytes/param/step); θ[t] is rebuilt by recomputing each step's gradient from its "
        "stored batch at the rebuilt θ[t] (one forward+backward per replayed step; exact on CPU).")
    codec: Literal["auto", "zstd", "blosc", "none"] = _f(
        "auto", "Gradient compressor. auto: fastest that compresses (fp32: blosc lz4, ~1.1x; bf16: lz4 with "
        "bit-shuffle, ~3.2x vs fp32); blosc: lz4 with bit-shuffle (fp32 ~1.3x, more writer CPU); zstd; none."
    )
    queue_size: int = _f(8, "Steps buffered for the background writer before training waits.")
    unlearn: OnlineUnlearnConfig = field(default_factory=OnlineUnlearnConfig, metadata={
        "help": "Deletion requests that arrive while recording (lmclean/train/online.py)."})


@dataclass
class LmcleanConfig:
    seed: int = _f(0, "Seed for initialisation and batch order.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model to train."})
    tokenizer: str = _f("byte", "`byte` (built-in byte-level) or a local tokenizer directory.")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training data."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation."})
    record: RecordConfig = field(default_factory=RecordConfig, metadata={"help": "What is recorded."})


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key `{key}` = {value!r} is not allowed; use one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key `{key}` has an invalid value {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list):
        (inner,) = get_args(tp)
        return [_check_value(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key `{key}` = {value!r} must be of type {name}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section `{prefix.rstrip('.') or 'root'}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key `{prefix}{key}`; known keys here: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_value(prefix + f.name, data[f.name], tp)
    return cls(**kwargs)


def validate(cfg: LmcleanConfig) -> LmcleanConfig:
    """Cross-field checks that types alone cannot express."""
    t = cfg.train
    if t.batch_size < 1:
        raise ConfigError(f"config key `train.batch_size` = {t.batch_size} must be >= 1")
    if t.steps is None and (t.epochs is None or t.epochs < 1):
        raise ConfigError("config needs `train.steps` or `train.epochs` >= 1")
    if t.steps is not None and t.steps < 1:
        raise ConfigError(f"config key `train.steps` = {t.steps} must be >= 1")
    if t.lr <= 0:
        raise ConfigError(f"config key `train.lr` = {t.lr} must be > 0")
    if cfg.record.checkpoint_every < 1:
        raise ConfigError("config key `record.checkpoint_every` must be >= 1")
    if cfg.record.keep_steps is not None and cfg.record.keep_steps < 1:
        raise ConfigError(f"config key `record.keep_steps` = {cfg.record.keep_steps} must be >= 1 (or empty: keep all)")
    if cfg.record.unlearn.K is not None and cfg.record.unlearn.K < 0:
        raise ConfigError(f"config key `record.unlearn.K` = {cfg.record.unlearn.K} must be >= 0")
    if cfg.data.template is None and cfg.data.text_field is None:
        raise ConfigError("config needs `data.template` or `data.text_field`")
    if len(t.betas) != 2:
        raise ConfigError("config key `train.betas` must be a list of two floats")
    check_device_spec(t.device, "config key `train.device` =")
    if cfg.model.lora is not None:
        _check_lora(cfg.model.lora)
    return cfg


LORA_KEYS = {"r": 8, "alpha": 16, "target_modules": None, "dropout": 0.0}


def _check_lora(lora: dict[str, Any]) -> None:
    """`model.lora`: known keys, r >= 1, alpha > 0, target_modules a non-empty list of names, dropout 0
    (a dropout mask is not recorded, so a step with dropout could not be replayed)."""
    for key in lora:
        if key not in LORA_KEYS:
            raise ConfigError(f"unknown config key `model.lora.{key}`; known keys here: {sorted(LORA_KEYS)}")
    r, alpha = lora.get("r", 8), lora.get("alpha", 16)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError(f"config key `model.lora.r` = {r!r} must be an integer >= 1")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ConfigError(f"config key `model.lora.alpha` = {alpha!r} must be a number > 0")
    targets = lora.get("target_modules")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(m, str) and m for m in targets)):
        raise ConfigError(f"config key `model.lora.target_modules` = {targets!r} must be a non-empty list of module "
                          "names, e.g. [q_proj, v_proj]")
    dropout = lora.get("dropout", 0.0)
    if dropout != 0:
        raise ConfigError(f"config key `model.lora.dropout` = {dropout!r} is not supported: lmclean replays recorded "
                          "steps exactly, and dropout masks are not recorded; use 0.0")


def from_dict(data: dict[str, Any]) -> LmcleanConfig:
    return validate(_build(LmcleanConfig, data, ""))


def to_dict(cfg: LmcleanConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # an absent or empty (null) section: `--set model.lora.r=8` starts one
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: `{part}` is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from exc
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: what the parser found and where (1-based line and column), and what it was inside."""
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark, context, context_mark = (getattr(exc, n, None) for n in ("problem_mark", "context", "context_mark"))
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    text = f"{at(mark)}: {problem}" if mark is not None else problem
    if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        text += f" ({context} at {at(context_mark)})"
    return text


def load(path: Path | None, overrides: list[str] | None = None) -> LmcleanConfig:
    """Load a YAML config (or the defaults when path is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise InputNotFoundError(f"config file {path} does not exist; pass an existing YAML file")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    if not overrides:
        return from_dict(data)
    # Overrides apply to the full tree (file over defaults), so `--set model.config.hidden_size=32`
    # changes one key of the default model config instead of replacing the whole mapping.
    full = to_dict(_build(LmcleanConfig, data, ""))
    return from_dict(apply_overrides(full, overrides))


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts (`key: old -> new`)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def help_table(cls: type = LmcleanConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) rows for every config key, for `--help` and docs."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += help_table(hints[f.name], f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, repr(getattr(default, f.name)), f.metadata.get("help", "")))
    return rows
