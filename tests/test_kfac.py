"""K-FAC / EK-FAC (lmclean.curvature.kfac) against dense GGNs on tiny float64 models.

K-FAC is an approximation, so the dense comparisons are on the cases where it is exact (a linear
layer with squared loss and equal weights; a linear layer with cross-entropy and one predicted
token); elsewhere the tests check its defining structure: S M A from the factors, and EK-FAC's
eigenvalues equal to the GGN's diagonal in the Kronecker eigenbasis. Tolerances: rtol 1e-10 /
atol 1e-12 × max|reference|, float64 rounding of different programs (measured ~1e-15).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from curvature_cases import Built, build_llama, built, random_like
from lmclean.curvature import flatten, kronecker_curvature, unflatten
from lmclean.objective import CausalLMObjective, Params, SquaredErrorObjective


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-12 * expected.abs().max().item())


def dense(curv, params: Params) -> Tensor:  # noqa: ANN001
    """The operator's (P, P) matrix, column by column."""
    P = flatten(params).numel()
    eye = torch.eye(P, dtype=torch.float64)
    return torch.stack([flatten(curv.matvec(unflatten(eye[i], params))) for i in range(P)], dim=1)


class OneHotLM(torch.nn.Module):
    """logits = Linear(one_hot(token)): a causal 'LM' whose only parameters are one Linear layer."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.head = torch.nn.Linear(vocab, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.nn.functional.one_hot(input_ids, self.vocab).to(self.head.weight.dtype)))


def one_layer_ce(lengths: list[int], seed: int = 0) -> Built:
    torch.manual_seed(seed)
    model = OneHotLM(5).double()
    lens = torch.tensor(lengths)
    ids = torch.randint(0, 5, (len(lengths), max(lengths)))
    weights = torch.rand(len(lengths), dtype=torch.float64) + 0.2  # unequal, as recorded steps have
    obj = CausalLMObjective(model, ids, lens, weights)
    return Built(obj, {k: v.detach().clone() for k, v in model.named_parameters()})


@pytest.mark.parametrize("correct", [False, True], ids=["kfac", "ekfac"])
def test_exact_for_a_linear_layer_with_squared_loss(correct: bool) -> None:
    """G = Σ_n w_n ã ãᵀ ⊗ I and K-FAC = mean(ã ãᵀ) ⊗ (Σ_n w_n) I: equal for equal weights."""
    b = built("linear")
    close(dense(kronecker_curvature(b.obj, b.params, eigen_correction=correct), b.params), b.ggn)


@pytest.mark.parametrize("correct", [False, True], ids=["kfac", "ekfac"])
def test_exact_for_one_predicted_token_with_cross_entropy(correct: bool) -> None:
    """One example, one predicted token: G = ã ãᵀ ⊗ c (diag p − ppᵀ) is one Kronecker product."""
    b = one_layer_ce([2, 1])  # the second sample predicts nothing (length 1): no rows, no terms
    curv = kronecker_curvature(b.obj, b.params, eigen_correction=correct, mc_samples=None)
    close(dense(curv, b.params), b.ggn)


def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_kronecker_basis() -> None:
    """Three samples of one token each: K-FAC is no longer exact, EK-FAC's eigenvalues are
    diag(Qᵀ G Q) for Q = Q_A ⊗ Q_S, so EK-FAC is closer to G than K-FAC (Frobenius)."""
    b = one_layer_ce([2, 2, 2])
    kfac = kronecker_curvature(b.obj, b.params, mc_samples=None)
    ekfac = kronecker_curvature(b.obj, b.params, eigen_correction=True, mc_samples=None)
    (block,) = ekfac.blocks
    Q = torch.kron(block.QA, block.QS)  # (P, P): columns are vec(Q_S e_j e_kᵀ Q_Aᵀ), column stacking
    perm = torch.cat([torch.arange(block.S.shape[0] * 5).view(-1, 5).T.reshape(-1),  # params: W row-major, then b
                      torch.arange(block.S.shape[0]) + 5 * block.S.shape[0]])  # → vec([W | b]) column-major
    G = b.ggn[perm][:, perm]
    close(torch.diagonal(Q.T @ G @ Q), block.eigvals.T.reshape(-1))
    gap_k = torch.linalg.matrix_norm(dense(kfac, b.params) - b.ggn)
    gap_e = torch.linalg.matrix_norm(dense(ekfac, b.params) - b.ggn)
    assert gap_e < gap_k and gap_k > 0.01 * torch.linalg.matrix_norm(b.ggn), (float(gap_e), float(gap_k))


def test_product_is_the_kronecker_factors_product() -> None:
    """Structure on an MLP (not exact there): each block's product is S M A from its own factors, A
    is the mean of ã ãᵀ over the layer's inputs, and the last layer's S is (Σ w) I for squared error."""
    b = built("mlp")
    curv = kronecker_curvature(b.obj, b.params)
    v = random_like(b.params, 0)
    out = curv.matvec(v)
    assert [blk.weight for blk in curv.blocks] == ["0.weight", "2.weight"] and not curv.diagonal
    for blk in curv.blocks:
        M = torch.cat([v[blk.weight], v[blk.bias][:, None]], dim=1)
        got = torch.cat([out[blk.weight], out[blk.bias][:, None]], dim=1)
        close(got, blk.S @ M @ blk.A)
    x = torch.cat([b.obj.inputs, torch.ones(len(b.obj.inputs), 1, dtype=torch.float64)], dim=1)  # (B, 4)
    close(curv.blocks[0].A, x.T @ x / len(x))
    close(curv.blocks[1].S, b.obj.weights.sum() * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("correct", [False, True], ids=["kfac", "ekfac"])
def test_exact_for_an_embedding_with_squared_loss(correct: bool) -> None:
    """y = E[id]: G = Σ_n w_n e_id e_idᵀ ⊗ I = diag(token frequencies) ⊗ (Σ w) I for equal weights."""
    torch.manual_seed(3)
    model = torch.nn.Embedding(4, 3).double()
    ids = torch.tensor([0, 2, 2, 3, 0])  # token 1 unseen: zero curvature on its row
    obj = SquaredErrorObjective(model, ids, torch.randn(5, 3, dtype=torch.float64), torch.full((5,), 0.2, dtype=torch.float64))
    b = Built(obj, {k: v.detach().clone() for k, v in model.named_parameters()})
    curv = kronecker_curvature(b.obj, b.params, eigen_correction=correct)
    assert [blk.weight for blk in curv.blocks] == ["weight"] and not curv.diagonal
    close(dense(curv, b.params), b.ggn)


def test_llama_covers_every_linear_and_is_symmetric_psd() -> None:
    """Attention/MLP projections, the LM head and the (untied) embedding are Kronecker blocks; norm
    weights get the diagonal GGN; the operator is symmetric PSD and reproducible from its seed."""
    obj, params = build_llama()
    curv = kronecker_curvature(obj, params, eigen_correction=True, generator=torch.Generator().manual_seed(0))
    layers = {f"{n}.weight" for n, m in obj.model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert {blk.weight for blk in curv.blocks} == layers and {"lm_head.weight", "model.embed_tokens.weight"} <= layers
    assert set(curv.diagonal) == set(params) - layers and all("norm" in k for k in curv.diagonal)
    u, v = random_like(params, 1), random_like(params, 2)
    Ku, Kv = flatten(curv.matvec(u)), flatten(curv.matvec(v))
    close(torch.dot(flatten(v), Ku), torch.dot(flatten(u), Kv))
    assert torch.dot(flatten(u), Ku) > 0
    again = kronecker_curvature(obj, params, eigen_correction=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flatten(again.matvec(u)), Ku)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_window_in_the_eigenbasis_equals_step_by_step_products(momentum: float) -> None:
    b = built("mlp")
    curv = kronecker_curvature(b.obj, b.params, eigen_correction=True)
    v, m = random_like(b.params, 3), random_like(b.params, 4)
    lrs, shift = [0.3, 0.1, 0.2, 0.05, 0.3], 0.01
    ev, em = flatten(v), flatten(m)
    for eta in lrs:
        d = flatten(curv.matvec(unflatten(ev, b.params))) + shift * ev
        if momentum:
            em = momentum * em + d
            ev = ev - eta * em
        else:
            ev = ev - eta * d
    got_v, got_m, capped = curv.propagate(v, m if momentum else None, lrs, momentum, shift)
    close(flatten(got_v), ev)
    if momentum:
        close(flatten(got_m), em)
    assert capped == 0


def test_window_cap_keeps_sgd_non_expansive() -> None:
    """η·λ above 2 flips and grows a direction; the cap (the stabiliser's bound) keeps ‖v‖ from growing."""
    b = built("mlp")
    curv = kronecker_curvature(b.obj, b.params)
    top = max(float(lam.max()) for lam in curv.eigenvalues())
    v = random_like(b.params, 5)
    eta = 5.0 / top  # η·λmax = 5
    grown, _, _ = curv.propagate(v, None, [eta] * 20)
    capped_v, _, capped = curv.propagate(v, None, [eta] * 20, max_step=1.9)
    assert torch.linalg.vector_norm(flatten(grown)) > 100 * torch.linalg.vector_norm(flatten(v))
    assert torch.linalg.vector_norm(flatten(capped_v)) <= torch.linalg.vector_norm(flatten(v)) and capped == 20
