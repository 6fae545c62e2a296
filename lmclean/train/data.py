"""Training data: JSON Lines rows -> text via a template -> token ids, with stable sample ids.

Each sample's content fingerprint (sha256 of its int32 little-endian token ids) is what the store
records, so a user holding the text can find the sample again without knowing our ids.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmclean.config import DataConfig
from lmclean.errors import ConfigError, DataError, InputNotFoundError

MAX_SAMPLE_ID = 2**63 - 1  # sample ids are stored as int64
MAX_SPEC_IDS = 1_000_000  # ids one --forget/--exclude spec may name (a typo like 0-10**12 must not exhaust memory)


@dataclass(frozen=True)
class Sample:
    id: int
    text: str
    token_ids: tuple[int, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.token_ids)


def fingerprint(token_ids: Sequence[int]) -> str:
    """sha256 hex of the token ids as little-endian int32 bytes (the store's sample fingerprint)."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i4").tobytes()).hexdigest()


def store_tokenizer(store: Any) -> Any:
    """The tokenizer a store's outputs are saved with: `byte` or a directory as recorded; for a store
    recorded by a Trainer (tokenizer "external") the one saved with STORE/model, else None."""
    spec = store.meta.get("tokenizer", "external")
    if spec == "byte" or Path(spec).is_dir():
        return load_tokenizer(spec)
    model_dir = Path(store.path) / "model"
    if (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    return None


def load_tokenizer(spec: str) -> Any:
    """`byte` -> ByT5's byte-level tokenizer (needs no files); otherwise a local tokenizer directory."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if spec == "byte":
        return ByT5Tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise InputNotFoundError(f"tokenizer directory {spec} does not exist; use `byte` or a local directory")
    return AutoTokenizer.from_pretrained(path)


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def read_rows(path: Path, what: str = "data file", fix: str = "fix `data.path` in the config") -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-empty line of a JSON Lines file: the one reader of them.

    Bad bytes, malformed JSON and non-objects name the file and line; ``what``/``fix`` word the
    message for a missing file (the config's data file, `eval --data`, a TOFU split).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} {path} does not exist; {fix}")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                "save the file as UTF-8") from exc
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); fix or remove the line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, found {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise DataError(f"{what} {path} has no rows")
    return rows


def row_text(row: dict[str, Any], cfg: DataConfig, where: str) -> str:
    if cfg.text_field:
        if cfg.text_field not in row:
            raise DataError(f"{where}: row has no field `{cfg.text_field}` (data.text_field)")
        return str(row[cfg.text_field])
    assert cfg.template is not None  # guaranteed by config.validate
    missing = [f for f in template_fields(cfg.template) if f not in row]
    if missing:
        raise DataError(f"{where}: row lacks field(s) {missing} used by data.template {cfg.template!r}")
    return cfg.template.format(**row)


def row_id(row: dict[str, Any], id_field: str | None, index: int, where: str, hint: str) -> int:
    """The sample id of a row: its `id_field` (a non-negative int), or its index when no field is set."""
    if not id_field:
        return index
    if id_field not in row:
        raise DataError(f"{where}: row has no id field `{id_field}` {hint}")
    raw = row[id_field]
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise DataError(f"{where}: id {raw!r} must be a non-negative integer")
    if raw > MAX_SAMPLE_ID:
        raise DataError(f"{where}: id {raw} is too large; sample ids are stored as int64 (at most {MAX_SAMPLE_ID})")
    return raw


def encode(tokenizer: Any, text: str, max_length: int | None = None) -> tuple[int, ...]:
    """Token ids of a sample (special tokens added), cut to ``max_length`` when given."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return tuple(int(i) for i in ids[:max_length])


@dataclass
class Dataset:
    path: Path
    samples: list[Sample]
    truncated: int = 0  # samples longer than max_length, cut to it (reported, kept in the store's metadata)
    # data files appended by `record --continue --data` (lmclean/train/data.py load_segments): the
    # segments (path, first step) after the first; `samples` holds the union, old samples first
    more: list[tuple[Path, int]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # samples per file (the first, then `more`)

    def __post_init__(self) -> None:
        self.by_id = {s.id: s for s in self.samples}

    @property
    def ids(self) -> list[int]:
        return [s.id for s in self.samples]

    def path_of(self, sample_id: int) -> str:
        """The data file holding `sample_id` (all of them when none does): for error messages."""
        paths = [self.path, *(p for p, _ in self.more)]
        pos = next((k for k, s in enumerate(self.samples) if s.id == sample_id), None)
        if pos is None or not self.counts:
            return ", ".join(map(str, paths))
        return str(paths[int(np.searchsorted(np.cumsum(self.counts), pos, side="right"))])

    def plan(self, batch_size: int, seed: int, epochs: int | None, steps: int | None, shuffle: bool) -> list[list[int]]:
        """The batch plan: `batch_plan` over the one data file, `segmented_plan` over several."""
        if not self.more:
            return batch_plan(self.ids, batch_size, seed, epochs, steps, shuffle)
        if steps is None:
            raise ConfigError(f"training on more data files than {self.path} needs `train.steps` (the total step "
                              "count; `record --continue --data` sets it)")
        ends = np.cumsum(self.counts).tolist()
        firsts = [0, *(first for _, first in self.more)]
        segments = [(self.ids[:end], first) for end, first in zip(ends, firsts)]
        return segmented_plan(segments, batch_size, seed, steps, shuffle)


def load_dataset(cfg: DataConfig, tokenizer: Any, base: Path | None = None) -> Dataset:
    path = resolve_path(cfg.path, base)
    samples: list[Sample] = []
    seen: dict[int, int] = {}
    truncated = 0
    for index, (lineno, row) in enumerate(read_rows(path)):
        where = f"{path}:{lineno}"
        sid = row_id(row, cfg.id_field, index, where, "(data.id_field)")
        if sid in seen:
            raise DataError(f"{where}: duplicate sample id {sid} (first on line {seen[sid]}); ids must be unique")
        seen[sid] = lineno
        text = row_text(row, cfg, where)
        ids = encode(tokenizer, text)
        truncated += len(ids) > cfg.max_length
        samples.append(Sample(sid, text, ids[: cfg.max_length]))
    return Dataset(path, samples, truncated)


def load_segments(cfg: DataConfig, tokenizer: Any, base: Path | None, more: list[tuple[str, int]]) -> Dataset:
    """The data of `data.path` followed by each more data file (path, first step it is trained at):
    one Dataset whose samples are the union, in file order. An id that two files share is refused
    (DataError naming the first such id and both files): a sample id names one sample for good."""
    first = load_dataset(cfg, tokenizer, base)
    if not more:
        return first
    samples, owner = list(first.samples), {s.id: first.path for s in first.samples}
    truncated, parts, counts = first.truncated, [], [len(first.samples)]
    for raw, step in more:
        part = load_dataset(replace(cfg, path=str(raw)), tokenizer, base)
        clash = next((s.id for s in part.samples if s.id in owner), None)
        if clash is not None:
            raise DataError(f"{part.path}: sample id {clash} is already used by {owner[clash]}; give the new samples "
                            "ids no earlier data file uses")
        owner.update((s.id, part.path) for s in part.samples)
        samples += part.samples
        truncated += part.truncated
        parts.append((part.path, int(step)))
        counts.append(len(part.samples))
    return Dataset(first.path, samples, truncated, parts, counts)


def segments_meta(dataset: Dataset) -> list[dict[str, Any]]:
    """meta["data_segments"] of a store trained on more than one data file ([] for one file)."""
    if not dataset.more:
        return []
    firsts = [(dataset.path, 0), *dataset.more]
    return [{"path": str(p), "first_step": int(f), "samples": int(n)} for (p, f), n in zip(firsts, dataset.counts)]


def more_data(meta: dict[str, Any]) -> list[tuple[str, int]]:
    """The data files after the first (path, first step) that a store's metadata lists."""
    return [(str(s["path"]), int(s["first_step"])) for s in (meta.get("data_segments") or [])[1:]]


def resolve_path(raw: str, base: Path | None) -> Path:
    """Relative paths resolve against the working directory, then against the config's directory."""
    path = Path(raw)
    if path.is_absolute() or path.exists() or base is None:
        return path
    return base / path if (base / path).exists() else path


def collate(token_lists: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> input_ids (B, L) int64 and lengths (B,) int64."""
    L = length or max((len(t) for t in token_lists), default=1)
    ids = torch.full((len(token_lists), L), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(token_lists), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        lengths[i] = len(toks)
    return ids, lengths


def batch_plan(ids: Sequence[int], batch_size: int, seed: int, epochs: int | None, steps: int | None, shuffle: bool) -> list[list[int]]:
    """The deterministic list of batches (sample ids per step); `--exclude` filters it, never reorders."""
    order_ids = np.asarray(ids)
    plan: list[list[int]] = []
    epoch = 0
    while True:
        if steps is None and epochs is not None and epoch >= epochs:
            break
        perm = np.random.default_rng([seed, epoch]).permutation(len(order_ids)) if shuffle else np.arange(len(order_ids))
        for start in range(0, len(perm), batch_size):
            if steps is not None and len(plan) >= steps:
                return plan
            plan.append([int(x) for x in order_ids[perm[start : start + batch_size]]])
        epoch += 1
    return plan


def segmented_plan(segments: Sequence[tuple[Sequence[int], int]], batch_size: int, seed: int, steps: int,
                   shuffle: bool) -> list[list[int]]:
    """The batch plan of a run whose data grew: `segments` are (the ids available, first step), the
    first at step 0, each later one holding the earlier ids followed by the added ones.

    Epochs are numbered over the whole run. Segment k runs from its first step to the next
    segment's (or `steps`), epoch after epoch, epoch e ordered by `default_rng([seed, e])` over the
    segment's ids (as in `batch_plan`); a segment starts a new epoch, cutting short the epoch in
    progress. So the plan up to a segment's first step is the plan recorded before the data grew,
    and one segment alone is `batch_plan` with `steps`."""
    plan: list[list[int]] = []
    epoch = 0
    for k, (ids, first) in enumerate(segments):
        if first != len(plan) or not len(ids):
            raise DataError(f"data segment {k} starts at step {first} with {len(ids)} samples; segments start where "
                            f"the previous one stops ({len(plan)}) and hold samples")
        stop = segments[k + 1][1] if k + 1 < len(segments) else steps
        order_ids, n = np.asarray(ids), len(ids)
        while len(plan) < stop:
            perm = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
            for start in range(0, len(perm), batch_size):
                if len(plan) >= stop:
                    break
                plan.append([int(x) for x in order_ids[perm[start : start + batch_size]]])
            epoch += 1
    return plan


def parse_id_spec(spec: str, base: Path | None = None) -> list[int]:
    """`3,5,60-79` or `@file` (one id or range per line) -> sorted unique ids (int64, at most MAX_SPEC_IDS)."""
    text = spec
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise InputNotFoundError(f"id file {path} does not exist; use @FILE with one id per line")
        try:
            content = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"id file {path} is not UTF-8 text (byte {exc.start}); write one id or range per line") from exc
        text = ",".join(line.split("#")[0].strip() for line in content.splitlines())
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        try:
            lo, dash, hi = part.partition("-")
            a, b = int(lo), int(hi if dash else lo)
            if b < a:
                raise ValueError("a range runs backwards")
        except ValueError as exc:
            raise DataError(f"cannot read ids {part!r} in {spec!r}; use ids, ranges like 60-79 (low-high), or @file") from exc
        if b > MAX_SAMPLE_ID:
            raise DataError(f"id {b} in {spec!r} is too large; sample ids are int64 (at most {MAX_SAMPLE_ID})")
        if b - a + 1 + len(out) > MAX_SPEC_IDS:
            raise DataError(f"{spec!r} names more than {MAX_SPEC_IDS:,} ids; split the request")
        out.update(range(a, b + 1))
    if not out:
        raise DataError(f"no ids in {spec!r}")
    return sorted(out)
