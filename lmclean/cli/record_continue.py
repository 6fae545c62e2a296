"""`lmclean record --store S --continue --epochs N | --steps N [--data MORE.jsonl]`: train a complete store on."""

from __future__ import annotations

import time
from pathlib import Path

from lmclean.cli._app import err, print_json, progress_bar
from lmclean.errors import ConfigError


def run_continue(store: Path, *, continue_: bool, epochs: int | None, steps: int | None, data: Path | None,
                 json_out: bool, conflicts: list[str]) -> None:
    """Check the flags, train on (lmclean/train/continue_run.py) and print the summary."""
    if not continue_:
        raise ConfigError("--epochs, --steps and --data belong to --continue; add --continue to train the store on")
    if conflicts:
        raise ConfigError(f"--continue takes its config from the store; drop {conflicts[0]}")
    from lmclean.train.continue_run import continue_training

    started = time.perf_counter()
    with progress_bar("train", total=None, fields="loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e}",
                      enabled=not json_out, lazy=True) as advance:

        def on_start(start: int, total: int) -> None:
            err.print(f"continuing [bold]{store}[/] from step {start} to {total}")
            advance(total=total, completed=start)

        def on_step(t: int, total: int, loss: float, lr: float) -> None:
            advance(total=total, completed=t + 1, loss=loss, lr=lr)

        result, jump = continue_training(store, epochs=epochs, steps=steps, data=data, on_step=on_step,
                                         on_start=on_start)
    summary = {"store": str(store), "steps": result.steps, "continued_from": result.start_step,
               "final_loss": result.final_loss, "train_seconds": round(result.seconds, 2),
               "wall_seconds": round(time.perf_counter() - started, 2),
               "model_dir": str(result.model_dir) if result.model_dir else None,
               "started_from_model": jump["model_before"], "correction": jump["correction"],
               "dropped_ids": jump["dropped_ids"], "data": jump["data"]}
    if json_out:
        print_json(summary)
        return
    how = (f"after the correction of {jump['correction']['method']} request {jump['correction']['request_id']}"
           if jump["correction"] else "from the recorded final model")
    if jump["data"]:
        how += f", with {jump['data']['samples']} new samples from {jump['data']['path']}"
    err.print(f"[green]continued[/] {store} from step {result.start_step} to {result.steps} {how}, final loss "
              f"{result.final_loss:.4f}; model saved to {summary['model_dir']}")
