"""What one recorded step does besides θ − η·g: parameter groups and gradient clipping.

Groups (per-parameter weight decay, lr scale) keep the linear-quadratic recursion exact, so the
quadratic exactness test holds at 1e-8 with them. Clipping is nonlinear: its derivative (docs/
algorithm.md) is tested against finite differences, replay must stay exact, and propagation
with the derivative must beat propagation that ignores it by a wide margin.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmclean.optim import (AdamWRule, GroupRun, SGDRule, clip_factor, clip_gradient, clip_tangent, rule_from_dict,
                           rule_from_torch, rule_to_dict)
from lmclean.unlearn import ForgetSet, InMemoryTrajectory, OperatorSettings, PropagationSettings, propagate, replay, rollback

TOL = 1e-8
GROUPS = (GroupRun(0, 10, 0.05, 1.0), GroupRun(10, 12, 0.0, 0.5))  # Linear(5, 2): weight decays, bias does not


def make_run(rule: SGDRule | AdamWRule, max_grad_norm: float | None = None, lr: float = 0.3, seed: int = 0,
             epochs: int = 3, n: int = 24, batch: int = 4) -> InMemoryTrajectory:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
    model = torch.nn.Linear(5, 2).double()
    order = [torch.randperm(n, generator=g).tolist() for _ in range(epochs)]
    batches = [perm[i : i + batch] for perm in order for i in range(0, n, batch)]
    lrs = [lr * (1 - 0.5 * t / len(batches)) for t in range(len(batches))]
    theta0 = torch.randn(12, generator=g, dtype=torch.float64)
    return InMemoryTrajectory(model, X, Y, batches, lrs, rule, theta0, max_grad_norm=max_grad_norm)


def exact(K: int = 10_000) -> PropagationSettings:
    return PropagationSettings(K=K, damping=0.0, stabilize=False, operator=OperatorSettings(hvp="exact"))


def _named_params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(4, 3), (3,), (3, 2), (2,)]]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_groups_are_bitwise_torch_per_group(kind: str) -> None:
    """Two groups with their own weight decay (the Trainer's decay / no-decay split), interleaved
    in the flat order: the rule equals torch's single-tensor optimizer bitwise."""
    params = _named_params()
    model = torch.nn.Module()
    for k, p in enumerate(params):
        model.register_parameter(f"p{k}", p)
    from lmclean.params import ParamManifest, flat_params

    manifest = ParamManifest.from_model(model)
    decay, no_decay = [params[0], params[2]], [params[1], params[3]]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, foreach=False) if kind == "sgd"
           else torch.optim.AdamW(groups, lr=0.1, foreach=False))
    rule = rule_from_torch(opt, model, manifest)
    assert len(rule.groups) == 4 and rule_from_dict(rule_to_dict(rule)) == rule
    theta = flat_params(model, manifest).clone()
    state = rule.init_state(theta)
    for t in range(12):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + t)) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        lr = 0.1 * (1 + t) / 12
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        rule.step(theta, torch.cat([gr.reshape(-1) for gr in grads]), lr, state, t)
    assert torch.equal(theta, flat_params(model, manifest))


def test_group_lr_ratio_is_recorded_and_replayed() -> None:
    params = _named_params()
    model = torch.nn.Module()
    for k, p in enumerate(params):
        model.register_parameter(f"p{k}", p)
    from lmclean.params import ParamManifest

    opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1)
    rule = rule_from_torch(opt, model, ParamManifest.from_model(model))
    assert [(g.start, g.stop, g.lr_scale) for g in rule.groups] == [(0, 15, 1.0), (15, 23, 0.5)]
    with pytest.raises(Exception, match="model and manifest"):
        rule_from_torch(opt)


@pytest.mark.parametrize("rule", [SGDRule(groups=GROUPS), SGDRule(momentum=0.9, weight_decay=0.05, groups=GROUPS)],
                         ids=["sgd", "momentum"])
def test_groups_keep_quadratic_exactness(rule: SGDRule) -> None:
    run = make_run(rule)
    forget = {3, 17}
    retrained = run.run(exclude=forget)[0][-1]
    assert torch.linalg.vector_norm(retrained - run.thetas[-1]) > 1e-2
    res = propagate(run, ForgetSet(sample_ids=forget), exact())
    torch.testing.assert_close(run.thetas[-1] + res.delta, retrained, rtol=0, atol=TOL)
    torch.testing.assert_close(run.thetas[-1] + replay(run, ForgetSet(sample_ids=forget)).delta, retrained, rtol=0, atol=TOL)
    # a half-right implementation (one weight decay, no lr scale for the bias group) is far off
    flat = dataclasses.replace(rule, groups=())
    wrong = make_run(flat)
    wrong.thetas = run.thetas  # same recorded points, wrong update rule in the propagation
    off = run.thetas[-1] + propagate(wrong, ForgetSet(sample_ids=forget), exact()).delta
    assert torch.linalg.vector_norm(off - retrained) > 1e4 * TOL


def test_clip_tangent_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(40, generator=g, dtype=torch.float64) * 3  # ‖g‖ ≈ 19
    C = 2.0
    norm = float(torch.linalg.vector_norm(grad))
    f = clip_factor(norm, C)
    assert f < 1
    applied = clip_gradient(grad, C)
    dg = torch.randn(40, generator=g, dtype=torch.float64)
    h = 1e-6
    fd = (clip_gradient(grad + h * dg, C) - clip_gradient(grad - h * dg, C)) / (2 * h)
    torch.testing.assert_close(clip_tangent(dg, applied, norm, f), fd, rtol=1e-7, atol=1e-9)
    # the projection matters: dropping it (dg·f) is off by the radial component
    assert torch.linalg.vector_norm(dg * f - fd) > 1e-2 * torch.linalg.vector_norm(fd)
    # not clipped: identity
    small = grad / 100
    assert clip_factor(float(torch.linalg.vector_norm(small)), C) == 1.0
    assert torch.equal(clip_tangent(dg, small, float(torch.linalg.vector_norm(small)), 1.0), dg)


def test_clipped_run_replay_is_exact_and_propagation_uses_the_derivative() -> None:
    """Every step of this run clips (‖g‖ ≫ C). Replay re-clips at the counterfactual's own norm:
    exact. Propagation through the linearised clip is second-order accurate (measured: residual
    0.063 of the change; 0.41 with batches of 4, where one sample is a quarter of the step);
    ignoring the clip's derivative is 4.2 — worse than doing nothing."""
    C = 0.5
    run = make_run(SGDRule(), max_grad_norm=C, lr=0.1, n=96, batch=24)
    assert all(run.batch(t).clip < 1 for t in range(run.n_steps))
    forget = {5}
    retrained = run.run(exclude=forget)[0][-1]
    change = float(torch.linalg.vector_norm(retrained - run.thetas[-1]))
    assert change > 1e-3
    torch.testing.assert_close(run.thetas[-1] + replay(run, ForgetSet(sample_ids=forget)).delta, retrained, rtol=0, atol=TOL)
    good = float(torch.linalg.vector_norm(run.thetas[-1] + propagate(run, ForgetSet(sample_ids=forget), exact()).delta - retrained))

    class NoClipInfo(InMemoryTrajectory):  # the same run, but the engine is told no step clipped
        def batch(self, t: int):  # noqa: ANN201
            return dataclasses.replace(super().batch(t), clip=1.0)

    blind = NoClipInfo.__new__(NoClipInfo)
    blind.__dict__.update(run.__dict__)
    bad = float(torch.linalg.vector_norm(run.thetas[-1] + propagate(blind, ForgetSet(sample_ids=forget), exact()).delta - retrained))
    assert good < 0.1 * change, (good, change)
    assert bad > 5 * good, (good, bad)
    roll = rollback(run, ForgetSet(sample_ids=forget)).delta
    assert roll.abs().sum() > 0


def test_store_keeps_label_masks_and_clip_factors(tmp_path) -> None:  # noqa: ANN001
    """A Trainer-style step (labels −100 on a prompt, a clipped gradient) survives the store, and
    the objective rebuilt from it weighs only the target tokens."""
    from lmclean.objective import CausalLMObjective
    from lmclean.params import ParamManifest
    from lmclean.store import TrajectoryStore
    from lmclean.train.recorder import Recorder

    model = torch.nn.Linear(2, 4)
    rec = Recorder.create(tmp_path / "s.zarr", manifest=ParamManifest.from_model(model), rule=SGDRule(), planned_steps=1,
                          batch_size=2, max_length=5, checkpoint_every=1, sample_ids=[7, 8],
                          fingerprints=["00" * 32] * 2, max_grad_norm=1.0, label_mask=True)
    ids = torch.tensor([[5, 1, 0, 3, 2], [4, 2, 2, 0, 0]])
    mask = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    rec.record_step(0, lr=0.1, loss=1.0, sample_ids=[7, 8], weights=[0.6, 0.4], input_ids=ids,
                    lengths=torch.tensor([5, 3]), grad=torch.ones(12) * 0.1, theta=torch.zeros(12), opt_state={},
                    loss_mask=mask, grad_norm=3.0, clip=0.25)
    rec.close(1, torch.zeros(12), {})
    step = TrajectoryStore(tmp_path / "s.zarr").step(0)
    assert step.clip == 0.25 and step.grad_norm == 3.0
    assert step.tokens.tolist() == [[5, 1, 0, 3, 2], [4, 2, 2, 0, 0]]
    assert step.loss_mask.tolist() == mask.tolist()
    obj = CausalLMObjective(model, ids, torch.tensor([5, 3]), torch.tensor([0.6, 0.4]), mask)
    # targets: sample 0 positions 2, 3, 4 (3 tokens); sample 1 positions 1, 2 (2 tokens)
    assert obj._targets.tolist() == [0, 3, 2, 2, 2]
    assert obj._coef.tolist() == pytest.approx([0.2, 0.2, 0.2, 0.2, 0.2])
    with pytest.raises(Exception, match="loss_mask"):
        rec2 = Recorder.create(tmp_path / "t.zarr", manifest=ParamManifest.from_model(model), rule=SGDRule(),
                               planned_steps=1, batch_size=2, max_length=5, checkpoint_every=1, sample_ids=[7, 8],
                               fingerprints=["00" * 32] * 2, label_mask=True)
        try:
            rec2.record_step(0, lr=0.1, loss=1.0, sample_ids=[7, 8], weights=[0.5, 0.5], input_ids=ids,
                             lengths=torch.tensor([5, 3]), grad=torch.ones(12), theta=torch.zeros(12), opt_state={})
        finally:
            rec2.abort()
