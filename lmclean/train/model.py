"""Build, load and save Hugging Face causal LMs: always eager attention, so jvp/double-backward work."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lmclean._faults import crash_point
from lmclean.errors import ConfigError, InputNotFoundError, ModelWriteError
from lmclean.params import ParamManifest


def fresh_model(config_keys: dict[str, Any], vocab_size: int, max_length: int, seed: int) -> torch.nn.Module:
    """A freshly initialised model from Transformers config keys (vocab size from the tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(config_keys)
    model_type = keys.pop("model_type", None)
    if not model_type:
        raise ConfigError("config key `model.config.model_type` is required (e.g. llama, gpt2)")
    keys.setdefault("vocab_size", vocab_size)
    if model_type == "gpt2":
        keys.setdefault("n_positions", max(max_length, 64))
    else:
        keys.setdefault("max_position_embeddings", max(max_length, 64))
    try:
        cfg = AutoConfig.for_model(model_type, **keys)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key `model.config` is not a valid {model_type} config: {exc}") from exc
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model.float()


def load_model(path: Path | str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in lmclean's output

    path = Path(path)
    if not (path / "config.json").exists():
        raise InputNotFoundError(f"model directory {path} does not exist or has no config.json; pass a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype)
    return model.to(dtype)


def model_from_config_dict(config_dict: dict[str, Any]) -> torch.nn.Module:
    """An uninitialised-weights skeleton from a saved Transformers config dict (weights come from the store)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(config_dict)
    model_type = keys.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in keys.items() if k not in ("transformers_version", "architectures")})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).float()


def save_model(model: torch.nn.Module, tokenizer: Any, out: Path, extra_files: dict[str, str | bytes] | None = None) -> None:
    """Save an HF model directory atomically: write a sibling temp dir, then rename into place.

    `extra_files` (name -> text or bytes, e.g. an unlearning report) land in the same atomic rename.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    for stale in out.parent.glob(f".{out.name}.*.partial"):  # left by a crashed earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the model directory gets the usual mode
    hf_logging.disable_progress_bar()  # our messages go to stderr; no tqdm bar per shard
    from safetensors import SafetensorError

    from lmclean.store.atomic import fsync_dir

    try:
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, text in (extra_files or {}).items():
                if isinstance(text, bytes):
                    (tmp / name).write_bytes(text)
                else:
                    (tmp / name).write_text(text)
            for path in tmp.iterdir():  # safetensors writes through a 0600 temp file: every file gets the usual mode
                if path.is_file():
                    os.chmod(path, 0o666 & ~umask)
                    fd = os.open(path, os.O_RDONLY)  # durable before the rename makes it visible
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except (SafetensorError, OSError) as exc:  # disk full, quota, permissions: one line, nothing in place
            reason = " ".join(str(exc).split())
            raise ModelWriteError(f"could not write the model to {out}: {reason}; free disk space or choose "
                                  "another output directory (nothing was written)") from exc
        crash_point("save-model:before-rename")
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_flat_into(model: torch.nn.Module, manifest: ParamManifest, flat: torch.Tensor) -> None:
    """Copy a flat parameter vector into the model (names from the manifest)."""
    views = manifest.views(flat)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in views:
                p.copy_(views[name])

