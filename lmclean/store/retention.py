"""Retention window of a store (`record.keep_steps: N`): gradient rows older than the window are dropped.

The published method keeps a ring buffer of the last K steps; a store does the same at object
granularity. After each commit of n steps the window should start at w = n − N. θ inside the window
is rebuilt from a checkpoint, so the store keeps from c0 = the newest committed checkpoint at or
before w: that checkpoint, the later ones, and every gradient row from c0 on. Gradient shard files
whose rows all lie before c0 are deleted whole, as are the chunk files of the checkpoints before
c0. So the retained steps are c0 … n−1 with n − c0 ≥ N (up to N + checkpoint_every − 1 steps of θ
can be rebuilt), and the gradient bytes on disk cover up to one more shard before c0
(`create_layout`, store/layout.py, takes shards of ceil(N / 4) rows for a windowed store). Tokens, sample ids,
weights and the per-step scalars are kept for every step: they are small, and they say when a
sample was seen, which is what a refused or carried unlearning request reports.

COMMIT.json's `retained_from` (absent: 0) is c0; it is written before any file is deleted, so a
crash in between leaves only unreferenced files, which the next commit deletes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmclean.store import format as fmt

__all__ = ["Retention", "keep_steps_of", "read_retained"]


def keep_steps_of(meta: dict[str, Any]) -> int | None:
    """The store's window N: meta["keep_steps"] (Recorder users pass it in `extra`), else the
    recorded config's record.keep_steps; None: every step is kept."""
    keep = meta.get("keep_steps")
    if keep is None:
        keep = ((meta.get("config") or {}).get("record") or {}).get("keep_steps")
    return None if keep is None else int(keep)


def read_retained(path: Path) -> int:
    """`retained_from` of an existing COMMIT.json (0 when absent or unreadable: validated on read)."""
    try:
        value = json.loads((Path(path) / fmt.COMMIT_FILE).read_text()).get("retained_from", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Retention:
    """The writer's window policy: where the retained steps start, and the deletion of what left."""

    def __init__(self, path: Path, meta: dict[str, Any], plan: list[int], shard_rows: int, retained: int = 0) -> None:
        self.path = Path(path)
        self.keep = keep_steps_of(meta)
        self.plan = list(plan)
        self.shard_rows = shard_rows
        self.retained = retained  # first retained step (a committed checkpoint); never moves back
        self._dropped = -1  # the retained start whose files were last deleted (-1: none this session)

    def start(self, committed: int, checkpoints: list[int]) -> int:
        """The retained start after `committed` steps, given the committed checkpoints."""
        if self.keep is not None:
            edge = committed - self.keep
            fits = [c for c in checkpoints if self.retained < c <= edge]
            if fits:
                self.retained = fits[-1]
        return self.retained

    def drop_before(self, retained: int, rows: Iterable[Any], checkpoints: Iterable[Any]) -> None:
        """Delete the gradient shard files wholly before `retained`, and the checkpoint chunk files of
        the checkpoints before it (missing files are fine: a crash may have deleted them already)."""
        if retained <= self._dropped:
            return
        for arr in rows:  # ShardRowArray: shard s holds rows s*S … (s+1)*S − 1
            for shard in range(retained // arr.rows):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(arr.chunk_path(shard))
        dropped = [k for k, step in enumerate(self.plan) if step < retained]
        for arr in checkpoints:  # RowArray: one chunk file per checkpoint
            for k in dropped:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(arr.chunk_path(k))
        self._dropped = retained
