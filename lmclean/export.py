"""Write the model at any recorded step of a store as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

from lmclean.errors import StoreError

__all__ = ["export_step"]


def export_step(store_path: Path | str, out: Path, step: int | None = None, overwrite: bool = False,
                merge: bool = False) -> int:
    """Rebuild θ[step] (checkpoint + optimizer replay; default: the last step) and save it to `out`.

    `out` must be new or empty (or `overwrite` for a plain directory), never inside a store. Returns
    the step written. An adapter store writes an adapter directory, or with `merge` the merged model."""
    from lmclean.paths import check_output
    from lmclean.store.reader import TrajectoryStore
    from lmclean.train.data import store_tokenizer
    from lmclean.adapters import save_output, store_model
    from lmclean.train.model import load_flat_into

    store = TrajectoryStore(store_path)
    check_output(out, overwrite=overwrite)
    target = store.committed_steps if step is None else step
    if not 0 <= target <= store.committed_steps:
        raise StoreError(f"--step {target} is not a recorded step of {store.path}: use 0..{store.committed_steps}")
    from lmclean.unlearn.trajectory import recompute_grad

    theta, _ = store.theta_at(target, grad=recompute_grad(store))  # a recompute store: gradients recomputed
    model = store_model(store)
    load_flat_into(model, store.manifest, theta)
    tokenizer = store_tokenizer(store)
    save_output(model, tokenizer, out, merge=merge)
    return target
