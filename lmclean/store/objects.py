"""The objects of a remote store: zarr's ObjectStore over obstore, and the writer's lease.

Object storage has no rename and no O_EXCL; what stands in for them are conditional writes, which
S3 (since 2024), GCS, Azure, MinIO and obstore's MemoryStore all have: a put with If-None-Match: *
creates an object only if it is absent, a put with If-Match: <ETag> replaces only the version read.
No hand-written client: obstore speaks the protocol, and reads the endpoint and the credentials
from the standard AWS_* (GOOGLE_*, AZURE_*) environment variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lmclean.errors import ConfigError, StoreError, StoreLockedError

__all__ = ["LEASE_KEY", "LEASE_SECONDS", "Lease", "RemoteLocation", "is_remote"]

LEASE_KEY = ".lmclean.lease"  # remote only: never pulled into a staging copy
LEASE_SECONDS = float(os.environ.get("LMCLEAN_LEASE_SECONDS", "60"))
_SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure", "memory")  # obstore's, with conditional puts
_MEMORY: dict[str, Any] = {}  # memory:// stores live as long as the process: one per URL


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for `scheme://...` URLs lmclean stages (file:// and plain paths are local)."""
    text = os.fspath(location)
    return "://" in text and text.split("://", 1)[0].lower() in _SCHEMES


class RemoteLocation:
    """One store URL: zarr's ObjectStore over obstore, with the conditional puts zarr's API lacks."""

    def __init__(self, url: str) -> None:
        try:
            import obstore  # noqa: F401  (the `s3` extra)
            from obstore.store import MemoryStore, from_url
            from zarr.storage import ObjectStore
        except ImportError as exc:
            raise ConfigError(f"store {url} needs obstore: pip install 'lmclean[s3]'") from exc
        self.url = url.rstrip("/")
        try:
            raw = _MEMORY.setdefault(self.url, MemoryStore()) if self.url.startswith("memory:") else from_url(self.url)
        except Exception as exc:  # obstore's errors: bad URL, unknown config key, missing region
            raise ConfigError(f"cannot open {url}: {_one_line(exc)} (check the URL and the AWS_*/GOOGLE_*/AZURE_* variables)") from exc
        self.zarr_store = ObjectStore(raw)  # the same objects, for zarr.open_group(...) by a Python user
        self.raw = raw

    def list(self, prefix: str | None = None) -> dict[str, dict[str, Any]]:
        """Every object under the store's prefix (and under `prefix` in it): key -> {size, e_tag}."""
        import obstore

        try:
            return {m["path"]: m for batch in obstore.list(self.raw, prefix, chunk_size=1000) for m in batch}
        except Exception as exc:
            raise _remote_error(self.url, "list", exc) from exc

    def etag(self, key: str) -> str | None:
        """The ETag of `key`, None when it does not exist (one HEAD)."""
        import obstore

        try:
            return str(obstore.head(self.raw, key)["e_tag"])
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _remote_error(self.url, f"read {key}", exc) from exc

    def get(self, key: str) -> tuple[bytes, str]:
        import obstore

        try:
            result = obstore.get(self.raw, key)
            return bytes(result.bytes()), str(result.meta["e_tag"])
        except Exception as exc:
            raise _remote_error(self.url, f"read {key}", exc) from exc

    def put(self, key: str, data: bytes, etag: str | None) -> str:
        """Create `key` (If-None-Match: *) when etag is None, else replace it If-Match etag; the new ETag."""
        import obstore

        mode: Any = "create" if etag is None else {"e_tag": etag}
        return str(obstore.put(self.raw, key, data, mode=mode, use_multipart=False)["e_tag"])

    def delete(self, key: str) -> None:
        import obstore

        try:
            obstore.delete(self.raw, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _remote_error(self.url, f"delete {key}", exc) from exc


class Lease:
    """The writer's lease: `.lmclean.lease` holding owner, host, machine, pid, purpose and expiry.

    Created with If-None-Match; renewed by a heartbeat with If-Match on its ETag; taken over only
    after it expired (or its holder's pid is gone on this machine), with If-Match on the ETag read, so
    of two writers racing for it exactly one wins."""

    def __init__(self, loc: RemoteLocation, purpose: str, seconds: float = LEASE_SECONDS) -> None:
        self.loc, self.purpose, self.seconds = loc, purpose, seconds
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None
        self.since = time.time()
        self._stop = threading.Event()
        self._renewing = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self, expires: float) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "machine": _machine(), "pid": os.getpid(),
                           "purpose": self.purpose, "since": self.since, "expires": expires}).encode()

    def acquire(self) -> None:
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            self.etag = self.loc.put(LEASE_KEY, self._body(time.time() + self.seconds), None)
        except AlreadyExistsError:
            raw, etag = self.loc.get(LEASE_KEY)
            holder = _parse(raw)
            if not _expired(holder):
                raise StoreLockedError(
                    f"store {self.loc.url} is locked by `{holder.get('purpose')}` (pid {holder.get('pid')} on "
                    f"{holder.get('host')}) until {time.strftime('%H:%M:%S', time.localtime(holder.get('expires', 0)))}; "
                    "wait for it to finish (a dead holder's lease expires by then)") from None
            try:
                self.etag = self.loc.put(LEASE_KEY, self._body(time.time() + self.seconds), etag)
            except PreconditionError:
                raise StoreLockedError(f"store {self.loc.url}: another writer took the expired lease first; "
                                       "wait for it to finish") from None
        except Exception as exc:
            raise _remote_error(self.loc.url, "create the lease", exc) from exc
        self._thread = threading.Thread(target=self._beat, name="lmclean-lease", daemon=True)
        self._thread.start()

    def renew(self) -> None:
        """Extend the lease, If-Match its ETag; raises when another writer took it (or the service
        cannot be reached: the heartbeat tries again, a push stops)."""
        from obstore.exceptions import PreconditionError

        with self._renewing:  # the heartbeat and a push renew from two threads: one If-Match at a time
            if self.lost is None:
                try:
                    self.etag = self.loc.put(LEASE_KEY, self._body(time.time() + self.seconds), self.etag)
                except PreconditionError as exc:
                    self.lost = _one_line(exc)
                except Exception as exc:
                    raise _remote_error(self.loc.url, "renew the lease", exc) from exc
        if self.lost is not None:
            raise StoreLockedError(f"store {self.loc.url}: this job lost its lease to another writer; nothing more is "
                                   "pushed (what it pushed before stays): rerun once that writer is done")

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            with contextlib.suppress(StoreError):
                self.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.etag is not None:
            with contextlib.suppress(Exception):  # expired, not deleted: a stale release cannot remove another's lease
                self.loc.put(LEASE_KEY, self._body(0.0), self.etag)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _expired(holder: dict[str, Any]) -> bool:
    """Past its expiry, unreadable, or held by a pid that no longer exists on this machine."""
    if not isinstance(holder.get("expires"), (int, float)) or holder["expires"] <= time.time():
        return True
    if holder.get("machine") == _machine() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _machine() -> str:
    """This boot of this machine and its pid namespace: where a pid means the same process (two
    containers may share a host name, never a boot id and pid namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # not Linux: the pid check is off, the expiry alone decides
        return f"unknown:{uuid.uuid4().hex}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _remote_error(url: str, what: str, exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    return StoreError(f"cannot {what} at {url}: {_one_line(exc)} (check the endpoint, the bucket and the credentials)")
