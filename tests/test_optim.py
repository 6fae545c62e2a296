"""The flat-vector update rules (shared by the trainer and the replay) against torch.optim.

Bitwise (torch.equal) against the single-tensor implementations (foreach=False) over 20 steps with a
varying learning rate; within a stated tolerance against the foreach implementation.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmclean.config import TrainConfig
from lmclean.errors import UnsupportedError
from lmclean.optim import (AdamWRule, SGDRule, lr_at, make_rule, rule_from_dict, rule_from_torch,
                                 rule_to_dict)

SHAPES = [(7, 5), (5,), (3, 4, 2), (1,)]
STEPS = 20


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * (0.5 + step % 3) for s in SHAPES]


def _lr(step: int) -> float:
    return 0.1 * (1 + math.cos(math.pi * step / STEPS)) / 2 + 1e-3  # varies every step


def _run_torch(make_opt, steps: int = STEPS) -> tuple[torch.Tensor, torch.optim.Optimizer, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(p.clone()) for p in _params()]
    opt = make_opt(params)
    for t in range(steps):
        for p, g in zip(params, _grads(t)):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = _lr(t)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params]), opt, params


def _run_rule(rule, steps: int = STEPS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    theta = torch.cat([p.reshape(-1) for p in _params()])
    state = rule.init_state(theta)
    for t in range(steps):
        rule.step(theta, torch.cat([g.reshape(-1) for g in _grads(t)]), _lr(t), state, t)
    return theta, state


def _flat_state(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], name: str) -> torch.Tensor:
    return torch.cat([opt.state[p][name].reshape(-1) for p in params])


@pytest.mark.parametrize("momentum,wd", [(0.9, 0.01), (0.0, 0.0), (0.5, 0.0), (0.0, 0.05)])
def test_sgd_rule_matches_torch_sgd_bitwise(momentum: float, wd: float) -> None:
    ref, opt, params = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, weight_decay=wd, foreach=False))
    theta, state = _run_rule(SGDRule(momentum=momentum, weight_decay=wd))
    assert torch.equal(theta, ref)
    if momentum:
        assert torch.equal(state["momentum_buffer"], _flat_state(opt, params, "momentum_buffer"))


@pytest.mark.parametrize("wd,betas", [(0.01, (0.9, 0.999)), (0.0, (0.8, 0.95)), (0.1, (0.0, 0.5))])
def test_adamw_rule_matches_torch_adamw_bitwise(wd: float, betas: tuple[float, float]) -> None:
    ref, opt, params = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=betas, eps=1e-8, weight_decay=wd, foreach=False))
    theta, state = _run_rule(AdamWRule(beta1=betas[0], beta2=betas[1], eps=1e-8, weight_decay=wd))
    assert torch.equal(theta, ref)
    assert torch.equal(state["exp_avg"], _flat_state(opt, params, "exp_avg"))
    assert torch.equal(state["exp_avg_sq"], _flat_state(opt, params, "exp_avg_sq"))


# The foreach (multi-tensor) kernels may fuse or reorder float ops; over 20 steps the drift we
# accept is rtol 1e-6 / atol 1e-7 (a few float32 ulps at |θ| ~ 1).
FOREACH_TOL = dict(rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("foreach", [None, True])
def test_rules_match_default_and_foreach_torch_within_tolerance(name: str, foreach: bool | None) -> None:
    if name == "sgd":
        ref, _, _ = _run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=foreach))
        theta, _ = _run_rule(SGDRule(momentum=0.9, weight_decay=0.01))
    else:
        ref, _, _ = _run_torch(lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.01, foreach=foreach))
        theta, _ = _run_rule(AdamWRule(weight_decay=0.01))
    torch.testing.assert_close(theta, ref, **FOREACH_TOL)


def test_rule_dict_round_trip_and_make_rule() -> None:
    for rule in [SGDRule(0.9, 0.01), SGDRule(), AdamWRule(0.8, 0.9, 1e-6, 0.1)]:
        assert rule_from_dict(rule_to_dict(rule)) == rule
    assert make_rule(TrainConfig(optimizer="sgd", momentum=0.5, weight_decay=0.1)) == SGDRule(0.5, 0.1)
    assert make_rule(TrainConfig(optimizer="adamw", betas=[0.8, 0.9], eps=1e-6, weight_decay=0.2)) == AdamWRule(0.8, 0.9, 1e-6, 0.2)
    assert SGDRule().state_names() == [] and SGDRule(0.9).state_names() == ["momentum_buffer"]


def test_rule_from_torch_reads_hyperparameters_and_refuses_what_cannot_be_replayed() -> None:
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert rule_from_torch(torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01)) == SGDRule(0.9, 0.01)
    assert rule_from_torch(torch.optim.AdamW(p, lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.2)) == AdamWRule(0.8, 0.9, 1e-6, 0.2)
    with pytest.raises(UnsupportedError, match="nesterov"):
        rule_from_torch(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(UnsupportedError, match="amsgrad"):
        rule_from_torch(torch.optim.AdamW(p, lr=0.1, amsgrad=True))
    with pytest.raises(UnsupportedError, match="Adagrad"):
        rule_from_torch(torch.optim.Adagrad(p, lr=0.1))
    two_groups = torch.optim.SGD([{"params": p}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2}], lr=0.1)
    with pytest.raises(UnsupportedError, match="parameter groups"):
        rule_from_torch(two_groups)


def test_lr_schedules() -> None:
    T = 20
    warm = TrainConfig(lr=0.1, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(t, T, warm) for t in range(4)] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lr_at(4, T, warm) == pytest.approx(0.1)  # cosine starts at the peak
    assert lr_at(T, T, warm) == pytest.approx(0.01)  # and ends at lr * min_lr_ratio
    cos = [lr_at(t, T, warm) for t in range(4, T)]
    assert all(a > b for a, b in zip(cos, cos[1:]))
    lin = TrainConfig(lr=0.2, schedule="linear")
    assert lr_at(0, 10, lin) == pytest.approx(0.2) and lr_at(5, 10, lin) == pytest.approx(0.1)
    const = TrainConfig(lr=0.3, schedule="constant", warmup_steps=2)
    assert [lr_at(t, 10, const) for t in range(5)] == pytest.approx([0.15, 0.3, 0.3, 0.3, 0.3])
