"""Where tensors live and how deterministic the kernels are: `auto | cpu | cuda | cuda:N | mps`.

Importable without torch (config validation and CLI parsing check the spelling only); availability
is checked when a command runs, by `resolve_device`, which refuses a device this machine lacks in
one line that names what it has.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lmclean.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_SPECS = "auto, cpu, cuda, cuda:N or mps"
_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# cuBLAS needs a fixed workspace for deterministic matmuls (set before its first handle is made)
CUBLAS_WORKSPACE = ":4096:8"


def check_device_spec(spec: str, what: str = "device") -> str:
    """`spec` if it is spelled like a device lmclean knows (availability is resolve_device's job)."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ConfigError(f"{what} {spec!r} is not a device; use {DEVICE_SPECS}")
    return spec


def available_devices() -> list[str]:
    """The devices this process can use, e.g. ['cpu', 'cuda:0', 'cuda:1'] or ['cpu', 'mps']."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str = "auto") -> "torch.device":
    """The torch device for `spec`. auto: cuda if available, else mps, else cpu; `cuda` is the
    current CUDA device with its index (so stores and reports name it exactly)."""
    import torch

    check_device_spec(spec)
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError(f"device mps is not available here; available: {', '.join(available_devices())}")
        return torch.device("mps")
    index = int(spec.split(":")[1]) if ":" in spec else None
    if not torch.cuda.is_available() or (index is not None and index >= torch.cuda.device_count()):
        raise ConfigError(f"device {spec} is not available here; available: {', '.join(available_devices())}")
    return torch.device("cuda", torch.cuda.current_device() if index is None else index)


def float_dtype_on(device: "torch.device") -> "torch.dtype":
    """The widest float a device computes in: float64, except on MPS (no float64 there)."""
    import torch

    return torch.float32 if device.type == "mps" else torch.float64


@contextmanager
def deterministic(device: "torch.device") -> Iterator[None]:
    """On CUDA, ask torch for deterministic kernels (warning where none exists) and a fixed cuBLAS
    workspace, then restore the previous setting. Replay and recording need the same kernels to
    give the same numbers; CPU kernels already are deterministic at a fixed thread count."""
    import torch

    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    enabled, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn)


def replay_drift(traj: Any, first: int, last: int) -> tuple[int, float] | None:
    """(t, ‖g' − g[t]‖ / ‖g[t]‖) at the first step t in first..last whose stored gradient is exact:
    g' is the gradient recomputed at the rebuilt θ[t] on the step's recorded batch, clipped as the run
    clipped, on the trajectory's device and precision; g[t] is the stored one. It measures how far
    replay's recomputed gradients drift from the recording's (0 when the same kernels run; bf16
    storage alone gives about 2e-3). None when no step in the range has an exact, non-zero g[t]."""
    import torch

    from lmclean.optim import clip_gradient
    from lmclean.unlearn.common import flat_grad

    for t, theta, _state in traj.states(first, last):
        info = traj.batch(t)
        if not len(info.sample_ids) or not traj.stored_grad_is_exact(t):
            continue
        stored = traj.stored_grad(t)
        norm = float(torch.linalg.vector_norm(stored))
        if norm == 0:
            continue
        g = clip_gradient(flat_grad(traj.objective(t, [int(i) for i in info.sample_ids], micro=True), traj.manifest, theta),
                          traj.max_grad_norm)
        return t, float(torch.linalg.vector_norm(g.to(stored.dtype) - stored)) / norm
    return None
