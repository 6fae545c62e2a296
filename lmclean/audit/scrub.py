"""Scrub forgotten samples' token data from a store, one atomically replaced chunk at a time.

After an unlearning request the forgotten samples' token rows are overwritten with zeros in every
step that recorded them, and ``samples/tombstone`` (N,) int64 marks them as removed (-1 = live,
else the audit ``seq`` of the record that removed them). ``steps/sample_ids`` and
``steps/lengths`` are left unchanged, so the recorded batch structure stays known.

Each chunk is re-encoded with zarr's own codec pipeline (an in-memory array with the same
metadata), written to a temp file next to the chunk, fsynced and renamed over it: a crash leaves
every chunk either old or new. The whole scrub is restartable: an intent file
(``scrub_pending.json``) lists the ids and steps before any chunk is touched and is removed only
after the tombstones are written; ``finish_pending_scrub`` completes an interrupted one.

The caller holds the store's ``StoreLock`` for the whole operation.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from lmclean.audit.log import AuditLog, _fsync_dir, utc_now
from lmclean._faults import crash_point
from lmclean.errors import AuditError, DataError, InputNotFoundError, StoreError

__all__ = [
    "PENDING_FILENAME",
    "TOMBSTONE_ARRAY",
    "ScrubResult",
    "finish_pending_scrub",
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
_PARTIAL_SUFFIX = ".lmclean-scrub.partial"
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


def _atomic_write_bytes(path: Path, data: bytes, dirs: set[Path] | None = None) -> None:
    """Write ``data`` to a temp file next to ``path``, fsync, rename over ``path``, fsync the dir.

    With ``dirs``, the directory is added to it instead of fsynced (the caller fsyncs them in bulk).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_PARTIAL_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if dirs is None:
        _fsync_dir(path.parent)
    else:
        dirs.add(path.parent)


def _store_dir(store_dir: Path | str) -> Path:
    path = Path(store_dir)
    if not (path / "zarr.json").is_file():
        raise InputNotFoundError(
            f"no lmclean store at {path}; create one with `lmclean record --store {path}`"
        )
    return path


# -- zarr helpers --------------------------------------------------------------------------------


def _open(store: Path, name: str) -> Any:
    try:
        return zarr.open_array(str(store / name), mode="r")
    except Exception as exc:  # zarr raises many types for missing or broken metadata
        raise StoreError(f"store {store}: array {name} is missing or unreadable ({exc})") from exc


def _mirror(meta: bytes) -> tuple[Any, dict[str, Any]]:
    """An in-memory array with exactly the metadata ``meta`` (a zarr.json document).

    Writing a chunk region into it produces the bytes zarr itself would store under the same key.
    """
    entries: dict[str, Any] = {"zarr.json": cpu.Buffer.from_bytes(meta)}
    mem = zarr.open_array(store=MemoryStore(entries), mode="r+", config={"write_empty_chunks": True})
    return mem, entries


def _chunk_rows(array: Any) -> int:
    """Rows per storage chunk along axis 0; the chunk must span every other axis whole."""
    shape = array.metadata.chunk_grid.chunk_shape
    if tuple(shape[1:]) != tuple(array.shape[1:]):
        raise StoreError(
            f"array {array.name} has chunks {tuple(shape)} for shape {array.shape}; scrubbing "
            "needs chunks that hold whole rows (the store format's layout)"
        )
    return int(shape[0])


def _chunk_path(store: Path, name: str, array: Any, coords: tuple[int, ...]) -> Path:
    """The chunk's file, from the array metadata's chunk_key_encoding (default: c/<i>/<j>/...)."""
    return store / name / array.metadata.encode_chunk_key(coords)


def _read_region(store: Path, array: Any, name: str, lo: int, hi: int) -> np.ndarray:
    try:
        return np.asarray(array[lo:hi])
    except Exception as exc:
        unit = "step" if name.startswith("steps/") else "row"
        where = f"{unit} {lo}" if hi == lo + 1 else f"{unit}s {lo}..{hi - 1}"
        raise StoreError(
            f"store {store}: array {name} chunk holding {where} is corrupted ({exc}); "
            "it cannot be scrubbed"
        ) from exc


def _encode_chunk(meta: bytes, index: int, data: np.ndarray) -> tuple[str, bytes]:
    """(chunk key, encoded bytes) of rows [index*c, index*c + len(data)) under metadata ``meta``."""
    mem, entries = _mirror(meta)
    lo = index * _chunk_rows(mem)
    mem[lo : lo + data.shape[0]] = data
    key = mem.metadata.encode_chunk_key((index,) + (0,) * (mem.ndim - 1))
    return key, entries[key].to_bytes()


def _rewrite_chunk(store: Path, name: str, meta: bytes, index: int, data: np.ndarray, dirs: set[Path]) -> None:
    """Re-encode one chunk of array ``name`` with zarr's own codecs and replace its file atomically."""
    key, raw = _encode_chunk(meta, index, data)
    _atomic_write_bytes(store / name / key, raw, dirs)
    crash_point("scrub:after-chunk")


# -- reading -------------------------------------------------------------------------------------


def _sample_table(store: Path) -> np.ndarray:
    arr = _open(store, SAMPLE_TABLE)
    return _read_region(store, arr, SAMPLE_TABLE, 0, arr.shape[0]).astype(np.int64)


def _tombstone_values(store: Path, n: int) -> np.ndarray | None:
    """The tombstone column (N,), or None when the store has never been scrubbed."""
    if not (store / TOMBSTONE_ARRAY / "zarr.json").is_file():
        return None
    arr = _open(store, TOMBSTONE_ARRAY)
    if arr.shape != (n,):
        raise StoreError(
            f"store {store}: array {TOMBSTONE_ARRAY} has shape {arr.shape}, expected ({n},) "
            "like samples/id"
        )
    c = _chunk_rows(arr)
    for index in range(-(-n // c)):
        if not _chunk_path(store, TOMBSTONE_ARRAY, arr, (index,)).is_file():
            raise StoreError(
                f"store {store}: array {TOMBSTONE_ARRAY} chunk {index} is missing, so which "
                "samples were scrubbed is unknown (damaged store)"
            )
    return np.asarray(_read_region(store, arr, TOMBSTONE_ARRAY, 0, n)).astype(np.int64)


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
    arr = _open(store, SAMPLE_IDS_ARRAY)
    try:
        table = np.asarray(arr[:])
    except Exception:  # locate the damaged row precisely
        for t in range(arr.shape[0]):
            _read_region(store, arr, SAMPLE_IDS_ARRAY, t, t + 1)
        raise
    mask = np.isin(table, wanted)
    return {int(t): mask[t] for t in np.nonzero(mask.any(axis=1))[0]}


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


def _scrub_tokens(store: Path, masks: dict[int, np.ndarray]) -> tuple[int, int]:
    """Zero the masked token rows chunk by chunk; return (rows overwritten, chunks rewritten)."""
    tokens = _open(store, TOKENS_ARRAY)
    c = _chunk_rows(tokens)
    T = tokens.shape[0]
    by_chunk: dict[int, list[int]] = {}
    for t in sorted(masks):
        if t < T:
            by_chunk.setdefault(t // c, []).append(t)
    meta = (store / TOKENS_ARRAY / "zarr.json").read_bytes()
    dirs: set[Path] = set()
    rows = chunks = 0
    for index, steps in by_chunk.items():
        coords = (index,) + (0,) * (tokens.ndim - 1)
        if not _chunk_path(store, TOKENS_ARRAY, tokens, coords).is_file():
            continue  # never written: holds no data
        lo, hi = index * c, min((index + 1) * c, T)
        data = _read_region(store, tokens, TOKENS_ARRAY, lo, hi)
        changed = 0
        for t in steps:
            pos = np.nonzero(masks[t][: data.shape[1]])[0]
            for p in pos:
                if data[t - lo, p].any():
                    data[t - lo, p] = 0
                    changed += 1
        if changed:
            _rewrite_chunk(store, TOKENS_ARRAY, meta, index, data, dirs)
            rows += changed
            chunks += 1
    for d in dirs:  # every rename durable before the tombstones say the scrub is done
        _fsync_dir(d)
    return rows, chunks


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
            fill_value=LIVE, compressors=None,
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
        c = _chunk_rows(_mirror(meta)[0])
        for index in range(-(-n // c)):
            key, raw = _encode_chunk(meta, index, values[index * c : (index + 1) * c])
            _atomic_write_bytes(store / TOMBSTONE_ARRAY / key, raw)
        if created:  # metadata last: the array appears only once its data is in place
            _atomic_write_bytes(meta_path, meta)
    return {i: int(values[pos[i]]) for i in wanted}


def _write_intent(store: Path, wanted: list[int], steps: list[int], seq: int) -> None:
    intent = {
        "version": _PENDING_VERSION,
        "sample_ids": wanted,
        "steps": steps,
        "audit_seq": seq,
        "started": utc_now(),
    }
    _atomic_write_bytes(store / PENDING_FILENAME, (json.dumps(intent, indent=1) + "\n").encode())


def _clear_intent(store: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store / PENDING_FILENAME).unlink()
    _fsync_dir(store)


def _remove_partials(store: Path) -> None:
    """Temp files of a scrub that died between write and rename (they hold only scrubbed data)."""
    for name in (TOKENS_ARRAY, TOMBSTONE_ARRAY):
        root = store / name
        if root.is_dir():
            for p in root.rglob(f"*{_PARTIAL_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def _run(store: Path, wanted: list[int], seq: int, table: np.ndarray) -> ScrubResult:
    masks = _affected_steps(store, table, np.asarray(wanted, dtype=np.int64))
    steps = sorted(masks)
    _write_intent(store, wanted, steps, seq)
    rows, chunks = _scrub_tokens(store, masks)
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


def finish_pending_scrub(store_dir: Path | str) -> list[ScrubResult]:
    """Complete scrubs that were interrupted; call it when a store is opened for writing.

    1. If ``scrub_pending.json`` exists (a crash mid-scrub), redo that scrub: chunks already
       rewritten are skipped, the rest are scrubbed, the tombstones written, the intent removed.
    2. Every ``unlearn`` record of the audit log with ``keep_data: false`` whose samples are not
       tombstoned (a crash between the audit append and the scrub) is scrubbed under its seq.

    Returns what was done ([] when nothing was pending). Raises AuditError on a damaged log.
    """
    store = _store_dir(store_dir)
    done: list[ScrubResult] = []
    intent = pending_scrub(store)
    if intent is not None:
        done.append(_finish_intent(store, intent))
    else:
        _remove_partials(store)
    log = AuditLog(store)
    if not log.exists():
        return done
    try:
        records = log.records()
    except AuditError as exc:
        raise AuditError(f"{exc}; cannot tell whether a scrub is pending (run `lmclean audit verify {store}`)") from exc
    dead = tombstones(store)
    for rec in records:
        if rec.get("kind") != "unlearn" or rec.get("keep_data") is not False:
            continue
        ids = rec.get("forget_ids") or []
        missing = [int(i) for i in ids if int(i) not in dead]
        if missing and isinstance(rec.get("seq"), int):
            result = scrub_samples(store, missing, rec["seq"])
            done.append(result)
            dead.update(result.tombstoned)
    return done
