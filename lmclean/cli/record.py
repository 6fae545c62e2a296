"""`lmclean record`: train a causal LM from a YAML config and record its trajectory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lmclean import config as config_mod
from lmclean.cli._app import err, handle_errors, on_store, print_json, progress_bar
from lmclean.cli._options import DEVICE_HELP, device_spec
from lmclean.errors import ConfigError

DEFAULT_CONFIG = Path("examples/tiny.yaml")


@handle_errors
@on_store("record", "write", sync=True)
def record(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (default: examples/tiny.yaml if present, else built-in defaults).")] = None,
    store: Annotated[Path, typer.Option("--store", "-s", help="Store directory to create (Zarr v3).")] = Path("runs/tiny.zarr"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set train.lr=0.1 (repeatable).")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Train without these sample ids (3,5,60-79 or @file): the exact-retraining reference.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted store from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at --store.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    show_config: Annotated[bool, typer.Option(help="Print every config key with its default and help, then exit.")] = False,
    continue_: Annotated[bool, typer.Option("--continue", help="Train a complete store on from its current model (the latest unlearned one): needs --epochs or --steps.")] = False,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="With --continue: this many more epochs.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="With --continue: this many more steps.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="With --continue: more samples (JSON Lines, read with the store's data config; new ids): later epochs shuffle old and new samples together.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option("--device", callback=device_spec, help=f"Where to train (sets `train.device`; default: the config's, auto): {DEVICE_HELP}", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the projected store size (per array family) and unlearning cost per request for this config, then exit; writes nothing.")] = False,
) -> None:
    """Train (or fine-tune) a Hugging Face causal LM and record its trajectory.

    The store holds per-step gradients, learning rates, batch ids, weights and tokens, plus
    periodic checkpoints, so that any sample can later be unlearned and the run replayed exactly.
    """
    if show_config:
        for key, default, help_text in config_mod.help_table():
            typer.echo(f"{key:28s} {default:24s} {help_text}")
        return
    from lmclean.dist import init_from_env
    from lmclean.train.data import parse_id_spec  # torch: imported when a command runs, not for --help
    from lmclean.train.trainer import train

    main = init_from_env().main  # under torchrun: join the group; only rank 0 reports (docs/distributed.md)

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: continue the store or replace it")
    if continue_ or epochs is not None or steps is not None or data is not None:
        from lmclean.cli.record_continue import run_continue

        if init_from_env().active:
            raise ConfigError("record --continue runs as a single process: run it without torchrun")

        run_continue(store, continue_=continue_, epochs=epochs, steps=steps, data=data, json_out=json_out,
                     conflicts=[n for n, v in (("CONFIG", config), ("--resume", resume), ("--overwrite", overwrite),
                                               ("--exclude", exclude), ("--set", set_), ("--device", device)) if v])
        return
    if device is not None:  # a config key like any other; --resume may continue on another device
        set_ = [*(set_ or []), f"train.device={device}"]
    if resume and config is None:  # the store knows its config (and exclusions): --resume needs only --store
        from lmclean.train.trainer import stored_config

        cfg, base, excluded = stored_config(store, set_ or [])
        excluded = parse_id_spec(exclude) if exclude else excluded
    else:
        if config is None and DEFAULT_CONFIG.exists():
            config = DEFAULT_CONFIG
        cfg = config_mod.load(config, set_ or [])
        excluded = parse_id_spec(exclude) if exclude else []
        base = config.parent if config else None
    if dry_run:
        from lmclean.train.dry_run import project_run

        _render_projection(project_run(cfg, base), json_out)
        return
    started = time.perf_counter()
    with progress_bar("train", total=None, fields="loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} {task.fields[rate]:.1f} steps/s",
                      enabled=not json_out and main, lazy=True) as advance:
        rate = _Rate()

        def on_start(start: int, total: int) -> None:  # set-up passed: bad input has been refused by now
            if not main:
                return
            where = f"resuming at step {start} of {total}" if resume else f"new, {total} steps"
            err.print(f"recording to [bold]{store}[/] ({where}; config {config or ('of the store' if resume else 'defaults')}"
                      f"{f'; excluding {len(excluded)} samples' if excluded else ''})")
            advance(total=total, completed=start)

        def on_step(t: int, total: int, loss: float, lr: float) -> None:
            advance(total=total, completed=t + 1, loss=loss, lr=lr, rate=rate.tick())

        result = train(cfg, store, exclude=excluded, resume=resume, overwrite=overwrite, base=base,
                       on_start=on_start, on_step=on_step)
    if not main:
        return
    stats = result.stats
    summary = {
        "store": str(result.store), "steps": result.steps, "resumed_from": result.start_step if resume else None,
        "final_loss": result.final_loss, "train_seconds": round(result.seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2), "excluded": len(excluded),
        "bytes_on_disk": stats.bytes_on_disk if stats else None,
        "grad_compression": (round(stats.bytes_raw_grads / stats.grad_bytes_on_disk, 3)
                             if stats and stats.grad_bytes_on_disk else None),  # None: `gradients: recompute`
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "samples": len(result.run.dataset.samples), "truncated_samples": result.run.dataset.truncated,
        "max_length": cfg.data.max_length, "device": result.device,
    }
    if json_out:
        print_json(summary)
        return
    err.print(f"[green]recorded[/] {summary['steps']} steps in {summary['train_seconds']} s, final loss "
              f"{summary['final_loss']:.4f}; store {summary['bytes_on_disk'] / 1e6:.1f} MB, "
              + (f"gradients compressed {summary['grad_compression']}x" if summary["grad_compression"] else
                 "no gradient rows (gradients: recompute)") + f"; model saved to {summary['model_dir']}")
    if summary["truncated_samples"]:
        err.print(f"[yellow]note[/]: {summary['truncated_samples']} of {summary['samples']} samples were truncated to "
                  f"max_length {summary['max_length']} (raise `data.max_length` to keep them whole)")


def _render_projection(p: "StoreProjection", json_out: bool) -> None:  # noqa: F821
    if json_out:
        print_json(p.to_dict())
        return
    from lmclean.cli._app import out

    out.print(f"projected store: {p.total_bytes / 1e6:.1f} MB uncompressed, {p.bytes_per_param_step:.3g} bytes/param/step "
              f"({p.steps} steps x {p.params:,} parameters; gradients: {p.gradients}"
              f"{'' if p.gradients == 'recompute' else ', ' + p.precision}; {p.checkpoints} checkpoints)")
    for name, f in p.families.items():
        out.print(f"  {name:12s} {f.bytes / 1e6:10.1f} MB  {f.bytes_per_param_step:.3g} bytes/param/step")
    out.print("unlearning one request, upper bound (a sample seen in the first epoch: every step swept), in training steps:")
    for name, c in p.unlearn.items():
        out.print(f"  {name:12s} {c.training_steps:10.0f}  ({c.per_step:.2f} per step x {c.steps_swept} steps; {c.source})")


class _Rate:
    """Steps per second over the steps since the first callback (the first step includes warm-up)."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.n = 0

    def tick(self) -> float:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
            return float("nan")
        self.n += 1
        return self.n / max(1e-9, now - self.t0)
