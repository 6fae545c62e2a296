"""Tamper-evident audit trail and store lock: what was recorded or unlearned, by whom, and proof.

``AuditLog`` is a hash-chained JSON Lines log (optionally HMAC-signed), ``StoreLock`` keeps two
processes from writing one store, and the digests tie log records to concrete weights and data.
``record_event`` / ``unlearn_event`` build the records the commands append; ``scrub_samples``
removes forgotten samples' token data from a store and ``tombstones`` lists what was removed.
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
from lmclean.audit.lock import LOCK_FILENAME, StoreLock, read_lock
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
from lmclean.audit.scrub import (
    PENDING_FILENAME,
    TOMBSTONE_ARRAY,
    ScrubResult,
    finish_pending_scrub,
    pending_scrub,
    scrub_samples,
    tombstones,
)

__all__ = [
    "AUDIT_FILENAME",
    "CHAIN_FIELDS",
    "GENESIS_PREV",
    "KEY_ENV",
    "LOCK_FILENAME",
    "PENDING_FILENAME",
    "TOMBSTONE_ARRAY",
    "AlreadyUnlearnedError",
    "AuditLog",
    "ScrubResult",
    "StoreLock",
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
    "pending_scrub",
    "read_lock",
    "record_event",
    "scrub_samples",
    "tombstones",
    "unlearn_event",
    "utc_now",
    "v_norm_summary",
]
