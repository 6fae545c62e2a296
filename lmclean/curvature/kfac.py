"""Kronecker-factored GGN (K-FAC) and its eigenvalue-corrected form (EK-FAC), from one anchor batch.

For an ``nn.Linear`` layer with weight W (d_out, d_in) and bias b, write M = [W | b] and ã = [a; 1].
K-FAC approximates the layer's GGN block by A ⊗ S on vec(M) (column stacking), i.e. G·M ≈ S M A, with

    A = mean of ã ãᵀ over the layer's input rows that reach the loss (no padding, no last token)
    S = Σ over output rows of g gᵀ, g = the gradient at the layer's output of one column of the
        output Hessian's square root pushed back through the network

("expand" K-FAC for weight sharing over sequence positions, Eschenhagen et al. 2023). The columns:
squared error's output Hessian w_n I factors exactly (one backward per output); softmax
cross-entropy's c_n (diag p − p pᵀ) = c_n E_y[(p − e_y)(p − e_y)ᵀ], y ~ softmax, so each backward
uses labels *sampled from the model* (Monte Carlo, unbiased for the GGN). Recorded labels would give
the empirical Fisher, which is not the GGN (the rank-1 `fisher` baseline shows how that does).
EK-FAC keeps K-FAC's eigenbasis Q_A ⊗ Q_S and replaces its eigenvalues by Σ_i (Q_Sᵀ Ĝ_i Q_A)², Ĝ_i
the per-sample gradients of the same backward passes: the exact diagonal of G in that basis when the
per-sample terms are exact (George et al. 2018).

An ``nn.Embedding`` is the linear layer Wᵀ onehot(token): its input factor is diagonal (token
frequencies), so it is a Kronecker block too, at the cost of a vector. Parameters of no block (norm
weights, a head tied to the embedding: one tensor in two layers fits no single Kronecker product,
any module called more than once per forward) get the *diagonal* GGN from the same passes: ĝ ⊙ ĝ,
ĝ the batch gradient of the sampled loss, is unbiased for diag(G) (samples independent, zero mean).
Identity-times-mean would shrink embedding rows of tokens the batch never holds, whose true
curvature is zero; the diagonal leaves them alone. The LM head is a Linear like any other: its S is
V × V, fine for the byte-level and small vocabularies here (a 32k vocabulary would need 4 GB).

Why not curvlinops' ``KFACLinearOperator``: its ``loss_func`` is an ``nn.MSELoss``/``CrossEntropyLoss``
with a uniform reduction and a fixed number of loss terms per example, while a recorded step's loss
weights each token by w_i / (len_i − 1) (fixed denominator, variable lengths) and differentiates
parameters given as a dict at θ[t] through ``Objective.outputs``; the hooks below need neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmclean.curvature._tree import check_like
from lmclean.curvature.closed_form import diagonal_recursion
from lmclean.errors import ConfigError
from lmclean.objective import CausalLMObjective, Objective, Params, SquaredErrorObjective

__all__ = ["KroneckerBlock", "KroneckerCurvature", "kronecker_curvature"]


@dataclass
class KroneckerBlock:
    """One layer y = M ã: factors, their eigenbases (columns), and the eigenvalues used (d_out, d_in').

    An ``nn.Embedding`` is the layer y = Wᵀ onehot(token): M = Wᵀ (``transposed``), and its input
    factor is diagonal (token frequencies), kept as a vector with the standard basis (QA None)."""

    weight: str
    bias: str | None
    A: Tensor  # (d_in', d_in') input factor, d_in' = d_in + 1 with a bias; (d_in,) when diagonal
    S: Tensor  # (d_out, d_out) output-gradient factor
    QA: Tensor | None  # (d_in', d_in'); None: A is diagonal, its basis the standard one
    QS: Tensor  # (d_out, d_out)
    eigvals: Tensor  # (d_out, d_in'): K-FAC eS_j·eA_k, or EK-FAC's corrections
    transposed: bool = False  # the parameter is stored as Mᵀ (embeddings: (vocab, d))

    def rotate(self, vec: Params) -> Tensor:
        """Coordinates Q_Sᵀ M Q_A (d_out, d_in') of the block's part of vec."""
        C = self.QS.T @ self._matrix(vec)
        return C if self.QA is None else C @ self.QA

    def unrotate(self, coords: Tensor, out: Params) -> None:
        """Write Q_S C Q_Aᵀ back into out's weight (and bias) entries."""
        M = self.QS @ (coords if self.QA is None else coords @ self.QA.T)  # (d_out, d_in')
        if self.transposed:
            out[self.weight] = M.T.contiguous()
            return
        d_in = self.A.shape[0] - (self.bias is not None)
        out[self.weight] = M[:, :d_in].contiguous()
        if self.bias is not None:
            out[self.bias] = M[:, d_in].contiguous()

    def _matrix(self, vec: Params) -> Tensor:
        W = vec[self.weight]  # (d_out, d_in); embeddings (d_in, d_out)
        if self.transposed:
            return W.T
        return torch.cat([W, vec[self.bias][:, None]], dim=1) if self.bias is not None else W


@dataclass
class KroneckerCurvature:
    """Block-diagonal curvature: Kronecker blocks for Linear layers, a diagonal for the rest.

    Every part is diagonal in a known orthonormal basis (Q_A ⊗ Q_S per block, the standard basis for
    the diagonal part), so products and whole windows of (I − η_t G) steps are cheap."""

    blocks: list[KroneckerBlock]
    diagonal: Params  # diagonal GGN of the parameters no block covers
    reference: Params  # keys, shapes, dtypes of the full parameter dict

    def to_eigenbasis(self, vec: Params) -> list[Tensor]:
        check_like(self.reference, vec)
        return [b.rotate(vec) for b in self.blocks] + [vec[k] for k in self.diagonal]

    def from_eigenbasis(self, coords: Sequence[Tensor]) -> Params:
        out: Params = {}
        for b, c in zip(self.blocks, coords):
            b.unrotate(c, out)
        for k, c in zip(self.diagonal, coords[len(self.blocks):]):
            out[k] = c
        return {k: out[k] for k in self.reference}  # the parameters' own key order

    def eigenvalues(self) -> list[Tensor]:
        return [b.eigvals for b in self.blocks] + list(self.diagonal.values())

    def matvec(self, vec: Params) -> Params:
        """G v with the Kronecker/diagonal approximation G."""
        return self.from_eigenbasis([lam * c for lam, c in zip(self.eigenvalues(), self.to_eigenbasis(vec))])

    def rescaled_along(self, vec: Params, gvec: Params, bounds: tuple[float, float] = (0.1, 100.0)) -> KroneckerCurvature:
        """A copy whose eigenvalues are scaled part by part (each block, each diagonal tensor) so that
        its quadratic form along ``vec`` equals vecᵀ(G vec) restricted to that part, ``gvec`` = G vec
        being one exact GGN product. Why: the traces agree but along a propagated correction the GGN's
        Rayleigh quotient is several times K-FAC's (benchmarks/README.md); the basis is kept. A part
        where either form is not positive keeps its scale; ratios are clipped to ``bounds``."""
        lo, hi = bounds

        def ratio(exact: Tensor, approx: Tensor) -> float:
            e, a = float(exact), float(approx)
            return min(hi, max(lo, e / a)) if e > 0 and a > 0 else 1.0

        blocks = []
        for b in self.blocks:
            coords = b.rotate(vec)  # (d_out, d_in')
            exact = sum((vec[k] * gvec[k]).sum() for k in (b.weight, b.bias) if k is not None)
            r = ratio(exact, (b.eigvals * coords * coords).sum())
            blocks.append(dataclasses.replace(b, eigvals=b.eigvals * r))
        diagonal = {k: d * ratio((vec[k] * gvec[k]).sum(), (d * vec[k] * vec[k]).sum()) for k, d in self.diagonal.items()}
        return KroneckerCurvature(blocks, diagonal, self.reference)

    def propagate(self, v: Params, m: Params | None, lrs: Sequence[float], momentum: float = 0.0,
                  shift: float = 0.0, max_step: float | None = None) -> tuple[Params, Params | None, int]:
        """Apply len(lrs) linearised SGD steps with this fixed curvature, in its eigenbasis.

        Per step: d = (G + shift·I) v;  m ← momentum·m + d (m is None without momentum);  v ← v − η m.
        G is diagonal in the basis and the momentum recursion acts coordinate-wise, so each
        eigen-direction follows its own 2×2 (1×1 without momentum) recursion: exact, two rotations
        for the whole window instead of one product per step. ``max_step`` caps η·λ per direction
        (the stabiliser's bound in this basis; None: no cap). Returns v, m and the number of steps
        in which some direction was capped."""
        cv = self.to_eigenbasis(v)
        cm = self.to_eigenbasis(m) if m is not None else None
        capped = diagonal_recursion(self.eigenvalues(), cv, cm, lrs, momentum, shift, max_step)
        return self.from_eigenbasis(cv), (self.from_eigenbasis(cm) if cm is not None else None), capped


def kronecker_curvature(obj: Objective, params: Params, *, eigen_correction: bool = False,
                        mc_samples: int | None = 1, generator: torch.Generator | None = None) -> KroneckerCurvature:
    """K-FAC (or EK-FAC with ``eigen_correction``) of obj's GGN at params, from one forward pass and
    one backward per output-Hessian column: ``mc_samples`` sampled labels for cross-entropy, or the
    exact columns with ``mc_samples=None`` (V backward passes; exact only when each sample has one
    output row). Squared error always uses its exact columns (one per output)."""
    model = getattr(obj, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"K-FAC needs an objective with a .model, got {type(obj).__name__}")
    # a parameter shared by two modules (a head tied to the embedding) fits no single Kronecker product
    uses: dict[int, int] = {}
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            uses[id(w)] = uses.get(id(w), 0) + 1
    layers: dict[str, tuple[str, str | None]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and uses[id(mod.weight)] == 1:
            w, b = (f"{name}.weight", f"{name}.bias") if name else ("weight", "bias")
            if w in params:
                layers[name] = (w, b if b in params and isinstance(mod, torch.nn.Linear) else None)
    inputs: dict[str, list[Tensor]] = {n: [] for n in layers}
    grads: dict[str, list[Tensor]] = {n: [] for n in layers}
    dtype = next(iter(params.values())).dtype  # autocast hands the hooks bf16 tensors: factors use θ's dtype

    def forward_hook(name: str):  # noqa: ANN202
        def hook(_mod: torch.nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            inputs[name].append(_like(args[0].detach(), dtype))
            if out.requires_grad:
                out.register_hook(lambda g: grads[name].append(_like(g.detach(), dtype)))
        return hook

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(forward_hook(n)) for n in layers]
    leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
    try:
        out = obj.outputs(leaves)  # (N, C)
        layers = {n: kb for n, kb in layers.items() if len(inputs[n]) == 1}  # called once: K-FAC applies
        columns = _output_columns(obj, out.detach(), mc_samples, generator)
        covered = {k for w, b in layers.values() for k in (w, b) if k is not None}
        rest = [k for k in params if k not in covered]
        diagonal = {k: torch.zeros_like(params[k]) for k in rest}
        for col in columns:
            # a backward through every parameter, so that each layer's output hook fires
            gs = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), col, retain_graph=True, allow_unused=True)))
            for k in rest:
                if gs[k] is not None:
                    diagonal[k] += gs[k].detach() ** 2
    finally:
        for h in handles:
            h.remove()
    blocks = []
    for n, (w, b) in layers.items():
        if isinstance(modules[n], torch.nn.Embedding):
            blocks.append(_embedding_block(obj, inputs[n][0], grads[n], w, modules[n].num_embeddings, eigen_correction))
        else:
            blocks.append(_block(obj, inputs[n][0], grads[n], w, b, eigen_correction))
    return KroneckerCurvature(blocks, diagonal, {k: p.detach() for k, p in params.items()})


def _embedding_block(obj: Objective, ids: Tensor, gs: list[Tensor], weight: str, vocab: int, correct: bool) -> KroneckerBlock:
    """An embedding as the linear layer Wᵀ onehot(id): A = diag(token frequencies over the rows that
    reach the loss), S as for any layer; EK-FAC's per-sample gradients are scattered by token id."""
    mask = _real_rows(obj, ids.shape).reshape(ids.shape[0], -1)  # (B, L); L = 1 for one id per sample
    ids = ids.reshape(ids.shape[0], -1)
    gs = [g.reshape(*ids.shape, -1) for g in gs]  # each (B, L, d)
    rows = ids[mask]  # (R,)
    A = torch.bincount(rows, minlength=vocab).to(gs[0].dtype) / mask.sum().clamp(min=1)  # (V,)
    S = sum(g[mask].T @ g[mask] for g in gs)  # (d, d)
    eS, QS = torch.linalg.eigh(S)
    if correct:
        B, d = ids.shape[0], S.shape[0]
        flat = (torch.arange(B, device=ids.device)[:, None] * vocab + ids)[mask]  # (R,) sample-major token slots
        lam = torch.zeros(vocab, d, dtype=S.dtype, device=S.device)
        for g in gs:
            per_sample = torch.zeros(B * vocab, d, dtype=S.dtype, device=S.device)
            per_sample.index_add_(0, flat, g[mask] @ QS)  # rows (i, token): Σ_p (Q_Sᵀ g_p) of sample i
            lam += per_sample.view(B, vocab, d).pow(2).sum(0)
        lam = lam.T  # (d, V)
    else:
        lam = torch.outer(eS.clamp(min=0), A)
    return KroneckerBlock(weight, None, A, S, None, QS, lam, transposed=True)


def _block(obj: Objective, a: Tensor, gs: list[Tensor], weight: str, bias: str | None, correct: bool) -> KroneckerBlock:
    """Factors, eigenbases and eigenvalues of one Linear from its input a (..., d_in) and the output
    gradients gs (one (..., d_out) per backward pass)."""
    mask = _real_rows(obj, a.shape[:-1])  # (...,) bool
    if bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)  # (..., d_in')
    a = a * mask[..., None].to(a.dtype)  # rows that do not reach the loss contribute nothing
    a_rows = a.reshape(-1, a.shape[-1])  # (R, d_in')
    A = a_rows.T @ a_rows / mask.sum().clamp(min=1)  # (d_in', d_in')
    S = sum(g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) for g in gs)  # (d_out, d_out)
    eA, QA = torch.linalg.eigh(A)
    eS, QS = torch.linalg.eigh(S)
    if correct:
        lam = torch.zeros(S.shape[0], A.shape[0], dtype=A.dtype, device=A.device)
        a_seq = a.reshape(a.shape[0], -1, a.shape[-1]) @ QA  # (B, R_i, d_in') rows of sample i, rotated
        for g in gs:
            g_seq = g.reshape(g.shape[0], -1, g.shape[-1]) @ QS  # (B, R_i, d_out)
            lam += torch.einsum("bro,bri->boi", g_seq, a_seq).pow(2).sum(0)  # Σ_i (Q_Sᵀ Ĝ_i Q_A)²
    else:
        lam = torch.outer(eS.clamp(min=0), eA.clamp(min=0))
    return KroneckerBlock(weight, bias, A, S, QA, QS, lam)


def _real_rows(obj: Objective, lead: torch.Size) -> Tensor:
    """Input rows that reach the loss: (B, L) positions that predict a token (below length − 1: a causal
    LM's last token feeds no prediction, padding none); every row otherwise."""
    lengths = getattr(obj, "lengths", None)
    if lengths is not None and len(lead) == 2 and lead[0] == len(lengths):
        return torch.arange(lead[1], device=lengths.device)[None, :] < lengths[:, None] - 1
    return torch.ones(lead, dtype=torch.bool)


def _output_columns(obj: Objective, out: Tensor, mc_samples: int | None, generator: torch.Generator | None) -> list[Tensor]:
    """Cotangents u_k (N, C) with Σ_k u_k u_kᵀ = ∇²_out L per row (exactly, or in expectation)."""
    if isinstance(obj, SquaredErrorObjective):  # ∇²_out = w_n I: the columns √w_n e_c
        root = obj.weights.to(out.dtype).sqrt()  # (N,)
        cols = []
        for c in range(out.shape[1]):
            u = torch.zeros_like(out)  # (N, C)
            u[:, c] = root
            cols.append(u)
        return cols
    if isinstance(obj, CausalLMObjective):  # c_n (diag p − ppᵀ) = c_n Σ_c p_c (e_c − p)(e_c − p)ᵀ
        coef = obj._coef.to(out.dtype)  # (N,) the recorded per-token loss weights
        p = torch.softmax(out, dim=-1)  # (N, V)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        if mc_samples is None:
            return [(coef * p[:, c]).sqrt()[:, None] * (eye[c] - p) for c in range(out.shape[1])]
        if mc_samples < 1:
            raise ConfigError(f"K-FAC mc_samples must be >= 1 (or None for exact columns), got {mc_samples}")
        scale = (coef / mc_samples).sqrt()[:, None]  # (N, 1)
        return [scale * (p - eye[torch.multinomial(p.float().cpu(), 1, generator=generator).squeeze(1).to(p.device)])
                for _ in range(mc_samples)]
    raise ConfigError(f"--hvp kfac/ekfac supports causal-LM and squared-error objectives, not {type(obj).__name__}")


def _like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in the factors' dtype (embedding inputs are ids: left as they are)."""
    return x.to(dtype) if x.is_floating_point() else x
