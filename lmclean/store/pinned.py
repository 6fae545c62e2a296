"""Pinned gradient rows of a `gradients: recompute` store: g[t] kept for steps whose tokens are scrubbed.

A recompute store rebuilds θ by recomputing each step's gradient from its stored batch. Scrubbing
a forgotten sample's tokens would make that impossible for every step that held it (its term of
g[t] is part of the recorded trajectory). So before a scrub, the unlearning writes g[t] of those
steps, recomputed at θ[t] while the tokens still exist, as `pinned/g<t>` (P,) float32 in one
checksummed chunk; from then on the rows are read instead of recomputed. That is what a stored
store keeps for every step, kept here for the few scrubbed ones (`lmclean reconcile` drops them
with the forgotten samples' influence).

A pinned row exists iff its chunk file does: it is written atomically and durably (temp file,
fsync, rename), so a crash leaves either no row or the whole row, and writing it again is harmless
(the same values: the recomputation is deterministic).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["GROUP", "pinned_steps", "read_pinned", "write_pinned"]

GROUP = "pinned"


def _chunk(store_path: Path, t: int) -> Path:
    return Path(store_path) / GROUP / f"g{t}" / "c.0"


def pinned_steps(store_path: Path | str) -> set[int]:
    """The steps with a pinned row."""
    root = Path(store_path) / GROUP
    if not root.is_dir():
        return set()
    return {int(d.name[1:]) for d in root.iterdir() if d.name.startswith("g") and (d / "c.0").is_file()}


def read_pinned(store: Any, t: int) -> torch.Tensor | None:
    """g[t] of a TrajectoryStore as pinned (float32 (P,), checksum verified), or None."""
    import torch

    if not _chunk(store.path, t).is_file():
        return None
    return torch.from_numpy(store.chunk(f"{GROUP}/g{t}", 0, f"pinned gradient of step {t}").copy())


def write_pinned(store_path: Path | str, t: int, grad: np.ndarray) -> None:
    """Write g[t] (P,) as `pinned/g<t>`, durably (a step already pinned is left as it is)."""
    import zarr

    from lmclean.store import format as fmt
    from lmclean.store.atomic import DirSync
    from lmclean.store.chunks import ChunkFiles

    store_path = Path(store_path)
    if _chunk(store_path, t).is_file():  # already pinned (the same values): never drop a row whose tokens may be gone
        return
    P = int(grad.shape[0])
    root = zarr.open_group(str(store_path), mode="a", zarr_format=3)
    arr = root.require_group(GROUP).create_array(
        f"g{t}", shape=(P,), chunks=(P,), dtype="float32", fill_value=np.nan, overwrite=True,
        compressors=fmt.grad_codec("fp32", "auto"), chunk_key_encoding=fmt.FLAT_KEYS)
    files, pending = ChunkFiles(store_path, arr), DirSync()
    try:
        files.write_chunk(0, np.ascontiguousarray(grad, dtype=np.float32), pending)
        pending.add(store_path / GROUP)
        pending.add(store_path / GROUP / f"g{t}")
        pending.sync()
    finally:
        files.close()
