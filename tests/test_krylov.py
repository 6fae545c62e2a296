"""Krylov curvature (lmclean.curvature.krylov) against dense float64 matrices, and the operator built
on it, `--hvp krylov`, in the engine and the CLI.

References: dense SPD matrices and explicit step-by-step recursions (float64); in the engine, the
per-step `ggn` sweep (one step of a window is degree 1 in G, so a Krylov space of dimension >= 2
started at v holds it exactly) and exact retraining on a quadratic. Tolerances: 1e-10 relative for
dense algebra (float64 rounding of different programs, measured ~1e-14), 1e-8 absolute in the engine
(a few dozen steps of accumulated rounding and the operator's central-difference products, GGNAt,
whose truncation is ~1e-9 relative on these float64 models), as tests/test_kfac_rescale.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import error_line
from torch import Tensor
from typer.testing import CliRunner

from curvature_cases import built, random_like, run_of
from lmclean.curvature import ggn_vp
from lmclean.curvature.krylov import KrylovCurvature, krylov_curvature
from lmclean.errors import ConfigError
from lmclean.optim import SGDRule
from lmclean.params import ParamManifest
from lmclean.unlearn import ForgetSet, InMemoryTrajectory, OperatorSettings, PropagationSettings, propagate
from lmclean.unlearn import basis_operators
from lmclean.unlearn.operators import make_operator

P = 30


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def spd(seed: int, eigvals: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """A random SPD (P, P) matrix Q diag(λ) Qᵀ with spread eigenvalues λ in [0.1, 3]; returns A, λ, Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = eigvals if eigvals is not None else torch.linspace(0.1, 3.0, P, dtype=torch.float64)
    return Q @ torch.diag(lam) @ Q.T, lam, Q


def vec(seed: int, n: int = P) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def counted(A: Tensor) -> tuple[Callable[[Tensor], Tensor], list[int]]:
    calls = [0]

    def matvec(x: Tensor) -> Tensor:
        calls[0] += 1
        return A @ x

    return matvec, calls


def polynomial(A: Tensor, v: Tensor, lrs: list[float]) -> Tensor:
    """Π_t (I − η_t A) v, step by step (dense)."""
    for eta in lrs:
        v = v - eta * (A @ v)
    return v


# --- Lanczos / Rayleigh–Ritz against dense ---


def test_full_dimension_reproduces_the_matrix() -> None:
    """k = P: the Krylov space of a generic v is the whole space, so U diag(θ) Uᵀ = A; asking for more
    than P products stops at P (the space is invariant)."""
    A, lam, _ = spd(0)
    v = vec(1)
    for k in (P, P + 5):
        matvec, calls = counted(A)
        curv, n = krylov_curvature(matvec, v, k)
        assert n == calls[0] == P
        close(curv.vecs @ curv.vecs.T, torch.eye(P, dtype=torch.float64))
        close(curv.vals, lam)  # eigh sorts ascending, as linspace
        for u in (v, vec(2), vec(3)):
            close(curv.matvec(u), A @ u)


def test_polynomials_below_the_dimension_are_exact_and_above_are_not() -> None:
    """k < P products: p(A) v for deg p < k equals V p(T) Vᵀ v (the Lanczos approximation of a
    matrix function) to rounding; for deg p = k it is off by far more than rounding, so the
    propagation really is the Krylov approximation and not the dense product."""
    A, _, _ = spd(4)
    v = vec(5)
    k = 5
    curv, n = krylov_curvature(lambda x: A @ x, v, k)
    assert n == k and curv.vecs.shape == (k, P)
    close(curv.vecs @ curv.vecs.T, torch.eye(k, dtype=torch.float64))
    lrs = [0.3, 0.5, 0.2, 0.6, 0.4, 0.1]
    for steps in range(1, k):  # degree 1..k-1
        got, m, capped = curv.propagate(v, None, lrs[:steps])
        assert m is None and capped == 0
        close(got, polynomial(A, v, lrs[:steps]))
    for steps in (k, k + 1):  # degree k, k+1: outside what k products determine
        got, _, _ = curv.propagate(v, None, lrs[:steps])
        assert rel(got, polynomial(A, v, lrs[:steps])) > 1e-6
    close(curv.matvec(v), A @ v)  # degree 1 (k >= 2)


def test_block_space_of_two_seeds() -> None:
    """Two seeds: the basis is orthonormal, contains both seeds, and the Ritz values are the
    compression of A onto it (U A Uᵀ = diag(θ), i.e. T = Qᵀ A Q in the Ritz basis)."""
    A, _, _ = spd(6)
    s1, s2 = vec(7), vec(8)
    for k in (2, 5):
        matvec, calls = counted(A)
        curv, n = krylov_curvature(matvec, [s1, s2], k)
        U = curv.vecs
        assert n == calls[0] == k and U.shape == (k, P)
        close(U @ U.T, torch.eye(k, dtype=torch.float64))
        for s in (s1, s2):
            close(U.T @ (U @ s), s)  # s lies in span U
        close(U @ A @ U.T, torch.diag(curv.vals))
    # with 4 products the space is span{s1, s2, A s1, A s2}: A acts exactly on both seeds
    curv, _ = krylov_curvature(lambda x: A @ x, [s1, s2], 4)
    for s in (s1, s2):
        close(curv.matvec(s), A @ s)
    assert rel(curv.matvec(vec(9)), A @ vec(9)) > 1e-3  # and not on a vector outside it


def test_quadratic_form_replaces_the_last_product() -> None:
    """With the quadratic form q ↦ qᵀ A q the k-th basis vector takes no product: its column of T is
    (A q_i)ᵀ q_k from the earlier products, so the curvature is the one k products give (to rounding),
    for one seed and a block, at k − 1 products; k = 1 is v's Rayleigh quotient at no product. A wrong
    column (or a corner left at 0) would change the Ritz values by O(1)."""
    A, _, _ = spd(12)
    quad = lambda q: q @ (A @ q)  # noqa: E731
    for seeds, k in ((vec(13), 5), ([vec(14), vec(15)], 4), (vec(16), 2)):
        full, n_full = krylov_curvature(lambda x: A @ x, seeds, k)
        matvec, calls = counted(A)
        cheap, n = krylov_curvature(matvec, seeds, k, quadratic=quad)
        assert n == calls[0] == k - 1 and n_full == k
        close(cheap.vals, full.vals)
        close(cheap.vecs.T @ cheap.vecs, full.vecs.T @ full.vecs)  # the same space
        for u in (vec(17), vec(18)):
            close(cheap.matvec(u), full.matvec(u))
    v = vec(19)
    matvec, calls = counted(A)
    one, n = krylov_curvature(matvec, v, 1, quadratic=quad)
    assert n == calls[0] == 0
    close(one.vals, (v @ A @ v / (v @ v)).reshape(1))
    assert rel(one.matvec(v), A @ v) > 1e-3  # one direction: v's Rayleigh quotient only


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "momentum"])
@pytest.mark.parametrize("max_step", [None, 1.0], ids=["uncapped", "capped"])
def test_propagate_matches_a_dense_recursion(momentum: float, max_step: float | None) -> None:
    """propagate = the step-by-step recursion d = (G̃ + shift) v, m ← μ m + d, v ← v − η m with the dense
    G̃ = Uᵀ diag(θ) U (zero on the complement of span U, which feels only the shift), η·λ capped at
    max_step per eigen-direction; the capped count is the steps where η_t·λmax(G̃) > max_step."""
    A, _, _ = spd(10)
    curv, _ = krylov_curvature(lambda x: A @ x, vec(11), 6)
    G = curv.vecs.T @ torch.diag(curv.vals) @ curv.vecs  # (P, P), rank 6
    lam, V = torch.linalg.eigh(G)  # independent eigendecomposition of the dense operator
    v0 = vec(12)  # generic: has mass outside span U
    assert rel(curv.vecs.T @ (curv.vecs @ v0), v0) > 0.5
    m0 = vec(13) if momentum else None
    lrs, shift = [0.1, 0.6, 0.2, 0.9, 0.3], 0.05
    v, m, expected_capped = v0.clone(), (m0.clone() if m0 is not None else None), 0
    for eta in lrs:
        lam_t = lam
        if max_step is not None and bool((eta * lam > max_step).any()):
            expected_capped += 1
            lam_t = lam.clamp(max=max_step / eta)
        d = V @ (lam_t * (V.T @ v)) + shift * v
        if m is None:
            v = v - eta * d
        else:
            m = momentum * m + d
            v = v - eta * m
    got_v, got_m, capped = curv.propagate(v0, m0, lrs, momentum, shift, max_step)
    close(got_v, v)
    if m is None:
        assert got_m is None
    else:
        assert got_m is not None
        close(got_m, m)
    assert capped == expected_capped
    if max_step is not None:
        assert 0 < capped < len(lrs)  # the case exercises both capped and uncapped steps
        uncapped, _, _ = curv.propagate(v0, m0, lrs, momentum, shift, None)
        assert rel(uncapped, got_v) > 1e-3


def test_an_eigenvector_stops_after_one_product() -> None:
    """v an eigenvector of A: its Krylov space is invariant after one product, which is exact there
    (any polynomial, any degree); a combination of two eigenvectors takes two products."""
    A, lam, Q = spd(14)
    v = 2.0 * Q[:, 7]
    matvec, calls = counted(A)
    curv, n = krylov_curvature(matvec, v, 5)
    assert n == calls[0] == 1 and curv.vecs.shape == (1, P)
    close(curv.vals, lam[7:8])
    close(curv.matvec(v), A @ v)
    lrs = [0.3] * 12
    close(curv.propagate(v, None, lrs)[0], polynomial(A, v, lrs))
    w = Q[:, 3] - 0.5 * Q[:, 20]
    curv, n = krylov_curvature(lambda x: A @ x, w, 5)
    assert n == 2
    close(torch.sort(curv.vals).values, torch.stack([lam[3], lam[20]]))
    close(curv.propagate(w, None, lrs)[0], polynomial(A, w, lrs))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="Krylov dimension must be >= 1"):
        krylov_curvature(lambda x: x, vec(0), 0)
    with pytest.raises(ConfigError, match="non-zero start vector"):
        krylov_curvature(lambda x: x, torch.zeros(P, dtype=torch.float64), 3)
    with pytest.raises(ConfigError, match=r"\(k, P\)"):
        KrylovCurvature(torch.zeros(3, P), torch.zeros(2))


# --- the operator `--hvp krylov` (lmclean/unlearn/basis_operators.py) in the engine and the CLI ---




def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def sweep(run: InMemoryTrajectory, forget: set[int], hvp: str, refresh: int = 1, krylov_dim: int = 4):  # noqa: ANN201
    s = PropagationSettings(K=10_000, damping=0.0, operator=OperatorSettings(
        hvp=hvp, refresh=refresh, krylov_dim=krylov_dim, anchor_fraction=1.0))
    return propagate(run, ForgetSet(sample_ids=forget), s)


def lanczos_counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The products each krylov_curvature call of the operator actually took."""
    taken: list[int] = []

    def spy(matvec, seeds, k, quadratic=None):  # noqa: ANN001, ANN202
        curv, n = krylov_curvature(matvec, seeds, k, quadratic)
        taken.append(n)
        return curv, n

    monkeypatch.setattr(basis_operators, "krylov_curvature", spy)
    return taken


RULES = [SGDRule(), SGDRule(momentum=0.5, weight_decay=0.01)]


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
@pytest.mark.parametrize("krylov_dim", [2, 3])
def test_refresh_1_equals_per_step_ggn(rule: SGDRule, krylov_dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """refresh 1: each step's curvature is the Krylov space of that step's v at that step's θ, and
    one step is degree 1 in G, exact in span{v, Gv}: the sweep reproduces the per-step ggn sweep
    (an MLP, so G differs from step to step). Products: the Lanczos steps actually taken, k − 1 per
    step after the first injection (the k-th basis vector takes a quadratic form; v = 0 before the
    first injection, which lands after that step's product)."""
    run = run_of(mlp(), rule)
    forget = {3, 17}
    taken = lanczos_counts(monkeypatch)
    ggn, kry = sweep(run, forget, "ggn"), sweep(run, forget, "krylov", 1, krylov_dim)
    assert ggn.clipped_steps == 0 and kry.clipped_steps == 0  # the two stabilisers (per-step vs per-direction) idle
    assert float(torch.linalg.vector_norm(ggn.delta)) > 1e-2
    torch.testing.assert_close(kry.delta, ggn.delta, rtol=0, atol=1e-8)
    first = min(run.occurrences(forget))
    assert ggn.products == len(run.batches) - first - 1
    assert kry.products == sum(taken) == (krylov_dim - 1) * ggn.products
    assert taken == [krylov_dim - 1] * ggn.products
    if rule.momentum:
        torch.testing.assert_close(kry.state_delta["momentum_buffer"], ggn.state_delta["momentum_buffer"], rtol=0, atol=1e-8)
    if krylov_dim == 2:  # dimension 1 holds only v's Rayleigh quotient, not Gv: measured rel 0.40 / 0.55
        assert rel(sweep(run, forget, "krylov", 1, 1).delta, ggn.delta) > 1e-2


def test_krylov_tail_continues_the_ggn_sweep() -> None:
    """--tail krylov with refresh 1 and 2 products: past K the sweep goes on exactly as per-step ggn
    would, where carrying v unchanged does not."""
    run = run_of(mlp(), SGDRule(momentum=0.5))
    forget = {0, 4}  # last seen at step 12 of 18: K = 2 stops at 15, the tail runs 15..17
    assert max(run.occurrences(forget)) == 12
    full = sweep(run, forget, "ggn")

    def short(tail: str):  # noqa: ANN202
        op = OperatorSettings(hvp="ggn", refresh=1, krylov_dim=2, anchor_fraction=1.0)
        return propagate(run, ForgetSet(sample_ids=forget), PropagationSettings(K=2, damping=0.0, operator=op, tail=tail))

    tailed, carried = short("krylov"), short("carry")
    torch.testing.assert_close(tailed.delta, full.delta, rtol=0, atol=1e-8)
    assert rel(carried.delta, full.delta) > 1e-2
    assert tailed.products > carried.products


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_equals_retraining_on_a_quadratic(rule: SGDRule) -> None:
    """One linear layer, squared loss, curvature of the retained batch: the linearisation is exact,
    so krylov (refresh 1) gives exactly retraining without the forget set."""
    run = run_of(torch.nn.Linear(5, 2), rule)
    forget = {3, 17}
    result = sweep(run, forget, "krylov", 1, 2)
    retrained = run.run(exclude=forget)[0][-1]
    assert torch.linalg.vector_norm(retrained - run.thetas[-1]) > 1e-2  # the forget set mattered
    torch.testing.assert_close(run.thetas[-1] + result.delta, retrained, rtol=0, atol=1e-8)


def test_long_windows_approximate_ggn() -> None:
    """refresh 6 with 2 products per anchor on an MLP: directions injected after an anchor get no
    curvature until the next one, and a window of up to 6 steps is degree 6 in G: the correction
    differs from per-step ggn, stays finite and of the same size, for one anchor per block."""
    run = run_of(mlp(), SGDRule())
    forget = {3, 17}
    ggn, kry = sweep(run, forget, "ggn"), sweep(run, forget, "krylov", 6, 2)
    assert torch.all(torch.isfinite(kry.delta))
    r = rel(kry.delta, ggn.delta)
    assert 1e-4 < r < 1.0, r
    first = min(run.occurrences(forget))
    blocks = len({t - t % 6 for t in range(first + 1, len(run.batches))})
    assert kry.products == blocks < ggn.products  # k − 1 = 1 product per anchor (2 < P: no space is invariant)


def test_operator_estimates_lazily_along_the_first_vector() -> None:
    """at() takes no product; the first non-zero vector takes krylov_dim − 1 GGN products (and one
    quadratic form) at the
    anchor's θ (a copy: θ is a reused buffer); later vectors and windows reuse that space; a new block
    re-estimates. The operator's products are central differences (GGNAt): on this float64 MLP their
    truncation is ~1e-9 relative, hence rtol 1e-7 against the exact products here; a stale θ or a
    wrong space would be off by O(1)."""
    b = built("mlp")
    manifest = ParamManifest.from_model(b.obj.model)
    theta = manifest.flatten(b.params)
    op = make_operator(OperatorSettings(hvp="krylov", refresh=10, krylov_dim=3, anchor_fraction=1.0), manifest)
    assert op.closed_form and op.reused_across_steps and op.products_for(25) == 7  # 3 anchors × (2 + 1/3)
    buffer = theta.clone()
    matvec = op.at(0, buffer, lambda: b.obj, lambda: torch.zeros_like(theta))
    assert op.products == 0
    buffer.add_(1.0)  # the engine reuses θ's buffer: the estimate must hold the anchor's θ
    v, u = manifest.flatten(random_like(b.params, 3)), manifest.flatten(random_like(b.params, 4))
    got_v = matvec(v)
    assert op.products == 2
    reference, _ = krylov_curvature(lambda x: manifest.flatten(ggn_vp(b.obj, b.params, manifest.views(x))), v, 3)
    close(got_v, reference.matvec(v), 1e-7)
    G = b.ggn
    close(got_v, G @ v, 1e-7)  # degree 1: exact
    close(matvec(u), reference.matvec(u), 1e-7)  # u reuses v's space
    assert rel(matvec(u), G @ u) > 1e-3
    lrs = [0.2, 0.3]
    w, m = v.clone(), torch.zeros_like(v)
    op.window(w, m, lrs, 0.5, 0.01, 1.9)
    close(w, reference.propagate(v, torch.zeros_like(v), lrs, 0.5, 0.01, 1.9)[0], 1e-7)
    assert op.products == 2
    assert op.at(9, theta, lambda: b.obj, lambda: torch.zeros_like(theta)) is matvec  # same block
    again = op.at(10, theta, lambda: b.obj, lambda: torch.zeros_like(theta))  # new block
    assert op.products == 2
    close(again(u), G @ u, 1e-7)  # estimated along u now
    assert op.products == 4


def test_zero_vector_takes_no_product() -> None:
    """G̃ 0 = 0 whatever the space: a zero vector neither estimates nor fails."""
    b = built("mlp")
    manifest = ParamManifest.from_model(b.obj.model)
    theta = manifest.flatten(b.params)
    op = make_operator(OperatorSettings(hvp="krylov", krylov_dim=3), manifest)
    matvec = op.at(0, theta, lambda: b.obj, lambda: torch.zeros_like(theta))
    zero = torch.zeros_like(theta)
    assert torch.equal(matvec(zero), zero) and op.products == 0
    matvec(manifest.flatten(random_like(b.params, 5)))
    assert op.products == 2


def test_refresh_defaults() -> None:
    assert OperatorSettings(hvp="krylov").refresh_steps == 16
    assert OperatorSettings(hvp="ekfac").refresh_steps == 100
    assert OperatorSettings(hvp="krylov", refresh=3).refresh_steps == 3
    with pytest.raises(ConfigError, match="--krylov-dim 0 must be >= 1"):
        OperatorSettings(hvp="krylov", krylov_dim=0)


@pytest.mark.parametrize("args, needle", [
    (["--hvp", "ggn", "--krylov-dim", "3"], "--krylov-dim is used only with --hvp/--tail krylov"),
    (["--hvp", "krylov", "--krylov-dim", "0"], "Invalid value for '--krylov-dim'"),  # the option's range (min=1)
])
def test_cli_refuses_krylov_misuse_in_one_line(recorded_store: Path, args: list[str], needle: str) -> None:
    from lmclean.cli.main import app

    r = CliRunner().invoke(app, ["unlearn", str(recorded_store), "--forget", "101", *args])
    assert needle in error_line(r), r.output


def test_cli_unlearns_with_krylov(store_copy: Path, tmp_path: Path) -> None:
    """The option reaches the engine: the report names it and counts the Lanczos products."""
    from lmclean.cli.main import app

    args = ["unlearn", str(store_copy), "--forget", "101", "--K", "20", "--check-steps", "0", "--json"]
    r = CliRunner().invoke(app, [*args, "--hvp", "krylov", "--krylov-dim", "3", "--out", str(tmp_path / "kry")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["hvp"] == "krylov"
    assert report["curvature_products"] > 0 and report["delta_norm"] > 0
    assert report["curvature_products"] % 2 == 0  # k − 1 = 2 Lanczos products per anchor (P >> 3: never invariant)


# --- GGNAt: the shared-forward, finite-difference products krylov takes at an anchor -------------------

def _flat_rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


@pytest.mark.parametrize("case, bound", [("mlp", 1e-6), ("llama", 1e-3)])
def test_ggn_at_matches_the_dual_product(case: str, bound: float) -> None:
    """Central differences with a shared forward graph against ggn_vp's forward-mode AD, for several
    products at one θ (the graph is reused): O(h²) truncation on the float64 MLP; the float64 Llama keeps
    norms and softmax in float32, so rounding bounds it there. A wrong sign, scale or a stale graph
    would be off by O(1)."""
    from curvature_cases import build_llama
    from lmclean.curvature import GGNAt

    obj, params = build_llama() if case == "llama" else (built("mlp").obj, built("mlp").params)
    op = GGNAt(obj, params)
    assert op.fd
    for seed in range(3):
        v = random_like(params, 10 + seed)
        got, want = op(v), ggn_vp(obj, params, v)
        assert _flat_rel(got, want) < bound, (case, seed, _flat_rel(got, want))
        exact = sum((want[k] * v[k]).sum() for k in v)
        assert abs(float(op.quadratic(v) - exact)) < bound * abs(float(exact)), (case, seed)
    zero = {k: torch.zeros_like(p) for k, p in params.items()}
    assert all(torch.equal(x, torch.zeros_like(x)) for x in op(zero).values())
    assert float(op.quadratic(zero)) == 0.0
    fresh = GGNAt(obj, params)  # a quadratic form before any product: its own plain forward at θ
    v = random_like(params, 30)
    exact = sum((x * v[k]).sum() for k, x in ggn_vp(obj, params, v).items())
    assert abs(float(fresh.quadratic(v) - exact)) < bound * abs(float(exact)) and fresh._graph is None


def test_ggn_at_float32_takes_a_forward_difference() -> None:
    """In float32 the product is a forward difference reusing the graph's f(θ) (one forward less than
    the central one): O(h) truncation plus float32 rounding, measured 3e-4–5e-4 on this Llama against
    ggn_vp (the central one 7e-5–2e-4), hence the bound 3e-3; a wrong sign, scale or base point would
    be off by O(1). The float64 tests above keep the central difference."""
    import dataclasses

    from curvature_cases import build_llama
    from lmclean.curvature import GGNAt

    obj, params = build_llama()
    obj.model.float()
    obj = dataclasses.replace(obj, weights=obj.weights.float())
    params = {k: p.float() for k, p in params.items()}
    op = GGNAt(obj, params)
    assert op.fd and not op.central and GGNAt(*build_llama()).central  # float64 keeps the central one
    for seed in range(3):
        v = random_like(params, 20 + seed)
        got, want = op(v), ggn_vp(obj, params, v)
        assert _flat_rel(got, want) < 3e-3, (seed, _flat_rel(got, want))
        form, exact = float(op.quadratic(v)), float(sum((want[k].double() * v[k].double()).sum() for k in v))
        assert abs(form - exact) < 3e-3 * abs(exact), (seed, form, exact)  # vᵀGv from the forward pass alone


def test_ggn_at_takes_the_dual_product_under_autocast() -> None:
    """bf16 rounding would swamp a difference quotient: an autocast objective takes ggn_vp's product."""
    import dataclasses

    from curvature_cases import build_llama
    from lmclean.curvature import GGNAt

    obj, params = build_llama()
    obj = dataclasses.replace(obj, autocast="bf16")
    op = GGNAt(obj, params)
    assert not op.fd
    v = random_like(params, 5)
    got, want = op(v), ggn_vp(obj, params, v)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(op.quadratic(v), sum((want[k] * v[k]).sum() for k in v))


def test_spot_check_wording_for_krylov() -> None:
    """krylov's per-step defect read 0.70 both at residual 0.276 (TOFU) and at 0.970 (bundled;
    benchmarks/README.md, quality section): its line says the ratio does not discriminate instead of
    calling the answer poor, which it still does for a per-step curvature."""
    from lmclean.cli._quality import quality_lines

    q = {"defect_ratio": 0.7, "check_steps": [3, 9], "forget_loss": {"delta": 0.1}, "retain_loss": {"delta": 0.0}}
    krylov, = quality_lines(q, "lmcleaner", "krylov")
    ggn, = quality_lines(q, "lmcleaner", "ggn")
    assert "(poor: about as far off" in ggn and "(poor: about as far off" not in krylov
    assert "does not tell a good krylov answer from a poor one" in krylov
    assert "defect ratio 0.7 at steps [3, 9]" in krylov
