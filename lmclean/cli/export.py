"""`lmclean export`: write the model at any recorded step as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lmclean.cli._app import err, handle_errors, on_store


@handle_errors
@on_store("export")
def export(
    store: Annotated[Path, typer.Argument(help="Store directory written by `lmclean record`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model directory.")],
    step: Annotated[Optional[int], typer.Option(min=0, help="Recorded step whose parameters θ[step] to write (default: the last).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing non-empty --out directory (never a store).")] = False,
    merge: Annotated[bool, typer.Option(help="LoRA stores: write the merged full model (base + adapter) instead of the adapter directory.")] = False,
) -> None:
    """Rebuild θ at a recorded step (checkpoint + optimizer replay) and save it as a Hugging Face model."""
    from lmclean.export import export_step

    target = export_step(store, out, step, overwrite, merge)
    err.print(f"[green]wrote[/] θ\\[{target}] to {out}")
