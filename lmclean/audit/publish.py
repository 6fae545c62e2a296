"""Publish an unlearned model together with its audit record, or not at all (crash-safe).

Order, under the store lock:
1. the model is written to a hidden staging directory next to the output (atomically, complete);
2. an intent file ``STORE/unlearn_pending.json`` names the staging directory, the output and the
   weights digest;
3. the audit record is appended (the commit point: from here the unlearning has happened);
4. the staging directory is renamed to the output; 5. the intent file is removed.

A crash before 3 leaves no record: the next writer deletes the staged model (roll back). A crash
after 3 leaves a record whose model is staged: the next writer renames it into place (roll forward).
So an output model never exists without its audit record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmclean.errors import AuditError
from lmclean.store.atomic import atomic_write_bytes, fsync_dir

__all__ = ["PENDING_UNLEARN", "PendingPublish", "finish_pending_unlearn", "publish", "stage_path"]

PENDING_UNLEARN = "unlearn_pending.json"


def stage_path(out: Path) -> Path:
    """The staging directory of output `out`: hidden, beside it (same file system: rename is atomic)."""
    return out.with_name(f".{out.name}.lmclean-staged")


@dataclass(frozen=True)
class PendingPublish:
    store: Path
    staged: Path
    out: Path
    digest: str
    request_id: str
    overwrite: bool

    def write(self) -> None:
        body = {"version": 1, "staged": str(self.staged), "out": str(self.out), "digest": self.digest,
                "request_id": self.request_id, "overwrite": self.overwrite}
        atomic_write_bytes(self.store / PENDING_UNLEARN, (json.dumps(body, indent=1) + "\n").encode())

    @classmethod
    def read(cls, store: Path) -> PendingPublish | None:
        path = store / PENDING_UNLEARN
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text())
            return cls(store, Path(body["staged"]), Path(body["out"]), str(body["digest"]), str(body["request_id"]),
                       bool(body.get("overwrite")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"store {store}: {PENDING_UNLEARN} is unreadable ({exc}); it is written atomically, so "
                             "the store was edited by hand") from exc

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.store / PENDING_UNLEARN).unlink()


def _rename_into_place(staged: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and (overwrite or (out.is_dir() and not any(out.iterdir()))):
        old = out.with_name(f".{out.name}.lmclean-old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)  # an output that appeared meanwhile makes this fail: nothing is lost
    fsync_dir(out.parent)


def publish(pending: PendingPublish) -> None:
    """Steps 4-5: move the staged model to its output and clear the intent."""
    from lmclean._faults import crash_point

    _rename_into_place(pending.staged, pending.out, pending.overwrite)
    crash_point("unlearn:after-publish")
    pending.clear()


def finish_pending_unlearn(store: Path | str, records: list[dict[str, Any]] | None = None) -> str | None:
    """Complete or undo an interrupted publish (see the module docstring); returns what was done."""
    from lmclean.audit.digest import model_digest
    from lmclean.audit.log import AuditLog

    store = Path(store)
    pending = PendingPublish.read(store)
    if pending is None:
        return None
    if records is None:
        records = AuditLog(store).records()
    committed = any(r.get("kind") == "unlearn" and r.get("request_id") == pending.request_id
                    and r.get("output_model_digest") == pending.digest for r in records)
    if not committed:
        shutil.rmtree(pending.staged, ignore_errors=True)
        pending.clear()
        return f"rolled back an interrupted unlearning (request {pending.request_id}): it was never recorded"
    if pending.staged.is_dir():
        _rename_into_place(pending.staged, pending.out, pending.overwrite)
    elif not (pending.out.is_dir() and model_digest(pending.out) == pending.digest):
        raise AuditError(f"audit log of {store} records request {pending.request_id} with output {pending.out}, but "
                         f"neither it nor its staged copy {pending.staged} holds the model; restore it from a backup")
    pending.clear()
    return f"completed an interrupted unlearning (request {pending.request_id}): model moved to {pending.out}"
