"""Optimizer update rules on flat parameter vectors, shared by the trainer and by trajectory replay.

The trainer applies exactly these rules, so θ rebuilt from a checkpoint plus the stored gradients
is bitwise the trained θ for fp32 gradients. The rules mirror `torch.optim.SGD` / `AdamW`
(single-tensor path) op for op; tests compare them with torch.optim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lmclean.config import TrainConfig
from lmclean.errors import UnsupportedError

State = dict[str, Tensor]


@dataclass(frozen=True)
class SGDRule:
    momentum: float = 0.0
    weight_decay: float = 0.0

    name = "sgd"

    def state_names(self) -> list[str]:
        return ["momentum_buffer"] if self.momentum else []

    def init_state(self, theta: Tensor) -> State:
        return {n: torch.zeros_like(theta) for n in self.state_names()}

    def step(self, theta: Tensor, grad: Tensor, lr: float, state: State, step_index: int) -> None:
        """In place: θ ← θ − lr·d, d = g + λθ (or the momentum buffer of d). step_index counts from 0."""
        d = grad.add(theta, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum:
            buf = state["momentum_buffer"]
            if step_index == 0:
                buf.copy_(d)
            else:
                buf.mul_(self.momentum).add_(d)
            d = buf
        theta.add_(d, alpha=-lr)


@dataclass(frozen=True)
class AdamWRule:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    name = "adamw"

    def state_names(self) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def init_state(self, theta: Tensor) -> State:
        return {n: torch.zeros_like(theta) for n in self.state_names()}

    def step(self, theta: Tensor, grad: Tensor, lr: float, state: State, step_index: int) -> None:
        t = step_index + 1
        m, s = state["exp_avg"], state["exp_avg_sq"]
        theta.mul_(1 - lr * self.weight_decay)
        m.lerp_(grad, 1 - self.beta1)
        s.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        bias1 = 1 - self.beta1**t
        bias2_sqrt = math.sqrt(1 - self.beta2**t)
        denom = (s.sqrt() / bias2_sqrt).add_(self.eps)
        theta.addcdiv_(m, denom, value=-(lr / bias1))


UpdateRule = SGDRule | AdamWRule


def make_rule(cfg: TrainConfig) -> UpdateRule:
    if cfg.optimizer == "sgd":
        return SGDRule(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return AdamWRule(beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps, weight_decay=cfg.weight_decay)


def rule_from_dict(d: dict) -> UpdateRule:
    """Rebuild a rule from the optimizer description stored in the store's attributes."""
    if d["name"] == "sgd":
        return SGDRule(momentum=d["momentum"], weight_decay=d["weight_decay"])
    return AdamWRule(beta1=d["beta1"], beta2=d["beta2"], eps=d["eps"], weight_decay=d["weight_decay"])


def rule_to_dict(rule: UpdateRule) -> dict:
    if isinstance(rule, SGDRule):
        return {"name": "sgd", "momentum": rule.momentum, "weight_decay": rule.weight_decay}
    return {"name": "adamw", "beta1": rule.beta1, "beta2": rule.beta2, "eps": rule.eps, "weight_decay": rule.weight_decay}


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based) out of `total`: linear warmup, then the schedule."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1.0 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rule_from_torch(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The update rule of a `torch.optim.SGD` / `AdamW` (for the Recorder API), or UnsupportedError.

    The store records one learning rate per step, so every parameter group must share the
    hyperparameters; SGD dampening/nesterov/maximize and AdamW amsgrad/maximize have no replay rule.
    """
    groups = optimizer.param_groups
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "amsgrad", "maximize")
    first = {k: groups[0].get(k) for k in keys}
    for g in groups[1:]:
        if {k: g.get(k) for k in keys} != first:
            raise UnsupportedError("all parameter groups must share lr and hyperparameters to be recorded")
    if first["maximize"]:
        raise UnsupportedError("maximize=True has no replay rule; use a minimising optimizer")
    if isinstance(optimizer, torch.optim.SGD):
        if first["dampening"] or first["nesterov"]:
            raise UnsupportedError("SGD with dampening or nesterov has no replay rule; use momentum and weight_decay only")
        return SGDRule(momentum=float(first["momentum"]), weight_decay=float(first["weight_decay"]))
    if isinstance(optimizer, torch.optim.AdamW):
        if first["amsgrad"]:
            raise UnsupportedError("AdamW(amsgrad=True) has no replay rule")
        b1, b2 = first["betas"]
        return AdamWRule(beta1=float(b1), beta2=float(b2), eps=float(first["eps"]), weight_decay=float(first["weight_decay"]))
    raise UnsupportedError(f"optimizer {type(optimizer).__name__} has no replay rule; use torch.optim.SGD or torch.optim.AdamW")
