"""An exclusive, crash-tolerant lock on a store directory (``.lmclean.lock``).

The lock file is created with ``O_CREAT | O_EXCL`` so exactly one process wins. It records who holds
it, so a second process can say who is in the way, and a lock left by a process that died on this
host is recognised as stale and cleared instead of blocking the store forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from lmclean.errors import InputNotFoundError, StoreLockedError

__all__ = ["LOCK_FILENAME", "StoreLock", "read_lock"]

LOCK_FILENAME = ".lmclean.lock"
_RETRIES = 5  # bounded: each retry follows a lock that vanished or a stale one we cleared


def read_lock(store_dir: Path | str) -> dict[str, Any] | None:
    """The current holder's record ({pid, host, since, purpose}), or None when unlocked.

    An unreadable lock file (mid-creation, or left by a crash) reads as ``{"unreadable": True}``.
    """
    try:
        raw = (Path(store_dir) / LOCK_FILENAME).read_bytes()
    except FileNotFoundError:
        return None
    return _parse(raw) or {"unreadable": True}


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        info = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class StoreLock:
    """Context manager holding ``store_dir/.lmclean.lock`` for one operation (``purpose``).

    ``stale_cleared`` is True when a lock left by a dead process was removed to take this one;
    ``stale_info`` then holds that dead holder's record.
    """

    def __init__(self, store_dir: Path | str, purpose: str) -> None:
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / LOCK_FILENAME
        self.purpose = purpose
        self.stale_cleared = False
        self.stale_info: dict[str, Any] | None = None
        self._content: bytes | None = None

    @property
    def held(self) -> bool:
        return self._content is not None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise StoreLockedError naming the holder and how to recover."""
        if self.held:
            raise StoreLockedError(f"store {self.store_dir}: this StoreLock is already held")
        if not self.store_dir.is_dir():
            raise InputNotFoundError(
                f"store directory {self.store_dir} does not exist; check the path"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "purpose": self.purpose,
        }
        content = (json.dumps(info) + "\n").encode("utf-8")
        for _ in range(_RETRIES):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            try:
                os.write(fd, content)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                raise
            os.close(fd)
            self._content = content
            return
        raise StoreLockedError(
            f"store {self.store_dir}: could not take {self.path} after {_RETRIES} attempts "
            "(another process keeps locking it); try again"
        )

    def _handle_existing(self) -> None:
        """Raise if the existing lock is live; clear it if its holder died; return to retry."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return  # released meanwhile
        holder = _parse(raw)
        if holder is None:  # the creator may be between O_EXCL and write(): look once more
            time.sleep(0.1)
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return
            holder = _parse(raw)
        if holder is None:
            raise StoreLockedError(
                f"store {self.store_dir} has an unreadable lock file {self.path}; "
                "remove it if no lmclean process is using this store"
            )
        pid, host = holder.get("pid"), holder.get("host")
        desc = (
            f"pid {pid}{'' if host == socket.gethostname() else f' on host {host}'} "
            f"({holder.get('purpose')}) since {holder.get('since')}"
        )
        if (
            isinstance(pid, int)
            and pid > 0
            and host == socket.gethostname()
            and not _pid_alive(pid)
        ):
            if self._remove_if_unchanged(raw):
                self.stale_cleared = True
                self.stale_info = holder
            return
        raise StoreLockedError(
            f"store {self.store_dir} is locked by {desc}; "
            f"wait for it or remove {self.path} if that process is gone"
        )

    def _remove_if_unchanged(self, expected: bytes) -> bool:
        """Remove the lock only if it is still the stale one we read.

        Renaming first makes the check-and-remove atomic with respect to another process that
        clears the same stale lock and creates its own in between.
        """
        aside = self.path.with_name(f"{LOCK_FILENAME}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() == expected:
                return True
            with contextlib.suppress(FileExistsError):  # not the stale one: put it back
                os.link(aside, self.path)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    def release(self) -> None:
        """Remove the lock file if it is still ours; never raises for an already-missing lock."""
        if self._content is None:
            return
        content, self._content = self._content, None
        try:
            if self.path.read_bytes() != content:
                return  # someone removed ours and took the lock: not ours to delete
        except FileNotFoundError:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
