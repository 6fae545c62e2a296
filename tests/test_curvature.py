"""lmclean.curvature against dense torch.func references on tiny float64 models.

Tolerances: rtol 1e-6 and atol 1e-10 × max|reference| (the design's float64 bound; the products and
the references are different autodiff programs, so they agree to rounding, ~1e-15 on the exact
float64 cases). The Llama case is looser, atol 1e-6 × max|reference|: see tests/curvature_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from curvature_cases import (
    CASE_IDS,
    CASES,
    Case,
    build_llama,
    build_mlp,
    built,
    flatten_batch,
    random_like,
    unflatten_batch,
)
from lmclean.curvature import (
    PRODUCTS,
    LowRankCurvature,
    as_flat_matvec,
    diag_vp,
    fisher_vp,
    fisher_vp_at,
    flatten,
    get_product,
    ggn_diagonal_hutchinson,
    ggn_vp,
    ggn_vp_batched,
    hessian_diagonal_hutchinson,
    hvp,
    make_hvp,
    top_eigenpairs,
    unflatten,
)
from lmclean.errors import ConfigError

by_case = pytest.mark.parametrize("case", CASES, ids=CASE_IDS)


def close(actual: Tensor, expected: Tensor, case: Case) -> None:
    torch.testing.assert_close(actual, expected, rtol=case.rtol, atol=case.atol * expected.abs().max().item())


@by_case
def test_hvp_matches_dense_hessian(case: Case) -> None:
    b = built(case.name)
    for seed in range(2):
        v = random_like(b.params, seed)
        close(flatten(hvp(b.obj, b.params, v)), b.hessian @ flatten(v), case)


@by_case
def test_ggn_vp_matches_dense_ggn(case: Case) -> None:
    b = built(case.name)
    for seed in range(2):
        v = random_like(b.params, seed)
        close(flatten(ggn_vp(b.obj, b.params, v)), b.ggn @ flatten(v), case)


@by_case
def test_ggn_vp_batched_matches_single_products(case: Case) -> None:
    b = built(case.name)
    vs = [random_like(b.params, seed) for seed in range(3)]
    stacked = {k: torch.stack([v[k] for v in vs]) for k in b.params}  # each (3, *shape)
    out = ggn_vp_batched(b.obj, b.params, stacked)
    for j, v in enumerate(vs):
        close(flatten({k: o[j] for k, o in out.items()}), flatten(ggn_vp(b.obj, b.params, v)), case)


@by_case
def test_ggn_from_products_is_symmetric_psd_and_differs_from_hessian_unless_linear(case: Case) -> None:
    b = built(case.name)
    eye = torch.eye(b.hessian.shape[0], dtype=torch.float64)  # (P, P)
    G = flatten_batch(ggn_vp_batched(b.obj, b.params, unflatten_batch(eye, b.params)))  # (P, P), rows G e_i
    scale = G.abs().max()
    torch.testing.assert_close(G, G.T, rtol=0, atol=case.atol * scale)
    assert torch.linalg.eigvalsh(G).min() >= -case.atol * scale
    rel_gap = torch.linalg.matrix_norm(G - b.hessian) / torch.linalg.matrix_norm(b.hessian)
    assert rel_gap < 1e-12 if case.linear else rel_gap > 0.1  # a "GGN" that is really H fails here


@by_case
def test_output_hvp_matches_dense_output_hessian(case: Case) -> None:
    b = built(case.name)
    out = b.obj.outputs(b.params).detach()  # (N, C)
    u = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    expected = (b.output_hessian @ u.reshape(-1)).view(out.shape)
    atol = 1e-10 * expected.abs().max().item()  # loss_from_outputs is plain float64 in every case
    torch.testing.assert_close(b.obj.output_hvp(out, u), expected, rtol=1e-6, atol=atol)


def test_ce_output_hessian_is_weighted_softmax_hessian() -> None:
    b = built("llama")
    out = b.obj.outputs(b.params).detach()  # (N, V)
    p = torch.softmax(out, dim=-1)  # (N, V)
    blocks = [c * (torch.diag(pn) - torch.outer(pn, pn)) for c, pn in zip(b.obj._coef, p)]  # N × (V, V)
    torch.testing.assert_close(b.output_hessian, torch.block_diag(*blocks), rtol=1e-6, atol=1e-12)


@by_case
def test_fisher_is_rank_one_gradient_outer_product(case: Case) -> None:
    b = built(case.name)
    v = random_like(b.params, 0)
    expected = torch.outer(b.grad, b.grad) @ flatten(v)
    close(flatten(fisher_vp_at(b.obj, b.params, v)), expected, case)
    close(flatten(fisher_vp(unflatten(b.grad, b.params), v)), expected, case)


@pytest.mark.parametrize("name", ["linear", "mlp"])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_hutchinson_diagonal_converges_to_true_diagonal(name: str, kind: str) -> None:
    b = built(name)
    A = b.ggn if kind == "ggn" else b.hessian
    estimate = ggn_diagonal_hutchinson if kind == "ggn" else hessian_diagonal_hutchinson
    n = 1500
    est = flatten(estimate(b.obj, b.params, n, generator=0))
    # Rademacher estimator variance per entry is Σ_{j≠i} A_ij² / n; allow 5 standard errors.
    se = ((A**2).sum(1) - A.diag() ** 2).div(n).sqrt()
    assert ((est - A.diag()).abs() <= 5 * se + 1e-12).all()


def test_hutchinson_is_deterministic_given_seed() -> None:
    b = built("mlp")
    first = ggn_diagonal_hutchinson(b.obj, b.params, 5, generator=7)
    again = ggn_diagonal_hutchinson(b.obj, b.params, 5, generator=torch.Generator().manual_seed(7))
    other = ggn_diagonal_hutchinson(b.obj, b.params, 5, generator=8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    v = random_like(b.params, 0)
    torch.testing.assert_close(flatten(diag_vp(first, v)), flatten(first) * flatten(v))


def test_lanczos_matches_eigh_on_synthetic_gap() -> None:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))  # (P, P) orthogonal
    top = torch.tensor([10.0, 7.0, 5.0, 3.0], dtype=torch.float64)
    lam = torch.cat([top, torch.rand(36, generator=g, dtype=torch.float64)])  # (P,), gap 2 after rank 4
    A = Q @ torch.diag(lam) @ Q.T
    # n_iter < P: convergence, not an exhausted Krylov space
    vals, vecs = top_eigenpairs(lambda v: A @ v, 40, rank=4, n_iter=25, seed=0, dtype=torch.float64)
    torch.testing.assert_close(vals, lam[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(vecs.T @ vecs, Q[:, :4] @ Q[:, :4].T, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("name", "rank", "which"), [("mlp", 3, "largest"), ("linear", 4, "largest"), ("mlp", 7, "magnitude")]
)
def test_lanczos_matches_eigh_of_dense_curvature(name: str, rank: int, which: str) -> None:
    # GGN for "largest", Hessian (indefinite) for "magnitude". linear: every GGN eigenvalue is double
    # (Kronecker structure), which exercises the invariant-subspace restart.
    b = built(name)
    if which == "largest":
        A, product = b.ggn, lambda v: ggn_vp(b.obj, b.params, v)
    else:
        A, product = b.hessian, make_hvp(b.obj, b.params)
    lam, U = torch.linalg.eigh(A)
    key = lam if which == "largest" else lam.abs()
    order = torch.argsort(key, descending=True)
    assert key[order[rank - 1]] - key[order[rank]] > 0.1 * key[order[0]]  # a clear gap after `rank`
    order = order[:rank]
    matvec = as_flat_matvec(product, b.params)
    vals, vecs = top_eigenpairs(matvec, b.params, rank, n_iter=A.shape[0], which=which)  # full Krylov space
    torch.testing.assert_close(vals, lam[order], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vecs.T @ vecs, U[:, order] @ U[:, order].T, rtol=0, atol=1e-8)


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_low_rank_propagate_equals_explicit_product(damping: float) -> None:
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0].T  # (r, P) orthonormal rows
    lam = torch.tensor([4.0, 1.5, -0.5], dtype=torch.float64)
    curv = LowRankCurvature(lam, U)
    M = U.T @ torch.diag(lam) @ U  # (P, P)
    v = torch.randn(12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(curv.matvec(v), M @ v)
    lrs = [0.1, 0.3, 0.05, 0.2]
    expected = v.clone()
    eye = torch.eye(12, dtype=torch.float64)
    for eta in lrs:
        expected = (eye - eta * (M + damping * eye)) @ expected
    torch.testing.assert_close(curv.propagate(v, lrs, damping=damping), expected, rtol=1e-12, atol=1e-14)


def test_products_preserve_float32() -> None:
    obj, params = build_mlp(torch.float32)
    v = {k: torch.ones_like(p) for k, p in params.items()}
    for name, product in PRODUCTS.items():
        assert all(t.dtype == torch.float32 for t in product(obj, params, v).values()), name
    vals, vecs = top_eigenpairs(as_flat_matvec(lambda u: ggn_vp(obj, params, u), params), params, rank=2)
    assert vals.dtype == vecs.dtype == torch.float32
    assert LowRankCurvature(vals, vecs).propagate(flatten(v), [0.1]).dtype == torch.float32


def test_bad_inputs_raise_config_error() -> None:
    b = built("linear")
    bad = {k: torch.zeros(v.numel() + 1, dtype=v.dtype) for k, v in b.params.items()}
    for product in (hvp, ggn_vp, fisher_vp_at):
        with pytest.raises(ConfigError, match="Shape mismatch"):
            product(b.obj, b.params, bad)
    with pytest.raises(ConfigError, match="unknown curvature"):
        get_product("kfac")
    assert get_product("ggn") is ggn_vp
    with pytest.raises(ConfigError, match="rank"):
        top_eigenpairs(lambda v: v, 5, rank=6)
    with pytest.raises(ConfigError, match="Shape mismatch"):
        LowRankCurvature(torch.ones(2), torch.ones(3, 4))



def test_subset_objective_is_the_rescaled_loss_of_its_rows() -> None:
    """diag/lowrank anchors estimate curvature on part of a batch: the subset's loss is the kept
    samples' weighted losses scaled by (total weight / kept weight), padding trimmed; float64."""
    obj, params = build_llama()
    rows = torch.tensor([1, 2])
    sub = obj.subset(rows)
    assert sub.input_ids.shape == (2, 4)  # trimmed to the longest kept sample (length 4)
    per_sample = []
    for i in range(3):
        one = obj.subset(torch.tensor([i]))  # weight rescaled to the total: 1.0
        per_sample.append(float(one.loss_from_outputs(one.outputs(params))) / float(obj.weights.sum()))
    w = obj.weights
    expected = float(w.sum() / w[rows].sum()) * sum(float(w[i]) * per_sample[i] for i in (1, 2))
    # float64: measured equal to the last bit; 1e-12 leaves room for another summation order only
    assert float(sub.loss_from_outputs(sub.outputs(params))) == pytest.approx(expected, rel=1e-12)
    full = obj.subset(torch.arange(3))
    assert float(full.loss_from_outputs(full.outputs(params))) == pytest.approx(
        float(obj.loss_from_outputs(obj.outputs(params))), rel=1e-12)
