"""The quality spot check (lmclean/unlearn/quality.py) on in-memory runs against exact retraining.

Float64 tiny MLP (tanh) and a linear model, so the references are exact: exact replay's defect
ratio is 0 to rounding (1e-10), a zero correction's is exactly 1 (1e-12), and across methods the
signal orders like the true residual ‖θ̂ − θ_retrain‖ / ‖θ − θ_retrain‖.
"""

from __future__ import annotations

import pytest
import torch

from lmclean.optim import AdamWRule, SGDRule
from lmclean.unlearn import ForgetSet, InMemoryTrajectory, OperatorSettings, PropagationSettings, propagate, replay, rollback
from lmclean.unlearn.common import SweepResult
from lmclean.cli._quality import quality_lines
from lmclean.unlearn.quality import check_steps, keep_for, spot_check, stability_reading


def mlp_run(rule: SGDRule | AdamWRule, lr: float = 0.1, n: int = 24, seed: int = 0) -> InMemoryTrajectory:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    batches = [perm[i : i + 4] for perm in (torch.randperm(n, generator=g).tolist() for _ in range(3)) for i in range(0, n, 4)]
    theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return InMemoryTrajectory(model, X, Y, batches, [lr] * len(batches), rule, theta0)


def checked(run: InMemoryTrajectory, forget: ForgetSet, s: int = 6) -> list[int]:
    affected = forget.affected(run)
    return check_steps(min(affected), run.n_steps, affected, s, seed=0)


def nothing(run: InMemoryTrajectory, forget: ForgetSet, checks: list[int]) -> SweepResult:
    """A method that corrects nothing: θ̂[t] = θ[t] and the recorded state at every kept step."""
    zero = torch.zeros(run.manifest.size, dtype=torch.float64)
    state = {k: torch.zeros_like(zero) for k in run.rule.state_names()}
    return SweepResult(zero, "nothing", [], (checks[0], run.n_steps), kept={t: (zero, state) for t in keep_for(checks)})


def residual(run: InMemoryTrajectory, forget: ForgetSet, result: SweepResult) -> float:
    retrained = run.run(exclude=forget.sample_ids, skip_steps=forget.steps)[0][-1]
    orig = run.thetas[-1]
    return float(torch.linalg.vector_norm(orig + result.delta - retrained) / torch.linalg.vector_norm(orig - retrained))


def signal(run: InMemoryTrajectory, forget: ForgetSet, result: SweepResult, checks: list[int]) -> dict:
    return spot_check(run, forget, result, checks, run.thetas[-1], run.thetas[-1] + result.delta)


def test_check_steps_are_seeded_stratified_and_inside_the_window() -> None:
    affected = [3, 9, 20]
    picked = check_steps(3, 30, affected, 4, seed=1)
    assert picked == check_steps(3, 30, affected, 4, seed=1) and picked == sorted(set(picked))
    assert len(picked) == 4 and all(3 <= t < 30 for t in picked)
    assert len(set(picked) & set(affected)) == 2  # ⌈s/2⌉ steps holding forget samples, the rest not
    assert check_steps(3, 30, affected, 4, seed=2) != picked or check_steps(3, 30, affected, 4, seed=3) != picked
    assert check_steps(3, 30, affected, 0) == [] and check_steps(5, 5, [5], 3) == []
    assert check_steps(3, 5, [3], 10) == [3, 4]  # never more steps than the window holds


@pytest.mark.parametrize("level", ["sample", "batch"])
def test_exact_replay_reads_zero_and_a_zero_correction_reads_one(level: str) -> None:
    run = mlp_run(SGDRule(momentum=0.5, weight_decay=0.01))
    forget = ForgetSet(sample_ids={3, 17}) if level == "sample" else ForgetSet(steps={4, 11})
    checks = checked(run, forget)
    exact = signal(run, forget, replay(run, forget, keep=keep_for(checks)), checks)
    assert exact["defect_ratio"] < 1e-10 and len(exact["check_steps"]) == 6
    assert all(r["correction"] > 0 for r in exact["per_step"] if r["step"] in forget.affected(run))
    did_nothing = signal(run, forget, nothing(run, forget, checks), checks)
    assert did_nothing["defect_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert did_nothing["forget_loss"]["delta"] == 0 and did_nothing["retain_loss"]["delta"] == 0
    assert exact["forget_loss"]["samples"] > 0 and exact["retain_loss"]["samples"] > 0


def test_signal_orders_methods_like_the_true_residual() -> None:
    """ggn < diag in both the spot check and the residual vs retraining, and the exact Hessian below
    both; over eight methods the rank correlation is high (measured 0.90 on this run)."""
    run = mlp_run(SGDRule(momentum=0.5))
    forget = ForgetSet(sample_ids={3, 17})
    checks = checked(run, forget)
    keep = keep_for(checks)

    def lm(hvp: str) -> SweepResult:
        return propagate(run, forget, PropagationSettings(K=10_000, operator=OperatorSettings(hvp=hvp, rank=2, refresh=5)), keep=keep)

    results = {"replay": replay(run, forget, keep=keep), "replay f=0.5": replay(run, forget, fraction=0.5, keep=keep),
               "exact": lm("exact"), "ggn": lm("ggn"), "diag": lm("diag"), "lowrank": lm("lowrank"),
               "rollback": rollback(run, forget, keep=keep), "nothing": nothing(run, forget, checks)}
    true = {k: residual(run, forget, r) for k, r in results.items()}
    seen = {k: signal(run, forget, r, checks)["defect_ratio"] for k, r in results.items()}
    assert seen["exact"] < seen["ggn"] < seen["diag"] < 1 and true["exact"] < true["ggn"] < true["diag"] < 1
    assert seen["replay f=0.5"] > 0.05  # control-variate replay is not exact, and the check sees it
    names = list(results)
    rank = lambda xs: torch.tensor([sorted(xs).index(x) for x in xs], dtype=torch.float64)  # noqa: E731
    a, b = rank([true[k] for k in names]), rank([seen[k] for k in names])
    spearman = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert spearman > 0.8, (true, seen)


def test_keeping_states_leaves_the_closed_form_result_unchanged() -> None:
    """Kept steps are taken out of ekfac's closed-form windows: exact for a fixed curvature, so the
    correction is the same to rounding."""
    run = mlp_run(SGDRule(momentum=0.5))
    forget = ForgetSet(sample_ids={3})
    settings = PropagationSettings(K=10_000, operator=OperatorSettings(hvp="ekfac", refresh=6, anchor_fraction=1.0))
    checks = checked(run, forget)
    plain, kept = propagate(run, forget, settings), propagate(run, forget, settings, keep=keep_for(checks))
    torch.testing.assert_close(kept.delta, plain.delta, rtol=0, atol=1e-10)
    assert set(kept.kept) == set(keep_for(checks)) and not plain.kept


def test_adamw_exact_replay_reads_zero_and_propagation_is_checked_with_its_moments() -> None:
    run = mlp_run(AdamWRule(weight_decay=0.01), lr=0.01)
    forget = ForgetSet(sample_ids={5})
    checks = checked(run, forget, s=4)
    assert signal(run, forget, replay(run, forget, keep=keep_for(checks)), checks)["defect_ratio"] < 1e-10
    lm = propagate(run, forget, PropagationSettings(K=10_000, operator=OperatorSettings(hvp="ggn")), keep=keep_for(checks))
    assert set(lm.kept[checks[0]][1]) == {"exp_avg", "exp_avg_sq"}
    quality = signal(run, forget, lm, checks)
    assert 0 < quality["defect_ratio"] < 1 and quality["non_finite_steps"] == []


def test_a_correction_carried_past_the_window_is_checked_too() -> None:
    """Batch-level rollback of consecutive steps is exact inside its window (each removed step's
    update is taken back); its error is in carrying that unchanged to the end, which the check sees."""
    run = mlp_run(SGDRule(momentum=0.5))
    forget = ForgetSet(steps={4, 5})
    checks = checked(run, forget)
    assert max(checks) > 6  # steps past the window are sampled
    result = rollback(run, forget, keep=keep_for(checks))
    quality = signal(run, forget, result, checks)
    assert quality["strata"]["affected"]["ratio"] < 1e-12  # exact inside the window
    assert quality["defect_ratio"] > 0.5 and residual(run, forget, result) > 0.5
    exact = propagate(run, forget, PropagationSettings(K=10_000, damping=0.0, operator=OperatorSettings(hvp="exact")),
                      keep=keep_for(checks))
    # propagation with the exact Hessian (linearised, so not exact on an MLP: residual 0.30) reads 0.10
    assert signal(run, forget, exact, checks)["defect_ratio"] < 0.2 * quality["defect_ratio"]


def test_stability_reading_flags_the_run_at_the_edge_of_stability() -> None:
    """ggn and krylov clip η·λ > 1.9 along v at no step at lr 0.1, where they land 0.21 / 0.32 from
    retraining, and at 12–13 of 15 steps at lr 1.0, where both land at 1.00 (no better than doing
    nothing): the reading separates the two, and the report says so."""
    forget = ForgetSet(sample_ids={3, 7})
    for lr, edge in ((0.1, False), (1.0, True)):
        run = mlp_run(SGDRule(), lr=lr)
        for hvp in ("ggn", "krylov"):
            result = propagate(run, forget, PropagationSettings(K=800, operator=OperatorSettings(hvp=hvp, refresh=4)))
            reading = stability_reading(result)
            assert reading is not None and reading["steps"] == result.window[1] - result.window[0] == 15
            assert reading["edge_of_stability"] is edge, (lr, hvp, reading)
            assert reading["clipped_steps"] >= 12 if edge else reading["clipped_steps"] == 0
            res = residual(run, forget, result)
            assert res > 0.9 if edge else res < 0.4, (lr, hvp, res)
            quality = signal(run, forget, result, checked(run, forget))
            assert quality["stability"] == reading
            text = " ".join(quality_lines(quality, "lmcleaner", hvp))
            assert ("edge of stability, where no linearised correction is reliable" in text) is edge
            assert ("use --method replay" in text) is edge and ("not at the edge of stability" in text) is not edge
            # --check-steps 0: no spot check, and the reading is still shown
            lines = quality_lines({"check_steps": [], "defect_ratio": None, "stability": reading}, "lmcleaner", hvp)
            assert lines[0].startswith("quality: no spot check") and lines[1].startswith(("stability:", "[red]stability:"))


@pytest.mark.parametrize("settings", [PropagationSettings(K=800, operator=OperatorSettings(hvp="lowrank")),
                                      PropagationSettings(K=800, operator=OperatorSettings(hvp="exact")),
                                      PropagationSettings(K=800, stabilize=False)])
def test_no_stability_reading_where_clips_measure_the_operator_or_nothing_is_clipped(settings: PropagationSettings) -> None:
    """lowrank's clips measure its own estimate, the exact Hessian is never clipped, nor is anything without the stabiliser."""
    run = mlp_run(SGDRule(), lr=0.1)
    result = propagate(run, ForgetSet(sample_ids={3, 7}), settings)
    assert result.stability_steps is None and stability_reading(result) is None
    assert signal(run, ForgetSet(sample_ids={3, 7}), result, [])["stability"] is None
    assert not any("stability" in line for line in quality_lines({"check_steps": [], "stability": None}))
