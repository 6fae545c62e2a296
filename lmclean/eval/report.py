"""The pipeline behind `lmclean eval`: several models x the metrics of `lmclean.eval` -> one dict.

Data rows are rendered with the recording template. When the template contains `{answer}` it is
split there: the loss, the membership scores and the KL are taken on the answer's tokens given the
prompt (the template up to `{answer}`, e.g. "Q: {question}\\nA: "), as TOFU does; otherwise on every
token after the first of the rendered text. The tokenizer adds no special tokens here, so the EOS
that recording appends is not scored.

Metrics that compare models are computed after every model has been scored: `privleak` and
`forget_quality` against the reference model (usually `lmclean record --exclude`), and
`residual_ratio` = ||theta - theta_ref|| / ||theta_orig - theta_ref|| with theta_orig the
original model (by default the first model given). Nothing here prints; `progress` is told the
stage before each one starts.
"""

from __future__ import annotations

import gc
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmclean.config import DataConfig
from lmclean.errors import ConfigError, DataError, InputNotFoundError
from lmclean.eval import metrics, tofu
from lmclean.train.data import read_rows, row_id

DEFAULT_DATA_TEMPLATE: str = DataConfig.template  # type: ignore[assignment]  # one default: the record config's
FORGET_QUALITY_NOTE = (
    "forget_quality is a p-value (KS test of the model's forget-set truth ratios against the reference's): "
    "higher = closer to retraining; above 0.05 TOFU calls the two indistinguishable. It is not a loss."
)
MIA_ATTACK_KEYS = {"loss": "mia_auc_loss", "zlib": "mia_auc_zlib", "min_k": "mia_auc_min_k"}
PRIVLEAK_ATTACK = "min_k"  # MUSE computes PrivLeak from the Min-K% Prob attack

Progress = Callable[[str, int, int], None]  # (what starts now, stages done, stages in all)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EvalSample:
    """One data row as the metrics see it."""

    id: int | None  # None for holdout rows, which need no id
    where: str  # "file:line", for messages
    prompt: str | None  # the rendered template up to {answer}; None = plain-text scoring
    target: str  # the scored text: the answer part, or the whole rendered text


def split_template(template: str) -> tuple[str, str] | None:
    """(prompt part, answer part) of a template that contains `{answer}`, split before it; None if it has none."""
    fields = _template_fields(template)
    if "answer" not in fields:
        return None
    at = template.index("{answer}") if "{answer}" in template else template.index("{answer")
    return template[:at], template[at:]


def _template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"--template {template!r} is not a valid format string ({exc}); use fields like {{question}}") from exc
    if not names or any(not n for n in names):
        raise ConfigError(f"--template {template!r} must name row fields, e.g. 'Q: {{question}}\\nA: {{answer}}'")
    return names


def read_samples(path: Path, template: str, id_field: str | None, need_ids: bool) -> list[EvalSample]:
    """Render every row of a JSON Lines file; a row without a template field is an error naming file and line."""
    path = Path(path)
    fields = _template_fields(template)
    parts = split_template(template)
    samples: list[EvalSample] = []
    seen: dict[int, str] = {}
    for index, (lineno, row) in enumerate(read_rows(path, fix="pass an existing JSON Lines file")):
        where = f"{path}:{lineno}"
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"{where}: row lacks field(s) {missing} used by --template {template!r}; fields found: {sorted(row)}")
        sid: int | None = None
        if need_ids:
            sid = row_id(row, id_field, index, where, "; pass --id-field '' to number the rows from 0")
            if sid in seen:
                raise DataError(f"{where}: duplicate sample id {sid} (first at {seen[sid]}); ids must be unique")
            seen[sid] = where
        if parts is None:
            samples.append(EvalSample(sid, where, None, template.format(**row)))
        else:
            samples.append(EvalSample(sid, where, parts[0].format(**row), parts[1].format(**row)))
    return samples


@dataclass(frozen=True)
class EvalSets:
    """What every model is evaluated on."""

    data_path: Path
    template: str
    forget: tuple[EvalSample, ...]
    retain: tuple[EvalSample, ...]
    holdout: tuple[EvalSample, ...]  # empty: no membership inference
    holdout_source: str | None
    tofu_data: tofu.TofuData | None = None
    tofu_dir: Path | None = None
    tofu_split: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def answer_mode(self) -> bool:
        return self.forget[0].prompt is not None

    @property
    def prompt_template(self) -> str:
        """The template up to {answer}: the TOFU prompt."""
        parts = split_template(self.template)
        assert parts is not None
        return parts[0]

    def describe_scoring(self) -> str:
        if self.answer_mode:
            return f"answer tokens given the prompt {self.prompt_template!r}"
        return "every token after the first of the rendered text"


def id_ranges(ids: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7'."""
    out: list[str] = []
    values = sorted(ids)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(out)


def _pick(by_id: dict[int, EvalSample], ids: Sequence[int], option: str, path: Path) -> tuple[EvalSample, ...]:
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        known = sorted(by_id)
        raise DataError(
            f"{option} names id {unknown[0]} that is not in {path} ({len(unknown)} unknown id(s); "
            f"the file holds {len(known)} ids in {known[0]}-{known[-1]})"
        )
    return tuple(by_id[i] for i in ids)


def prepare(
    data: Path,
    forget: Sequence[int],
    retain: Sequence[int] | None = None,
    holdout: Path | None = None,
    template: str = DEFAULT_DATA_TEMPLATE,
    id_field: str | None = "id",
    tofu_dir: Path | None = None,
) -> EvalSets:
    """Read the data (and TOFU) files and select the forget / retain / holdout rows, checking every id."""
    data = Path(data)
    if not data.is_file():
        raise InputNotFoundError(f"data file {data} does not exist; pass the JSON Lines file the model was recorded on")
    samples = read_samples(data, template, id_field, need_ids=True)
    by_id = {s.id: s for s in samples if s.id is not None}
    forget_rows = _pick(by_id, forget, "--forget", data)
    forget_set = set(forget)
    if retain is None:
        retain_ids = [s.id for s in samples if s.id is not None and s.id not in forget_set]
        if not retain_ids:
            raise DataError(f"every id of {data} is in --forget; the retain metrics need other rows")
    else:
        both = sorted(forget_set & set(retain))
        if both:
            raise DataError(f"--retain and --forget share id {both[0]} ({len(both)} shared); a sample is one or the other")
        retain_ids = list(retain)
    retain_rows = _pick(by_id, retain_ids, "--retain", data)
    notes: list[str] = []
    tofu_data, split, prompt = None, None, ""
    if tofu_dir is not None:
        parts = split_template(template)
        if parts is None or not set(_template_fields(template)) <= {"question", "answer"}:
            raise ConfigError(f"--tofu needs a template over {{question}} and {{answer}} only, got {template!r}")
        prompt = parts[0]
        tofu_data = tofu.load_tofu(tofu_dir)
        split = _tofu_split(tofu_data, forget)
        _check_tofu_questions(tofu_data, forget_rows, prompt)
    holdout_rows: tuple[EvalSample, ...] = ()
    source: str | None = None
    if holdout is not None:
        holdout_rows = tuple(read_samples(Path(holdout), template, None, need_ids=False))
        source = str(holdout)
    elif tofu_data is not None and split is not None:
        name = split.replace("forget", "holdout")
        holdout_rows = tuple(
            EvalSample(None, f"{tofu_dir}/{name}.jsonl:{i + 1}", prompt.format(question=qa.question), qa.answer)
            for i, qa in enumerate(tofu_data.holdout[name])
        )
        source = f"{tofu_dir}/{name}.jsonl"
    else:
        notes.append("membership inference skipped: pass --holdout FILE.jsonl with rows the models never saw")
    if holdout_rows and (holdout_rows[0].prompt is None) != (forget_rows[0].prompt is None):
        raise DataError("--holdout rows and --data rows must both be question/answer or both plain text")
    return EvalSets(data, template, forget_rows, retain_rows, holdout_rows, source, tofu_data,
                    Path(tofu_dir) if tofu_dir else None, split, tuple(notes))  # fmt: skip


def _tofu_split(data: tofu.TofuData, forget: Sequence[int]) -> str:
    wanted = sorted(set(forget))
    for split in tofu.FORGET_SPLITS:
        ids = data.forget_ids(split)
        if wanted == list(ids):
            return split
    options = ", ".join(f"{id_ranges(list(data.forget_ids(s)))} ({s})" for s in tofu.FORGET_SPLITS)
    raise DataError(f"with --tofu, --forget must be a TOFU forget split: {options}; got {id_ranges(wanted)}")


def _check_tofu_questions(data: tofu.TofuData, rows: Sequence[EvalSample], prompt_template: str) -> None:
    for row in rows:
        assert row.id is not None
        expected = prompt_template.format(question=data.full[row.id].question) if row.id < len(data.full) else None
        if row.prompt != expected:
            raise DataError(f"{row.where}: id {row.id} asks another question than row {row.id} of TOFU's full.jsonl; "
                            "--data must keep TOFU's ids")  # fmt: skip


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


def model_specs(args: Sequence[str], extra: Sequence[str | None] = ()) -> tuple[list[ModelSpec], list[ModelSpec | None]]:
    """`DIR` or `NAME=DIR` -> named specs, and the same for `extra` (reference, original).

    An unnamed model is called by the shortest tail of its path that no other model shares
    (`orig.zarr/model` and `ref.zarr/model`, not `model` twice). An extra whose directory is one
    of the models' is that model.
    """
    raw: list[tuple[str | None, Path]] = []
    for arg in [*args, *(e for e in extra if e is not None)]:
        name, sep, path = arg.partition("=")
        if sep and name and "/" not in name:
            raw.append((name, Path(path)))
        else:
            raw.append((None, Path(arg)))
    for _name, path in raw:
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise InputNotFoundError(f"model directory {path} does not exist or has no config.json; pass a Hugging Face model directory")
    unique: dict[Path, str | None] = {}
    for name, path in raw:
        key = path.resolve()
        if key not in unique or unique[key] is None:
            unique[key] = name
    names = _auto_names([k for k, v in unique.items() if v is None])
    final = {k: (v if v is not None else names[k]) for k, v in unique.items()}
    taken: dict[str, Path] = {}
    for key, name in final.items():
        if name in taken:
            raise ConfigError(f"two models are both named {name!r} ({taken[name]} and {key}); name them with NAME=DIR")
        taken[name] = key
    specs = [ModelSpec(final[p.resolve()], p) for _n, p in raw]
    models = list({s.name: s for s in specs[: len(args)]}.values())
    rest = iter(specs[len(args) :])
    extras = [None if e is None else next(rest) for e in extra]
    return models, extras


def _auto_names(paths: Sequence[Path]) -> dict[Path, str]:
    out: dict[Path, str] = {}
    depth = 1
    pending = list(paths)
    while pending:
        tails = {p: "/".join(p.parts[-depth:]) for p in pending}
        counts: dict[str, int] = {}
        for t in tails.values():
            counts[t] = counts.get(t, 0) + 1
        pending = [p for p in pending if counts[tails[p]] > 1 and depth < len(p.parts)]
        for p, t in tails.items():
            if p not in pending:
                out[p] = t
        depth += 1
    return out


def load_for_eval(path: Path, device: str = "cpu") -> Any:
    """A float32 model in eval mode for scoring only: SDPA attention where the architecture has it.

    lmclean loads models with eager attention elsewhere because curvature products need double
    backward; scoring needs only forward passes, which SDPA runs 2-3x faster on CPU. The two agree
    to float32 rounding.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    from lmclean.adapters import is_adapter_dir, load_adapter_dir

    adapter = is_adapter_dir(path) and not (path / "config.json").is_file()  # a LoRA store's output: base + adapter, merged
    if not adapter and not (path / "config.json").is_file():
        raise InputNotFoundError(f"model directory {path} does not exist or has no config.json; pass a Hugging Face model directory")
    load = (lambda attn: load_adapter_dir(path, attn)) if adapter else (
        lambda attn: AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32))
    try:
        try:
            model = load("sdpa")
        except (ValueError, ImportError):  # an architecture without SDPA support
            model = load("eager")
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputNotFoundError(f"model directory {path} cannot be loaded: {first}") from exc
    return model.float().to(device).eval()


def _load(spec: ModelSpec, tokenizer_spec: str | None, device: str) -> tuple[Any, Any]:
    from lmclean.train.data import load_tokenizer

    model = load_for_eval(spec.path, device)
    if tokenizer_spec:
        return model, load_tokenizer(tokenizer_spec)
    try:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(spec.path)
    except (OSError, ValueError, TypeError) as exc:
        raise InputNotFoundError(f"model directory {spec.path} holds no tokenizer; pass --tokenizer byte or a tokenizer directory") from exc


# ----------------------------------------------------------------------------- evaluation


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
        model, tok = _load(spec, tokenizer, device)
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

            model, _tok = _load(original, tokenizer, device)
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
    "DEFAULT_DATA_TEMPLATE",
    "FORGET_QUALITY_NOTE",
    "EvalSample",
    "EvalSets",
    "ModelSpec",
    "evaluate",
    "id_ranges",
    "load_for_eval",
    "model_specs",
    "prepare",
    "read_samples",
    "split_template",
    "token_loss",
]
