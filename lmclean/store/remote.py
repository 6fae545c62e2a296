"""Stores on object storage (s3://, gs://, az://, memory://): worked on through a local staging copy.

Why staging, not zarr on the bucket: lmclean's writer appends gradient rows in place into shard
files (O_DIRECT) and relies on rename and O_EXCL; objects have none of these. So
`open_location(url, purpose, mode)` pulls the store's objects into a local directory (only the
objects that changed since the last pull), the command runs on that directory unchanged, and the
changed objects are pushed back in the order they were written, COMMIT.json last; objects deleted
locally are deleted remotely after the commit marker.

Without rename or O_EXCL, two writers are kept apart by conditional writes (docs/store-format.md,
"Stores on object storage"): a lease object (`.lmclean.lease`, created with If-None-Match, renewed
and taken over with If-Match on its ETag) admits one writer, and every push of an object that
existed is conditional on the ETag pulled (If-Match; a new one on If-None-Match), so a writer that
lost its lease can never overwrite what another writer pushed: it stops with a one-line error.

The objects and the lease: lmclean/store/objects.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmclean.errors import InputNotFoundError, StoreLockedError
from lmclean.store.atomic import PARTIAL_SUFFIX, atomic_write_bytes, atomic_write_json
from lmclean.store.format import COMMIT_FILE
from lmclean.store.lock import LOCK_FILENAME
from lmclean.store.objects import LEASE_KEY, Lease, RemoteLocation, _remote_error, is_remote

__all__ = ["LEASE_KEY", "Lease", "Mode", "RemoteLocation", "Staging", "cache_dir", "is_remote", "open_location", "remove_cache"]

Mode = Literal["read", "write", "append"]
SYNC_SECONDS = float(os.environ.get("LMCLEAN_SYNC_SECONDS", "10"))  # record's background push interval
_THREADS = 8


def cache_dir(url: str) -> Path:
    """Where the staging copies of `url` live: $LMCLEAN_CACHE (default ~/.cache/lmclean)/<sha256(url)[:16]>."""
    root = Path(os.environ.get("LMCLEAN_CACHE") or Path.home() / ".cache" / "lmclean")
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


@dataclass
class _Entry:
    """What the staging copy last agreed with the remote on, for one object."""

    etag: str
    size: int
    mtime_ns: int


@dataclass
class Staging:
    """The local copy of one store URL and what it last agreed with the remote on (its manifest)."""

    loc: RemoteLocation
    root: Path  # the staging directory: <cache>/<w|r>/; the store itself is root/<name>
    entries: dict[str, _Entry] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.root / (self.loc.url.rsplit("/", 1)[-1] or "store")

    @property
    def _manifest(self) -> Path:
        return self.root / ".remote-manifest.json"

    def load(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            raw = json.loads(self._manifest.read_text())
            if raw.get("url") == self.loc.url:
                self.entries = {k: _Entry(**v) for k, v in raw["objects"].items()}

    def save(self) -> None:
        atomic_write_json(self._manifest, {"url": self.loc.url, "objects": {k: vars(e) for k, e in self.entries.items()}})

    def local_files(self) -> dict[str, os.stat_result]:
        found: dict[str, os.stat_result] = {}
        if not self.store.is_dir():
            return found
        for dirpath, _, names in os.walk(self.store):
            for name in names:
                if name == LOCK_FILENAME or name.endswith(PARTIAL_SUFFIX) or ".stale-" in name:
                    continue
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    found[path.relative_to(self.store).as_posix()] = path.stat()
        return found

    def _fresh(self, key: str, meta: dict[str, Any] | None, st: os.stat_result | None) -> bool:
        e = self.entries.get(key)
        return (e is not None and st is not None and (meta is None or str(meta["e_tag"]) == e.etag)
                and (st.st_size, st.st_mtime_ns) == (e.size, e.mtime_ns))

    def pull(self, only: str | None = None) -> int:
        """Make the staging copy equal the remote (objects under `only/` alone when given); objects fetched."""
        for _attempt in range(3):  # a writer pushing meanwhile: retry until COMMIT.json held still
            remote = {k: m for k, m in self.loc.list(only).items() if k != LEASE_KEY}
            local = self.local_files()
            todo = [k for k in remote if not self._fresh(k, remote[k], local.get(k))
                    and (only is None or (k not in self.entries and k not in local))]
            if COMMIT_FILE in todo:  # the commit marker first, alone: data fetched after it is at least as new
                todo.remove(COMMIT_FILE)
                self._record(*self._fetch(COMMIT_FILE))
            with ThreadPoolExecutor(_THREADS) as pool:
                for key, etag in pool.map(self._fetch, todo):
                    self._record(key, etag)
            if only is None:  # a partial pull (new requests, while record runs) only adds
                for key in set(local) - set(remote):
                    (self.store / key).unlink(missing_ok=True)
                for key in set(self.entries) - set(remote):
                    del self.entries[key]
                _prune_empty(self.store)
            commit = remote.get(COMMIT_FILE)
            if only is not None or commit is None or self.loc.etag(COMMIT_FILE) == str(commit["e_tag"]):
                break
        self.save()
        return len(todo)

    def _fetch(self, key: str) -> tuple[str, str]:
        data, etag = self.loc.get(key)
        path = self.store / key
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return key, etag

    def _record(self, key: str, etag: str, st: os.stat_result | None = None) -> None:
        st = st or (self.store / key).stat()
        self.entries[key] = _Entry(etag, st.st_size, st.st_mtime_ns)

    def push(self, mode: Mode, lease: Lease | None) -> int:
        """Push what changed locally, oldest change first, COMMIT.json last, then the deletions.

        Oldest first replays the order lmclean wrote the files in (the writer orders its writes so
        that a crash at any instant leaves a consistent store), so a push cut short leaves the
        remote at a state at least as consistent as a local crash would; COMMIT.json is read before
        anything else, so every object pushed is at least as new as the commit it describes.
        Every put is conditional on the ETag this copy last saw, so nothing another writer pushed is
        overwritten. Append mode (a queued request) pushes new objects only. Returns objects pushed."""
        if lease is not None:
            lease.renew()
        commit_path = self.store / COMMIT_FILE
        try:
            commit_stat = commit_path.stat()
            commit_bytes: bytes | None = commit_path.read_bytes()
        except FileNotFoundError:
            commit_stat, commit_bytes = None, None
        local = self.local_files()
        changed = sorted((k for k in local if k != COMMIT_FILE and not self._fresh(k, None, local[k])
                          and (mode == "write" or k not in self.entries)), key=lambda k: local[k].st_mtime_ns)
        n = 0
        try:
            for key in changed:  # one at a time: the order is the point (see above)
                done = self._upload(key)
                if done is not None:  # None: the file went away meanwhile (pushed as a deletion)
                    self._record(*done)
                    n += 1
            if commit_bytes is not None and commit_stat is not None and not self._fresh(COMMIT_FILE, None, commit_stat) \
                    and (mode == "write" or COMMIT_FILE not in self.entries):
                self._record(*self._upload(COMMIT_FILE, commit_stat, commit_bytes))
                n += 1
            if mode == "write":
                for key in set(self.entries) - set(local):
                    self.loc.delete(key)
                    del self.entries[key]
        finally:
            self.save()
        return n

    def _upload(self, key: str, st: os.stat_result | None = None, data: bytes | None = None) -> Any:
        """One conditional put -> (key, etag, stat), None if the file is gone. The stat is taken before
        the bytes are read, so a file that changes while being read is pushed again next time."""
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        prior = self.entries.get(key)
        try:
            if data is None:
                st = (self.store / key).stat()
                data = (self.store / key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return key, self.loc.put(key, data, prior.etag if prior else None), st
        except (AlreadyExistsError, PreconditionError):
            raise StoreLockedError(f"store {self.loc.url} was changed by another writer ({key} is not the version this "
                                   f"job pulled); nothing of it was overwritten: rerun the command") from None
        except Exception as exc:
            raise _remote_error(self.loc.url, f"write {key}", exc) from exc


class _Uploader:
    """Pushes committed state every `every` seconds while a command (record) runs, so a killed job
    loses at most the steps since the last push; also pulls new queued requests (requests/)."""

    def __init__(self, staging: Staging, lease: Lease | None, every: float) -> None:
        self.staging, self.lease, self.every = staging, lease, every
        self.error: StoreLockedError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmclean-push", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.staging.push("write", self.lease)
                self.staging.pull(only="requests/")
            except StoreLockedError as exc:  # the lease or an object went to another writer: stop pushing
                self.error = exc
                return
            except Exception:  # the service unreachable for a while: the next round tries again
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def open_location(location: str | os.PathLike[str], purpose: str, mode: Mode = "read",
                  sync_every: float | None = None) -> Iterator[Path]:
    """The local directory to run `purpose` on: `location` itself when local, else a staging copy.

    mode: "read" pulls only; "write" takes the lease, pulls, and pushes what changed at the end (and
    every `sync_every` seconds meanwhile, for record), also when the command fails, since a store
    is crash-consistent at any moment; "append" pushes new objects only (a queued request), no lease."""
    if not is_remote(location):
        yield Path(location)
        return
    loc = RemoteLocation(os.fspath(location))
    root = cache_dir(loc.url) / ("w" if mode == "write" else "r")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".sync.lock", "w") as guard:
        try:  # readers wait for each other (short); a second writer on this machine is refused at once
            fcntl.flock(guard, fcntl.LOCK_EX | (fcntl.LOCK_NB if mode == "write" else 0))
        except BlockingIOError:
            raise StoreLockedError(f"the staging copy {root} of {loc.url} is in use by another lmclean job on this "
                                   "machine; wait for it to finish") from None
        staging = Staging(loc, root)
        staging.load()
        lease = Lease(loc, purpose) if mode == "write" else None
        if lease is not None:
            lease.acquire()
        try:
            staging.pull()
            if mode == "write":
                (staging.store / LOCK_FILENAME).unlink(missing_ok=True)  # we hold the lease: a local lock is stale
            if mode == "read" and not staging.store.is_dir():
                raise InputNotFoundError(f"no store at {loc.url} (no objects under it); check the URL and the bucket")
            uploader = _Uploader(staging, lease, sync_every) if sync_every and mode == "write" else None
            try:
                yield staging.store
            finally:
                if uploader is not None:
                    uploader.close()
                if mode != "read" and (uploader is None or uploader.error is None):
                    staging.push(mode, lease)
                if uploader is not None and uploader.error is not None:
                    raise uploader.error
        finally:
            if lease is not None:
                lease.release()


def _prune_empty(root: Path) -> None:
    """Remove directories left empty by deletions (a store with no objects has no directory at all)."""
    if root.is_dir():
        for dirpath, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(dirpath)


def remove_cache(url: str) -> None:
    """Drop the staging copies of `url` (they are rebuilt from the remote on the next command)."""
    shutil.rmtree(cache_dir(url.rstrip("/")), ignore_errors=True)
