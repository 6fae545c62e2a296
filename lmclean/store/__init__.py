"""The on-disk trajectory store (Zarr v3): format, background writer, reader, check, lock, scrub.

Knows nothing of autograd. Names are loaded on first use, so a command that only reads metadata
(`inspect-log`, `audit show`) never imports torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"CheckReport": "check", "check_store": "check", "FORMAT_VERSION": "format", "StepRecord": "reader",
          "TrajectoryStore": "reader", "StoreWriter": "writer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lmclean.store' has no attribute {name!r}")
    return getattr(import_module(f"lmclean.store.{_WHERE[name]}"), name)
