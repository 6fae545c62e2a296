"""KroneckerCurvature.rescaled_along: each part's quadratic form along v matches the exact GGN's;
and the operator built on it, `--hvp ekfac-rq`, in the engine and the CLI.

Dense float64 references (tests/curvature_cases.py); tolerances as tests/test_kfac.py (rtol 1e-10,
float64 rounding of different programs); engine results against plain EK-FAC and exact retraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line
from typer.testing import CliRunner

from curvature_cases import build_llama, built, random_like, run_of
from lmclean.curvature import flatten, ggn_vp, kronecker_curvature, unflatten
from lmclean.optim import SGDRule
from lmclean.params import ParamManifest
from lmclean.unlearn import ForgetSet, InMemoryTrajectory, OperatorSettings, PropagationSettings, propagate
from lmclean.unlearn.operators import make_operator


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


# --- the operator `--hvp ekfac-rq` (lmclean/unlearn/basis_operators.py) in the engine and the CLI ---




def sweep(run: InMemoryTrajectory, hvp: str, refresh: int, forget: set[int]):  # noqa: ANN201
    s = PropagationSettings(K=10_000, damping=0.0, operator=OperatorSettings(hvp=hvp, refresh=refresh, anchor_fraction=1.0))
    return propagate(run, ForgetSet(sample_ids=forget), s)


@pytest.mark.parametrize("rule", [SGDRule(), SGDRule(momentum=0.5, weight_decay=0.01)], ids=["sgd", "momentum+wd"])
def test_equals_plain_ekfac_where_kfac_is_exact(rule: SGDRule) -> None:
    """One linear layer, squared loss, equal weights: EK-FAC is the GGN, every ratio is 1, so the
    rescaled operator gives plain EK-FAC's correction (and exact retraining), for one more product
    per anchor that calibrates."""
    run = run_of(torch.nn.Linear(5, 2), rule)
    forget = {3, 17}
    plain, scaled = sweep(run, "ekfac", 1, forget), sweep(run, "ekfac-rq", 1, forget)
    torch.testing.assert_close(scaled.delta, plain.delta, rtol=0, atol=1e-10)
    retrained = run.run(exclude=forget)[0][-1]
    assert torch.linalg.vector_norm(retrained - run.thetas[-1]) > 1e-2  # the forget set mattered
    torch.testing.assert_close(run.thetas[-1] + scaled.delta, retrained, rtol=0, atol=1e-8)
    first = min(run.occurrences(forget))  # v = 0 up to the first injection (applied after that step's product)
    assert scaled.products - plain.products == len(run.batches) - first - 1


def test_changes_the_correction_where_kfac_is_not_exact() -> None:
    """An MLP: K-FAC is an approximation, the rescaling moves each anchor's eigenvalues, and the
    correction changes (one calibration product per anchor block the sweep uses)."""
    run = run_of(torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)), SGDRule())
    forget = {3, 17}
    plain, scaled = sweep(run, "ekfac", 6, forget), sweep(run, "ekfac-rq", 6, forget)
    assert torch.all(torch.isfinite(scaled.delta))
    rel = torch.linalg.vector_norm(scaled.delta - plain.delta) / torch.linalg.vector_norm(plain.delta)
    assert rel > 1e-3, rel
    first = min(run.occurrences(forget))
    blocks = len({t - t % 6 for t in range(first + 1, len(run.batches))})
    assert scaled.products - plain.products == blocks


def test_operator_rescales_its_anchor_along_the_first_vector() -> None:
    """The operator's product = EK-FAC at the anchor, rescaled along the first non-zero vector it
    meets by one exact GGN product there (KroneckerCurvature.rescaled_along); later vectors reuse it."""
    b = built("mlp")
    manifest = ParamManifest.from_model(b.obj.model)
    theta = manifest.flatten(b.params)
    settings = OperatorSettings(hvp="ekfac-rq", refresh=10, anchor_fraction=1.0)
    op = make_operator(settings, manifest)
    matvec = op.at(0, theta.clone(), lambda: b.obj, lambda: torch.zeros_like(theta))
    assert op.products == 1 and op.products_for(25) == 3 * 2
    v, u = manifest.flatten(random_like(b.params, 3)), manifest.flatten(random_like(b.params, 4))
    zero = torch.zeros_like(v)
    torch.testing.assert_close(matvec(zero), zero)  # no direction yet: not calibrated
    assert op.products == 1
    got_v, got_u = matvec(v), matvec(u)
    assert op.products == 2
    reference = kronecker_curvature(b.obj, b.params, eigen_correction=True, generator=torch.Generator().manual_seed(0))
    vec = manifest.views(v)
    scaled = reference.rescaled_along(vec, ggn_vp(b.obj, b.params, vec))
    close(got_v, manifest.flatten(scaled.matvec(vec)))
    close(got_u, manifest.flatten(scaled.matvec(manifest.views(u))))


@pytest.mark.parametrize("args, needle", [
    (["--hvp", "ekfac-rq", "--curvature-fraction", "0.5"],
     "--curvature-fraction is used only with --hvp ggn or exact, not with --hvp ekfac-rq --tail carry"),
    (["--hvp", "ggn", "--refresh", "10"], "--refresh is used only with --hvp/--tail krylov, lowrank, diag, kfac, ekfac or ekfac-rq"),
    (["--method", "replay", "--hvp", "ekfac-rq"], "--hvp is used only with --method lmcleaner"),
    (["--tail", "ekfac-rq"], "--tail"),
])
def test_cli_refuses_ekfac_rq_misuse_in_one_line(recorded_store: Path, args: list[str], needle: str) -> None:
    from lmclean.cli.main import app

    r = CliRunner().invoke(app, ["unlearn", str(recorded_store), "--forget", "101", *args])
    assert r.exit_code != 0 and needle in error_line(r), r.output


def test_cli_unlearns_with_ekfac_rq(store_copy: Path, tmp_path: Path) -> None:
    """The option reaches the engine: the report names it and counts the calibration products."""
    from lmclean.cli.main import app

    args = ["unlearn", str(store_copy), "--forget", "101", "--K", "20", "--refresh", "5", "--check-steps", "0", "--json"]
    r = CliRunner().invoke(app, [*args, "--hvp", "ekfac-rq", "--out", str(tmp_path / "rq")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["hvp"] == "ekfac-rq"
    assert report["curvature_products"] > 0 and report["delta_norm"] > 0
