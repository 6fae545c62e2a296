"""Tiny float64 problems and dense curvature references for tests/test_curvature.py.

Each case builds (objective, params); the dense matrices are computed once per case from
torch.func on the flattened parameter vector, independently of lmclean.curvature's products.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lmclean.curvature import flatten, unflatten
from lmclean.objective import CausalLMObjective, Objective, Params, SquaredErrorObjective, loss_of
from lmclean.optim import SGDRule
from lmclean.unlearn import InMemoryTrajectory


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[Objective, Params]]
    linear: bool  # outputs linear in θ: then GGN == Hessian exactly
    rtol: float = 1e-6
    atol: float = 1e-10  # relative to max |reference|, so the bound does not depend on the vector's scale


def _params(model: torch.nn.Module) -> Params:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _regression(
    model: torch.nn.Module, d_in: int, d_out: int, dtype: torch.dtype
) -> tuple[Objective, Params]:
    model = model.to(dtype)
    x = torch.randn(5, d_in, dtype=dtype)  # (B, D_in)
    y = torch.randn(5, d_out, dtype=dtype)  # (B, D_out)
    w = torch.full((5,), 1 / 5, dtype=dtype)  # (B,) mean over samples
    return SquaredErrorObjective(model, x, y, w), _params(model)


def build_linear(dtype: torch.dtype = torch.float64) -> tuple[Objective, Params]:
    torch.manual_seed(0)
    return _regression(torch.nn.Linear(3, 2), 3, 2, dtype)


def build_mlp(dtype: torch.dtype = torch.float64) -> tuple[Objective, Params]:
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return _regression(mlp, 3, 2, dtype)


def build_llama() -> tuple[Objective, Params]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").double().eval()
    lengths = torch.tensor([6, 4, 3])  # (B,)
    ids = torch.randint(1, 11, (3, 6))  # (B, L)
    ids[torch.arange(6)[None, :] >= lengths[:, None]] = 0  # right padding
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # (B,)
    return CausalLMObjective(model, ids, lengths, weights), _params(model)


CASES = [
    Case("linear", build_linear, linear=True),
    Case("mlp", build_mlp, linear=False),
    # transformers' Llama runs RMSNorm and the eager softmax in float32 even after .double(), so the
    # loss is only float32-accurate: forward- and reverse-mode derivatives differ by ~1.4e-7 of the
    # largest entry (the dense torch.func Hessian itself is asymmetric by ~8e-8 of its largest entry).
    Case("llama", build_llama, linear=False, atol=1e-6),
]
CASE_IDS = [c.name for c in CASES]


@dataclass
class Built:
    obj: Objective
    params: Params

    @functools.cached_property
    def hessian(self) -> Tensor:
        """Dense ∇²L (P, P)."""
        theta = flatten(self.params)  # (P,)
        return torch.func.hessian(lambda t: loss_of(self.obj, unflatten(t, self.params)))(theta)

    @functools.cached_property
    def jacobian(self) -> Tensor:
        """Dense ∂ vec(outputs)/∂θ (N·C, P)."""
        theta = flatten(self.params)
        return torch.func.jacrev(lambda t: self.obj.outputs(unflatten(t, self.params)).reshape(-1))(theta)

    @functools.cached_property
    def output_hessian(self) -> Tensor:
        """Dense ∇²_out L (N·C, N·C) by autodiff of loss_from_outputs."""
        out = self.obj.outputs(self.params).detach()  # (N, C)
        return torch.func.hessian(lambda o: self.obj.loss_from_outputs(o.view(out.shape)))(out.reshape(-1))

    @functools.cached_property
    def ggn(self) -> Tensor:
        """Dense Jᵀ (∇²_out L) J (P, P)."""
        return self.jacobian.T @ self.output_hessian @ self.jacobian

    @functools.cached_property
    def grad(self) -> Tensor:
        """Dense ∇L (P,)."""
        theta = flatten(self.params)
        return torch.func.grad(lambda t: loss_of(self.obj, unflatten(t, self.params)))(theta)


@functools.cache
def built(name: str) -> Built:
    """The case's objective, params and lazily computed dense references, shared across tests."""
    case = next(c for c in CASES if c.name == name)
    return Built(*case.build())


def random_like(params: Params, seed: int) -> Params:
    """A reproducible Gaussian vector with params' layout."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def flatten_batch(a: Params) -> Tensor:
    """Params with a leading k dim → (k, P), rows in ``flatten``'s order."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in a.values()], dim=1)


def unflatten_batch(rows: Tensor, reference: Params) -> Params:
    """(k, P) → Params with a leading k dim on every entry (inverse of ``flatten_batch``)."""
    out: Params = {}
    i = 0
    for name, p in reference.items():
        out[name] = rows[:, i : i + p.numel()].reshape(len(rows), *p.shape)
        i += p.numel()
    return out


def run_of(model: torch.nn.Module, rule: SGDRule, n: int = 24, batch: int = 4, epochs: int = 3) -> InMemoryTrajectory:
    """A recorded float64 SGD run of `model` (5 inputs, 2 outputs) on random regression data."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    batches = [perm[i : i + batch] for perm in (torch.randperm(n, generator=g).tolist() for _ in range(epochs))
               for i in range(0, n, batch)]
    lrs = [0.3 * (1 - 0.5 * t / len(batches)) for t in range(len(batches))]
    model = model.double()
    theta0 = 0.5 * torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    return InMemoryTrajectory(model, X, Y, batches, lrs, rule, theta0)
