"""Tamper-evident audit trail: what was recorded or unlearned, by whom, and proof.

``AuditLog`` is a hash-chained JSON Lines log (optionally HMAC-signed), and the digests tie log
records to concrete weights and data. ``record_event`` / ``unlearn_event`` build the records the
commands append; ``history`` reads the current model and what is forgotten; ``verify`` checks it
all. The store owns its lock, tombstones and token scrubbing (lmclean.store.lock / .scrub).
"""

from lmclean.audit.digest import content_fingerprint, file_digest, model_digest
from lmclean.audit.events import (
    AlreadyUnlearnedError,
    check_not_tombstoned,
    dataset_digest,
    new_request_id,
    record_event,
    unlearn_event,
    v_norm_summary,
)
from lmclean.audit.log import (
    AUDIT_FILENAME,
    CHAIN_FIELDS,
    GENESIS_PREV,
    KEY_ENV,
    AuditLog,
    VerifyResult,
    canonical_json,
    key_from_env,
    utc_now,
)
from lmclean.audit.recovery import finish_pending_scrub

__all__ = [
    "AUDIT_FILENAME",
    "CHAIN_FIELDS",
    "GENESIS_PREV",
    "KEY_ENV",
    "AlreadyUnlearnedError",
    "AuditLog",
    "VerifyResult",
    "canonical_json",
    "check_not_tombstoned",
    "content_fingerprint",
    "dataset_digest",
    "file_digest",
    "finish_pending_scrub",
    "key_from_env",
    "model_digest",
    "new_request_id",
    "record_event",
    "unlearn_event",
    "utc_now",
    "v_norm_summary",
]
