"""Evaluation of unlearning: membership inference, TOFU metrics, parameter and output distances.

`metrics` and `tofu` need only numpy/scipy and load eagerly; `scoring` and `distance` need torch
(and transformers) and load on first use of one of their names, so `import lmclean.eval.metrics`
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmclean.eval.metrics import (
    MIA_ATTACKS,
    answer_probability,
    forget_quality,
    loss_score,
    mia_auc,
    min_k_prob_score,
    model_utility,
    normalised_choice_probability,
    privleak,
    roc_auc,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_forget,
    truth_ratio_utility,
    zlib_score,
)
from lmclean.eval.tofu import (
    DEFAULT_TEMPLATE,
    PerturbedQA,
    QA,
    SplitScores,
    TofuData,
    load_tofu,
    model_utility_components,
    rouge_recalls,
    score_split,
    split_probability,
    split_truth_ratios,
)

if TYPE_CHECKING:
    from lmclean.eval.distance import param_distance, residual_ratio
    from lmclean.eval.scoring import (
        ScoredAnswer,
        greedy_answers,
        make_generator,
        make_scorer,
        mean_token_kl,
        mean_token_kl_full_texts,
        score_full_texts,
        score_texts,
    )

_LAZY = {
    "param_distance": "distance",
    "residual_ratio": "distance",
    "ScoredAnswer": "scoring",
    "greedy_answers": "scoring",
    "make_generator": "scoring",
    "make_scorer": "scoring",
    "mean_token_kl": "scoring",
    "mean_token_kl_full_texts": "scoring",
    "score_full_texts": "scoring",
    "score_texts": "scoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lmclean.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lmclean.eval' has no attribute {name!r}")


__all__ = [
    "DEFAULT_TEMPLATE",
    "MIA_ATTACKS",
    "PerturbedQA",
    "QA",
    "ScoredAnswer",
    "SplitScores",
    "TofuData",
    "answer_probability",
    "forget_quality",
    "greedy_answers",
    "load_tofu",
    "loss_score",
    "make_generator",
    "make_scorer",
    "mean_token_kl",
    "mean_token_kl_full_texts",
    "mia_auc",
    "min_k_prob_score",
    "model_utility",
    "model_utility_components",
    "normalised_choice_probability",
    "param_distance",
    "privleak",
    "residual_ratio",
    "roc_auc",
    "rouge_l_recall",
    "rouge_recalls",
    "score_full_texts",
    "score_split",
    "score_texts",
    "split_probability",
    "split_truth_ratios",
    "truth_ratio",
    "truth_ratio_forget",
    "truth_ratio_utility",
    "zlib_score",
]
