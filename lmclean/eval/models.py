"""The models `lmclean eval` compares: `DIR` / `NAME=DIR` arguments to named specs, and loading for scoring.

Separate from the pipeline (`report`): naming and checking the model directories happens in the
CLI before any work, and loading (SDPA attention, LoRA adapters merged, the tokenizer) is one
concern the scoring code should not know the details of.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmclean.errors import ConfigError, InputNotFoundError


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


def model_specs(args: Sequence[str], extra: Sequence[str | None] = ()) -> tuple[list[ModelSpec], list[ModelSpec | None]]:
    """`DIR` or `NAME=DIR` -> named specs, and the same for `extra` (reference, original).

    An unnamed model is called by the shortest tail of its path that no other model shares
    (`orig.zarr/model` and `ref.zarr/model`, not `model` twice). An extra whose directory is one
    of the models' is that model.
    """
    raw: list[tuple[str | None, Path]] = []
    for arg in [*args, *(e for e in extra if e is not None)]:
        name, sep, path = arg.partition("=")
        if sep and name and "/" not in name:
            raw.append((name, Path(path)))
        else:
            raw.append((None, Path(arg)))
    for _name, path in raw:
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise InputNotFoundError(f"model directory {path} does not exist or has no config.json; pass a Hugging Face model directory")
    unique: dict[Path, str | None] = {}
    for name, path in raw:
        key = path.resolve()
        if key not in unique or unique[key] is None:
            unique[key] = name
    names = _auto_names([k for k, v in unique.items() if v is None])
    final = {k: (v if v is not None else names[k]) for k, v in unique.items()}
    taken: dict[str, Path] = {}
    for key, name in final.items():
        if name in taken:
            raise ConfigError(f"two models are both named {name!r} ({taken[name]} and {key}); name them with NAME=DIR")
        taken[name] = key
    specs = [ModelSpec(final[p.resolve()], p) for _n, p in raw]
    models = list({s.name: s for s in specs[: len(args)]}.values())
    rest = iter(specs[len(args) :])
    extras = [None if e is None else next(rest) for e in extra]
    return models, extras


def _auto_names(paths: Sequence[Path]) -> dict[Path, str]:
    out: dict[Path, str] = {}
    depth = 1
    pending = list(paths)
    while pending:
        tails = {p: "/".join(p.parts[-depth:]) for p in pending}
        counts: dict[str, int] = {}
        for t in tails.values():
            counts[t] = counts.get(t, 0) + 1
        pending = [p for p in pending if counts[tails[p]] > 1 and depth < len(p.parts)]
        for p, t in tails.items():
            if p not in pending:
                out[p] = t
        depth += 1
    return out


def load_for_eval(path: Path, device: str = "cpu") -> Any:
    """A float32 model in eval mode for scoring only: SDPA attention where the architecture has it.

    lmclean loads models with eager attention elsewhere because curvature products need double
    backward; scoring needs only forward passes, which SDPA runs 2-3x faster on CPU. The two agree
    to float32 rounding.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    from lmclean.adapters import is_adapter_dir, load_adapter_dir

    adapter = is_adapter_dir(path) and not (path / "config.json").is_file()  # a LoRA store's output: base + adapter, merged
    if not adapter and not (path / "config.json").is_file():
        raise InputNotFoundError(f"model directory {path} does not exist or has no config.json; pass a Hugging Face model directory")
    load = (lambda attn: load_adapter_dir(path, attn)) if adapter else (
        lambda attn: AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32))
    try:
        try:
            model = load("sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA support
            model = load("eager")
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputNotFoundError(f"model directory {path} cannot be loaded: {first}") from exc
    return model.float().to(device).eval()


def load_model_and_tokenizer(spec: ModelSpec, tokenizer_spec: str | None, device: str) -> tuple[Any, Any]:
    """`load_for_eval` of the model and its tokenizer: `tokenizer_spec` if given, else the model directory's own."""
    from lmclean.train.data import load_tokenizer

    model = load_for_eval(spec.path, device)
    if tokenizer_spec:
        return model, load_tokenizer(tokenizer_spec)
    try:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError, TypeError) as exc:
        raise InputNotFoundError(f"model directory {spec.path} holds no tokenizer; pass --tokenizer byte or a tokenizer directory") from exc


__all__ = [
    "ModelSpec",
    "load_for_eval",
    "load_model_and_tokenizer",
    "model_specs",
]
