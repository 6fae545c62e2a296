"""Build and append the audit records that `record`, `record --resume` and `unlearn` write.

The fields are documented in docs/audit.md. These helpers only build and append: the caller holds
the store's ``StoreLock`` for the whole operation (training or unlearning plus the append plus the
scrub), so that no other process can slip a record in between.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

import lmclean
from lmclean.audit.digest import model_digest
from lmclean.audit.log import AuditLog, canonical_json
from lmclean.errors import DataError, StoreError

__all__ = [
    "AlreadyUnlearnedError",
    "check_not_tombstoned",
    "dataset_digest",
    "new_request_id",
    "refuse_used_request_id",
    "reconcile_event",
    "record_event",
    "unlearn_event",
    "v_norm_summary",
]

_HEX = set("0123456789abcdef")


class AlreadyUnlearnedError(DataError):
    """A sample asked to be unlearned was already removed (scrubbed) by an earlier audit record.

    ``sample_ids`` are the offending ids; ``records`` maps each to the audit record (or None when
    the log no longer holds it).
    """

    def __init__(self, message: str, sample_ids: list[int], records: dict[int, dict[str, Any] | None]):
        super().__init__(message)
        self.sample_ids = sample_ids
        self.records = records


def new_request_id() -> str:
    """A fresh request id for callers that have no ticket number: ``r-YYYYmmddTHHMMSSZ-xxxxxx``."""
    return f"r-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def dataset_digest(store_dir: Path | str) -> str:
    """sha256 over the store's (sample id, content fingerprint) table, in stored order.

    Ties a record to the exact data set recorded (each line ``<id> <fingerprint hex>\\n``).
    """
    import zarr  # not at module level: `audit show` must not pay for it

    store = Path(store_dir)
    try:
        ids = np.asarray(zarr.open_array(str(store / "samples/id"), mode="r")[:])
        fps = np.asarray(zarr.open_array(str(store / "samples/fingerprint"), mode="r")[:])
    except Exception as exc:
        raise StoreError(f"store {store}: the samples table is missing or unreadable ({exc})") from exc
    h = hashlib.sha256()
    for i, fp in zip(ids.tolist(), fps):
        h.update(f"{int(i)} {bytes(fp).hex()}\n".encode())
    return h.hexdigest()


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if is_dataclass(config):
        from lmclean import config as config_mod

        return config_mod.to_dict(config)  # type: ignore[arg-type]
    raise TypeError(f"config must be an LmcleanConfig or a dict, got {type(config).__name__}")


def _digest_or_none(model_dir: Path | str | None) -> str | None:
    return None if model_dir is None else model_digest(model_dir)


def record_event(
    store_dir: Path | str,
    kind: Literal["record", "resume", "continue"],
    config: Any,
    steps: int,
    model_dir: Path | str | None,
    wall_time: float,
    *,
    start_step: int | None = None,
    excluded_ids: Sequence[int] | None = None,
    model_before_dir: Path | str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append the record of a training run recorded into the store (``kind`` "record", "resume", or
    "continue": `record --continue` trained on from the current model, ``model_before_dir``).

    ``config`` is the run's LmcleanConfig (or its dict); ``steps`` the committed steps after the
    run; ``model_dir`` the model it wrote (None if none); ``start_step`` where a resume restarted.
    ``model_digest_before`` is the digest of the model fine-tuning started from: ``model_before_dir``
    if given, else the config's ``model.path`` when it holds safetensors weights, else None (a
    freshly initialised model). Returns the record as stored (with its ``seq``).
    """
    if kind not in ("record", "resume", "continue"):
        raise ValueError(f"kind must be 'record', 'resume' or 'continue', got {kind!r}")
    cfg = _config_dict(config)
    if model_before_dir is None and kind == "record":
        base = (cfg.get("model") or {}).get("path")
        if base and any(Path(base).glob("*.safetensors")):
            model_before_dir = base
    body: dict[str, Any] = {
        "kind": kind,
        "config_digest": hashlib.sha256(canonical_json(cfg).encode("utf-8")).hexdigest(),
        "data_path": (cfg.get("data") or {}).get("path"),
        "dataset_digest": dataset_digest(store_dir),
        "excluded_ids": sorted(int(i) for i in (excluded_ids or [])),
        "steps": int(steps),
        "start_step": None if start_step is None else int(start_step),
        "model_digest_before": _digest_or_none(model_before_dir),
        "output_model_digest": _digest_or_none(model_dir),
        "output_path": None if model_dir is None else str(model_dir),
        "lmclean_version": lmclean.__version__,
        "wall_time_s": round(float(wall_time), 3),
        **dict(extra or {}),
    }
    return AuditLog(store_dir).append(body)



def reconcile_event(store_dir: Path | str, *, config: Any, steps: int, forget_ids: Sequence[int],
                    model_before_dir: Path | str, model_dir: Path | str, output_path: Path | str, wall_time: float,
                    excluded_ids: Sequence[int], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Append the record of `lmclean reconcile`: the store was rewritten to exact retraining without
    ``forget_ids`` and its model (``model_dir``, recorded as ``output_path``: STORE/model) replaces
    the approximate current model (``model_before_dir``). Like a training record it starts the chain
    again at that model; the forgotten ids stay forgotten (their unlearn records stay in the log).
    ``extra`` holds the cost and the residual ratio (docs/audit.md)."""
    body: dict[str, Any] = {
        "kind": "reconcile",
        "config_digest": hashlib.sha256(canonical_json(_config_dict(config)).encode("utf-8")).hexdigest(),
        "dataset_digest": dataset_digest(store_dir),
        "excluded_ids": sorted(int(i) for i in excluded_ids),
        "forget_ids": sorted(int(i) for i in forget_ids),
        "steps": int(steps),
        "model_digest_before": model_digest(model_before_dir),
        "output_model_digest": model_digest(model_dir),
        "output_path": str(output_path),
        "lmclean_version": lmclean.__version__,
        "wall_time_s": round(float(wall_time), 3),
        **dict(extra or {}),
    }
    return AuditLog(store_dir).append(body)

def v_norm_summary(v_norms: Sequence[float]) -> dict[str, Any]:
    """Summary of the ‖v‖ trace: first, max, last and n (finite values; non-finite counted apart)."""
    values = [float(v) for v in v_norms]
    finite = [v for v in values if math.isfinite(v)]
    return {
        "first": finite[0] if finite else None,
        "max": max(finite) if finite else None,
        "last": finite[-1] if finite else None,
        "n": len(values),
        "n_nonfinite": len(values) - len(finite),
    }


def _check_fingerprints(ids: list[int], fps: Sequence[str]) -> list[str]:
    out = [str(f).lower() for f in fps]
    if len(out) != len(ids):
        raise DataError(
            f"forget_fingerprints has {len(out)} entries for {len(ids)} forget_ids; "
            "give one content fingerprint per id, in the same order"
        )
    for i, fp in zip(ids, out):
        if len(fp) != 64 or not set(fp) <= _HEX:
            raise DataError(f"fingerprint of sample {i} is {fp!r}, expected 64 hex digits (sha256)")
    return out


def unlearn_event(
    store_dir: Path | str,
    *,
    request_id: str | None,
    reason: str | None,
    requested_by: str | None,
    forget_ids: Sequence[int],
    forget_fingerprints: Sequence[str],
    level: str,
    method: str,
    K: int | None,
    hvp: str | None,
    damping: float | None,
    noise_sigma: float,
    steps_touched: Sequence[int],
    curvature_products: int,
    v_norms: Sequence[float],
    divergence_check: str | Mapping[str, Any],
    model_before_dir: Path | str,
    output_dir: Path | str,
    keep_data: bool,
    wall_time: float,
    output_path: Path | str | None = None,
    extra: Mapping[str, Any] | None = None,
    digests: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Append the record of one unlearning request and return it as stored (with its ``seq``).

    Digests are computed here: ``model_digest_before`` from ``model_before_dir``,
    ``output_model_digest`` from ``output_dir``. ``output_path`` (default ``output_dir``) is the
    path recorded, so a caller that writes to a temp directory and renames it afterwards can pass
    the temp directory as ``output_dir`` and the final path as ``output_path``.
    ``request_id`` None draws a fresh one (``new_request_id``); a request id already in the log is
    refused (DataError naming the record that used it). ``v_norms`` is the full ‖v‖ trace (it is
    summarised, not stored); ``divergence_check`` a line or a JSON-serialisable dict.
    ``digests`` (before, output), when the caller has hashed both already: a large model is hashed
    once, not twice.
    """
    log = AuditLog(store_dir)
    ids = [int(i) for i in forget_ids]
    fps = _check_fingerprints(ids, forget_fingerprints)
    if request_id is None:
        request_id = new_request_id()
    request_id = str(request_id)
    refuse_used_request_id(log.records(), request_id)
    body: dict[str, Any] = {
        "kind": "unlearn",
        "request_id": request_id,
        "reason": reason,
        "requested_by": requested_by,
        "forget_ids": ids,
        "forget_fingerprints": fps,
        "level": level,
        "method": method,
        "K": None if K is None else int(K),
        "hvp": hvp,
        "damping": None if damping is None else float(damping),
        "noise_sigma": float(noise_sigma),
        "steps_touched": sorted(int(s) for s in steps_touched),
        "curvature_products": int(curvature_products),
        "v_norm_summary": v_norm_summary(v_norms),
        "divergence_check": dict(divergence_check) if isinstance(divergence_check, Mapping) else str(divergence_check),
        "model_digest_before": digests[0] if digests else model_digest(model_before_dir),
        "output_model_digest": digests[1] if digests else model_digest(output_dir),
        "output_path": str(output_path if output_path is not None else output_dir),
        "keep_data": bool(keep_data),
        "lmclean_version": lmclean.__version__,
        "wall_time_s": round(float(wall_time), 3),
        **dict(extra or {}),
    }
    return log.append(body)


def refuse_used_request_id(records: Sequence[Mapping[str, Any]], request_id: str | None) -> None:
    """The one check that a request id is new to the store's log (DataError naming the record)."""
    if request_id is None:
        return
    used = [r for r in records if r.get("request_id") == str(request_id)]
    if used:
        raise DataError(f"request id {request_id!r} was already used by audit record {used[-1].get('seq')} "
                        f"({used[-1].get('time')}); give each unlearning request its own id")


def check_not_tombstoned(store_dir: Path | str, ids: Sequence[int]) -> None:
    """Refuse to unlearn samples that an earlier request already removed from the store.

    Raises AlreadyUnlearnedError naming, for each such sample, the audit record that removed it:
    ``sample 17 was already unlearned by audit record 3 (request r-1, 2026-01-02T…Z); nothing to do``.
    """
    from lmclean.store.scrub import tombstones

    dead = tombstones(store_dir)
    hit = sorted({int(i) for i in ids if int(i) in dead})
    if not hit:
        return
    try:
        by_seq = {r.get("seq"): r for r in AuditLog(store_dir).records()}
    except Exception:  # a damaged log must not hide the refusal itself
        by_seq = {}
    groups: dict[int, list[int]] = {}
    for i in hit:
        groups.setdefault(dead[i], []).append(i)
    parts = []
    records: dict[int, dict[str, Any] | None] = {}
    for seq, members in groups.items():
        rec = by_seq.get(seq)
        for i in members:
            records[i] = rec
        names = ", ".join(map(str, members[:10])) + (f", … ({len(members)} in all)" if len(members) > 10 else "")
        who = f"sample {names} was" if len(members) == 1 else f"samples {names} were"
        if rec is None:
            where = "(that record is not in the audit log: run `lmclean audit verify`)"
        else:
            where = f"(request {rec.get('request_id')}, {rec.get('time')})"
        parts.append(f"{who} already unlearned by audit record {seq} {where}")
    n_req = len({int(i) for i in ids})
    if len(hit) == n_req:
        tail = "nothing to do"
    else:
        tail = f"remove {'it' if len(hit) == 1 else 'them'} from the request"
    raise AlreadyUnlearnedError("; ".join(parts) + f"; {tail}", hit, records)
