"""The int8 gradient codec (`record.precision: int8`): int8 values with one float32 scale per block.

Plain zarr arrays, no custom codec, so any Zarr v3 reader can decode a row: steps/grad holds
q (int8, (T, P)) and steps/grad_scale the scales (float32, (T, ceil(P / QUANT_BLOCK))); the row
is `q * scale` with each scale repeated over its QUANT_BLOCK consecutive parameters. Per block,
scale = absmax / 127 and q = round-half-even(g / scale), so the largest entry of a block is exact
to a float32 rounding and every entry is within scale / 2 of g. A block of zeros has scale 0, q 0.
A non-finite gradient gives its block a NaN scale (the row decodes to NaN, as training diverged).

Why int8 with a per-block scale: 1 + 4 / QUANT_BLOCK bytes per parameter before compression,
a quarter of fp32, and a block adapts the step to the local magnitude (embedding rows and layer
norms differ by orders of magnitude). Quantizing runs in numpy on the writer thread (element-wise
only, no BLAS); decoding runs in torch. Both round the product q * scale once, so they agree bitwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from lmclean.store.format import QUANT_BLOCK, quant_blocks

if TYPE_CHECKING:
    import torch

__all__ = ["dequantize", "dequantize_np", "quantize"]


def quantize(g: np.ndarray, q_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (P,), scale float32 (nb,)) of a float32 gradient row (P,); `q_out`: a buffer to fill."""
    g = np.asarray(g, dtype=np.float32).reshape(-1)
    P, nb = g.size, quant_blocks(g.size)
    padded = np.zeros(nb * QUANT_BLOCK, dtype=np.float32)
    padded[:P] = g
    blocks = padded.reshape(nb, QUANT_BLOCK)
    with np.errstate(invalid="ignore", divide="ignore"):
        absmax = np.abs(blocks).max(axis=1)
        scale = (absmax / np.float32(127)).astype(np.float32)
        scale[~np.isfinite(absmax)] = np.nan
        values = np.rint(blocks / scale[:, None])  # 0/0 (a zero block) and x/NaN give NaN: q 0 below
    values[~np.isfinite(values)] = 0
    q = q_out if q_out is not None else np.empty(P, dtype=np.int8)
    np.clip(values.reshape(-1)[:P], -127, 127, out=values.reshape(-1)[:P])
    q[:] = values.reshape(-1)[:P]
    return q, scale


def dequantize_np(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 (P,) of a stored row (q int8 (P,), scale (nb,))."""
    P = q.size
    return (q.astype(np.float32) * np.repeat(scale.astype(np.float32), QUANT_BLOCK)[:P]).astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray) -> "torch.Tensor":
    """float32 (P,) tensor of a stored row; bitwise dequantize_np."""
    import torch

    P = q.size
    qt = torch.from_numpy(np.asarray(q).astype(np.float32))
    s = torch.from_numpy(np.array(scale, dtype=np.float32)).repeat_interleave(QUANT_BLOCK)[:P]
    return qt * s
