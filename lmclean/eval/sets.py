"""The evaluation data sets: which rows `lmclean eval` scores, rendered and checked before any model loads.

Data rows are rendered with the recording template. When the template contains `{answer}` it is
split there: the loss, the membership scores and the KL are taken on the answer's tokens given the
prompt (the template up to `{answer}`, e.g. "Q: {question}\\nA: "), as TOFU does; otherwise on every
token after the first of the rendered text. Kept apart from the scoring pipeline (`report`): this
is file reading and validation, and `lmclean eval` runs it before loading any model, so a bad id
or a missing field is refused before the slow part starts.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmclean.config import DataConfig
from lmclean.errors import ConfigError, DataError, InputNotFoundError
from lmclean.eval import tofu
from lmclean.train.data import read_rows, row_id

DEFAULT_DATA_TEMPLATE: str = DataConfig.template  # type: ignore[assignment]  # one default: the record config's


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


__all__ = [
    "DEFAULT_DATA_TEMPLATE",
    "EvalSample",
    "EvalSets",
    "id_ranges",
    "prepare",
    "read_samples",
    "split_template",
]
