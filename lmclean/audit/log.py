"""Append-only, hash-chained audit log (``audit.jsonl`` at the root of a store directory).

Each line is one JSON object. The chain fields make tampering visible: ``digest`` is the sha256 of
the record's canonical JSON (without ``digest``/``hmac``), ``prev`` repeats the previous record's
``digest``, and ``hmac`` signs the same bytes with a secret key (env ``LMCLEAN_AUDIT_KEY``). Without
the key anyone can rewrite the whole chain consistently; with it they cannot. See docs/audit.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac as hmac_lib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmclean.errors import AuditError, InputNotFoundError

__all__ = [
    "AUDIT_FILENAME",
    "CHAIN_FIELDS",
    "GENESIS_PREV",
    "KEY_ENV",
    "AuditLog",
    "VerifyResult",
    "canonical_json",
    "key_from_env",
    "utc_now",
]

AUDIT_FILENAME = "audit.jsonl"
KEY_ENV = "LMCLEAN_AUDIT_KEY"
GENESIS_PREV = "0" * 64
# Fields that append() fills; a caller-supplied record must not contain them.
CHAIN_FIELDS = ("seq", "time", "prev", "digest", "hmac", "signed")

Record = dict[str, Any]


def canonical_json(obj: Any) -> str:
    """The one serialisation digests and HMACs cover (sorted keys, no spaces, raw UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix and microseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_from_env() -> bytes | None:
    """The HMAC key from ``LMCLEAN_AUDIT_KEY`` (UTF-8 bytes), or None when unset or empty."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode("utf-8") if value else None


def _signed_bytes(record: Mapping[str, Any]) -> bytes:
    """What ``digest`` and ``hmac`` cover: the record minus those two fields."""
    body = {k: v for k, v in record.items() if k not in ("digest", "hmac")}
    return canonical_json(body).encode("utf-8")


def _digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(_signed_bytes(record)).hexdigest()


def _hmac(record: Mapping[str, Any], key: bytes) -> str:
    return hmac_lib.new(key, _signed_bytes(record), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :meth:`AuditLog.verify`; ``problem`` names the first broken record and why."""

    ok: bool
    n_records: int
    first_bad_seq: int | None = None
    problem: str | None = None
    signatures_checked: bool = False
    n_signed: int = 0
    note: str | None = None


class AuditLog:
    """The audit log of one store directory; callers serialise appends (hold the StoreLock)."""

    def __init__(self, store_dir: Path | str) -> None:
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / AUDIT_FILENAME

    def __repr__(self) -> str:
        return f"AuditLog({str(self.store_dir)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    # -- reading -------------------------------------------------------------------------------

    def _read_text(self) -> str:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise AuditError(
                f"audit log {self.path} line {line} is not valid UTF-8: {e.reason}"
            ) from e

    def _parse(self, text: str) -> tuple[list[Record], AuditError | None]:
        """Parse line by line: the records before the first bad line, and that line's error."""
        out: list[Record] = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return out, AuditError(
                    f"audit log {self.path} line {lineno} is truncated or not JSON: {e}"
                )
            if not isinstance(obj, dict):
                return out, AuditError(
                    f"audit log {self.path} line {lineno} is not a JSON object "
                    f"(found {type(obj).__name__})"
                )
            out.append(obj)
        return out, None

    def records(self) -> list[Record]:
        """All records in file order ([] when there is no log yet). Does not verify the chain."""
        recs, err = self._parse(self._read_text())
        if err is not None:
            raise err
        return recs

    def find(self, predicate: Callable[[Record], bool]) -> list[Record]:
        """Records for which ``predicate`` is true, in log order."""
        return [r for r in self.records() if predicate(r)]

    def latest(
        self, where: Callable[[Record], bool] | Mapping[str, Any] | None = None
    ) -> Record | None:
        """The last record matching ``where`` (a predicate or a field -> value mapping), or None.

        Example: ``log.latest(where={"output_model_digest": model_digest(model_dir)})``.
        """
        if where is None:
            pred: Callable[[Record], bool] = lambda r: True  # noqa: E731
        elif callable(where):
            pred = where
        else:
            wanted = dict(where)
            pred = lambda r: all(k in r and r[k] == v for k, v in wanted.items())  # noqa: E731
        matches = self.find(pred)
        return matches[-1] if matches else None

    # -- writing -------------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> Record:
        """Chain, sign and atomically append one record; return it exactly as stored.

        The whole file is rewritten to a temp file in the same directory, fsynced and renamed over
        the old one, so a crash leaves either the old log or the new one, never a half line.
        """
        if not self.store_dir.is_dir():
            raise InputNotFoundError(
                f"store directory {self.store_dir} does not exist; create the store before logging"
            )
        reserved = sorted(set(record) & set(CHAIN_FIELDS))
        if reserved:
            raise AuditError(
                f"record fields {reserved} are filled by AuditLog.append; "
                "remove them from the record"
            )
        # Round-trip through JSON so the digest covers exactly what a reader will parse back
        # (tuples -> lists, non-str keys -> str).
        body: Record = json.loads(json.dumps(dict(record), ensure_ascii=False))

        old_text = self._read_text()
        existing, err = self._parse(old_text)
        if err is not None:
            raise AuditError(f"{err}; refusing to append to a damaged log (run verify)") from err
        if existing:
            last = existing[-1]
            if not isinstance(last.get("digest"), str) or not isinstance(last.get("seq"), int):
                raise AuditError(
                    f"audit log {self.path}: last record has no valid seq/digest; "
                    "refusing to append to a damaged log (run verify)"
                )
            seq, prev = last["seq"] + 1, last["digest"]
        else:
            seq, prev = 0, GENESIS_PREV

        key = key_from_env()
        full: Record = {
            **body,
            "seq": seq,
            "time": utc_now(),
            "prev": prev,
            "signed": key is not None,
        }
        full["digest"] = _digest(full)
        full["hmac"] = _hmac(full, key) if key is not None else None

        if old_text and not old_text.endswith("\n"):
            old_text += "\n"
        self._atomic_write((old_text + canonical_json(full) + "\n").encode("utf-8"))
        return full

    def _atomic_write(self, data: bytes) -> None:
        fd, tmp_name = tempfile.mkstemp(
            dir=self.store_dir, prefix=f".{AUDIT_FILENAME}.", suffix=".partial"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(self.store_dir)

    # -- verification --------------------------------------------------------------------------

    def verify(self, key: bytes | str | None = None, *, use_env: bool = True) -> VerifyResult:
        """Check seq contiguity, the prev chain, every digest and (with a key) every HMAC.

        ``key`` defaults to ``LMCLEAN_AUDIT_KEY`` unless ``use_env=False``. A log that does not
        exist verifies as ok with 0 records; the caller decides whether that is acceptable.
        """
        if isinstance(key, str):
            key = key.encode("utf-8")
        if key is None and use_env:
            key = key_from_env()
        if not key:
            key = None

        recs, parse_err = self._parse(self._read_text())
        n_signed = sum(1 for r in recs if r.get("signed") is True)

        def fail(pos: int, problem: str) -> VerifyResult:
            return VerifyResult(False, len(recs), pos, problem, key is not None, n_signed)

        prev_digest = GENESIS_PREV
        for pos, rec in enumerate(recs):
            seq = rec.get("seq")
            if seq != pos or isinstance(seq, bool):
                return fail(
                    pos,
                    f"record {pos} (line {pos + 1}): seq is {seq!r}, expected {pos} "
                    "(record deleted or reordered)",
                )
            stored = rec.get("digest")
            if stored != _digest(rec):
                return fail(pos, f"record {pos}: digest mismatch (content edited)")
            if rec.get("prev") != prev_digest:
                what = "the genesis value (64 zeros)" if pos == 0 else f"digest of record {pos - 1}"
                return fail(
                    pos, f"record {pos}: prev does not match {what} (record deleted or reordered)"
                )
            mac = rec.get("hmac")
            if rec.get("signed") is True and mac is None:
                return fail(
                    pos, f"record {pos}: marked signed but hmac is missing (signature stripped)"
                )
            if key is not None:
                if mac is None:
                    return fail(pos, f"record {pos} is unsigned")
                if not isinstance(mac, str) or not hmac_lib.compare_digest(mac, _hmac(rec, key)):
                    return fail(
                        pos, f"record {pos}: HMAC mismatch (wrong key, or the chain was rewritten)"
                    )
            prev_digest = stored

        if parse_err is not None:
            return fail(len(recs), str(parse_err))
        note = None
        if key is None and n_signed:
            note = (
                f"{n_signed} of {len(recs)} records are signed; signatures not checked "
                f"(no key: set {KEY_ENV})"
            )
        return VerifyResult(True, len(recs), None, None, key is not None, n_signed, note)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; some platforms cannot open directories, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
