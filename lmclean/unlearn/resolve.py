"""Turn what a user holds (ids, id files, text rows, step numbers) into a ForgetSet over a store."""

from __future__ import annotations

from pathlib import Path

from lmclean.config import DataConfig
from lmclean.errors import DataError
from lmclean.store.reader import TrajectoryStore
from lmclean.train.data import encode, fingerprint, load_tokenizer, parse_id_spec, read_rows, row_text
from lmclean.unlearn.common import ForgetSet
from lmclean.errors import UnsupportedError
from lmclean.unlearn.request import ForgetSpec, ResolvedForget


def ids_from_data(store: TrajectoryStore, path: Path) -> list[int]:
    """Match rows of a JSON Lines file to recorded samples by the fingerprint of their token ids."""
    if "data" not in store.meta.get("config", {}):
        raise UnsupportedError(f"store {store.path} was recorded by a Trainer (no lmclean data config): --forget-data "
                               "cannot tokenize rows as it did; pass the sample ids with --forget IDS")
    data_cfg = DataConfig(**{k: v for k, v in store.meta["config"]["data"].items() if k in DataConfig.__dataclass_fields__})
    tokenizer = load_tokenizer(store.meta["tokenizer"])
    by_fp = {fp: sid for sid, fp in store.sample_fingerprints.items()}
    out = []
    for lineno, row in read_rows(Path(path)):
        where = f"{path}:{lineno}"
        fp = fingerprint(encode(tokenizer, row_text(row, data_cfg, where), data_cfg.max_length))
        if fp not in by_fp:
            raise DataError(f"{where}: this row's text matches no recorded sample (fingerprint {fp[:12]}…); "
                            "check the template and that it was in the training data")
        out.append(by_fp[fp])
    return sorted(set(out))


def resolve_forget(store: TrajectoryStore, spec: ForgetSpec) -> ResolvedForget:
    """Resolve what the user named into the ForgetSet the engine runs and what the audit records."""
    if spec.level not in ("sample", "batch"):
        raise DataError(f"--level {spec.level!r} must be sample or batch")
    ids: list[int] = []
    if spec.ids:
        ids += parse_id_spec(spec.ids)
    if spec.data:
        ids += ids_from_data(store, spec.data)
    ids = sorted(set(ids))
    known = store.sample_fingerprints
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise DataError(f"sample id {unknown[0]} is not in store {store.path} ({len(unknown)} unknown); "
                        f"see `lmclean inspect-log {store.path} --json` for the recorded ids")
    step_ids = parse_id_spec(spec.steps) if spec.steps else []
    if not ids and not step_ids:
        raise DataError("nothing to forget: pass --forget IDS, --forget-data FILE.jsonl or --steps T,...")
    n = store.committed_steps
    bad = [t for t in step_ids if t >= n]
    if bad:
        raise DataError(f"--steps {bad[0]} is not a recorded step (0..{n - 1})")
    fps = tuple(known[i] for i in ids)
    if spec.level == "batch" or step_ids:
        all_ids = store.all_sample_ids()  # (T, B)
        hit = set(step_ids)
        if ids:
            hit |= set(store.occurrences(ids))
        removed = {int(i) for t in hit for i in all_ids[t] if i >= 0}
        return ResolvedForget(ForgetSet(steps=hit), tuple(ids), fps, "batch", tuple(sorted(hit)),
                              len(removed - set(ids)))
    return ResolvedForget(ForgetSet(sample_ids=set(ids)), tuple(ids), fps, "sample")
