"""Stores whose trainable parameters are part of the model: LoRA / PEFT adapters and frozen bases.

A store records only the trainable tensors (its manifest). The frozen rest, the *base*, stays a
plain Hugging Face model directory named in ``meta["model"]`` and pinned by a sha256 over its frozen
tensors: replaying or correcting an adapter on top of different base weights would silently give a
different model, so a base that does not verify is refused.

``meta["model"]`` is ``{"kind": "full"}`` (or absent: older stores) for a model whose parameters are
all trainable, else ``{"kind": "peft" | "frozen-base", "peft_config": {...} (peft only),
"adapter_name": ..., "frozen": [...] (frozen-base only), "base": {"path", "sha256", "model_config"}}``.
A relative base path is relative to the store (a base with no directory of its own is saved at
``STORE/base``).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

from lmclean.errors import ConfigError, InputNotFoundError, ModelMismatchError, UnsupportedError

__all__ = ["ADAPTER_SUBDIR", "BASE_DIRNAME", "build_model", "describe_for_store", "describe_model", "ensure_base", "frozen_digest",
           "is_adapter_dir", "is_peft", "load_adapter_dir", "load_for_store", "save_base", "save_output",
           "store_model", "wrap_lora"]

BASE_DIRNAME = "base"  # STORE/base: the frozen base of a store whose base has no directory of its own
ADAPTER_SUBDIR = "adapter"  # a merged output keeps its adapter here, so later requests can compose on it


def is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Transformers/peft warn on stderr about deprecations and missing hub configs: lmclean's
    errors are one line, so those warnings are silenced around the peft calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _json_safe(value: Any) -> Any:
    """Sets become sorted lists, enums their values, anything else non-JSON its str."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def frozen_digest(model: torch.nn.Module) -> str:
    """sha256 hex over the frozen (requires_grad False) parameters in name order: a JSON header
    line (name, shape, dtype) then the raw bytes of each."""
    h = hashlib.sha256(b"lmclean-frozen-v1\n")
    frozen = sorted((n, p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, p in frozen:
        t = p.detach().cpu().contiguous()
        header = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        h.update(json.dumps(header, sort_keys=True).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapter_name(model: torch.nn.Module) -> str:
    names = list(model.peft_config)
    if len(names) != 1:
        raise UnsupportedError(f"the PEFT model holds {len(names)} adapters ({names}); record a model with one adapter")
    return names[0]


def _base_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if is_peft(model) else model


def _local_dir(name: Any) -> str | None:
    """The absolute model directory `name` when it is one (config.json inside), else None."""
    if not name:
        return None
    path = Path(str(name))
    return str(path.resolve()) if (path / "config.json").is_file() else None


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """What `build_model` needs to rebuild `model` around a store's trainable parameters (JSON-safe).

    The base path is the directory the frozen weights were loaded from (absolute), or None when they
    have none: the caller then saves them with `save_base` (see `ensure_base`)."""
    peft = is_peft(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    if not peft and not frozen:
        return {"kind": "full"}
    base = _base_of(model)
    desc: dict[str, Any] = {"kind": "peft" if peft else "frozen-base"}
    if peft:
        name = _adapter_name(model)
        cfg = _json_safe(model.peft_config[name].to_dict())
        cfg["base_model_name_or_path"] = None  # where the base is lives in desc["base"]["path"]
        desc.update(peft_config=cfg, adapter_name=name)
    else:
        desc["frozen"] = frozen
    desc["base"] = {"path": _local_dir(getattr(base.config, "_name_or_path", None)),
                    "sha256": frozen_digest(model),
                    "model_config": _json_safe(base.config.to_dict())}
    return desc


def wrap_lora(model: torch.nn.Module, settings: dict[str, Any], seed: int | None = None,
              adapter_name: str = "default") -> torch.nn.Module:
    """`model` with LoRA adapters from a peft config dict (either lmclean's `model.lora` keys
    r/alpha/target_modules/dropout or a full LoraConfig dict); `seed` makes the init reproducible."""
    from peft import LoraConfig, PeftConfig, get_peft_model

    if "peft_type" in settings:
        cfg = PeftConfig.from_peft_type(**settings)
    else:
        cfg = LoraConfig(r=int(settings.get("r", 8)), lora_alpha=settings.get("alpha", 16),
                         lora_dropout=float(settings.get("dropout", 0.0)),
                         target_modules=settings.get("target_modules"))
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with _quiet():
            wrapped = get_peft_model(model, cfg, adapter_name=adapter_name)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError(f"config key `model.lora` does not fit the model: {' '.join(str(exc).split())}") from exc
    return wrapped.float()


def save_base(model: torch.nn.Module, directory: Path) -> None:
    """Save the frozen base of `model` as a plain HF model directory, atomically.

    For a PEFT model this is the model with the adapters removed (on a copy: `model` is unchanged);
    for a frozen-base model the whole model (its trainable values are the store's to supply)."""
    from lmclean.train.model import save_model

    if is_peft(model):
        with _quiet():
            base = copy.deepcopy(model).unload()
    else:
        base = model
    save_model(base, None, Path(directory))


def describe_for_store(model: torch.nn.Module) -> dict[str, Any]:
    """`describe_model` as a new store records it: a base with no directory gets path "base"
    (`ensure_base` saves it at STORE/base)."""
    desc = describe_model(model)
    if desc["kind"] != "full" and desc["base"]["path"] is None:
        desc["base"]["path"] = BASE_DIRNAME
    return desc


def ensure_base(model: torch.nn.Module, store: Path, desc: dict[str, Any], recorded: dict[str, Any]) -> None:
    """Make `store` able to rebuild `model` (described by `desc`, from `describe_for_store`): save
    the base at STORE/base when that is its path and it is not there yet (a crash may have left a
    store without it), and point the adapter's `base_model_name_or_path` at the base.

    `recorded` is the store's meta["model"]: a resumed run must train on the same frozen weights."""
    if recorded.get("kind", "full") != desc["kind"] or recorded.get("base", {}).get("sha256") != desc.get("base", {}).get("sha256"):
        raise ModelMismatchError(f"the model being trained ({desc['kind']}, base {str(desc.get('base', {}).get('sha256'))[:12]}) "
                                 f"is not the one store {store} was recorded with ({recorded.get('kind', 'full')}, base "
                                 f"{str(recorded.get('base', {}).get('sha256'))[:12]}); restore the base the store was "
                                 "recorded with, or use --overwrite")
    if desc["kind"] == "full":
        return
    path = _resolve(desc["base"]["path"], Path(store))
    if desc["base"]["path"] == BASE_DIRNAME and not (path / "config.json").is_file():
        save_base(model, path)
    if is_peft(model):
        model.peft_config[desc["adapter_name"]].base_model_name_or_path = str(path.resolve())


def _resolve(path: str, store_path: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or store_path is None else Path(store_path) / p


def _mismatch(where: Path | None, meta: dict[str, Any], digest: str, what: str) -> NoReturn:
    expected = meta["base"]["sha256"]
    raise ModelMismatchError(
        f"base model {where} does not match the store's: {what} hashes to {digest[:12]}, the store was recorded "
        f"with {expected[:12]}; restore the base the store was recorded with")


def build_model(meta: dict[str, Any], store_path: Path | None = None) -> torch.nn.Module:
    """The model whose trainable parameters are the store's manifest, float32 with eager attention.

    full: a skeleton from ``meta["model_config"]`` (every weight comes from the store); adapter
    kinds: the base loaded from its directory, verified by sha256, then wrapped / frozen."""
    from lmclean.train.model import load_model, model_from_config_dict

    kind = meta.get("kind", "full")
    if kind == "full":
        return model_from_config_dict(meta["model_config"])
    if kind not in ("peft", "frozen-base"):
        raise UnsupportedError(f"store model kind {kind!r} is not known to lmclean {_version()}; upgrade lmclean")
    path = _resolve(meta["base"]["path"], store_path)
    if not (path / "config.json").is_file():
        raise InputNotFoundError(f"base model {path} of store {store_path} is missing (no config.json); "
                                 "restore the base the store was recorded with")
    with _quiet():
        model = load_model(path)
    if kind == "peft":
        name = meta.get("adapter_name", "default")
        model = wrap_lora(model, meta["peft_config"], adapter_name=name)
        model.peft_config[name].base_model_name_or_path = str(path.resolve())
    else:
        frozen = set(meta["frozen"])
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
    digest = frozen_digest(model)
    if digest != meta["base"]["sha256"]:
        _mismatch(path, meta, digest, "its frozen weights")
    return model


def store_model(store: Any) -> torch.nn.Module:
    """`build_model` for an open TrajectoryStore (a store without meta["model"] holds a full model)."""
    return build_model(store.meta.get("model", {"kind": "full"}) | {"model_config": store.meta["model_config"]},
                       store.path)


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_for_store(store: Any, path: Path) -> torch.nn.Module:
    """A model directory (e.g. an earlier unlearning's output) as the store's model: a PEFT adapter
    directory (or a merged output's `adapter/`) is loaded onto the store's verified base."""
    from lmclean.train.model import load_model

    path = Path(path)
    meta = store.meta.get("model", {"kind": "full"})
    if meta.get("kind", "full") != "peft":
        model = load_model(path)
        frozen = set(meta.get("frozen", ()))  # frozen-base: a full directory, of which the store holds a part
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
        return model
    adapter = path if is_adapter_dir(path) else path / ADAPTER_SUBDIR
    if not is_adapter_dir(adapter):
        raise ModelMismatchError(f"model {path} holds no PEFT adapter (no adapter_config.json), but store {store.path} "
                                 "records a LoRA adapter; pass an adapter directory written by lmclean for this store")
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = store_model(store)
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputNotFoundError(f"adapter directory {adapter} has no adapter_model.safetensors; pass a complete adapter directory")
    state = load_file(weights)
    with _quiet():
        result = set_peft_model_state_dict(model, state, adapter_name=meta.get("adapter_name", "default"))
    loaded = len(state) - len(getattr(result, "unexpected_keys", []) or [])
    if loaded != len(store.manifest.entries):
        raise ModelMismatchError(f"adapter {adapter} has {loaded} tensors of the store's {len(store.manifest.entries)}; "
                                 "it is not an adapter of this store")
    return model


def load_adapter_dir(path: Path, attn_implementation: str = "eager", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A PEFT adapter directory as a plain (merged) model, its base read from adapter_config.json."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = Path(path)
    base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path or not (Path(base_path) / "config.json").is_file():
        raise InputNotFoundError(f"adapter {path} names base model {base_path!r}, which is not a model directory; "
                                 "restore the base or fix base_model_name_or_path in its adapter_config.json")
    with _quiet():
        base = AutoModelForCausalLM.from_pretrained(base_path, attn_implementation=attn_implementation, dtype=dtype)
        model = PeftModel.from_pretrained(base.to(dtype), path).merge_and_unload()
    return model.to(dtype)


class _MergedWithAdapter:
    """What `save_model` saves for merge=True: the merged model at the top, the adapter in
    ``adapter/`` (model_digest covers the top level only, i.e. the merged weights)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def save_pretrained(self, directory: Path | str, safe_serialization: bool = True) -> None:
        directory = Path(directory)
        with _quiet():
            self.model.save_pretrained(directory / ADAPTER_SUBDIR, safe_serialization=safe_serialization)
            for f in (directory / ADAPTER_SUBDIR).iterdir():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            merged = self.model.merge_and_unload()
            merged.save_pretrained(directory, safe_serialization=safe_serialization)


def save_output(model: torch.nn.Module, tokenizer: Any, out: Path, *, merge: bool = False,
                extra_files: dict[str, str] | None = None) -> None:
    """Save a store's model atomically: a full model as an HF directory; a PEFT model as an adapter
    directory (``PeftModel.from_pretrained(base, out)``), or with `merge` as the merged full model
    (the model is merged in place: do not use it afterwards)."""
    from lmclean.train.model import save_model

    if not is_peft(model):
        save_model(model, tokenizer, out, extra_files=extra_files)
        return
    name = _adapter_name(model)
    if not model.peft_config[name].base_model_name_or_path:
        raise ConfigError("the adapter's base model has no directory; build the model with lmclean.adapters.build_model")
    if merge:
        save_model(_MergedWithAdapter(model), tokenizer, out, extra_files=extra_files)  # type: ignore[arg-type]
        return
    with _quiet():
        save_model(model, tokenizer, out, extra_files=extra_files)


def _version() -> str:
    import lmclean

    return lmclean.__version__
