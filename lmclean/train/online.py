"""Deletion requests applied by a running `lmclean record`, at step boundaries (crash-safe).

At the top of each step t the trainer calls `OnlineRequests.maybe_apply(t, θ, state)`: one listdir
of STORE/requests (lmclean/requests.py). For the pending requests (all of them, in one sweep) it
claims them for step t, makes the writer commit steps < t, runs the configured engine
(`record.unlearn`) on the store so far, records the jump as a correction event at t
(`Recorder.correct`, lmclean/store/corrections.py) and applies it to the live θ and optimizer
state, appends the "online-unlearn" audit record, scrubs the samples' tokens and marks the
requests applied; from step t on the samples are dropped from their batches (fixed weights).

Commit point: the correction event (or, with no jump, the audit record). `record --resume`
restarts from a checkpoint before it; this class then re-applies every committed event at its
step from the store (never recomputing it), finishes what a crash left undone (audit, scrub,
request status), and applies a request that was claimed but not committed at the step it was
claimed for, so the final model equals the run that was never killed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmclean._faults import crash_point
from lmclean.config import LmcleanConfig
from lmclean.errors import LmcleanError, StoreError
from lmclean.requests import Request, RequestPoller, claim, list_requests, mark_applied, mark_refused
from lmclean.store.corrections import CorrectionEvent, apply_correction

__all__ = ["ONLINE_KIND", "OnlineRequests"]

ONLINE_KIND = "online-unlearn"  # the audit record of a request applied inside a recording run
Jump = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class _Due:
    """What a resumed run must redo at a step: a committed event's jump and/or its requests' tail."""

    step: int
    audit_request_id: str | None
    jump: Jump | None = None  # re-applied from the store (None: already in θ, or none was recorded)
    event: CorrectionEvent | None = None
    requests: list[Request] = field(default_factory=list)
    listed: bool = False  # the event is still listed (at the restart step): apply the jump, record nothing


class OnlineRequests:
    """The request hook of the built-in trainer (see the module docstring)."""

    def __init__(self, cfg: LmcleanConfig, store: Path, prior: list[tuple[CorrectionEvent, Jump | None]]) -> None:
        self.cfg, self.store, self.prior = cfg, Path(store), prior
        self.poller = RequestPoller(self.store)
        self.recorder: Any = None
        self.excluded: set[int] = set()
        self.start = 0
        self._due: dict[int, list[_Due]] | None = None  # built at the first step (the store's state then)
        self._last_poll = -1
        self._synced = -1  # the step at which the writer was last known idle with steps < t committed

    @classmethod
    def open(cls, cfg: LmcleanConfig, store: Path | None, resume: bool, restart: int | None = None,
             pre_jump: bool = False) -> "OnlineRequests | None":
        """Before `record --resume` reopens the store: read its committed events (the reopen unlists
        those past the restart checkpoint, which this run re-applies at their steps). `restart`: the
        step the caller restarts from (default: the built-in trainer's); `pre_jump`: its θ is the
        pre-jump one (a Trainer checkpoint), so the events at `restart` are applied again too."""
        if store is None:
            return None
        prior: list[tuple[CorrectionEvent, Jump | None]] = []
        if resume and (Path(store) / "zarr.json").exists():
            from lmclean.store.reader import TrajectoryStore

            ts = TrajectoryStore(store)
            # the checkpoint the reopen restarts from (trainer._reopen): events up to it stay listed and in θ
            if restart is None:
                restart = ts.nearest_checkpoint(ts.committed_steps) if ts.checkpoint_steps else 0
            prior = [(e, ts.correction(e) if e.step > restart or (pre_jump and e.step == restart) else None)
                     for e in ts.corrections]
        return cls(cfg, Path(store), prior)

    def bind(self, recorder: Any, excluded: set[int], start: int) -> None:
        """The live recorder, the trainer's excluded set (updated in place) and the first step."""
        self.recorder, self.excluded, self.start = recorder, excluded, start

    # -- the per-step hook ------------------------------------------------------------------
    def wants(self, t: int) -> bool:
        """Whether `maybe_apply(t)` may have work (one listdir): a caller whose θ/state are not flat
        vectors (the Trainer callback) builds them only then."""
        if self._last_poll == t:
            return False
        if self._due is None:
            self._due = self._plan_resume()
        return bool(self._due.get(t)) or bool(self.poller.pending())

    def maybe_apply(self, t: int, theta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self._last_poll == t:  # at most once per step
            return
        self._last_poll = t
        if self._due is None:
            self._due = self._plan_resume()
        for due in self._due.pop(t, []):
            self._redo(t, due, theta, state)
        handled = {d.audit_request_id for ds in self._due.values() for d in ds}
        reqs = [r for r in self.poller.pending()
                if (r.step is None or r.step <= t) and (r.audit_request_id is None or r.audit_request_id not in handled)]
        if reqs:
            self._apply(t, reqs, theta, state)

    # -- resume: what a killed run committed ----------------------------------------------
    def _plan_resume(self) -> dict[int, list[_Due]]:
        """Steps at which committed work of an earlier run must be redone (from `start` on)."""
        reqs = [r for r in list_requests(self.store)  # applied (or claimed) by a recording run: they have a step
                if r.status != "refused" and r.audit_request_id and r.step is not None]
        if not self.prior and not reqs:
            return {}
        audited = self._audited()
        dues: list[_Due] = []
        for event, jump in self.prior:
            if event.step > self.start and jump is None:
                raise StoreError(f"store {self.store}: correction {event.index} at step {event.step} is past the restart "
                                 f"step {self.start} but was not read before the reopen")
            dues.append(_Due(max(event.step, self.start), event.request_id, jump, event, listed=event.step <= self.start))
        by_rid = {d.audit_request_id: d for d in dues if d.audit_request_id}
        for r in reqs:
            if r.audit_request_id in by_rid:
                by_rid[r.audit_request_id].requests.append(r)
            elif r.audit_request_id in audited and r.step is not None:  # committed without a jump
                by_rid[r.audit_request_id] = _Due(max(r.step, self.start), r.audit_request_id, requests=[r])
                dues.append(by_rid[r.audit_request_id])
        out: dict[int, list[_Due]] = {}
        for d in dues:
            out.setdefault(d.step, []).append(d)
        return out

    def _redo(self, t: int, due: _Due, theta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if due.jump is not None and due.event is not None and due.listed:
            apply_correction(theta, state, *due.jump)
        elif due.jump is not None and due.event is not None:
            dtheta, dstate = due.jump
            index = self.recorder.correct(t, dtheta, dstate, request_id=due.event.request_id,
                                          method=due.event.method, theta=theta, opt_state=state)
            apply_correction(theta, state, dtheta, dstate)
            self._await_event(index, t)
        if due.requests:
            rid = str(due.audit_request_id)
            self._finish(t, due.requests, rid, due.requests[0].method or "unknown", None, recovered=True,
                         correction=due.event.index if due.event else None)

    # -- applying new requests --------------------------------------------------------------
    def _apply(self, t: int, reqs: list[Request], theta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        from lmclean.audit.events import new_request_id

        began = time.perf_counter()
        live = self._refuse_done(reqs)
        if not live:
            return
        method = self.cfg.record.unlearn.method
        claimed = {r.audit_request_id for r in live}
        rid = claimed.pop() if len(claimed) == 1 and None not in claimed else (
            live[0].id if len(live) == 1 else new_request_id())
        live = [claim(self.store, r.id, audit_request_id=rid, method=method, step=t) for r in live]
        ids = sorted({i for r in live for i in r.ids})
        self._sync_writer(t)
        try:
            result = self._compute(ids, method) if method != "none" else None
        except LmcleanError as exc:  # e.g. divergence, an unsupported optimizer: refuse it, train on
            for r in live:
                mark_refused(self.store, r.id, f"{method} at step {t} failed: {exc}")
            return
        crash_point("request:after-compute")
        index = None
        if result is not None and _nonzero(result.delta, result.state_delta):
            dtheta = result.delta.detach().float().cpu()
            dstate = {k: v.detach().float().cpu() for k, v in result.state_delta.items()}
            index = self.recorder.correct(t, dtheta, dstate, request_id=rid, method=method, theta=theta, opt_state=state)
            apply_correction(theta, state, dtheta, dstate)
            self._await_event(index, t)
        crash_point("request:after-correct")
        self._finish(t, live, rid, method, result, recovered=False, correction=index, seconds=time.perf_counter() - began)

    def _refuse_done(self, reqs: list[Request]) -> list[Request]:
        """Refuse (one line, in the request file) requests whose samples are forgotten by now."""
        from lmclean.audit.events import check_not_tombstoned

        live = []
        for r in reqs:
            gone = sorted(set(r.ids) & self.excluded)
            try:
                if gone:
                    raise StoreError(f"sample {gone[0]} was already dropped from this run's batches; nothing to do")
                check_not_tombstoned(self.store, r.ids)
            except LmcleanError as exc:
                mark_refused(self.store, r.id, str(exc))
                continue
            live.append(r)
        return live

    def _compute(self, ids: list[int], method: str) -> Any:
        """The engine on the store so far (committed steps < t): the correction at step t."""
        from lmclean.device import resolve_device
        from lmclean.store.reader import TrajectoryStore
        from lmclean.store.scrub import tombstones
        from lmclean.unlearn.common import ForgetSet
        from lmclean.unlearn.lmcleaner import PropagationSettings, require_supported
        from lmclean.unlearn.operators import OperatorSettings
        from lmclean.unlearn.service import UnlearnOptions, open_trajectory, run_method

        u = self.cfg.record.unlearn
        device = str(resolve_device(self.cfg.train.device))
        options = UnlearnOptions(method=method, K=u.K, device=device,
                                 propagation=PropagationSettings(operator=OperatorSettings(hvp=u.hvp)))
        ts = TrajectoryStore(self.store)
        if not ts.occurrences(ids):  # not trained on yet: dropping them from later batches is exact
            from lmclean.unlearn.common import SweepResult

            n = ts.committed_steps
            return SweepResult(torch.zeros(ts.manifest.size), method, [], (n, n), notes=["not seen yet"])
        forget = ForgetSet(sample_ids=set(ids))
        if method == "replay":  # exact retraining without every sample forgotten so far (tombstoned)
            forget = forget.union(ForgetSet(sample_ids=set(tombstones(self.store)) | self.excluded))
        if method == "lmcleaner":
            require_supported(ts, forget)
        traj = open_trajectory(ts, device)
        result = run_method(traj, forget, options, None)
        result.notes.append(f"K={options.K}")
        return result

    def _finish(self, t: int, reqs: list[Request], rid: str, method: str, result: Any, *, recovered: bool,
                correction: int | None, seconds: float = 0.0) -> None:
        """After the commit point: audit record (unless there), scrub, request status, exclusion."""
        from lmclean.store.scrub import scrub_samples

        ids = sorted({i for r in reqs for i in r.ids})
        record = self._audited().get(rid)
        if record is None:
            record = self._audit(t, reqs, rid, method, result, recovered, correction, seconds)
        crash_point("request:after-audit")
        self._sync_writer(t)  # the scrub rewrites token chunks the writer also writes
        from lmclean.store.reader import TrajectoryStore
        from lmclean.unlearn.trajectory import pin_before_scrub

        pin_before_scrub(TrajectoryStore(self.store), ids)  # a recompute store keeps g[t] of the steps it scrubs
        scrub_samples(self.store, ids, int(record["seq"]))
        self._reload_token_block()
        for r in reqs:
            if r.status == "pending":
                mark_applied(self.store, r.id, audit_request_id=rid, audit_seq=int(record["seq"]), method=method, step=t)
        self.excluded.update(ids)

    def _audit(self, t: int, reqs: list[Request], rid: str, method: str, result: Any, recovered: bool,
               correction: int | None, seconds: float) -> dict[str, Any]:
        import lmclean
        from lmclean.audit.events import refuse_used_request_id, v_norm_summary
        from lmclean.audit.log import AuditLog

        log = AuditLog(self.store)
        refuse_used_request_id(log.records(), rid)
        ids = sorted({i for r in reqs for i in r.ids})
        fps = {i: fp for r in reqs for i, fp in zip(r.ids, r.fingerprints)}
        u = self.cfg.record.unlearn
        body: dict[str, Any] = {
            "kind": ONLINE_KIND, "request_id": rid, "request_ids": [r.id for r in reqs],
            "reason": "; ".join(sorted({r.reason for r in reqs if r.reason})) or None,
            "requested_by": "; ".join(sorted({r.requested_by for r in reqs if r.requested_by})) or None,
            "forget_ids": ids, "forget_fingerprints": [fps.get(i) for i in ids], "level": "sample",
            "method": method, "K": u.K, "hvp": u.hvp if method == "lmcleaner" else None,
            "step": t, "correction_index": correction, "keep_data": False, "recovered": recovered,
            "steps_touched": list(result.steps_touched) if result is not None else [],
            "curvature_products": int(result.products) if result is not None else 0,
            "v_norm_summary": v_norm_summary([n for _, n in result.v_norms]) if result is not None else None,
            "delta_norm": float(torch.linalg.vector_norm(result.delta)) if result is not None else 0.0,
            "divergence_check": result.divergence if result is not None else None,
            "wait_seconds": {r.id: round(time.time() - r.created_at.timestamp(), 3) for r in reqs},
            "lmclean_version": lmclean.__version__, "wall_time_s": round(seconds, 3),
        }
        return log.append(body)

    def _audited(self) -> dict[str, dict[str, Any]]:
        from lmclean.audit.log import AuditLog

        log = AuditLog(self.store)
        if not log.exists():
            return {}
        return {str(r["request_id"]): r for r in log.records() if r.get("kind") == ONLINE_KIND}

    # -- the writer ---------------------------------------------------------------------------
    def _sync_writer(self, t: int) -> None:
        """Every step < t committed and the writer idle (the training thread queues nothing while a
        request is applied)."""
        if self._synced == t:
            return
        self._synced = t
        self.recorder.writer.flush()

    def _await_event(self, index: int, t: int) -> None:
        """Until event `index` is committed (listed in COMMIT.json) with every step before it."""
        self.recorder.writer.flush()
        self._synced = t

    def _reload_token_block(self) -> None:
        """After a scrub the writer's in-memory token block must hold the scrubbed rows, or the next
        commit would write the tokens back."""
        self.recorder.writer.reload_tokens()


def _nonzero(delta: torch.Tensor, state_delta: dict[str, torch.Tensor]) -> bool:
    return bool(torch.any(delta != 0)) or any(bool(torch.any(v != 0)) for v in state_delta.values())
