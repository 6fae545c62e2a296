"""What an audit record's chain fields cover and who signs them: the canonical JSON, the sha256 digest,
the HMAC under the key from ``LMCLEAN_AUDIT_KEY`` and the key's fingerprint. One definition, so the
log that writes records (lmclean/audit/log.py) and every reader that checks them hash the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac as hmac_lib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

__all__ = ["KEY_ENV", "canonical_json", "digest_of", "hmac_of", "key_fingerprint", "key_from_env", "signed_bytes", "utc_now"]

KEY_ENV = "LMCLEAN_AUDIT_KEY"
_FINGERPRINT_LABEL = b"lmclean-audit-key-fingerprint-v1"


def canonical_json(obj: Any) -> str:
    """The one serialisation digests and HMACs cover (sorted keys, no spaces, raw UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def utc_now() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix and microseconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_from_env() -> bytes | None:
    """The HMAC key from ``LMCLEAN_AUDIT_KEY`` (UTF-8 bytes), or None when unset or empty."""
    value = os.environ.get(KEY_ENV, "")
    return value.encode("utf-8") if value else None


def key_fingerprint(key: bytes) -> str:
    """Names a key without revealing it: HMAC-SHA256 of a fixed label under the key (hex)."""
    return hmac_lib.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()


def signed_bytes(record: Mapping[str, Any]) -> bytes:
    """What ``digest`` and ``hmac`` cover: the record minus those two fields."""
    body = {k: v for k, v in record.items() if k not in ("digest", "hmac")}
    return canonical_json(body).encode("utf-8")


def digest_of(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(signed_bytes(record)).hexdigest()


def hmac_of(record: Mapping[str, Any], key: bytes) -> str:
    return hmac_lib.new(key, signed_bytes(record), hashlib.sha256).hexdigest()
