"""Append-only, hash-chained audit log (``audit.jsonl`` at the root of a store directory).

Each line is one JSON object. The chain fields make tampering visible (the bytes they cover:
lmclean/audit/chain.py): ``digest`` is the sha256 of the record's canonical JSON (without
``digest``/``hmac``), ``prev`` repeats the previous record's ``digest``, and ``hmac`` signs the same
bytes with a secret key (env ``LMCLEAN_AUDIT_KEY``). Without the key anyone can rewrite the whole
chain consistently; with it they cannot. Signing starts at a *key enrolment* (a signed
``key-enrolled`` record, or a signed record 0): from there on every record
must be signed, and every append first verifies the chain. See docs/audit.md.
"""

from __future__ import annotations

import hmac as hmac_lib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmclean.audit.chain import KEY_ENV, canonical_json, digest_of, hmac_of, key_fingerprint, key_from_env, utc_now
from lmclean.errors import AuditError, InputNotFoundError

__all__ = [
    "AUDIT_FILENAME",
    "CHAIN_FIELDS",
    "ENROL_KIND",
    "GENESIS_PREV",
    "KEY_ENV",
    "AuditLog",
    "VerifyResult",
    "canonical_json",
    "key_fingerprint",
    "key_from_env",
    "utc_now",
]

AUDIT_FILENAME = "audit.jsonl"
GENESIS_PREV = "0" * 64
# Fields that append() fills; a caller-supplied record must not contain them.
CHAIN_FIELDS = ("seq", "time", "prev", "digest", "hmac", "signed")
ENROL_KIND = "key-enrolled"
# Filled by append() on enrolment records (explicit, or a signed record 0); never by a caller.
FINGERPRINT_FIELD = "key_fingerprint"

Record = dict[str, Any]


def _is_enrolment(rec: Mapping[str, Any], pos: int) -> bool:
    """An enrolment starts signing: a ``key-enrolled`` record, or record 0 written with a key."""
    return rec.get("kind") == ENROL_KIND or (pos == 0 and rec.get("hmac") is not None)


def _span(a: int, b: int) -> str:
    return f"record {a}" if a == b else f"records {a}..{b}"


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
    enrolled_at: int | None = None  # seq of the first key enrolment (signing starts there)
    current_key_at: int | None = None  # seq of the latest enrolment (the key that signs now)
    current_key_fingerprint: str | None = None


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
        """Verify the chain, then chain, sign and atomically append one record; return it as stored.

        Every writer comes through here, so none can extend a broken or forged chain: see
        :meth:`require_intact` for what is refused. The whole file is rewritten to a temp file in
        the same directory, fsynced and renamed over the old one, so a crash leaves either the old
        log or the new one, never a half line.
        """
        if not self.store_dir.is_dir():
            raise InputNotFoundError(
                f"store directory {self.store_dir} does not exist; create the store before logging"
            )
        reserved = sorted(set(record) & {*CHAIN_FIELDS, FINGERPRINT_FIELD})
        if reserved:
            raise AuditError(
                f"record fields {reserved} are filled by AuditLog.append; "
                "remove them from the record"
            )
        # Round-trip through JSON so the digest covers exactly what a reader will parse back
        # (tuples -> lists, non-str keys -> str).
        body: Record = json.loads(json.dumps(dict(record), ensure_ascii=False))
        key = key_from_env()
        enrolling = body.get("kind") == ENROL_KIND
        old_text = self._read_text()
        existing = self._check_appendable(old_text, key, enrolling)
        if existing:
            seq, prev = existing[-1]["seq"] + 1, existing[-1]["digest"]
        else:
            seq, prev = 0, GENESIS_PREV

        full: Record = {
            **body,
            "seq": seq,
            "time": utc_now(),
            "prev": prev,
            "signed": key is not None,
        }
        if key is not None and (enrolling or seq == 0):
            full[FINGERPRINT_FIELD] = key_fingerprint(key)
        full["digest"] = digest_of(full)
        full["hmac"] = hmac_of(full, key) if key is not None else None

        if old_text and not old_text.endswith("\n"):
            old_text += "\n"
        self._atomic_write((old_text + canonical_json(full) + "\n").encode("utf-8"))
        return full

    def require_intact(self) -> VerifyResult:
        """Raise AuditError (one line) unless a record could be appended now; call before any work.

        Refused: a damaged or broken chain (checked with ``LMCLEAN_AUDIT_KEY`` when set); no key
        for a log whose key was enrolled; a key for a log with records but no enrolment (the fix:
        ``lmclean audit enroll``). An empty or missing log passes.
        """
        recs = self._check_appendable(self._read_text(), key_from_env(), enrolling=False)
        return self._verify_records(recs, key_from_env())

    def _check_appendable(self, text: str, key: bytes | None, enrolling: bool) -> list[Record]:
        recs, err = self._parse(text)
        if err is not None:
            raise AuditError(
                f"{err}; refusing to append to a damaged log "
                f"(run `lmclean audit verify {self.store_dir}`)"
            ) from err
        enrolments = [pos for pos, r in enumerate(recs) if _is_enrolment(r, pos)]
        if enrolling and key is None:
            raise AuditError(f"set {KEY_ENV} to the key to enrol in the audit log of {self.store_dir}")
        if recs and not enrolling and key is not None and not enrolments:
            raise AuditError(
                f"the audit log of {self.store_dir} has {len(recs)} records but no key "
                f"enrolment, so records signed with {KEY_ENV} could never be verified; run "
                f"`lmclean audit enroll {self.store_dir}` first (or unset {KEY_ENV})"
            )
        if not enrolling and key is None and enrolments:
            raise AuditError(
                f"the audit log of {self.store_dir} is signed since key enrolment at record "
                f"{enrolments[-1]}; set {KEY_ENV} to the enrolled key to write to this store"
            )
        # An enrolment (maybe a rotation to a new key) checks the hash chain and the structure
        # only: the old key's signatures cannot be checked with the new key.
        result = self._verify_records(recs, None if enrolling else key)
        if not result.ok:
            raise AuditError(
                f"audit log {self.path}: {result.problem}; refusing to append to a broken chain "
                f"(run `lmclean audit verify {self.store_dir}`)"
            )
        return recs

    def enroll(self, *, rotate: bool = False) -> tuple[Record, bool]:
        """Sign from now on with ``LMCLEAN_AUDIT_KEY``: append a signed ``key-enrolled`` record.

        Returns (record, created): the current enrolment and False when this key is already
        enrolled. Another enrolled key is refused unless ``rotate`` (the new key signs from this
        record on; earlier records stay anchored by its ``prev``). Caller holds the StoreLock.
        """
        key = key_from_env()
        if key is None:
            raise AuditError(f"set {KEY_ENV} to the key to enrol in the audit log of {self.store_dir}")
        recs = self._check_appendable(self._read_text(), key, enrolling=True)
        enrolments = [pos for pos, r in enumerate(recs) if _is_enrolment(r, pos)]
        fp = key_fingerprint(key)
        previous = None
        if enrolments:
            current = recs[enrolments[-1]]
            previous = current.get(FINGERPRINT_FIELD)
            mac = current.get("hmac")
            same = previous == fp if isinstance(previous, str) else (
                isinstance(mac, str) and hmac_lib.compare_digest(mac, hmac_of(current, key)))
            if same:  # nothing to add; but the records this key signed must still hold
                result = self._verify_records(recs, key)
                if not result.ok:
                    raise AuditError(f"audit log {self.path}: {result.problem} "
                                     f"(run `lmclean audit verify {self.store_dir}`)")
                return current, False
            if not rotate:
                shown = f" (fingerprint {previous[:12]}…)" if isinstance(previous, str) else ""
                raise AuditError(
                    f"the audit log of {self.store_dir} already has a key enrolled at record "
                    f"{enrolments[-1]}{shown} and {KEY_ENV} is another key (fingerprint "
                    f"{fp[:12]}…); set the enrolled key, or pass --rotate to sign with the new key "
                    "from now on"
                )
        body: Record = {
            "kind": ENROL_KIND,
            "previous_key_fingerprint": previous if isinstance(previous, str) else None,
            "records_before": len(recs),
        }
        return self.append(body), True

    def _atomic_write(self, data: bytes) -> None:
        from lmclean.store.atomic import atomic_write_bytes

        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
        atomic_write_bytes(self.path, data, mode=mode)

    # -- verification --------------------------------------------------------------------------

    def verify(self, key: bytes | str | None = None, *, use_env: bool = True) -> VerifyResult:
        """Check seq contiguity, the prev chain, every digest and the signatures from enrolment on.

        ``key`` defaults to ``LMCLEAN_AUDIT_KEY`` unless ``use_env=False``. A log that does not
        exist verifies as ok with 0 records; the caller decides whether that is acceptable.
        """
        if isinstance(key, str):
            key = key.encode("utf-8")
        if key is None and use_env:
            key = key_from_env()
        recs, parse_err = self._parse(self._read_text())
        return self._verify_records(recs, key or None, parse_err)

    def _verify_records(
        self, recs: list[Record], key: bytes | None, parse_err: AuditError | None = None
    ) -> VerifyResult:
        n_signed = sum(1 for r in recs if r.get("signed") is True)
        enrolments = [pos for pos, r in enumerate(recs) if _is_enrolment(r, pos)]
        first = enrolments[0] if enrolments else None
        last = enrolments[-1] if enrolments else None
        current_fp = recs[last].get(FINGERPRINT_FIELD) if last is not None else None

        def result(ok: bool, pos: int | None, problem: str | None, note: str | None = None) -> VerifyResult:
            return VerifyResult(ok, len(recs), pos, problem, key is not None, n_signed, note,
                                first, last, current_fp if isinstance(current_fp, str) else None)

        prev_digest = GENESIS_PREV
        for pos, rec in enumerate(recs):
            seq = rec.get("seq")
            if seq != pos or isinstance(seq, bool):
                return result(False, pos,
                    f"record {pos} (line {pos + 1}): seq is {seq!r}, expected {pos} "
                    "(record deleted or reordered)",
                )
            stored = rec.get("digest")
            if stored != digest_of(rec):
                return result(False, pos, f"record {pos}: digest mismatch (content edited)")
            if rec.get("prev") != prev_digest:
                what = "the genesis value (64 zeros)" if pos == 0 else f"digest of record {pos - 1}"
                return result(False, pos,
                    f"record {pos}: prev does not match {what} (record deleted or reordered)"
                )
            mac = rec.get("hmac")
            if rec.get("signed") is True and mac is None:
                return result(False, pos,
                    f"record {pos}: marked signed but hmac is missing (signature stripped)"
                )
            if first is not None and pos >= first and mac is None:
                if pos in enrolments:
                    return result(False, pos, f"record {pos} enrols a key but is unsigned (forged)")
                return result(False, pos,
                    f"record {pos} is unsigned, but a key was enrolled at record {first}: every "
                    "record from the enrolment on must be signed"
                )
            if key is not None and last is not None and pos >= last:
                if not isinstance(mac, str) or not hmac_lib.compare_digest(mac, hmac_of(rec, key)):
                    return result(False, pos,
                        f"record {pos}: HMAC mismatch (wrong key, or the chain was rewritten)"
                    )
            prev_digest = stored

        if parse_err is not None:
            return result(False, len(recs), str(parse_err))
        notes = []
        if key is not None and recs and first is None:
            return result(False, 0,
                f"record 0 is unsigned and no key is enrolled in this log: run "
                f"`lmclean audit enroll {self.store_dir}` to start signing with {KEY_ENV}"
            )
        if key is not None and first:
            verb = "precedes" if first == 1 else "precede"
            notes.append(
                f"{_span(0, first - 1)} {verb} key enrolment at record {first} and "
                f"{'is' if first == 1 else 'are'} covered by the hash chain only"
            )
        if key is not None and last is not None and first is not None and last > first:
            notes.append(
                f"{_span(first, last - 1)} {'was' if last - first == 1 else 'were'} signed with "
                f"an earlier key (rotated at record {last}); covered by the hash chain only"
            )
        if key is None and n_signed:
            notes.append(
                f"{n_signed} of {len(recs)} records are signed; signatures not checked "
                f"(no key: set {KEY_ENV})"
            )
        return result(True, None, None, "; ".join(notes) or None)
