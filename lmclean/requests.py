"""The durable queue of deletion requests: `STORE/requests/<request id>.json`, one file each.

`lmclean request` queues a request and returns at once, whether or not a job holds the store: each
file is written with the store's atomic write (lmclean/store/atomic.py) and needs no store lock (a
running `record` holds it). A request is resolved and checked when it is queued (ids known to the
store, not already forgotten), so what stays pending can be applied later: by a running `record`
at its next step boundary (lmclean/train/online.py) or by `lmclean unlearn --pending`
(lmclean/unlearn/pending.py). Status: pending -> applied | refused. A pending request may be
*claimed* (``step`` / ``audit_request_id`` set) by the job about to apply it, so that a job resumed
after a crash applies it at the same step, under the same audit id, instead of again elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmclean.errors import DataError, InputNotFoundError, StoreError

__all__ = ["REQUESTS_DIR", "Request", "claim", "enqueue", "list_requests", "mark_applied", "mark_refused",
           "pending", "read_request", "RequestPoller"]

REQUESTS_DIR = "requests"
STATUSES = ("pending", "applied", "refused")
_VERSION = 1


@dataclass
class Request:
    """One queued deletion request (the file's fields; docs/store-format.md, "Requests")."""

    id: str
    ids: list[int]
    created: str  # UTC, ISO 8601 with microseconds (orders the queue)
    reason: str | None = None
    requested_by: str | None = None
    status: str = "pending"
    applied_at: str | None = None
    step: int | None = None  # the step boundary it was (or is claimed to be) applied at; None: `unlearn --pending`
    method: str | None = None
    wait_seconds: float | None = None  # created -> applied
    error: str | None = None  # why it was refused (one line)
    audit_request_id: str | None = None  # the audit record's request id (shared when several went in one sweep)
    audit_seq: int | None = None
    fingerprints: list[str] = field(default_factory=list)
    source: str | None = None  # what the requester named (--forget 3,5 / --forget-data rows.jsonl)
    version: int = _VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> "Request":
        known = {f.name for f in fields(cls)}
        try:
            req = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise StoreError(f"request file {where} is missing fields ({exc}); it is written atomically, so it was "
                             "edited by hand: restore it or remove it") from exc
        if req.status not in STATUSES or not isinstance(req.ids, list):
            raise StoreError(f"request file {where} has status {req.status!r} / ids {req.ids!r}; expected one of "
                             f"{list(STATUSES)} and a list of sample ids: restore it or remove it")
        return req

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created.replace("Z", "+00:00"))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def requests_dir(store: Path | str) -> Path:
    return Path(store) / REQUESTS_DIR


def _path(store: Path | str, request_id: str) -> Path:
    return requests_dir(store) / f"{request_id}.json"


def _write(store: Path | str, req: Request) -> None:
    from lmclean.store.atomic import atomic_write_json, fsync_dir

    directory = requests_dir(store)
    if not directory.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
    atomic_write_json(_path(store, req.id), req.to_dict())


def read_request(store: Path | str, request_id: str) -> Request:
    path = _path(store, request_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputNotFoundError(f"no request {request_id} in store {store}; list them with "
                                 f"`lmclean request {store} --list`") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"request file {path} is unreadable ({exc}); restore it or remove it") from exc
    return Request.from_dict(data, path)


def list_requests(store: Path | str) -> list[Request]:
    """Every request of the store, oldest first."""
    directory = requests_dir(store)
    if not directory.is_dir():
        return []
    names = [n for n in os.listdir(directory) if n.endswith(".json") and not n.startswith(".")]
    out = [read_request(store, n[: -len(".json")]) for n in names]
    return sorted(out, key=lambda r: (r.created, r.id))


def pending(store: Path | str) -> list[Request]:
    """The pending requests, oldest first."""
    return [r for r in list_requests(store) if r.status == "pending"]


def enqueue(store: Path | str, *, ids: str | None = None, data: Path | None = None, reason: str | None = None,
            requested_by: str | None = None) -> Request:
    """Resolve, check and queue one request (sample level). Refused at once, with a one-line error:
    no store, ids unknown to it, rows that match no recorded sample, samples already forgotten."""
    from lmclean.audit.events import check_not_tombstoned, new_request_id
    from lmclean.audit.history import load_history, refuse_forgotten
    from lmclean.store.reader import TrajectoryStore
    from lmclean.unlearn.request import ForgetSpec
    from lmclean.unlearn.resolve import resolve_forget

    if not ids and data is None:
        raise DataError("nothing to forget: pass --forget IDS (3,5,60-79 or @file) or --forget-data FILE.jsonl")
    ts = TrajectoryStore(store)  # "no lmclean store at ..." first
    resolved = resolve_forget(ts, ForgetSpec(ids=ids, data=data))
    never = sorted(set(resolved.sample_ids) & {int(i) for i in ts.meta.get("excluded_ids", [])})
    if never:
        raise DataError(f"sample {never[0]} was excluded from store {ts.path}'s run (--exclude): it was never trained on; "
                        "nothing to do")
    refuse_forgotten(load_history(ts.path), resolved.sample_ids)
    check_not_tombstoned(ts.path, list(resolved.sample_ids))
    source = " ".join(s for s in (f"--forget {ids}" if ids else "", f"--forget-data {data}" if data else "") if s)
    req = Request(id=new_request_id(), ids=[int(i) for i in resolved.sample_ids], created=_now(), reason=reason,
                  requested_by=requested_by, fingerprints=list(resolved.fingerprints), source=source)
    while _path(store, req.id).exists():  # the same second and the same 24 random bits: draw again
        req.id = new_request_id()
    _write(store, req)
    return req


def _update(store: Path | str, request_id: str, **changes: Any) -> Request:
    req = read_request(store, request_id)
    for key, value in changes.items():
        setattr(req, key, value)
    _write(store, req)
    return req


def claim(store: Path | str, request_id: str, *, audit_request_id: str, method: str, step: int | None = None) -> Request:
    """Note, before any work, the step and audit id a pending request is about to be applied under."""
    return _update(store, request_id, audit_request_id=audit_request_id, method=method, step=step)


def mark_applied(store: Path | str, request_id: str, *, audit_request_id: str, audit_seq: int | None, method: str,
                 step: int | None = None) -> Request:
    req = read_request(store, request_id)
    at = datetime.now(UTC)
    wait = round((at - req.created_at).total_seconds(), 3)
    return _update(store, request_id, status="applied", applied_at=at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                   audit_request_id=audit_request_id, audit_seq=audit_seq, method=method, step=step,
                   wait_seconds=wait, error=None)


def mark_refused(store: Path | str, request_id: str, error: str) -> Request:
    return _update(store, request_id, status="refused", error=" ".join(str(error).split()),
                   applied_at=_now())


class RequestPoller:
    """Cheap per-step polling for a running job: one listdir; a pending file is stat'ed and parsed
    again only when it changed (an applied or refused request is final: not even stat'ed)."""

    def __init__(self, store: Path | str) -> None:
        self.store = Path(store)
        self._seen: dict[str, tuple[tuple[int, int], Request]] = {}

    def pending(self) -> list[Request]:
        directory = requests_dir(self.store)
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            cached = self._seen.get(entry.name)
            if cached is not None and cached[1].status != "pending":
                continue
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                mtime = (st.st_ino, st.st_mtime_ns)  # an atomic rewrite is a new inode
                cached = self._seen.get(entry.name)
                if cached is None or cached[0] != mtime:
                    cached = (mtime, read_request(self.store, entry.name[: -len(".json")]))
                    self._seen[entry.name] = cached
                if cached[1].status == "pending":
                    out.append(cached[1])
        return sorted(out, key=lambda r: (r.created, r.id))
