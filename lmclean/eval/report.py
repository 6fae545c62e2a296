"""The pipeline behind `lmclean eval`: several models x the metrics of `lmclean.eval` -> one dict.

The rows come from `sets` (which also says which tokens are scored: the answer's given the prompt,
or every token after the first of plain text), the models from `models`. The tokenizer adds no
special tokens here, so the EOS that recording appends is not scored.

Metrics that compare models are computed after every model has been scored: `privleak` and
`forget_quality` against the reference model (usually `lmclean record --exclude`), and
`residual_ratio` = ||theta - theta_ref|| / ||theta_orig - theta_ref|| with theta_orig the
original model (by default the first model given). Nothing here prints; `progress` is told the
stage before each one starts.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmclean.errors import ConfigError
from lmclean.eval import metrics, tofu
from lmclean.eval.models import ModelSpec, load_model_and_tokenizer
from lmclean.eval.sets import EvalSample, EvalSets, id_ranges

FORGET_QUALITY_NOTE = (
    "forget_quality is a p-value (KS test of the model's forget-set truth ratios against the reference's): "
    "higher = closer to retraining; above 0.05 TOFU calls the two indistinguishable. It is not a loss."
)
MIA_ATTACK_KEYS = {"loss": "mia_auc_loss", "zlib": "mia_auc_zlib", "min_k": "mia_auc_min_k"}
PRIVLEAK_ATTACK = "min_k"  # MUSE computes PrivLeak from the Min-K% Prob attack

Progress = Callable[[str, int, int], None]  # (what starts now, stages done, stages in all)


@dataclass
class _Raw:
    """What one model produced that cross-model metrics need."""

    values: dict[str, Any] = field(default_factory=dict)
    forget_truth_ratios: np.ndarray | None = None
    distance_to_reference: float | None = None
    generations: list[str] = field(default_factory=list)


def _stages(sets: EvalSets, is_reference: bool, with_reference: bool, n_generate: int) -> list[str]:
    stages = ["load", "forget loss", "retain loss"]
    if sets.holdout:
        stages.append("membership inference")
    if with_reference and not is_reference:
        stages += ["KL to reference", "parameter distance"]
    if sets.tofu_data is not None:
        stages += ["TOFU forget truth ratio", "TOFU forget ROUGE", "TOFU model utility"]
    if n_generate and sets.answer_mode:
        stages.append("generation")
    return stages


def _score(model: Any, tok: Any, rows: Sequence[EvalSample], batch_size: int) -> list[Any]:
    from lmclean.eval import scoring

    if rows[0].prompt is None:
        return scoring.score_full_texts(model, tok, [r.target for r in rows], batch_size)
    return scoring.score_texts(model, tok, [r.prompt or "" for r in rows], [r.target for r in rows], batch_size)


def _kl(model: Any, ref: Any, tok: Any, rows: Sequence[EvalSample], batch_size: int) -> float:
    from lmclean.eval import scoring

    if rows[0].prompt is None:
        return scoring.mean_token_kl_full_texts(model, ref, tok, [r.target for r in rows], batch_size)
    return scoring.mean_token_kl(model, ref, tok, [r.prompt or "" for r in rows], [r.target for r in rows], batch_size)


def _perplexity(loss: float) -> float:
    """exp(loss), inf past float range (a diverged model's loss can exceed 709)."""
    return math.exp(loss) if loss < 709.0 else math.inf


def token_loss(scored: Sequence[Any]) -> float:
    """Token-weighted mean NLL: all scored tokens of all rows pooled (what `forget_loss` reports)."""
    total = sum(float(-s.token_logprobs.sum()) for s in scored)
    return total / sum(s.n_tokens for s in scored)


def _evaluate_one(
    model: Any,
    tok: Any,
    sets: EvalSets,
    ref_model: Any | None,
    is_reference: bool,
    n_generate: int,
    batch_size: int,
    max_new_tokens: int,
    step: Callable[[str], None],
) -> _Raw:
    from lmclean.eval import distance, scoring

    raw = _Raw()
    v = raw.values
    step("forget loss")
    forget_scored = _score(model, tok, sets.forget, batch_size)
    v["forget_loss"] = token_loss(forget_scored)
    v["forget_ppl"] = _perplexity(v["forget_loss"])
    step("retain loss")
    retain_scored = _score(model, tok, sets.retain, batch_size)
    v["retain_loss"] = token_loss(retain_scored)
    v["retain_ppl"] = _perplexity(v["retain_loss"])
    if sets.holdout:
        step("membership inference")
        holdout_scored = _score(model, tok, sets.holdout, batch_size)
        members = [(s.token_logprobs, r.target) for s, r in zip(forget_scored, sets.forget)]
        nonmembers = [(s.token_logprobs, r.target) for s, r in zip(holdout_scored, sets.holdout)]
        for attack, key in MIA_ATTACK_KEYS.items():
            fn = metrics.MIA_ATTACKS[attack]
            v[key] = metrics.mia_auc(members, nonmembers, lambda s, fn=fn: fn(s[0], s[1]))
    if ref_model is not None:
        if is_reference:
            v["kl_forget"], v["kl_retain"] = 0.0, 0.0
            raw.distance_to_reference = 0.0
        else:
            step("KL to reference")
            v["kl_forget"] = _kl(model, ref_model, tok, sets.forget, batch_size)
            v["kl_retain"] = _kl(model, ref_model, tok, sets.retain, batch_size)
            step("parameter distance")
            raw.distance_to_reference = distance.param_distance(model, ref_model)
        v["distance_to_reference"] = raw.distance_to_reference
    if sets.tofu_data is not None and sets.tofu_split is not None:
        data, prompt = sets.tofu_data, sets.prompt_template
        score = scoring.make_scorer(model, tok, batch_size)
        generate = scoring.make_generator(model, tok, max_new_tokens, batch_size)
        step("TOFU forget truth ratio")
        forget_rows = data.forget[sets.tofu_split]
        scores = tofu.score_split(forget_rows, score, prompt)
        raw.forget_truth_ratios = tofu.split_truth_ratios(scores)
        v["truth_ratio_forget"] = metrics.truth_ratio_forget(raw.forget_truth_ratios)
        v["forget_probability"] = tofu.split_probability(scores, multiple_choice=False)
        step("TOFU forget ROUGE")
        v["forget_rouge_l_recall"] = float(tofu.rouge_recalls(forget_rows, generate, prompt).mean())
        step("TOFU model utility")
        components = tofu.model_utility_components(data, score, generate, prompt)
        v["model_utility"] = metrics.model_utility(components.values())
        v.update(components)
    if n_generate and sets.answer_mode:
        step("generation")
        rows = [*sets.forget[:n_generate], *sets.retain[:n_generate]]  # forgotten questions, then kept ones
        raw.generations = scoring.greedy_answers(model, tok, [r.prompt or "" for r in rows], max_new_tokens, batch_size)
    return raw


def evaluate(
    models: Sequence[ModelSpec],
    sets: EvalSets,
    *,
    reference: ModelSpec | None = None,
    original: ModelSpec | None = None,
    n_generate: int = 3,
    batch_size: int = 16,
    max_new_tokens: int = 200,
    tokenizer: str | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate every model (and the reference, as its own column) on `sets`; see the module docstring.

    `original` defaults to the first model when a reference is given; it need not be one of
    `models` (then it is loaded only for its distance to the reference).
    """
    import torch

    from lmclean.device import resolve_device

    if not models:
        raise ConfigError("pass at least one model directory")
    device = str(resolve_device(device))  # auto -> cuda, mps or cpu; an absent device is refused here
    notes = list(sets.notes)
    if reference is not None and original is None:
        original = models[0]
    ref_name = reference.name if reference is not None else None
    names = {m.name for m in models}
    columns = list(models) + ([reference] if reference is not None and reference.name not in names else [])
    order = ([reference] if reference is not None else []) + [m for m in columns if m.name != ref_name]
    extra_original = original is not None and reference is not None and original.name not in {m.name for m in columns}
    plan = {m.name: _stages(sets, m.name == ref_name, reference is not None, n_generate) for m in order}
    total = sum(len(s) for s in plan.values()) + int(extra_original)
    done = 0

    def tell(label: str) -> None:
        nonlocal done
        if progress is not None:
            progress(label, done, total)
        done += 1

    results: dict[str, _Raw] = {}
    ref_model = None
    for spec in order:
        tell(f"{spec.name}: load")
        model, tok = load_model_and_tokenizer(spec, tokenizer, device)
        is_ref = spec.name == ref_name
        raw = _evaluate_one(model, tok, sets, ref_model if not is_ref else model, is_ref, n_generate, batch_size,
                            max_new_tokens, lambda s, n=spec.name: tell(f"{n}: {s}"))  # fmt: skip
        results[spec.name] = raw
        if is_ref:
            ref_model = model
        else:
            del model
            gc.collect()
    orig_distance: float | None = None
    if reference is not None and original is not None:
        if original.name in results:
            orig_distance = results[original.name].distance_to_reference
        else:
            tell(f"{original.name}: parameter distance")
            from lmclean.eval import distance

            model, _tok = load_model_and_tokenizer(original, tokenizer, device)
            orig_distance = distance.param_distance(model, ref_model)
            del model
    if progress is not None:
        progress("done", total, total)
    del ref_model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    # ------------------------------------------------------------- cross-model metrics
    ref_raw = results.get(reference.name) if reference is not None else None
    if ref_raw is not None and sets.holdout:
        ref_auc = ref_raw.values[MIA_ATTACK_KEYS[PRIVLEAK_ATTACK]]
        if ref_auc > 0:
            for raw in results.values():
                raw.values["privleak"] = metrics.privleak(raw.values[MIA_ATTACK_KEYS[PRIVLEAK_ATTACK]], ref_auc)
        else:
            notes.append("privleak undefined: the reference's Min-K% AUC is 0")
    if reference is not None:
        if orig_distance:
            for raw in results.values():
                raw.values["residual_ratio"] = (raw.distance_to_reference or 0.0) / orig_distance
        else:
            notes.append(f"residual_ratio undefined: the original ({original.name if original else '-'}) equals the reference")
    if sets.tofu_data is not None:
        if ref_raw is not None and ref_raw.forget_truth_ratios is not None:
            for raw in results.values():
                assert raw.forget_truth_ratios is not None
                raw.values["forget_quality"] = metrics.forget_quality(raw.forget_truth_ratios, ref_raw.forget_truth_ratios)
            notes.append(FORGET_QUALITY_NOTE)
        else:
            notes.append("forget_quality skipped: it compares with a model retrained without the forget set; pass --reference DIR")
    if reference is None:
        notes.append("privleak, residual_ratio and KL skipped: pass --reference DIR (e.g. the model of `lmclean record --exclude`)")

    generations: list[dict[str, Any]] = []
    retain_generations: list[dict[str, Any]] = []
    if n_generate and sets.answer_mode:
        rows = [*sets.forget[:n_generate], *sets.retain[:n_generate]]  # the order _evaluate_one generated
        for i, row in enumerate(rows):
            into = generations if i < min(n_generate, len(sets.forget)) else retain_generations
            into.append({"id": row.id, "prompt": row.prompt, "answer": row.target,
                         "outputs": {m.name: results[m.name].generations[i] for m in columns}})  # fmt: skip
    elif n_generate:
        notes.append("generation skipped: the data rows are plain text, without a question to answer")
    return {
        "data": str(sets.data_path),
        "template": sets.template,
        "scored": sets.describe_scoring(),
        "device": device,
        "forget": {"n": len(sets.forget), "ids": id_ranges([r.id for r in sets.forget if r.id is not None])},
        "retain": {"n": len(sets.retain)},
        "holdout": {"n": len(sets.holdout), "source": sets.holdout_source} if sets.holdout else None,
        "tofu": {"dir": str(sets.tofu_dir), "split": sets.tofu_split} if sets.tofu_data is not None else None,
        "reference": reference.name if reference is not None else None,
        "original": original.name if original is not None and reference is not None else None,
        "models": {m.name: {"path": str(m.path), **results[m.name].values} for m in columns},
        "generations": generations,  # the first n forget questions
        "retain_generations": retain_generations,  # the first n retain questions: what unlearning must keep
        "notes": notes,
    }


__all__ = [
    "FORGET_QUALITY_NOTE",
    "evaluate",
    "token_loss",
]
