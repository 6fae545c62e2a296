"""TOFU (Maini et al. 2024): load its JSONL split files and compute its metrics from a scorer.

The model enters only through two callables, so this module needs no torch:
`score(prompts, answers) -> mean per-token log-prob of each answer` (`scoring.make_scorer`) and
`generate(prompts) -> greedy answers` (`scoring.make_generator`). Which answers are scored follows
TOFU's eval config: probability on `answer`; truth ratio of `perturbed_answer` against
`paraphrased_answer` (retain / forget) or against `answer` itself (real authors / world facts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from lmclean.config import DataConfig
from lmclean.errors import DataError, InputNotFoundError
from lmclean.eval import metrics
from lmclean.train.data import read_rows

DEFAULT_TEMPLATE: str = DataConfig.template.split("{answer}")[0]  # type: ignore[union-attr]  # the record template's prompt
FORGET_SPLITS = ("forget01", "forget05", "forget10")
HOLDOUT_SPLITS = ("holdout01", "holdout05", "holdout10")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")

ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]
GenerateFn = Callable[[Sequence[str]], Sequence[str]]


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


@dataclass(frozen=True)
class PerturbedQA:
    question: str
    answer: str
    paraphrased_answer: str | None  # None in real_authors / world_facts, which have none
    perturbed_answers: tuple[str, ...]

    @property
    def base_answer(self) -> str:
        """The right answer a truth ratio compares the perturbed ones with (TOFU's base_answer_key)."""
        return self.answer if self.paraphrased_answer is None else self.paraphrased_answer


@dataclass(frozen=True)
class TofuData:
    full: tuple[QA, ...]  # 200 authors x 20 questions; row index = sample id
    forget: Mapping[str, tuple[PerturbedQA, ...]]  # "forget01" ...: the last 1/5/10 % of full
    retain: tuple[PerturbedQA, ...]  # retain_perturbed.jsonl: the first 400 rows of full
    holdout: Mapping[str, tuple[QA, ...]]  # "holdout01" ...: never in full, MIA non-members
    real_authors: tuple[PerturbedQA, ...]
    world_facts: tuple[PerturbedQA, ...]

    def forget_ids(self, split: str) -> range:
        """Sample ids (rows of full.jsonl) of a forget split; the retain split is the rest."""
        if split not in self.forget:
            raise DataError(f"unknown TOFU forget split {split!r}; choose one of {', '.join(FORGET_SPLITS)}")
        return range(len(self.full) - len(self.forget[split]), len(self.full))


# ----------------------------------------------------------------------------- loading


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    return read_rows(path, what="TOFU file", fix="the TOFU folder must hold all its split files")


def _text(path: Path, lineno: int, obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        what = "missing field" if key not in obj else f"field is {type(value).__name__}, not a string:"
        raise DataError(f"{path}:{lineno}: {what} {key!r}; fields found: {', '.join(sorted(obj))}")
    return value


def _qa_rows(path: Path) -> tuple[QA, ...]:
    return tuple(QA(_text(path, n, o, "question"), _text(path, n, o, "answer")) for n, o in _read_jsonl(path))


def _perturbed_rows(path: Path, paraphrased: bool) -> tuple[PerturbedQA, ...]:
    out: list[PerturbedQA] = []
    width: int | None = None
    for n, o in _read_jsonl(path):
        value = o.get("perturbed_answer")
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise DataError(f"{path}:{n}: field 'perturbed_answer' must be a non-empty list of strings")
        if width is not None and len(value) != width:
            raise DataError(f"{path}:{n}: {len(value)} perturbed answers, earlier rows have {width}")
        width = len(value)
        para = _text(path, n, o, "paraphrased_answer") if paraphrased else None
        out.append(PerturbedQA(_text(path, n, o, "question"), _text(path, n, o, "answer"), para, tuple(value)))
    return tuple(out)


def _check_same_questions(path: Path, rows: Sequence[PerturbedQA], expected: Sequence[QA], where: str) -> None:
    if len(rows) > len(expected):
        raise DataError(f"{path}: {len(rows)} rows but full.jsonl has {len(expected)}; check the TOFU folder")
    for i, (row, ref) in enumerate(zip(rows, expected)):
        if row.question != ref.question:
            raise DataError(f"{path}: row {i + 1} asks a different question than {where} of full.jsonl")


def load_tofu(tofu_dir: str | Path) -> TofuData:
    """Read TOFU's JSONL files from `tofu_dir` (layout: see the data set's README), checking fields.

    The options files (real_authors.jsonl, world_facts.jsonl) are not read: the metrics use the
    `_perturbed` versions. Forget / retain rows must ask the questions of their full.jsonl rows.
    """
    root = Path(tofu_dir)
    if not root.is_dir():
        raise InputNotFoundError(f"TOFU directory not found: {root}; pass the folder that holds full.jsonl")
    full_path = root / "full.jsonl"
    full: list[QA] = []
    for index, (n, o) in enumerate(_read_jsonl(full_path)):
        if o.get("id") != index:
            raise DataError(f"{full_path}:{n}: field 'id' is {o.get('id')!r}, expected the row index {index}")
        full.append(QA(_text(full_path, n, o, "question"), _text(full_path, n, o, "answer")))
    forget: dict[str, tuple[PerturbedQA, ...]] = {}
    for split in FORGET_SPLITS:
        path = root / f"{split}_perturbed.jsonl"
        forget[split] = _perturbed_rows(path, paraphrased=True)
        _check_same_questions(path, forget[split], full[len(full) - len(forget[split]) :], "the tail")
    retain_path = root / "retain_perturbed.jsonl"
    retain = _perturbed_rows(retain_path, paraphrased=True)
    _check_same_questions(retain_path, retain, full, "the head")
    return TofuData(
        full=tuple(full),
        forget=forget,
        retain=retain,
        holdout={split: _qa_rows(root / f"{split}.jsonl") for split in HOLDOUT_SPLITS},
        real_authors=_perturbed_rows(root / "real_authors_perturbed.jsonl", paraphrased=False),
        world_facts=_perturbed_rows(root / "world_facts_perturbed.jsonl", paraphrased=False),
    )


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True, eq=False)
class SplitScores:
    """Mean per-token log-probs of one split's answers, each given its formatted question."""

    answer: NDArray[np.float64]  # (n,) the gold answer
    base: NDArray[np.float64]  # (n,) the paraphrased answer, or the gold one where there is none
    perturbed: NDArray[np.float64]  # (n, n_perturbed) the wrong answers


def score_split(rows: Sequence[PerturbedQA], score: ScoreFn, template: str = DEFAULT_TEMPLATE) -> SplitScores:
    """Score every answer of a split in one call to `score` (so the scorer can batch)."""
    if not rows:
        raise DataError("score_split: no rows; pass a non-empty TOFU split")
    width = len(rows[0].perturbed_answers)
    if any(len(r.perturbed_answers) != width for r in rows):
        raise DataError("score_split: rows have different numbers of perturbed answers; score them separately")
    prompts: list[str] = []
    answers: list[str] = []
    for r in rows:
        prompt = template.format(question=r.question)
        texts = [r.answer] + ([] if r.paraphrased_answer is None else [r.paraphrased_answer])
        texts += list(r.perturbed_answers)
        prompts += [prompt] * len(texts)
        answers += texts
    values = np.asarray(score(prompts, answers), dtype=np.float64)
    if values.shape != (len(answers),):
        raise DataError(f"score_split: the scorer returned shape {values.shape} for {len(answers)} answers")
    answer, base, perturbed = [], [], []
    pos = 0
    for r in rows:
        answer.append(values[pos])
        pos += 1
        if r.paraphrased_answer is not None:
            pos += 1
        base.append(values[pos - 1])
        perturbed.append(values[pos : pos + width])
        pos += width
    return SplitScores(np.array(answer), np.array(base), np.array(perturbed))


def split_truth_ratios(scores: SplitScores) -> NDArray[np.float64]:
    """Raw truth ratio R of every question (`metrics.truth_ratio`): the input of forget quality."""
    return np.array([metrics.truth_ratio(p, b) for p, b in zip(scores.perturbed, scores.base)])


def split_probability(scores: SplitScores, multiple_choice: bool) -> float:
    """TOFU "Probability": P(answer)^(1/len) on retain / forget; on real authors / world facts
    (`multiple_choice=True`) the normalised share of the right answer among all options."""
    if not multiple_choice:
        return metrics.answer_probability(scores.answer)
    return float(np.mean([metrics.normalised_choice_probability(a, p) for a, p in zip(scores.answer, scores.perturbed)]))


def rouge_recalls(
    rows: Sequence[QA | PerturbedQA], generate: GenerateFn, template: str = DEFAULT_TEMPLATE
) -> NDArray[np.float64]:
    """ROUGE-L recall of the model's greedy answer against the gold answer, per question."""
    predictions = list(generate([template.format(question=r.question) for r in rows]))
    if len(predictions) != len(rows):
        raise DataError(f"rouge_recalls: the generator returned {len(predictions)} answers for {len(rows)} prompts")
    return np.array([metrics.rouge_l_recall(p, r.answer) for p, r in zip(predictions, rows)])


def model_utility_components(
    data: TofuData, score: ScoreFn, generate: GenerateFn, template: str = DEFAULT_TEMPLATE
) -> dict[str, float]:
    """TOFU's 9 model-utility components, keyed `{retain,real_authors,world_facts}_{probability,
    rouge_l_recall,truth_ratio}`; pass `.values()` to `metrics.model_utility`."""
    out: dict[str, float] = {}
    for name in UTILITY_SPLITS:
        rows: tuple[PerturbedQA, ...] = getattr(data, name)
        scores = score_split(rows, score, template)
        out[f"{name}_probability"] = split_probability(scores, multiple_choice=name != "retain")
        out[f"{name}_rouge_l_recall"] = float(rouge_recalls(rows, generate, template).mean())
        out[f"{name}_truth_ratio"] = metrics.truth_ratio_utility(split_truth_ratios(scores))
    return out


__all__ = [
    "DEFAULT_TEMPLATE",
    "FORGET_SPLITS",
    "HOLDOUT_SPLITS",
    "PerturbedQA",
    "QA",
    "SplitScores",
    "TofuData",
    "load_tofu",
    "model_utility_components",
    "rouge_recalls",
    "score_split",
    "split_probability",
    "split_truth_ratios",
]
