"""KroneckerCurvature.rescaled_along: each part's quadratic form along v matches the exact GGN's.

Dense float64 references (tests/curvature_cases.py); tolerances as tests/test_kfac.py (rtol 1e-10,
float64 rounding of different programs).
"""

from __future__ import annotations

import torch

from curvature_cases import build_llama, built, random_like
from lmclean.curvature import flatten, ggn_vp, kronecker_curvature, unflatten


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


def test_each_part_matches_the_exact_form_along_v() -> None:
    """Per Kronecker block and per diagonal tensor: Σ λ' c² = v_bᵀ (G v)_b, the basis unchanged."""
    obj, params = build_llama()
    curv = kronecker_curvature(obj, params, eigen_correction=True, generator=torch.Generator().manual_seed(0))
    v = random_like(params, 7)
    gv = ggn_vp(obj, params, v)
    scaled = curv.rescaled_along(v, gv, bounds=(1e-6, 1e6))
    checked = 0
    for old, new in zip(curv.blocks, scaled.blocks):
        exact = sum(float((v[k] * gv[k]).sum()) for k in (old.weight, old.bias) if k is not None)
        c = new.rotate(v)
        if exact > 0:
            close((new.eigvals * c * c).sum(), torch.tensor(exact, dtype=torch.float64))
            checked += 1
        assert torch.equal(new.QS, old.QS) and (new.QA is old.QA or torch.equal(new.QA, old.QA))
    for k, d in scaled.diagonal.items():
        exact = float((v[k] * gv[k]).sum())
        if exact > 0:
            close((d * v[k] * v[k]).sum(), torch.tensor(exact, dtype=torch.float64))
    assert checked >= len(curv.blocks) // 2  # most blocks have a positive exact form along a random v


def test_exact_curvature_is_left_unchanged() -> None:
    """A single linear layer with squared loss: K-FAC is the GGN, so every ratio is 1."""
    b = built("linear")
    curv = kronecker_curvature(b.obj, b.params)
    v = random_like(b.params, 3)
    gv = unflatten(b.ggn @ flatten(v), b.params)
    u = random_like(b.params, 4)
    close(flatten(curv.rescaled_along(v, gv).matvec(u)), flatten(curv.matvec(u)))


def test_ratios_are_clipped_and_nonpositive_parts_keep_their_scale() -> None:
    b = built("mlp")
    curv = kronecker_curvature(b.obj, b.params)
    v = random_like(b.params, 5)
    huge = {k: 1e9 * t for k, t in v.items()}  # v_bᵀ(G v)_b = 1e9 ‖v_b‖² > 0 in every part: ratio > 100
    u = random_like(b.params, 6)
    close(flatten(curv.rescaled_along(v, huge, bounds=(0.1, 100.0)).matvec(u)), 100.0 * flatten(curv.matvec(u)))
    negative = {k: -t for k, t in huge.items()}
    close(flatten(curv.rescaled_along(v, negative).matvec(u)), flatten(curv.matvec(u)))
