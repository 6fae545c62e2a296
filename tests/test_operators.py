"""Every curvature operator through the propagation engine, on quadratics where it is exact.

A linear model with squared loss has H_t = GGN_t, constant in θ, so with K ≥ T the linearised
recursion is exact and unlearning must equal retraining without F when the operator reproduces
H_t: lowrank with full rank (Lanczos over the whole space), diag on a model whose Hessian is
diagonal, K-FAC/EK-FAC on a linear layer with equal weights. fisher is checked against a dense
reference sweep of its own recursion. Float64; 1e-8 as in test_unlearn_quadratic.py (summation
order over ~60 steps; measured ≤ 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from lmclean.errors import ConfigError
from lmclean.params import ParamManifest
from lmclean.optim import SGDRule
from lmclean.unlearn import ForgetSet, InMemoryTrajectory, OperatorSettings, PropagationSettings, propagate
from lmclean.unlearn.operators import OPERATORS, make_operator

TOL = 1e-8


class Elementwise(torch.nn.Module):
    """f(x) = x ⊙ s: with squared loss its Hessian Σ_n w_n diag(x_n²) is diagonal."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def make_run(model: torch.nn.Module, rule: SGDRule, d_in: int = 5, d_out: int = 2, n: int = 24, batch: int = 4,
             epochs: int = 3, lr: float = 0.3, seed: int = 0) -> InMemoryTrajectory:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    order = [torch.randperm(n, generator=g).tolist() for _ in range(epochs)]
    batches = [perm[i : i + batch] for perm in order for i in range(0, n, batch)]
    lrs = [lr * (1 - 0.5 * t / len(batches)) for t in range(len(batches))]
    model = model.double()
    theta0 = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    return InMemoryTrajectory(model, X, Y, batches, lrs, rule, theta0)


def settings(hvp: str, K: int = 10_000, **op: object) -> PropagationSettings:
    """An anchor at every step on the whole batch: a reused operator then sees each step's own H_t."""
    op = {"refresh": 1, "anchor_fraction": 1.0, **op}
    return PropagationSettings(K=K, damping=0.0, operator=OperatorSettings(hvp=hvp, **op))  # type: ignore[arg-type]


def assert_retrains(run: InMemoryTrajectory, forget: set[int], s: PropagationSettings) -> None:
    retrained = run.run(exclude=forget)[0][-1]
    assert torch.linalg.vector_norm(retrained - run.thetas[-1]) > 1e-2  # the forget set mattered
    res = propagate(run, ForgetSet(sample_ids=forget), s)
    torch.testing.assert_close(run.thetas[-1] + res.delta, retrained, rtol=0, atol=TOL)


RULES = [SGDRule(), SGDRule(momentum=0.5, weight_decay=0.01)]


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_diag_is_exact_on_a_diagonal_quadratic(rule: SGDRule) -> None:
    """Rademacher probes z ⊙ (D z) = D exactly for diagonal D: one probe suffices."""
    run = make_run(Elementwise(3), rule, d_in=3, d_out=3)
    assert_retrains(run, {3, 17}, settings("diag", diag_probes=1))


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_lowrank_with_full_rank_is_exact(rule: SGDRule) -> None:
    run = make_run(torch.nn.Linear(5, 2), rule, batch=8)  # P = 12; 7-8 inputs per batch: H_t has rank 12
    assert_retrains(run, {3, 17}, settings("lowrank", rank=12, lanczos_iter=12))


@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_lowrank_tail_takes_the_cli_settings_and_is_exact_at_full_rank(rule: SGDRule) -> None:
    """--tail lowrank past a K=2 window: the tail operator is built from the same --rank, --refresh
    and --seed, so at full rank and refresh 1 the tail is exact and so is the whole correction."""
    run = make_run(torch.nn.Linear(5, 2), rule, n=64, batch=8, epochs=1)  # 8 steps
    forget = {run.batches[0][0]}  # seen in step 0 only: window 0..2, tail 3..7
    s = PropagationSettings(K=2, damping=0.0, tail="lowrank", operator=OperatorSettings(
        hvp="exact", rank=12, lanczos_iter=12, refresh=1, anchor_fraction=1.0, seed=4))
    assert s.tail_operator is not None
    assert (s.tail_operator.hvp, s.tail_operator.rank, s.tail_operator.refresh, s.tail_operator.seed) == ("lowrank", 12, 1, 4)
    assert_retrains(run, forget, s)
    carried = PropagationSettings(K=2, damping=0.0, operator=s.operator)
    res = propagate(run, ForgetSet(sample_ids=forget), carried)
    assert torch.linalg.vector_norm(run.thetas[-1] + res.delta - run.run(exclude=forget)[0][-1]) > 1e-3  # the tail mattered


def test_fisher_follows_its_rank_one_recursion() -> None:
    """fisher: v ← v − η_t (g_t g_tᵀ v − injection_t) with g_t the recorded batch gradient; a dense
    reference loop (float64, no damping, no stabiliser)."""
    run = make_run(torch.nn.Linear(5, 2), SGDRule(), lr=0.1)
    forget = {3, 17}
    v = torch.zeros_like(run.theta0)
    for t, batch in enumerate(run.batches):
        g = run.stored_grad(t)
        d = g * torch.dot(g, v)
        for j in set(batch) & forget:
            obj = run.objective(t, [j])
            grads = torch.func.grad(lambda p: obj.loss_from_outputs(obj.outputs(p)))(run.manifest.views(run.thetas[t]))
            d = d - run.manifest.flatten(grads)
        v = v - run.lrs[t] * d
    s = PropagationSettings(K=10_000, damping=0.0, stabilize=False, operator=OperatorSettings(hvp="fisher"))
    res = propagate(run, ForgetSet(sample_ids=forget), s)
    assert torch.linalg.vector_norm(v) > 1e-2
    torch.testing.assert_close(res.delta, v, rtol=0, atol=1e-12)
    assert res.products == 0


@pytest.mark.parametrize("hvp", ["kfac", "ekfac"])
@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_kfac_is_exact_for_a_linear_layer(hvp: str, rule: SGDRule) -> None:
    """Equal weights within each batch: K-FAC = Σ_n w_n ã ãᵀ ⊗ I is the GGN, at every anchor."""
    run = make_run(torch.nn.Linear(5, 2), rule)
    assert_retrains(run, {3, 17}, settings(hvp))


def fixed_curvature_run(rule: SGDRule) -> InMemoryTrajectory:
    """Every batch holds the same four inputs (targets differ), so H_t is one matrix for all steps;
    sample 24 is seen once, in step 0: every later step is injection-free."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 5, generator=g, dtype=torch.float64)
    X = torch.cat([base.repeat(6, 1), base[1:2]])  # (25, 5): X[i] = base[i % 4]; X[24] = base[1]
    Y = torch.randn(25, 2, generator=g, dtype=torch.float64)
    batches = [[0, 24, 2, 3]] + [[4 * k + j for j in range(4)] for k in range(6)] * 4
    lrs = [0.2 * (1 - 0.3 * t / len(batches)) for t in range(len(batches))]
    model = torch.nn.Linear(5, 2).double()
    theta0 = torch.randn(12, generator=g, dtype=torch.float64)
    return InMemoryTrajectory(model, X, Y, batches, lrs, rule, theta0)


@pytest.mark.parametrize("hvp", ["kfac", "ekfac"])
@pytest.mark.parametrize("rule", RULES, ids=["sgd", "momentum+wd"])
def test_closed_form_window_is_exact_when_the_curvature_is_fixed(hvp: str, rule: SGDRule) -> None:
    """One anchor for the whole run and every later step applied in its eigenbasis (no product per
    step): still exact, momentum and weight decay included."""
    run = fixed_curvature_run(rule)
    # "full": the one anchor (step 0, the grid's first block) sees all four inputs; v = 0 there, so
    # no product is taken on step 0 and every later batch is retained in full anyway
    s = PropagationSettings(K=10_000, damping=0.0, curvature_batch="full",
                            operator=OperatorSettings(hvp=hvp, refresh=1000, anchor_fraction=1.0))
    res = propagate(run, ForgetSet(sample_ids={24}), s)
    torch.testing.assert_close(run.thetas[-1] + res.delta, run.run(exclude={24})[0][-1], rtol=0, atol=TOL)
    assert res.products == 1 and res.clipped_steps == 0
    assert len(res.v_norms) == 2  # the injection step, then one closed-form window to the end
    assert any("closed form" in n for n in res.notes)


@pytest.mark.parametrize("hvp", ["diag", "lowrank", "kfac", "ekfac"])
def test_reused_curvature_keeps_superposition(hvp: str) -> None:
    """With the full batch's curvature, anchors on the fixed grid of `refresh` blocks are the same
    for every forget set, so unlearn(A ∪ B) = unlearn(A) + unlearn(B) to rounding."""
    run = make_run(torch.nn.Linear(5, 2), SGDRule(momentum=0.9), lr=0.1)
    s = PropagationSettings(K=10_000, damping=0.0, curvature_batch="full",
                            operator=OperatorSettings(hvp=hvp, refresh=5, rank=3, anchor_fraction=0.5))
    a, b = {2, 7}, {20}  # first seen in steps 3 and 2: sweeps that start in different steps of a block
    assert min(run.occurrences(a)) % 5 != min(run.occurrences(b)) % 5

    def delta(ids: set[int]) -> torch.Tensor:
        return propagate(run, ForgetSet(sample_ids=ids), s).delta

    assert torch.linalg.vector_norm(delta(b)) > 1e-3
    torch.testing.assert_close(delta(a | b), delta(a) + delta(b), rtol=0, atol=1e-10)


def test_operators_declare_what_they_are() -> None:
    flags = {name: (cls.psd, cls.per_step, cls.closed_form) for name, cls in OPERATORS.items()}
    assert flags == {"ggn": (True, True, False), "exact": (False, True, False), "fisher": (True, True, False),
                     "diag": (True, False, False), "lowrank": (True, False, False),
                     "kfac": (True, False, True), "ekfac": (True, False, True), "ekfac-rq": (True, False, True),
                     "krylov": (True, False, True)}
    manifest = ParamManifest.from_model(torch.nn.Linear(5, 2))
    s = OperatorSettings(refresh=10, rank=4, lanczos_iter=3, diag_probes=6, mc_samples=2)
    costs = {name: make_operator(OperatorSettings(**{**s.__dict__, "hvp": name}), manifest).products_for(25)
             for name in OPERATORS}
    assert costs == {"ggn": 25, "exact": 25, "fisher": 0, "diag": 18, "lowrank": 18, "kfac": 6, "ekfac": 6,
                     "ekfac-rq": 9,  # + one calibration product per anchor
                     "krylov": 10}  # 3 anchors × (krylov_dim − 1 products + a third of one for the quadratic form)
    with pytest.raises(ConfigError, match="--hvp 'kfc' is not known"):
        make_operator(OperatorSettings(hvp="kfc"), manifest)
    with pytest.raises(ConfigError, match="--tail 'ggn' must be carry or a reused curvature"):
        PropagationSettings(tail="ggn")
    assert PropagationSettings(tail="ekfac", operator=OperatorSettings(refresh=7)).tail_operator == OperatorSettings(hvp="ekfac", refresh=7)
