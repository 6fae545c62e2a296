"""Finish what a crash interrupted, from the store's intent files and the audit log.

Called by every writer of a store under its lock (`unlearn`, `record --resume`), after
`AuditLog.require_intact()`: the log is what says which samples must be scrubbed.
"""

from __future__ import annotations

from pathlib import Path

from lmclean.audit.log import AuditLog
from lmclean.errors import AuditError
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmclean.store.scrub import ScrubResult

__all__ = ["finish_pending_scrub"]


def finish_pending_scrub(store_dir: Path | str) -> list[ScrubResult]:
    """Complete scrubs that were interrupted.

    1. If ``scrub_pending.json`` exists (a crash mid-scrub), the store redoes that scrub.
    2. Every ``unlearn`` record of the audit log with ``keep_data: false`` whose samples are not
       tombstoned (a crash between the audit append and the scrub) is scrubbed under its seq.

    Returns what was done ([] when nothing was pending). Raises AuditError on a damaged log.
    """
    from lmclean.store.scrub import finish_scrub_intent, scrub_samples, tombstones

    store = Path(store_dir)
    done: list[ScrubResult] = []
    first = finish_scrub_intent(store)
    if first is not None:
        done.append(first)
    log = AuditLog(store)
    if not log.exists():
        return done
    try:
        records = log.records()
    except AuditError as exc:
        raise AuditError(f"{exc}; cannot tell whether a scrub is pending (run `lmclean audit verify {store}`)") from exc
    dead = tombstones(store)
    for rec in records:
        if rec.get("kind") not in ("unlearn", "online-unlearn") or rec.get("keep_data") is not False:
            continue
        missing = [int(i) for i in rec.get("forget_ids") or [] if int(i) not in dead]
        if missing and isinstance(rec.get("seq"), int):
            from lmclean.store.reader import TrajectoryStore
            from lmclean.unlearn.trajectory import pin_before_scrub

            pin_before_scrub(TrajectoryStore(store), missing)  # a recompute store keeps g[t] of the steps it scrubs
            result = scrub_samples(store, missing, rec["seq"])
            done.append(result)
            dead.update(result.tombstoned)
    return done


def finish_interrupted(store: Path | str) -> None:
    """Before a writer works on a store (under its lock): refuse a forged log, then finish what a
    crash interrupted, in dependency order: a samples-table growth (it may have left no table), a
    two-phase unlearn publish, a scrub. One sequence for every writer, so none forgets a step."""
    from lmclean.audit.publish import finish_pending_unlearn
    from lmclean.store.append import finish_pending_growth

    AuditLog(store).require_intact()  # first: a forged record must not be scrubbed or trained on
    finish_pending_growth(store)
    finish_pending_unlearn(store)
    finish_pending_scrub(store)
