"""What a store's audit log says happened to its model: the current model, its chain, what is forgotten.

The *current model* of a store is the output of its latest unlearning, or the recorded final model
(``STORE/model``) when there is none. Every unlearning starts from it, so requests compose; the audit
chain links them (each unlearning's ``model_digest_before`` is the previous one's output digest).
This module only reads the log (and hashes models); it never writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmclean.audit.digest import model_digest
from lmclean.audit.log import AuditLog
from lmclean.errors import AuditError

__all__ = ["ChainLink", "ModelHistory", "load_history"]

MODEL_SUBDIR = "model"  # the recorded final model inside a store (store format)
# a training record starts the chain again at its model; forgotten samples persist (`continue` trains
# on from the current model without them; `reconcile` rewrote the store to retraining without them)
_TRAINING_KINDS = ("record", "resume", "continue", "reconcile")


@dataclass(frozen=True)
class ChainLink:
    """One record of the log that wrote a model the current model descends from."""

    seq: int
    kind: str  # record | resume | continue | reconcile | unlearn
    request_id: str | None
    method: str | None
    output_path: str | None
    output_digest: str
    forget_ids: tuple[int, ...] = ()
    base_unrelated: bool = False

    def describe(self) -> str:
        what = (f"request {self.request_id}, {self.method}" if self.kind == "unlearn"
                else "exact retraining" if self.kind == "reconcile" else "training run")
        return f"record {self.seq} ({self.kind}: {what})"


@dataclass(frozen=True)
class ModelHistory:
    """The model lineage and the forgotten samples of one store, read from its audit log."""

    store: Path
    chain: tuple[ChainLink, ...]  # from the training run's record to the current model's producer
    forgotten_ids: dict[int, int] = field(default_factory=dict)  # sample id -> seq of the unlearning
    forgotten_steps: dict[int, int] = field(default_factory=dict)  # batch-level steps -> seq
    kept_data_ids: frozenset[int] = frozenset()  # forgotten with --keep-data (tokens still stored)

    @property
    def current(self) -> ChainLink | None:
        return self.chain[-1] if self.chain else None

    @property
    def unlearnings(self) -> tuple[ChainLink, ...]:
        return tuple(link for link in self.chain if link.kind == "unlearn")

    @property
    def current_path(self) -> Path:
        """Where the current model should be: the latest unlearning's output, else STORE/model."""
        cur = self.current
        if cur is None or cur.kind != "unlearn" or not cur.output_path:
            return self.store / MODEL_SUBDIR
        return Path(cur.output_path)

    def require_current(self) -> tuple[Path, str]:
        """(path, digest) of the current model, checked against the log; AuditError naming the path
        and ``--base`` when it is missing or its weights differ from what the log recorded."""
        path = self.current_path
        cur = self.current
        what = (f"the output of {cur.describe()}" if cur is not None and cur.kind == "unlearn"
                else "the recorded final model")
        if not (path / "model.safetensors").is_file() and not any(path.glob("*.safetensors")):
            raise AuditError(f"the store's current model {path} ({what}) is missing; restore it, or pass --base DIR "
                             "with the same weights")
        digest = model_digest(path)
        if cur is not None and cur.output_digest and digest != cur.output_digest:
            raise AuditError(f"the store's current model {path} ({what}) has weights digest {digest[:12]}…, but the "
                             f"audit log recorded {cur.output_digest[:12]}…; restore it, or pass --base DIR with the "
                             "recorded weights")
        return path, digest

    def position_of(self, digest: str) -> int | None:
        """Index in the chain of the link that produced weights `digest` (latest first), or None."""
        for k in range(len(self.chain) - 1, -1, -1):
            if self.chain[k].output_digest == digest:
                return k
        return None

    def missing_after(self, position: int) -> tuple[ChainLink, ...]:
        """The unlearnings a model produced at chain[position] does not include."""
        return tuple(link for link in self.chain[position + 1:] if link.kind == "unlearn")

    def to_dict(self) -> dict[str, Any]:
        cur = self.current
        return {
            "current_model": str(self.current_path),
            "current_digest": cur.output_digest if cur else None,
            "chain": [{"seq": link.seq, "kind": link.kind, "request_id": link.request_id, "method": link.method,
                       "output_path": link.output_path, "output_digest": link.output_digest,
                       "forget_ids": list(link.forget_ids), "base_unrelated": link.base_unrelated}
                      for link in self.chain],
            "forgotten_ids": sorted(self.forgotten_ids),
            "forgotten_steps": sorted(self.forgotten_steps),
            "kept_data_ids": sorted(self.kept_data_ids),
        }


def load_history(store: Path | str, records: list[dict[str, Any]] | None = None) -> ModelHistory:
    """Read the chain of model-writing records and every forgotten sample from the store's log.

    The chain restarts at each training record (a store is recorded once; `resume` continues it);
    each unlearning joins the chain it started from. Raises AuditError for an unlearning whose
    ``model_digest_before`` is no earlier output (a log that no longer describes one lineage),
    unless that record says ``base_unrelated``.
    """
    store = Path(store)
    if records is None:
        records = AuditLog(store).records()
    chain: list[ChainLink] = []
    forgotten_ids: dict[int, int] = {}
    forgotten_steps: dict[int, int] = {}
    kept: set[int] = set()
    for rec in records:
        kind = rec.get("kind")
        seq = int(rec.get("seq", -1))
        if kind in _TRAINING_KINDS:
            if rec.get("output_model_digest"):
                chain = [ChainLink(seq, kind, None, None, rec.get("output_path"), rec["output_model_digest"])]
            continue
        if kind == "online-unlearn":  # applied inside a recording run: forgotten, but no model of the chain
            for i in rec.get("forget_ids") or []:
                forgotten_ids.setdefault(int(i), seq)
            continue
        if kind != "unlearn":
            continue
        ids = tuple(int(i) for i in rec.get("forget_ids") or [])
        for i in ids:
            forgotten_ids.setdefault(i, seq)
        if rec.get("level") == "batch":
            for t in rec.get("steps_touched") or []:
                forgotten_steps.setdefault(int(t), seq)
        if rec.get("keep_data"):
            kept.update(ids)
        unrelated = bool(rec.get("base_unrelated"))
        before = rec.get("model_digest_before")
        if chain and not unrelated and before != chain[-1].output_digest:
            raise AuditError(f"audit record {seq} (request {rec.get('request_id')}) started from weights "
                             f"{str(before)[:12]}…, not from the store's model at that point ({chain[-1].describe()}); "
                             "the log does not describe one lineage: run `lmclean audit verify`")
        chain.append(ChainLink(seq, "unlearn", rec.get("request_id"), rec.get("method"), rec.get("output_path"),
                               rec.get("output_model_digest") or "", ids, unrelated))
    return ModelHistory(store, tuple(chain), forgotten_ids, forgotten_steps, frozenset(kept))


def refuse_forgotten(history: ModelHistory, sample_ids: list[int] | tuple[int, ...],
                     steps: list[int] | tuple[int, ...] = ()) -> None:
    """Refuse a request for samples (or batch-level steps) an earlier unlearning already forgot,
    from the audit log (which also knows the `--keep-data` ones the tombstones do not)."""
    from lmclean.audit.events import AlreadyUnlearnedError

    by_seq = {link.seq: link for link in history.chain}
    hit = sorted({int(i) for i in sample_ids if int(i) in history.forgotten_ids})
    hit_steps = sorted({int(t) for t in steps if int(t) in history.forgotten_steps})
    if not hit and not hit_steps:
        return
    if hit:
        seq = history.forgotten_ids[hit[0]]
        names = ", ".join(map(str, hit[:10])) + (f", … ({len(hit)} in all)" if len(hit) > 10 else "")
        who = f"sample {names} was" if len(hit) == 1 else f"samples {names} were"
    else:
        seq = history.forgotten_steps[hit_steps[0]]
        who = f"step {hit_steps[0]} was" if len(hit_steps) == 1 else f"steps {', '.join(map(str, hit_steps[:10]))} were"
    link = by_seq.get(seq)
    where = f"(request {link.request_id})" if link else ""
    tail = "nothing to do" if len(hit) == len(set(sample_ids)) and not steps else "remove them from the request"
    raise AlreadyUnlearnedError(f"{who} already unlearned by audit record {seq} {where}; {tail}".replace("  ", " "),
                                hit, {i: None for i in hit})
