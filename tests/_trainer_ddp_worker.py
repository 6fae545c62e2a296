"""Run by tests/test_trainer_ddp.py under `torchrun --nproc-per-node 2`: a stock Trainer on CPU (gloo DDP)
with LMCleanCallback, recorded, then again with `exclude=`, with `gradients="recompute"`, without
average_tokens_across_devices, with a model taking no num_items_in_batch, then a refused `unlearn=`. Rank 0 writes
each run's final parameters and a summary; every rank writes the sample ids its collator saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

EXCLUDE = 105  # the id run "ex" trains without (tests/test_trainer_ddp.py replays it out of run "full")
N_SAMPLES = 12  # per-device batch 2 over 2 ranks, accumulation 2: steps of 2 and 1 micro-batches per rank


def main(work: Path) -> None:
    import torch.distributed as td
    from transformers import Trainer

    from lmclean.errors import LmcleanError
    from lmclean.integrations.transformers import LMCleanCallback
    from test_trainer_callback import collate, make_args, make_data, make_model

    summary: dict[str, Any] = {}

    def run(name: str, overrides: dict[str, Any] | None = None, mean_loss: bool = False, **cb_kwargs: Any) -> Trainer:
        fed: list[int] = []

        def logged(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            fed.extend(int(r["id"]) for r in rows)
            return collate(rows)

        cb = LMCleanCallback(work / f"{name}.zarr", id_column="id", checkpoint_every=100, **cb_kwargs)
        args = make_args(work / name, ddp_backend="gloo", logging_strategy="steps", logging_steps=1, **(overrides or {}))
        model = make_model()
        if mean_loss:  # the Trainer passes no num_items_in_batch: the model's mean, divided by G
            model.accepts_loss_kwargs = False
        trainer = Trainer(model=model, args=args, train_dataset=make_data(N_SAMPLES), data_collator=logged,
                          callbacks=[cb])
        try:
            trainer.train()
        finally:
            (work / f"fed-{name}-{td.get_rank()}.json").write_text(json.dumps(fed))
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        every = [torch.zeros_like(flat) for _ in range(td.get_world_size())]
        td.all_gather(every, flat)
        summary[f"{name}_ranks_equal"] = all(torch.equal(every[0], x) for x in every)
        summary[f"{name}_grad_norms"] = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        summary[f"{name}_losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        if td.get_rank() == 0:
            torch.save(params, work / f"{name}-final.pt")
        return trainer

    run("full")
    run("ex", exclude=[EXCLUDE])
    run("rc", gradients="recompute")
    run("local", {"average_tokens_across_devices": False})  # each rank's loss is its own token mean
    run("mean", mean_loss=True)
    try:
        run("online", unlearn={"method": "replay"})
    except LmcleanError as exc:
        summary["online_refused"] = f"{type(exc).__name__}: {exc}"
    summary["online_store_exists"] = (work / "online.zarr").exists()
    if td.get_rank() == 0:
        (work / "summary.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
