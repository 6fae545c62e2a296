"""Tamper-evident audit trail and store lock: what was recorded or unlearned, by whom, and proof.

``AuditLog`` is a hash-chained JSON Lines log (optionally HMAC-signed), ``StoreLock`` keeps two
processes from writing one store, and the digests tie log records to concrete weights and data.
"""

from lmclean.audit.digest import content_fingerprint, file_digest, model_digest
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

__all__ = [
    "AUDIT_FILENAME",
    "CHAIN_FIELDS",
    "GENESIS_PREV",
    "KEY_ENV",
    "LOCK_FILENAME",
    "AuditLog",
    "StoreLock",
    "VerifyResult",
    "canonical_json",
    "content_fingerprint",
    "file_digest",
    "key_from_env",
    "model_digest",
    "read_lock",
    "utc_now",
]
