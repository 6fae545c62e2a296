"""Scrub forgotten samples' token data from a store, one atomically replaced chunk at a time.

After an unlearning request the forgotten samples' token rows are overwritten with zeros in every
step that recorded them, and ``samples/tombstone`` (N,) int64 marks them as removed (-1 = live,
else the audit ``seq`` of the record that removed them). ``steps/sample_ids`` and
``steps/lengths`` are left unchanged, so the recorded batch structure stays known.

Each chunk is decoded and re-encoded (lmclean/store/scrub_chunks.py) through the store's one codec
path (lmclean/store/codec.py: checksum verified on read, written with a new one) and replaced with
the store's atomic write (lmclean/store/atomic.py: temp file, fsync, rename, directory fsync): a
crash leaves every chunk either old or new. The whole scrub is restartable: an intent file
(``scrub_pending.json``) lists the ids and steps before any chunk is touched and is removed only
after the tombstones are written; ``finish_scrub_intent`` completes an interrupted one (and
``lmclean.audit.recovery.finish_pending_scrub`` also scrubs what the audit log says was scrubbed).

The caller holds the store's ``StoreLock`` for the whole operation.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from lmclean.errors import DataError, InputNotFoundError, StoreError, StoreVersionError
from lmclean.store import format as fmt
from lmclean.store.atomic import PARTIAL_SUFFIX, DirSync, fsync_dir
from lmclean.store.codec import array_codec
from lmclean.store.scrub_chunks import (chunk_path, chunk_rows, open_array, read_all, read_chunk, rewrite_chunk,
                                        write_file)

__all__ = [
    "PENDING_FILENAME",
    "TOMBSTONE_ARRAY",
    "ScrubResult",
    "pending_scrub",
    "scrub_samples",
    "tombstones",
]

PENDING_FILENAME = "scrub_pending.json"
TOKENS_ARRAY = "steps/tokens"
SAMPLE_IDS_ARRAY = "steps/sample_ids"
SAMPLE_TABLE = "samples/id"
TOMBSTONE_ARRAY = "samples/tombstone"
LIVE = -1  # tombstone value of a sample that was never removed
_PENDING_VERSION = 1


@dataclass(frozen=True)
class ScrubResult:
    """What one scrub did.

    ``steps``: every step whose batch holds one of the samples (committed or not: stale rows
    left past the commit point by an interrupted recording are scrubbed too).
    ``rows_scrubbed`` / ``chunks_rewritten``: work done by this call (0 when it was already done).
    ``tombstoned``: sample id -> audit seq after the call, for the requested ids. A sample that
    was already tombstoned keeps the seq of the record that removed it first.
    """

    store: Path
    sample_ids: tuple[int, ...]
    audit_seq: int
    steps: tuple[int, ...]
    rows_scrubbed: int
    chunks_rewritten: int
    tombstoned: dict[int, int] = field(default_factory=dict)


# -- small file helpers --------------------------------------------------------------------------


def _store_dir(store_dir: Path | str) -> Path:
    path = Path(store_dir)
    if not (path / "zarr.json").is_file():
        raise InputNotFoundError(
            f"no lmclean store at {path}; create one with `lmclean record --store {path}`"
        )
    try:
        version = json.loads((path / "zarr.json").read_text())["attributes"][fmt.META_KEY]["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        version = None
    if version != fmt.FORMAT_VERSION:
        raise StoreVersionError(
            f"store {path} has format version {version}, this lmclean scrubs version {fmt.FORMAT_VERSION}; "
            "re-record it with `lmclean record`"
        )
    return path


# -- reading -------------------------------------------------------------------------------------


def _sample_table(store: Path) -> np.ndarray:
    return read_all(store, SAMPLE_TABLE).astype(np.int64)


def _tombstone_values(store: Path, n: int) -> np.ndarray | None:
    """The tombstone column (N,), or None when the store has never been scrubbed."""
    if not (store / TOMBSTONE_ARRAY / "zarr.json").is_file():
        return None
    arr = open_array(store, TOMBSTONE_ARRAY)
    if arr.shape != (n,):
        raise StoreError(
            f"store {store}: array {TOMBSTONE_ARRAY} has shape {arr.shape}, expected ({n},) "
            "like samples/id"
        )
    c = chunk_rows(arr)
    for index in range(-(-n // c)):
        if not chunk_path(store, TOMBSTONE_ARRAY, arr, (index,)).is_file():
            raise StoreError(
                f"store {store}: array {TOMBSTONE_ARRAY} chunk {index} is missing, so which "
                "samples were scrubbed is unknown (damaged store)"
            )
    return read_all(store, TOMBSTONE_ARRAY).astype(np.int64)


def tombstones(store_dir: Path | str) -> dict[int, int]:
    """Scrubbed samples: sample id -> audit seq of the record that removed it ({} if none).

    Works on stores that were never scrubbed (no ``samples/tombstone`` array). A damaged tombstone
    array raises StoreError rather than reading as "nothing removed".
    """
    store = _store_dir(store_dir)
    ids = _sample_table(store)
    values = _tombstone_values(store, len(ids))
    if values is None:
        return {}
    return {int(i): int(v) for i, v in zip(ids, values) if v != LIVE}


def pending_scrub(store_dir: Path | str) -> dict[str, Any] | None:
    """The intent of an interrupted scrub ({sample_ids, steps, audit_seq, started}), or None."""
    path = Path(store_dir) / PENDING_FILENAME
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        intent = json.loads(raw)
        ok = (
            isinstance(intent, dict)
            and isinstance(intent.get("sample_ids"), list)
            and isinstance(intent.get("audit_seq"), int)
        )
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise StoreError(
            f"store {store_dir}: {PENDING_FILENAME} is unreadable; it is written atomically, so "
            "it was damaged after the fact; restore it or remove it and scrub again"
        )
    return intent


def _affected_steps(store: Path, sample_ids: np.ndarray, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """step -> (B,) bool mask of batch positions holding a wanted sample (every written row)."""
    arr = open_array(store, SAMPLE_IDS_ARRAY)
    codec, c = array_codec(arr), chunk_rows(arr)
    out: dict[int, np.ndarray] = {}
    for index in range(-(-arr.shape[0] // c)):
        block = read_chunk(store, arr, SAMPLE_IDS_ARRAY, codec, index)
        if block is None:
            continue  # never written: holds no sample
        mask = np.isin(block, wanted)
        out.update({index * c + int(t): mask[t] for t in np.nonzero(mask.any(axis=1))[0]})
    return out


# -- scrubbing -----------------------------------------------------------------------------------


def _check_ids(store: Path, ids: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    table = _sample_table(store)
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        raise DataError("no sample ids to scrub; pass at least one id")
    known = set(table.tolist())
    unknown = [i for i in wanted if i not in known]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (f", … ({len(unknown)} in all)" if len(unknown) > 10 else "")
        what = f"sample id {shown} is" if len(unknown) == 1 else f"sample ids {shown} are"
        raise DataError(
            f"{what} not in store {store}; list its samples with `lmclean inspect-log {store} --json`"
        )
    return table, wanted


def _scrubbed_token_chunks(store: Path, masks: dict[int, np.ndarray]) -> list[tuple[int, np.ndarray, int]]:
    """(chunk index, chunk with the masked token rows zeroed, rows zeroed) of every tokens chunk
    that changes. Reads (and checksums) them all before anything is written: a damaged chunk
    stops the scrub before its intent file or any chunk is touched."""
    tokens = open_array(store, TOKENS_ARRAY)
    codec, c = array_codec(tokens), chunk_rows(tokens)
    by_chunk: dict[int, list[int]] = {}
    for t in sorted(masks):
        if t < tokens.shape[0]:
            by_chunk.setdefault(t // c, []).append(t)
    out = []
    for index, steps in by_chunk.items():
        data = read_chunk(store, tokens, TOKENS_ARRAY, codec, index)
        if data is None:
            continue  # never written: holds no data
        changed = 0
        for t in steps:
            for p in np.nonzero(masks[t][: data.shape[1]])[0]:
                if data[t - index * c, p].any():
                    data[t - index * c, p] = 0
                    changed += 1
        if changed:
            out.append((index, data, changed))
    return out


def _scrub_tokens(store: Path, scrubbed: list[tuple[int, np.ndarray, int]]) -> tuple[int, int]:
    """Write the scrubbed token chunks; return (rows overwritten, chunks rewritten)."""
    tokens = open_array(store, TOKENS_ARRAY)
    codec = array_codec(tokens)
    dirs = DirSync()
    for index, data, _ in scrubbed:
        rewrite_chunk(store, TOKENS_ARRAY, tokens, codec, index, data, dirs)
    dirs.sync()  # every rename durable before the tombstones say the scrub is done
    return sum(n for _, _, n in scrubbed), len(scrubbed)


def _write_tombstones(store: Path, table: np.ndarray, wanted: list[int], seq: int) -> dict[int, int]:
    """Set the tombstone of ``wanted`` to ``seq`` (keeping an earlier one); create the array once."""
    n = len(table)
    values = _tombstone_values(store, n)
    meta_path = store / TOMBSTONE_ARRAY / "zarr.json"
    created = values is None
    if values is None:
        values = np.full(n, LIVE, dtype=np.int64)
        mem_entries: dict[str, Any] = {}
        zarr.create_array(
            store=MemoryStore(mem_entries), shape=(n,), chunks=(max(n, 1),), dtype="int64",
            fill_value=LIVE, compressors=fmt.RAW_CODEC,
            attributes={"description": "-1 = live, else the audit seq of the record that scrubbed the sample"},
        )
        meta = mem_entries["zarr.json"].to_bytes()
    else:
        meta = meta_path.read_bytes()
    before = values.copy()
    pos = {int(i): k for k, i in enumerate(table.tolist())}
    for i in wanted:
        if values[pos[i]] == LIVE:
            values[pos[i]] = seq
    if created or not np.array_equal(before, values):
        array = _metadata_only(meta)
        codec, c = array_codec(array), chunk_rows(array)
        for index in range(-(-n // c)):
            path = chunk_path(store, TOMBSTONE_ARRAY, array, (index,))
            write_file(path, codec.encode(values[index * c : (index + 1) * c]))
        if created:  # metadata last: the array appears only once its data is in place
            write_file(meta_path, meta)
    return {i: int(values[pos[i]]) for i in wanted}


def _metadata_only(meta: bytes) -> Any:
    """A zarr array (in memory) with the metadata ``meta``: its codecs and chunk keys, no data."""
    return zarr.open_array(store=MemoryStore({"zarr.json": cpu.Buffer.from_bytes(meta)}), mode="r")


def _write_intent(store: Path, wanted: list[int], steps: list[int], seq: int) -> None:
    intent = {
        "version": _PENDING_VERSION,
        "sample_ids": wanted,
        "steps": steps,
        "audit_seq": seq,
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    write_file(store / PENDING_FILENAME, (json.dumps(intent, indent=1) + "\n").encode())


def _clear_intent(store: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store / PENDING_FILENAME).unlink()
    fsync_dir(store)


def _remove_partials(store: Path) -> None:
    """Temp files of a scrub that died between write and rename (they hold only scrubbed data)."""
    for name in (TOKENS_ARRAY, TOMBSTONE_ARRAY):
        root = store / name
        if root.is_dir():
            for p in root.rglob(f".*{PARTIAL_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _run(store: Path, wanted: list[int], seq: int, table: np.ndarray) -> ScrubResult:
    masks = _affected_steps(store, table, np.asarray(wanted, dtype=np.int64))
    steps = sorted(masks)
    scrubbed = _scrubbed_token_chunks(store, masks)
    _write_intent(store, wanted, steps, seq)
    rows, chunks = _scrub_tokens(store, scrubbed)
    marked = _write_tombstones(store, table, wanted, seq)
    _clear_intent(store)
    return ScrubResult(store, tuple(wanted), seq, tuple(steps), rows, chunks, marked)


def scrub_samples(store_dir: Path | str, sample_ids: Iterable[int], audit_seq: int) -> ScrubResult:
    """Overwrite the token rows of ``sample_ids`` with zeros in every step and tombstone them.

    ``audit_seq`` is the seq of the audit record of the unlearning that removed them. Idempotent:
    scrubbing again rewrites nothing and keeps the first seq. An interrupted earlier scrub is
    completed first. Raises DataError naming an id that is not in the store, StoreError naming
    the array and step of a chunk that cannot be decoded.
    """
    store = _store_dir(store_dir)
    if isinstance(audit_seq, bool) or not isinstance(audit_seq, (int, np.integer)) or audit_seq < 0:
        raise ValueError(f"audit_seq must be an audit record's seq (an int >= 0), got {audit_seq!r}")
    table, wanted = _check_ids(store, sample_ids)
    pending = pending_scrub(store)
    if pending is not None and (pending["sample_ids"], pending["audit_seq"]) != (wanted, int(audit_seq)):
        _finish_intent(store, pending)
    _remove_partials(store)
    return _run(store, wanted, int(audit_seq), table)


def _finish_intent(store: Path, intent: dict[str, Any]) -> ScrubResult:
    table, wanted = _check_ids(store, intent["sample_ids"])
    _remove_partials(store)
    return _run(store, wanted, int(intent["audit_seq"]), table)


def finish_scrub_intent(store_dir: Path | str) -> ScrubResult | None:
    """Complete a scrub that a crash interrupted (``scrub_pending.json``): chunks already rewritten
    are skipped, the rest scrubbed, the tombstones written, the intent removed. Without an intent,
    remove a killed scrub's temp files. Returns what was done (None when nothing was pending)."""
    store = _store_dir(store_dir)
    intent = pending_scrub(store)
    if intent is None:
        _remove_partials(store)
        return None
    return _finish_intent(store, intent)
