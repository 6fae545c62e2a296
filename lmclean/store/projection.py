"""What a recording will cost before it runs: store size per array family and unlearning cost per request.

`project` is pure arithmetic over the run's shape (parameters, steps, batch, sequence length, the
optimizer's state buffers) and the storage choices (`record.gradients`, `record.precision`,
`record.keep_steps`); `lmclean record --dry-run` and the Trainer callback print it. Sizes are
*uncompressed* (an upper bound: lz4 on fp32 gradients saves 0–10 %, on bf16 rows ~35 %,
benchmarks/README.md). The unlearning cost is in training-step equivalents: a method's measured
cost per swept step times the steps it sweeps; a request for a sample seen in the first epoch
sweeps the whole run, the upper bound reported here.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from lmclean.store.format import QUANT_BLOCK

__all__ = ["RECOMPUTE_PER_STEP", "StoreProjection", "cost_per_step", "fidelity_table", "project"]

# Training steps per swept step, stored gradients: the worst measured over the benchmark cases of the
# fidelity table the tool ships (the table `--method auto` chooses from), for the configuration each
# method runs by default.
DEFAULT_CONFIG = {"replay": "replay", "rollback": "rollback", "lmcleaner": "lmcleaner ggn K=800"}


@functools.cache
def fidelity_table() -> dict[str, Any]:
    """lmclean/unlearn/fidelity_table.json: measured residual and cost per swept step of each method
    configuration on each benchmark case, with provenance (read without importing the engine)."""
    return json.loads(resources.files("lmclean").joinpath("unlearn/fidelity_table.json").read_text(encoding="utf-8"))


def cost_per_step() -> dict[str, float]:
    """method -> its largest measured cost per swept step (training steps) in the fidelity table."""
    configs = {c["name"]: c for c in fidelity_table()["configs"]}
    return {m: max(v["per_step"] for v in configs[name]["measured"].values()) for m, name in DEFAULT_CONFIG.items()}


# Extra training steps per swept step when θ[t] is rebuilt by recomputing g[t] (`gradients: recompute`):
# benchmarks/README.md, "Storage modes" (`benchmarks/storage_modes.py`, the extra/step column: one more
# forward and backward pass per step; a loaded machine, so ±0.3).
RECOMPUTE_PER_STEP: dict[str, float] = {"replay": 0.92, "rollback": 0.62, "lmcleaner": 0.47}
GRAD_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / QUANT_BLOCK}


@dataclass(frozen=True)
class Family:
    """One array family's projected size: total bytes and bytes per parameter per recorded step."""

    bytes: int
    bytes_per_param_step: float


@dataclass(frozen=True)
class MethodCost:
    """One method's projected cost of a request, in training steps (upper bound: the whole run swept)."""

    per_step: float  # training steps per swept step (stored cost + recomputation)
    steps_swept: int
    training_steps: float
    source: str


@dataclass(frozen=True)
class StoreProjection:
    gradients: str
    precision: str
    params: int
    steps: int
    checkpoints: int
    families: dict[str, Family] = field(default_factory=dict)
    unlearn: dict[str, MethodCost] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.families.values())

    @property
    def bytes_per_param_step(self) -> float:
        return self.total_bytes / max(1, self.params * self.steps)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"], out["bytes_per_param_step"] = self.total_bytes, round(self.bytes_per_param_step, 4)
        return out

    def line(self) -> str:
        """The projection in one line (the Trainer callback logs it)."""
        fam = ", ".join(f"{name} {f.bytes_per_param_step:.3g}" for name, f in self.families.items())
        cost = ", ".join(f"{m} {c.training_steps:.0f}" for m, c in self.unlearn.items())
        return (f"projected store: {_size(self.total_bytes)} ({self.bytes_per_param_step:.3g} B/param/step: {fam}) "
                f"for {self.steps} steps x {self.params:,} params, gradients {self.gradients}"
                f"{'' if self.gradients == 'recompute' else ' ' + self.precision}; unlearning one request costs up to "
                f"{cost} training steps")


def project(*, params: int, steps: int, batch_size: int, max_length: int, checkpoint_every: int,
            state_buffers: int, gradients: str = "stored", precision: str = "fp32", keep_steps: int | None = None,
            micro_batches: bool = False) -> StoreProjection:
    """The store a run of this shape writes and what unlearning one request from it costs.

    `state_buffers`: the optimizer's per-parameter buffers checkpointed beside θ (SGD 0, SGD with
    momentum 1, AdamW 2); `keep_steps`: the retention window (gradient rows of the last N steps,
    checkpoints inside it and the one before); `micro_batches`: rows carry (micro, width) (Trainer)."""
    P, T = int(params), int(steps)
    plan = sorted(set(range(0, T, max(1, checkpoint_every))) | {T})
    kept_steps = T if not keep_steps else min(T, int(keep_steps))
    checkpoints = len(plan) if not keep_steps else 1 + sum(1 for c in plan if c >= T - kept_steps)
    grad = 0 if gradients == "recompute" else int(round(kept_steps * P * GRAD_BYTES[precision]))
    ck = checkpoints * P * 4 * (1 + int(state_buffers))
    per_row = batch_size * (8 + 8 + 4 + (8 if micro_batches else 0)) + 4 * 8  # ids, weights, lengths, scalars
    tokens = T * (batch_size * max_length * 4 + per_row)  # the batches are kept for every step (recompute needs them)
    denom = max(1, P * T)
    families = {name: Family(b, b / denom) for name, b in
                (("gradients", grad), ("checkpoints", ck), ("tokens_ids", tokens))}
    swept = T if not keep_steps else kept_steps
    unlearn = {}
    for method, per_step in cost_per_step().items():
        extra = RECOMPUTE_PER_STEP[method] if gradients == "recompute" else 0.0
        unlearn[method] = MethodCost(per_step + extra, swept, (per_step + extra) * swept,
                                     "fidelity table (worst case)" + (" + storage_modes.py" if extra else ""))
    return StoreProjection(gradients, precision, P, T, checkpoints, families, unlearn)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
