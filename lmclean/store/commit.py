"""The commit marker (COMMIT.json): what a store claims to have committed, checked before use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.corrections import validate_events


def validate_commit(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """COMMIT.json of the store at `path` with metadata `meta`, or a one-line StoreError saying
    what is wrong with it: committed_steps an int in 0..planned_steps, checkpoints a sorted list of
    planned checkpoint steps at or before it, `closed` a bool that is true only when every planned
    step and checkpoint is committed."""
    marker = path / fmt.COMMIT_FILE
    fix = f"the commit marker is damaged: run `lmclean check {path}`, then re-record the store (or restore {marker})"
    try:
        state = json.loads(marker.read_text())
    except FileNotFoundError:
        raise StoreError(f"store {path} has no {fmt.COMMIT_FILE} (its commit marker): its creation was interrupted "
                         f"or the file was removed; re-record it with `lmclean record`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} is not readable JSON ({exc}); {fix}") from exc
    if not isinstance(state, dict):
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} is not a JSON object; {fix}")
    planned, plan = int(meta["planned_steps"]), [int(s) for s in meta["checkpoint_plan"]]
    n, cks, closed = state.get("committed_steps"), state.get("checkpoints"), state.get("closed", False)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= planned:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} claims {n!r} committed steps, but the store plans "
                         f"{planned} (an int in 0..{planned} is valid); {fix}")
    if (not isinstance(cks, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in cks)
            or cks != sorted(set(cks))):
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} lists checkpoints {cks!r}, not ascending distinct steps; "
                         f"{fix}")
    unplanned = [c for c in cks if c not in plan]
    if unplanned:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} lists checkpoint {unplanned[0]}, which is not in the "
                         f"checkpoint plan {plan}; {fix}")
    later = [c for c in cks if c > n]
    if later:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} lists checkpoint {later[0]} beyond its {n} committed "
                         f"steps; {fix}")
    retained = state.get("retained_from", 0)  # record.keep_steps (lmclean/store/retention.py)
    if isinstance(retained, bool) or not isinstance(retained, int) or not 0 <= retained <= n:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} has retained_from = {retained!r}, not a step in 0..{n}; {fix}")
    if n > 0 and retained not in cks:
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} counts {n} committed steps but not the checkpoint of step "
                         f"{retained} they start from; {fix}")
    if not isinstance(closed, bool):
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} has closed = {closed!r}, not true or false; {fix}")
    if closed and (n != planned or cks != [c for c in plan if c >= retained]):
        raise StoreError(f"store {path}: {fmt.COMMIT_FILE} says the run is closed with {n} of {planned} steps and "
                         f"checkpoints {cks} of {plan} committed; {fix}")
    events = validate_events(path, state.get("corrections"), n, fix)
    return {"committed_steps": n, "checkpoints": cks, "closed": closed, "corrections": events, "retained_from": retained}
