"""Swap a rebuilt store in for the old one, crash-safely (`lmclean reconcile`).

The new store N is built beside the old one (``.STORE.reconcile-<pid>``, same file system) while the
caller holds the old store's lock, and is complete (closed, its model saved, the carried files and
its audit record in place) before anything here runs. Then:

1. N gets a copy of the old lock file, byte for byte: the lock moves with the store, and the
   holder's `StoreLock.release()` (which removes the file only if its bytes are its own) releases it
   at STORE after the swap;
2. the intent file ``.STORE.reconcile.json`` beside the store names STORE, N, O and N's inode
   (atomic write): the commit point; from here on the swap is rolled forward;
3. STORE and N are exchanged in one atomic step (Linux renameat2 RENAME_EXCHANGE: STORE is never
   missing, and the old store then sits at N's name); where the file system cannot, STORE is renamed
   to O = ``.STORE.old-<pid>`` and then N to STORE;
4. request files queued into the old store meanwhile (`lmclean request` needs no lock) move over;
5. the intent is removed; 6. the old store is removed.

A crash before 2 leaves the old store as it was and N as garbage (`remove_leftovers` deletes it under
the lock). A crash after 2 is finished by `finish_pending_swap`, which tells the new store from the
old by the inode in the intent. Only the two-rename fallback has a moment without STORE: a command
that finds no store there must call `finish_pending_swap` first (`lmclean reconcile` does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from lmclean._faults import crash_point
from lmclean.errors import StoreError
from lmclean.store.atomic import atomic_write_bytes, exchange_dirs, fsync_dir
from lmclean.store.lock import LOCK_FILENAME

__all__ = ["SwapIntent", "build_path", "finish_pending_swap", "intent_path", "remove_leftovers", "swap_in"]

REQUESTS_DIR = "requests"  # lmclean/requests.py: queued deletion requests, written without the lock


def intent_path(store: Path) -> Path:
    return store.with_name(f".{store.name}.reconcile.json")


def build_path(store: Path, pid: int | None = None) -> Path:
    """Where the new store is built: hidden, beside the store (a rename is atomic)."""
    return store.with_name(f".{store.name}.reconcile-{os.getpid() if pid is None else pid}")


def _old_path(store: Path, pid: int) -> Path:
    return store.with_name(f".{store.name}.old-{pid}")


@dataclass(frozen=True)
class SwapIntent:
    store: Path
    new: Path
    old: Path
    pid: int
    host: str
    ino: tuple[int, int]  # (st_dev, st_ino) of the new store: a rename keeps it, so it tells which is which

    def write(self) -> None:
        body = {"version": 1, "store": str(self.store), "new": str(self.new), "old": str(self.old),
                "pid": self.pid, "host": self.host, "ino": list(self.ino)}
        atomic_write_bytes(intent_path(self.store), (json.dumps(body, indent=1) + "\n").encode())

    @classmethod
    def read(cls, store: Path) -> SwapIntent | None:
        path = intent_path(store)
        try:
            body = json.loads(path.read_text())
            dev, ino = (int(x) for x in body["ino"])
            return cls(Path(body["store"]), Path(body["new"]), Path(body["old"]), int(body["pid"]), str(body["host"]),
                       (dev, ino))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{path} (the intent of an interrupted `lmclean reconcile`) is unreadable ({exc}); it is "
                             "written atomically, so it was edited by hand") from exc

    def writer_alive(self) -> bool:
        """Whether the process that wrote the intent is still swapping (then it is not ours to finish)."""
        if self.host != socket.gethostname():
            return True  # cannot tell: as with a lock held on another host, it is not ours to touch
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def swap_in(store: Path, new: Path) -> None:
    """Steps 1-6 of the module docstring; the caller holds the lock of `store`."""
    lock = (store / LOCK_FILENAME).read_bytes()
    fd = os.open(new / LOCK_FILENAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, lock)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(new)
    intent = SwapIntent(store.absolute(), new.absolute(), _old_path(store.absolute(), os.getpid()), os.getpid(),
                        socket.gethostname(), _ino(new))
    intent.write()
    crash_point("reconcile:after-intent")
    done = _finish(intent)
    if done.startswith("rolled back"):  # we hold the lock: nobody can have written the old store
        raise StoreError(f"store {store}: {done}")


def _ino(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _is_new(path: Path, intent: SwapIntent) -> bool:
    try:
        return _ino(path) == intent.ino and (path / "zarr.json").is_file()
    except FileNotFoundError:
        return False


_exchange = exchange_dirs  # module-level name: tests replace it to reach the two-rename path


def _log_moved_on(store: Path, new: Path) -> bool:
    """Whether the old store's audit log gained a record after the new store copied it (a writer that
    did not finish the swap first, e.g. an unlearning after a crash): the new store would lose it."""
    from lmclean.audit.log import AUDIT_FILENAME

    try:
        before = (store / AUDIT_FILENAME).read_bytes()
    except FileNotFoundError:
        before = b""
    try:
        after = (new / AUDIT_FILENAME).read_bytes()
    except FileNotFoundError:
        return bool(before)
    return not after.startswith(before) or after[len(before):].count(b"\n") != 1  # + the reconcile record


def _finish(intent: SwapIntent) -> str:
    """Roll the swap forward from wherever it stopped (each step is idempotent given the intent), or
    back when the old store was written to after the commit point."""
    store, new, old = intent.store, intent.new, intent.old
    if not _is_new(store, intent):
        if not _is_new(new, intent):
            raise StoreError(f"{intent_path(store)} says a reconciled store {new} replaces {store}, but neither is it; "
                             f"restore the store from a backup (the old one may still be at {old} or {new})")
        if store.exists() and _log_moved_on(store, new):
            shutil.rmtree(new, ignore_errors=True)
            intent_path(store).unlink()
            fsync_dir(store.parent)
            return "rolled back an interrupted reconcile: the store was written to since; reconcile it again"
        if not store.exists():  # the two-rename path stopped between its renames
            os.rename(new, store)
        elif not _exchange(store, new):  # after an exchange the old store waits at `new`
            os.rename(store, old)
            fsync_dir(store.parent)
            crash_point("reconcile:between-renames")
            os.rename(new, store)
        fsync_dir(store.parent)
        crash_point("reconcile:after-swap")
    for leftover in (new, old):  # the old store, under whichever name the swap left it
        if leftover.is_dir() and not _is_new(leftover, intent):
            _move_requests(leftover, store)
    with contextlib.suppress(FileNotFoundError):
        intent_path(store).unlink()
    fsync_dir(store.parent)
    for leftover in (new, old):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    return "completed an interrupted reconcile: the reconciled store is in place"


def _move_requests(old: Path, store: Path) -> None:
    """Request files that `lmclean request` queued into the old store after it was copied."""
    src = old / REQUESTS_DIR
    if not src.is_dir():
        return
    dst = store / REQUESTS_DIR
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".json" and not (dst / f.name).exists():
            os.replace(f, dst / f.name)
    fsync_dir(dst)


def finish_pending_swap(store: Path | str) -> str | None:
    """Finish a swap that a crash interrupted after its commit point (see the module docstring);
    returns what was done, None when nothing was pending (or its writer is still at it)."""
    store = Path(store)
    intent = SwapIntent.read(store)
    if intent is None or intent.writer_alive():
        return None
    if Path(intent.store) != store.absolute():
        raise StoreError(f"{intent_path(store)} names store {intent.store}, not {store.absolute()}; it was moved by hand")
    return f"{store}: {_finish(intent)}"


def remove_leftovers(store: Path) -> list[Path]:
    """Remove build and old directories no pending swap names (a reconcile that crashed before its
    commit point, or after removing its intent). The caller holds the store's lock, so no other
    reconcile of this store is running."""
    if SwapIntent.read(store) is not None:
        return []
    gone = []
    prefixes = (f".{store.name}.reconcile-", f".{store.name}.old-")
    for path in store.parent.iterdir():
        for prefix in prefixes:
            if path.name.startswith(prefix) and path.name[len(prefix):].isdigit() and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                gone.append(path)
    return gone
