"""Unlearning metrics over numbers a model has already produced: pure numpy/scipy, no torch.

Inputs are per-token log-probabilities (natural log) or per-answer mean log-probabilities as made
by `lmclean.eval.scoring`. Sources: Carlini et al. 2021 (zlib attack), Shi et al. 2023 (Min-K%
Prob), Maini et al. 2024 (TOFU, code at github.com/locuslab/tofu), Shi et al. 2024 (MUSE, PrivLeak).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray
from rouge_score import rouge_scorer
from scipy import stats
from scipy.special import logsumexp

from lmclean.errors import DataError

T = TypeVar("T")
Floats = NDArray[np.float64]


def _as_1d(values: ArrayLike, name: str) -> Floats:
    """Values as a non-empty float64 vector; NaN is refused because it silently poisons ranks and means."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise DataError(f"{name}: contains NaN; drop or re-score the samples that produced it")
    return arr


# ----------------------------------------------------------------------------- membership inference


def roc_auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """Area under the ROC curve of a score where higher means "more likely a member".

    Computed exactly as the Mann-Whitney U statistic over (member, non-member) pairs divided by the
    number of pairs, a tie counting 1/2: no thresholds, so it is exact for any number of samples.
    """
    m = _as_1d(member_scores, "member_scores")
    n = _as_1d(nonmember_scores, "nonmember_scores")
    ranks = stats.rankdata(np.concatenate([m, n]))  # average ranks: a tie between groups counts 1/2
    u = ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0
    return float(u / (m.size * n.size))


def loss_score(token_logprobs: ArrayLike) -> float:
    """LOSS attack (Yeom et al. 2018): minus the mean token NLL, i.e. the mean token log-prob."""
    return float(_as_1d(token_logprobs, "token_logprobs").mean())


def zlib_score(token_logprobs: ArrayLike, text: str) -> float:
    """zlib attack (Carlini et al. 2021): minus log-perplexity over the zlib-compressed size in bytes.

    Dividing by the compressed length discounts texts that are likely under any model because they
    are repetitive. Log-perplexity is the *mean* token NLL, as in the paper ("ratio of the (log)
    perplexity ... and the zlib entropy") and its reference code; higher = more likely a member.
    """
    lp = _as_1d(token_logprobs, "token_logprobs")
    return float(lp.mean() / len(zlib.compress(text.encode("utf-8"))))


def min_k_prob_score(token_logprobs: ArrayLike, k: float = 0.2) -> float:
    """Min-K% Prob (Shi et al. 2023): mean of the lowest k fraction of token log-probs.

    Members rarely contain outlier low-probability tokens, so the tail separates better than the
    mean. As in the reference code the count is floor(k * n), but at least one token.
    """
    if not 0.0 < k <= 1.0:
        raise DataError(f"min_k_prob_score: k must be in (0, 1], got {k}")
    lp = np.sort(_as_1d(token_logprobs, "token_logprobs"))
    count = max(1, int(k * lp.size + 1e-9))  # +1e-9: 0.29 * 100 must give 29, not 28
    return float(lp[:count].mean())


def _loss_attack(token_logprobs: ArrayLike, text: str) -> float:
    return loss_score(token_logprobs)


def _min_k_attack(token_logprobs: ArrayLike, text: str) -> float:
    return min_k_prob_score(token_logprobs)


MIA_ATTACKS: dict[str, Callable[[ArrayLike, str], float]] = {
    "loss": _loss_attack,
    "zlib": zlib_score,
    "min_k": _min_k_attack,
}
"""Attacks by name, all as (token_logprobs, text) -> score, higher = more likely a member."""


def mia_auc(members: Sequence[T], nonmembers: Sequence[T], attack: Callable[[T], float]) -> float:
    """ROC AUC of `attack` (sample -> score, higher = member) separating members from non-members.

    0.5 means the attack cannot tell them apart; for an unlearned model, compare it with the AUC of
    a model retrained without the forget set rather than with 0.5 (see `privleak`).
    """
    return roc_auc([attack(s) for s in members], [attack(s) for s in nonmembers])


def privleak(auc_model: float, auc_reference: float) -> float:
    """MUSE PrivLeak (Shi et al. 2024): (AUC_model - AUC_ref) / AUC_ref.

    AUC of a membership attack with the forget set as members and a holdout set as non-members;
    the reference is a model retrained without the forget set. Near 0 is ideal; positive means
    under-unlearning (members still exposed), negative over-unlearning. MUSE tables show it x100.
    """
    if not auc_reference > 0.0:
        raise DataError(f"privleak: auc_reference must be > 0, got {auc_reference}")
    return float((auc_model - auc_reference) / auc_reference)


# ----------------------------------------------------------------------------- TOFU


def truth_ratio(perturbed_logprobs_normalised: ArrayLike, paraphrased_logprob_normalised: float) -> float:
    """TOFU truth ratio R of one question: how much likelier wrong answers are than a right one.

    Inputs are length-normalised log-probs (mean per-token log-prob, log P^(1/len)) of each
    perturbed answer and of the paraphrased answer. As in TOFU's code the perturbed answers are
    averaged in log space (a geometric mean): R = exp(mean_i(lp_pert_i) - lp_para). TOFU's code
    stores the reciprocal, exp(mean perturbed loss - paraphrased loss) = 1/R; KS tests are blind
    to that choice. R < 1: the model prefers the right answer.
    """
    pert = _as_1d(perturbed_logprobs_normalised, "perturbed_logprobs_normalised")
    return float(np.exp(pert.mean() - float(paraphrased_logprob_normalised)))


def truth_ratio_utility(ratios: ArrayLike) -> float:
    """TOFU "Truth Ratio" utility on retain / real authors / world facts: mean(max(0, 1 - R)).

    TOFU aggregate_eval_stat.py: np.maximum(0, 1 - 1/curr_stat_1) with curr_stat_1 = 1/R.
    Higher is better: 1 when the model puts all mass on the right answer.
    """
    return float(np.maximum(0.0, 1.0 - _as_1d(ratios, "ratios")).mean())


def truth_ratio_forget(ratios: ArrayLike) -> float:
    """TOFU "Truth Ratio" reported on the forget set: mean(min(R, 1/R)), for display only.

    Not part of forget quality, which tests the raw R distribution (see `forget_quality`).
    """
    r = _as_1d(ratios, "ratios")
    return float(np.minimum(r, 1.0 / r).mean())


def forget_quality(truth_ratios_model: ArrayLike, truth_ratios_reference: ArrayLike) -> float:
    """TOFU forget quality: p-value of a two-sample KS test between raw forget-set truth ratios.

    The reference is a model retrained on the retain split only. Higher = the unlearned model's
    truth-ratio distribution is closer to retraining; TOFU calls p > 0.05 indistinguishable.
    """
    a = _as_1d(truth_ratios_model, "truth_ratios_model")
    b = _as_1d(truth_ratios_reference, "truth_ratios_reference")
    return float(stats.ks_2samp(a, b).pvalue)


@lru_cache(maxsize=1)
def _rouge_l() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: longest common subsequence over the reference length (TOFU's ROUGE).

    Recall, not F1, so a long generation that contains the answer is not penalised.
    """
    return float(_rouge_l().score(reference, prediction)["rougeL"].recall)


def answer_probability(answer_logprobs_normalised: ArrayLike) -> float:
    """TOFU "Probability" on retain: mean over questions of exp(mean per-token log-prob), P^(1/len)."""
    return float(np.exp(_as_1d(answer_logprobs_normalised, "answer_logprobs_normalised")).mean())


def normalised_choice_probability(
    correct_logprob_normalised: float, perturbed_logprobs_normalised: ArrayLike
) -> float:
    """TOFU "Probability" on real authors / world facts, for one question: P(correct) / sum P(options).

    Options are the correct and the perturbed answers, each as P^(1/len) (aggregate_eval_stat.py);
    computed with logsumexp so tiny probabilities do not underflow to 0/0.
    """
    pert = _as_1d(perturbed_logprobs_normalised, "perturbed_logprobs_normalised")
    c = float(correct_logprob_normalised)
    return float(np.exp(c - logsumexp(np.concatenate([[c], pert]))))


def model_utility(values: Iterable[float]) -> float:
    """TOFU model utility: harmonic mean of its 9 components (probability, ROUGE-L recall and
    truth-ratio utility on retain, real authors and world facts).

    The harmonic mean punishes any collapsed component; a zero component gives utility 0 (the
    limit), rather than scipy's division warning.
    """
    arr = _as_1d(list(values), "model utility components")
    if (arr < 0).any() or not np.isfinite(arr).all():
        raise DataError(f"model_utility: components must be finite and >= 0, got {arr.tolist()}")
    if (arr == 0).any():
        return 0.0
    return float(stats.hmean(arr))


__all__ = [
    "MIA_ATTACKS",
    "answer_probability",
    "forget_quality",
    "loss_score",
    "mia_auc",
    "min_k_prob_score",
    "model_utility",
    "normalised_choice_probability",
    "privleak",
    "roc_auc",
    "rouge_l_recall",
    "truth_ratio",
    "truth_ratio_forget",
    "truth_ratio_utility",
    "zlib_score",
]
