"""Atomic, durable file writes: the one helper every writer of a store (and its audit files) uses.

Policy: the bytes go to a temp file next to the target (`.<name>.<pid>.partial`), which is
fsynced, renamed over the target, and then the directory is fsynced so the rename survives a
power cut. Readers see the old content or the new, never half; a temp file is unlinked on any
exception. Callers that write many files into a few directories (a commit, a scrub) pass a
`DirSync` and fsync each directory once, after the last rename and before the write that makes
the others count (COMMIT.json, the tombstones).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["PARTIAL_SUFFIX", "DirSync", "atomic_write_bytes", "atomic_write_json", "fsync_dir"]

PARTIAL_SUFFIX = ".partial"

Data = bytes | bytearray | memoryview


def fsync_dir(path: Path | str | int) -> None:
    """fsync a directory (a path, or an open directory fd) so renames in it are durable.

    Platforms that cannot open or fsync a directory make this a no-op."""
    if isinstance(path, int):
        with contextlib.suppress(OSError):
            os.fsync(path)
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirSync:
    """Directories whose renames still need an fsync; `sync()` does each once."""

    def __init__(self) -> None:
        self._paths: set[Path] = set()
        self._fds: set[int] = set()

    def add(self, where: Path | int) -> None:
        (self._fds if isinstance(where, int) else self._paths).add(where)  # type: ignore[arg-type]

    def sync(self) -> None:
        for fd in self._fds:
            fsync_dir(fd)
        for path in self._paths:
            fsync_dir(path)
        self._fds.clear()
        self._paths.clear()


def atomic_write_bytes(path: Path | str, data: Data, *, dir_fd: int | None = None, mode: int = 0o644,
                       pending: DirSync | None = None) -> None:
    """Replace `path` with `data` atomically and durably (see the module docstring).

    With `dir_fd`, `path` is relative to that open directory (the store writer keeps one per array:
    no path lookup per write). With `pending`, the directory fsync is left to `pending.sync()`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode, dir_fd=dir_fd)
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if dir_fd is None:
            os.replace(tmp, path)
        else:
            os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    where: Path | int = dir_fd if dir_fd is not None else (path.parent if str(path.parent) else Path("."))
    if pending is not None:
        pending.add(where)
    else:
        fsync_dir(where)


def atomic_write_json(path: Path | str, obj: Any, *, pending: DirSync | None = None) -> None:
    """`obj` as indented, key-sorted JSON, written with atomic_write_bytes."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), pending=pending)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def exchange_dirs(a: Path, b: Path) -> bool:
    """Exchange two directories atomically (Linux renameat2 RENAME_EXCHANGE): neither path is ever
    missing. False where the system or file system does not support it (the caller then falls back
    to two renames), and with LMCLEAN_NO_RENAME_EXCHANGE set (how tests reach that path)."""
    import ctypes
    import errno
    import sys

    if sys.platform != "linux" or os.environ.get("LMCLEAN_NO_RENAME_EXCHANGE"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))
