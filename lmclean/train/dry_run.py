"""`lmclean record --dry-run`: the projected store and unlearning cost of a config, writing nothing.

The run's shape comes from the same `prepare` the trainer uses (model, data, batch plan), so the
numbers are those of the run the config would record; the arithmetic is lmclean/store/projection.py.
"""

from __future__ import annotations

from pathlib import Path

from lmclean.config import LmcleanConfig
from lmclean.store.projection import StoreProjection, project

__all__ = ["project_run"]


def project_run(cfg: LmcleanConfig, base: Path | None = None) -> StoreProjection:
    """The projection of recording `cfg` (nothing is written; the model is built in memory)."""
    from lmclean.optim import make_rule
    from lmclean.train.trainer import prepare

    run = prepare(cfg, base)
    rec = cfg.record
    return project(params=run.manifest.size, steps=len(run.plan), batch_size=cfg.train.batch_size,
                   max_length=cfg.data.max_length, checkpoint_every=rec.checkpoint_every,
                   state_buffers=len(make_rule(cfg.train).state_names()),
                   gradients=getattr(rec, "gradients", "stored"), precision=rec.precision,
                   keep_steps=getattr(rec, "keep_steps", None))
