"""`lmclean export`: write the model at any recorded step as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmclean.cli._app import err, handle_errors
from lmclean.errors import StoreError, StoreExistsError
from lmclean.store.reader import TrajectoryStore
from lmclean.train.data import load_tokenizer
from lmclean.train.model import load_flat_into, model_from_config_dict, save_model


def export_step(store: TrajectoryStore, step: int, out: Path) -> None:
    theta, _ = store.theta_at(step)
    model = model_from_config_dict(store.meta["model_config"])
    load_flat_into(model, store.manifest, theta)
    spec = store.meta.get("tokenizer", "external")
    tokenizer = load_tokenizer(spec) if spec == "byte" or Path(spec).is_dir() else None  # else: the user's own
    save_model(model, tokenizer, out)


@handle_errors
def export(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.")],
    step: Annotated[Optional[int], typer.Option(help="Recorded step whose parameters θ[step] to write (default: the last).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Rebuild θ at a recorded step (checkpoint + optimizer replay) and save it as a Hugging Face model."""
    s = TrajectoryStore(store)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise StoreExistsError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    target = s.committed_steps if step is None else step
    if not 0 <= target <= s.committed_steps:
        raise StoreError(f"--step {target} is not a recorded step of {store}: use 0..{s.committed_steps}")
    export_step(s, target, out)
    err.print(f"[green]wrote[/] θ[{target}] to {out}")
