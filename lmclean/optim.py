"""Optimizer update rules on flat parameter vectors, shared by the trainer and by trajectory replay.

The trainer applies exactly these rules, so θ rebuilt from a checkpoint plus the stored gradients
is bitwise the trained θ for fp32 gradients. The rules mirror `torch.optim.SGD` / `AdamW`
(single-tensor path) op for op; tests compare them with torch.optim.

Parameter groups (the Hugging Face Trainer puts biases and norm weights in a group without weight
decay) are contiguous runs of the flat vector (`GroupRun`) with their own weight decay and a
learning-rate scale; the rule applies each run with its own scalars, as torch applies each group,
so the result stays bitwise. Betas, eps and momentum are shared by every group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lmclean.config import TrainConfig
from lmclean.errors import UnsupportedError

if TYPE_CHECKING:
    from lmclean.params import ParamManifest

State = dict[str, Tensor]


@dataclass(frozen=True)
class GroupRun:
    """Flat positions start..stop−1 belong to a parameter group with these scalars."""

    start: int
    stop: int
    weight_decay: float
    lr_scale: float = 1.0


def _runs_step(groups: tuple[GroupRun, ...], theta: Tensor, grad: Tensor, lr: float, state: State,
               step_index: int, one: "object") -> None:
    """Apply `one` (a rule without groups) to each run's views with the run's decay and lr."""
    import dataclasses

    for run in groups:
        sl = slice(run.start, run.stop)
        rule = dataclasses.replace(one, weight_decay=run.weight_decay, groups=())  # type: ignore[type-var]
        rule.step(theta[sl], grad[sl], lr if run.lr_scale == 1.0 else lr * run.lr_scale,
                  {k: v[sl] for k, v in state.items()}, step_index)


def _vector(groups: tuple[GroupRun, ...], size: int, field_name: str, default: float) -> Tensor | float:
    values = {getattr(run, field_name) for run in groups}
    if len(values) <= 1:
        return values.pop() if values else default
    out = torch.empty(size)
    for run in groups:
        out[run.start:run.stop] = getattr(run, field_name)
    return out


@dataclass(frozen=True)
class SGDRule:
    momentum: float = 0.0
    weight_decay: float = 0.0
    groups: tuple[GroupRun, ...] = ()  # empty: one group with `weight_decay` and lr scale 1

    name = "sgd"

    def state_names(self) -> list[str]:
        return ["momentum_buffer"] if self.momentum else []

    def init_state(self, theta: Tensor) -> State:
        return {n: torch.zeros_like(theta) for n in self.state_names()}

    def step(self, theta: Tensor, grad: Tensor, lr: float, state: State, step_index: int) -> None:
        """In place: θ ← θ − lr·d, d = g + λθ (or the momentum buffer of d). step_index counts from 0."""
        if self.groups:
            return _runs_step(self.groups, theta, grad, lr, state, step_index, self)
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
    groups: tuple[GroupRun, ...] = ()  # empty: one group with `weight_decay` and lr scale 1

    name = "adamw"

    def state_names(self) -> list[str]:
        return ["exp_avg", "exp_avg_sq"]

    def init_state(self, theta: Tensor) -> State:
        return {n: torch.zeros_like(theta) for n in self.state_names()}

    def step(self, theta: Tensor, grad: Tensor, lr: float, state: State, step_index: int) -> None:
        if self.groups:
            return _runs_step(self.groups, theta, grad, lr, state, step_index, self)
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


def decay_of(rule: UpdateRule, size: int) -> Tensor | float:
    """The weight decay of every flat position: a float when one group holds them all."""
    return _vector(rule.groups, size, "weight_decay", rule.weight_decay)


def lr_scale_of(rule: UpdateRule, size: int) -> Tensor | float:
    """The learning-rate scale of every flat position (1.0 without groups)."""
    return _vector(rule.groups, size, "lr_scale", 1.0)


def is_uniform(rule: UpdateRule) -> bool:
    """One weight decay and one learning rate for every parameter (the closed-form windows need it)."""
    return len({(g.weight_decay, g.lr_scale) for g in rule.groups}) <= 1 and all(g.lr_scale == 1.0 for g in rule.groups)


def make_rule(cfg: TrainConfig) -> UpdateRule:
    if cfg.optimizer == "sgd":
        return SGDRule(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return AdamWRule(beta1=cfg.betas[0], beta2=cfg.betas[1], eps=cfg.eps, weight_decay=cfg.weight_decay)


def rule_from_dict(d: dict) -> UpdateRule:
    """Rebuild a rule from the optimizer description stored in the store's attributes."""
    groups = tuple(GroupRun(int(a), int(b), float(wd), float(sc)) for a, b, wd, sc in d.get("groups", []))
    if d["name"] == "sgd":
        return SGDRule(momentum=d["momentum"], weight_decay=d["weight_decay"], groups=groups)
    return AdamWRule(beta1=d["beta1"], beta2=d["beta2"], eps=d["eps"], weight_decay=d["weight_decay"], groups=groups)


def rule_to_dict(rule: UpdateRule) -> dict:
    if isinstance(rule, SGDRule):
        out = {"name": "sgd", "momentum": rule.momentum, "weight_decay": rule.weight_decay}
    else:
        out = {"name": "adamw", "beta1": rule.beta1, "beta2": rule.beta2, "eps": rule.eps, "weight_decay": rule.weight_decay}
    if rule.groups:
        out["groups"] = [[g.start, g.stop, g.weight_decay, g.lr_scale] for g in rule.groups]
    return out


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: factor = C / (‖g‖ + 1e-6), at most 1


def clip_factor(norm: float, max_norm: float | None) -> float:
    """The factor `clip_grad_norm_` scales a gradient of norm `norm` by (1.0: not clipped)."""
    if not max_norm:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


def clip_gradient(grad: Tensor, max_norm: float | None) -> Tensor:
    """g·min(1, C/(‖g‖ + ε)): what the recorded run applied in place of g (replay uses it)."""
    if not max_norm:
        return grad
    f = clip_factor(float(torch.linalg.vector_norm(grad)), max_norm)
    return grad * f if f < 1.0 else grad


def clip_tangent(dg: Tensor, applied: Tensor, norm: float, factor: float) -> Tensor:
    """The derivative of c(g) = g·C/(‖g‖ + ε) at the recorded g applied to a perturbation dg.

    dc = f·(dg − ĝ (ĝ·dg) ‖g‖/(‖g‖ + ε)), f = C/(‖g‖ + ε), ĝ = g/‖g‖, for a clipped step (f < 1);
    the identity otherwise. `applied` is the stored (clipped) gradient: same direction as g.
    """
    if factor >= 1.0:
        return dg
    n = float(torch.linalg.vector_norm(applied))
    if n == 0.0:
        return dg * factor
    unit = applied / n
    return factor * (dg - unit * (float(torch.dot(unit, dg)) * norm / (norm + CLIP_EPS)))


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


def rule_from_torch(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                    manifest: "ParamManifest | None" = None) -> UpdateRule:
    """The update rule of a `torch.optim.SGD` / `AdamW` (wrapped ones too: accelerate's
    `AcceleratedOptimizer`), or UnsupportedError.

    Groups may differ in weight decay and learning rate (as runs of the flat vector: `model` and
    `manifest` are needed then); the store records group 0's learning rate and each group's ratio
    to it. SGD dampening/nesterov/maximize and AdamW amsgrad/maximize have no replay rule.
    """
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and not isinstance(optimizer, (torch.optim.SGD, torch.optim.AdamW)):
        optimizer = inner
    supported = "torch.optim.AdamW (Trainer optim adamw_torch / adamw_torch_fused) or torch.optim.SGD (sgd)"
    if not isinstance(optimizer, (torch.optim.SGD, torch.optim.AdamW)):
        raise UnsupportedError(f"optimizer {type(optimizer).__name__} has no replay rule; use {supported}")
    groups = optimizer.param_groups
    shared = ("momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize")
    first = {k: groups[0].get(k) for k in shared}
    for g in groups[1:]:
        if {k: g.get(k) for k in shared} != first:
            raise UnsupportedError("parameter groups differ in betas, eps or momentum; only weight decay and the "
                                   "learning rate may differ between groups")
    if first["maximize"]:
        raise UnsupportedError("maximize=True has no replay rule; use a minimising optimizer")
    runs = _group_runs(groups, model, manifest)
    wd0 = float(groups[0]["weight_decay"])
    if isinstance(optimizer, torch.optim.SGD):
        if first["dampening"] or first["nesterov"]:
            raise UnsupportedError("SGD with dampening or nesterov has no replay rule; use momentum and weight_decay only")
        return SGDRule(momentum=float(first["momentum"]), weight_decay=wd0, groups=runs)
    if first["amsgrad"]:
        raise UnsupportedError("AdamW(amsgrad=True) has no replay rule")
    b1, b2 = first["betas"]
    return AdamWRule(beta1=float(b1), beta2=float(b2), eps=float(first["eps"]), weight_decay=wd0, groups=runs)


def _group_runs(groups: list[dict], model: torch.nn.Module | None, manifest: "ParamManifest | None") -> tuple[GroupRun, ...]:
    """() when every group shares weight decay and lr; else one run per maximal stretch of manifest
    entries in the same group."""
    lr0 = float(groups[0]["lr"])
    scalars = [(float(g["weight_decay"]), float(g["lr"]) / lr0 if lr0 else 1.0) for g in groups]
    if len(set(scalars)) == 1 and scalars[0][1] == 1.0:
        return ()
    if model is None or manifest is None:
        raise UnsupportedError("parameter groups with different weight decay or lr need the model and manifest: "
                               "pass them to rule_from_torch")
    group_of = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
    params = dict(model.named_parameters())
    runs: list[GroupRun] = []
    for e in manifest.entries:
        k = group_of.get(id(params[e.name]))
        if k is None:
            raise UnsupportedError(f"parameter {e.name} is trainable but in no optimizer group; freeze it "
                                   "(requires_grad=False) or give it to the optimizer")
        wd, scale = scalars[k]
        if runs and runs[-1].stop == e.offset and (runs[-1].weight_decay, runs[-1].lr_scale) == (wd, scale):
            runs[-1] = GroupRun(runs[-1].start, e.offset + e.numel, wd, scale)
        else:
            runs.append(GroupRun(e.offset, e.offset + e.numel, wd, scale))
    return tuple(runs)
