"""Per-sample log-likelihoods, greedy answers and token KL from a Hugging Face causal LM.

Prompt and answer are tokenised separately with `add_special_tokens=False` and concatenated, so
the answer's tokens are exactly those of the answer text (no BOS/EOS added by the tokenizer) and a
prompt's tokenisation never merges into the answer. Batches are right-padded with an attention
mask (left-padded for generation); the model runs in eval mode under `torch.no_grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmclean.errors import ConfigError, DataError, ModelMismatchError


@dataclass(frozen=True, eq=False)
class ScoredAnswer:
    """Log-probs of one answer's tokens, each given the prompt and the answer tokens before it."""

    token_logprobs: NDArray[np.float64]  # (n_tokens,), natural log

    @property
    def n_tokens(self) -> int:
        return int(self.token_logprobs.size)

    @property
    def logprob_sum(self) -> float:
        """log P(answer | prompt)."""
        return float(self.token_logprobs.sum())

    @property
    def mean_logprob(self) -> float:
        """Length-normalised log-prob, log P^(1/n): what TOFU's probability and truth ratio use."""
        return float(self.token_logprobs.mean())


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pad_id(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration, restoring each model's train/eval flag after."""
    flags = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def _pair_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    if len(prompts) != len(answers):
        raise DataError(f"got {len(prompts)} prompts but {len(answers)} answers; pass one answer per prompt")
    prefixes, targets = _encode(tokenizer, prompts), _encode(tokenizer, answers)
    for i, (p, a) in enumerate(zip(prefixes, targets)):
        if not p:
            raise DataError(f"prompt {i} tokenises to no tokens; the first answer token needs a context")
        if not a:
            raise DataError(f"answer {i} ({answers[i]!r}) tokenises to no tokens; drop it or fix the data")
    return prefixes, targets


def _target_logits(
    model: nn.Module, prefixes: list[list[int]], targets: list[list[int]], pad_id: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Per sample, the float32 logits (n_target, V) that predict each target token, in input order."""
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    for start in range(0, len(prefixes), batch_size):
        seqs = [p + t for p, t in zip(prefixes[start : start + batch_size], targets[start : start + batch_size])]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row in range(len(seqs)):
            lo = len(prefixes[start + row])
            hi = lo + len(targets[start + row])
            yield logits[row, lo - 1 : hi - 1].float()  # position t-1 predicts token t


def _score_ids(
    model: nn.Module, prefixes: list[list[int]], targets: list[list[int]], pad_id: int, batch_size: int
) -> list[ScoredAnswer]:
    order = _by_length(prefixes, targets)
    prefixes, targets = [prefixes[i] for i in order], [targets[i] for i in order]
    out: list[ScoredAnswer | None] = [None] * len(order)
    with _eval_mode(model):
        for i, logits, target in zip(order, _target_logits(model, prefixes, targets, pad_id, batch_size), targets):
            idx = torch.tensor(target, device=logits.device).unsqueeze(1)  # (n, 1)
            lp = torch.log_softmax(logits, dim=-1).gather(1, idx).squeeze(1)  # (n,)
            out[i] = ScoredAnswer(lp.cpu().double().numpy())  # MPS has no float64
    return out  # type: ignore[return-value]  # every slot is filled


def _by_length(prefixes: list[list[int]], targets: list[list[int]]) -> list[int]:
    """Input positions sorted by sequence length, so a batch pads little; results go back to input order."""
    return sorted(range(len(prefixes)), key=lambda i: len(prefixes[i]) + len(targets[i]))


def score_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
) -> list[ScoredAnswer]:
    """Log-prob of each answer token given its prompt and the answer tokens before it."""
    prefixes, targets = _pair_ids(tokenizer, prompts, answers)
    return _score_ids(model, prefixes, targets, _pad_id(tokenizer), batch_size)


def score_full_texts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 8
) -> list[ScoredAnswer]:
    """Plain-text likelihood: log-probs of every token after the first; -mean_logprob is the loss."""
    ids = _encode(tokenizer, texts)
    for i, seq in enumerate(ids):
        if len(seq) < 2:
            raise DataError(f"text {i} ({texts[i]!r}) has {len(seq)} token(s); a loss needs at least 2")
    return _score_ids(model, [s[:1] for s in ids], [s[1:] for s in ids], _pad_id(tokenizer), batch_size)


def make_scorer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8
) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """(prompts, answers) -> mean per-token log-probs: the scoring callable `lmclean.eval.tofu` takes."""

    def score(prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [s.mean_logprob for s in score_texts(model, tokenizer, prompts, answers, batch_size)]

    return score


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def greedy_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuation of each prompt, new tokens only, special tokens dropped, cut at a newline.

    At most `max_new_tokens`, and never past the model's context length (`max_position_embeddings`
    or `n_positions`): a batch's longest prompt plus its new tokens fit the context.
    """
    _check_batch_size(batch_size)
    ids = _encode(tokenizer, prompts)
    for i, seq in enumerate(ids):
        if not seq:
            raise DataError(f"prompt {i} tokenises to no tokens; generation needs a context")
    pad_id = _pad_id(tokenizer)
    device = next(model.parameters()).device
    limit = _context_length(model)
    out: list[str] = []
    with _eval_mode(model):
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, s in enumerate(chunk):
                input_ids[row, width - len(s) :] = torch.tensor(s)
                mask[row, width - len(s) :] = 1
            new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
            if new_tokens < 1:
                out.extend("" for _ in chunk)  # the prompt already fills the model's context
                continue
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=new_tokens,
                pad_token_id=pad_id,
            )
            for row in generated[:, width:].tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(text.split("\n", 1)[0].strip())
    return out


def make_generator(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 64, batch_size: int = 8
) -> Callable[[Sequence[str]], list[str]]:
    """prompts -> greedy answers: the generation callable `lmclean.eval.tofu` takes."""

    def generate(prompts: Sequence[str]) -> list[str]:
        return greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size)

    return generate


def _mean_kl_ids(
    model_p: nn.Module,
    model_q: nn.Module,
    prefixes: list[list[int]],
    targets: list[list[int]],
    pad_id: int,
    batch_size: int,
) -> float:
    order = _by_length(prefixes, targets)  # a sum over tokens: the order is free
    prefixes, targets = [prefixes[i] for i in order], [targets[i] for i in order]
    total, count = 0.0, 0
    with _eval_mode(model_p, model_q):
        pairs = zip(
            _target_logits(model_p, prefixes, targets, pad_id, batch_size),
            _target_logits(model_q, prefixes, targets, pad_id, batch_size),
        )
        for logits_p, logits_q in pairs:
            if logits_p.shape[-1] != logits_q.shape[-1]:
                raise ModelMismatchError(
                    f"vocabulary sizes differ: {logits_p.shape[-1]} (model_p) vs {logits_q.shape[-1]} (model_q)"
                )
            log_p = torch.log_softmax(logits_p.cpu().double(), dim=-1)  # float64 on CPU: MPS has none
            log_q = torch.log_softmax(logits_q.cpu().double(), dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum())
            count += log_p.shape[0]
    return total / count


def mean_token_kl(
    model_p: nn.Module,
    model_q: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 8,
) -> float:
    """Mean over all answer tokens (pooled across samples) of KL(p || q) between next-token distributions.

    Both models see the same teacher-forced inputs; p is usually the unlearned model and q the
    retrained or original one. Accumulated in float64.
    """
    if not prompts:
        raise DataError("mean_token_kl: no prompts given; pass at least one (prompt, answer) pair")
    prefixes, targets = _pair_ids(tokenizer, prompts, answers)
    return _mean_kl_ids(model_p, model_q, prefixes, targets, _pad_id(tokenizer), batch_size)


def mean_token_kl_full_texts(
    model_p: nn.Module,
    model_q: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 8,
) -> float:
    """`mean_token_kl` over every token after the first of plain texts (the tokens `score_full_texts` scores)."""
    if not texts:
        raise DataError("mean_token_kl_full_texts: no texts given; pass at least one")
    ids = _encode(tokenizer, texts)
    for i, seq in enumerate(ids):
        if len(seq) < 2:
            raise DataError(f"text {i} ({texts[i]!r}) has {len(seq)} token(s); a KL needs at least 2")
    return _mean_kl_ids(model_p, model_q, [s[:1] for s in ids], [s[1:] for s in ids], _pad_id(tokenizer), batch_size)


__all__ = [
    "ScoredAnswer",
    "greedy_answers",
    "make_generator",
    "make_scorer",
    "mean_token_kl",
    "mean_token_kl_full_texts",
    "score_full_texts",
    "score_texts",
]
