"""What `unlearn` writes: the unlearned model directory (staged, then published atomically), its
optimizer delta, and the audit entry that records it.

Separate from the request pipeline (unlearn/service.py: checks, sweep, report) because the publish
protocol (lmclean/audit/publish.py) is its own concern, and readers of an unlearned model
(`record --continue`, train/continue_run.py) need its file layout without the pipeline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmclean._faults import crash_point
from lmclean.unlearn.quality import quality_summary

if TYPE_CHECKING:
    from lmclean.unlearn.common import SweepResult
    from lmclean.unlearn.request import Requester
    from lmclean.unlearn.service import Prepared


def write_and_audit(p: Prepared, who: Requester, theta_hat: torch.Tensor,
                    result: SweepResult, report: dict[str, Any]) -> dict[str, Any]:
    """Stage the model, write the intent, append the audit record (the commit point), publish."""
    from lmclean.audit import model_digest, new_request_id, unlearn_event
    from lmclean.train.data import store_tokenizer
    from lmclean.adapters import save_output, store_model
    from lmclean.train.model import load_flat_into
    from lmclean.audit.publish import PendingPublish, publish, stage_path

    norms = report.pop("v_norms")
    staged = stage_path(p.out)
    if staged.exists():  # a crash after staging, before the intent: never recorded, ours to remove
        shutil.rmtree(staged)
    model = store_model(p.store)
    load_flat_into(model, p.store.manifest, theta_hat)
    save_output(model, store_tokenizer(p.store), staged, merge=p.merge,
                extra_files={"unlearn_report.json": json.dumps(report, indent=1),
                             OPTIMIZER_DELTA: optimizer_delta_bytes(result.state_delta)})
    request_id = who.request_id or new_request_id()
    out = p.out.absolute()  # the audit names the current model by a path that works from any directory
    digest = model_digest(staged)
    pending = PendingPublish(p.store.path, staged.absolute(), out, digest, request_id, overwrite=p.out.exists())
    pending.write()
    crash_point("unlearn:after-model")
    record = unlearn_event(
        p.store.path, request_id=request_id, reason=who.reason, requested_by=who.requested_by,
        forget_ids=list(p.resolved.sample_ids), forget_fingerprints=list(p.resolved.fingerprints),
        level=p.resolved.level, method=report["method"], K=report["K"], hvp=report["hvp"], damping=report["damping"],
        noise_sigma=report["noise_sigma"], steps_touched=report["steps_touched"],
        curvature_products=report["curvature_products"], v_norms=norms, divergence_check=report["divergence_check"],
        model_before_dir=p.start.path, output_dir=staged, output_path=out, keep_data=who.keep_data,
        wall_time=report["wall_seconds"], digests=(p.start.digest, digest),
        extra={"base_unrelated": p.start.unrelated, "composes_with": report["composes_with"],
               "also_excluded_ids": report["also_excluded_ids"], "lossy_store": report["lossy_store"],
               "carried_outside_window": list(p.carried), "auto": (report["auto"] or {}).get("chosen"),
               "quality": quality_summary(report["quality"])})
    crash_point("unlearn:after-audit")
    publish(pending)
    return record


OPTIMIZER_DELTA = "optimizer_delta.safetensors"  # Δ of each optimizer buffer for θ̂ (none listed: zeros)


def optimizer_delta_bytes(state_delta: dict[str, torch.Tensor]) -> bytes:
    """The output's optimizer-state change as safetensors bytes (float32 (P,) per buffer): what
    `record --continue` adds to the recorded final state to train on from this model."""
    from safetensors.torch import save

    return save({k: v.detach().float().cpu().contiguous() for k, v in sorted(state_delta.items())})


def load_optimizer_delta(model_dir: Path) -> dict[str, torch.Tensor] | None:
    """The optimizer-state change saved beside an unlearned model, None when it has none."""
    from safetensors.torch import load_file

    path = Path(model_dir) / OPTIMIZER_DELTA
    return load_file(str(path)) if path.is_file() else None


def default_out(store: Path) -> Path:
    """`<store>-unlearned-N` next to the store, N the first free number (never overwrites)."""
    stem = store.name.removesuffix(".zarr")
    n = 1
    while (store.parent / f"{stem}-unlearned-{n}").exists():
        n += 1
    return store.parent / f"{stem}-unlearned-{n}"
