"""Where a command may write: never into a store, never over a user's files without --overwrite.

Every command that writes an output (unlearn, export, eval --out, ...) asks `check_output` before
it computes anything, so a refused path costs nothing and damages nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from lmclean.errors import OutputExistsError

__all__ = ["check_output", "enclosing_store", "is_store"]

_STORE_MARKERS = ("COMMIT.json", "audit.jsonl", ".lmclean.lock")


def is_store(path: Path) -> bool:
    """A directory lmclean recorded into (Zarr root with lmclean's commit marker, audit log or lock)."""
    return path.is_dir() and (path / "zarr.json").is_file() and any((path / m).exists() for m in _STORE_MARKERS)


def enclosing_store(path: Path) -> Path | None:
    """The store that `path` is, or lies inside, if any."""
    for p in (path, *path.parents):
        if is_store(p):
            return p
    return None


def _contained_store(path: Path) -> Path | None:
    """A store somewhere below the directory `path` (first found), if any."""
    for root, dirs, files in os.walk(path):
        if "zarr.json" in files and is_store(Path(root)):
            return Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".git")]
    return None


def check_output(path: Path | str, *, overwrite: bool = False, kind: Literal["directory", "file"] = "directory",
                 flag: str = "--out") -> Path:
    """Refuse `path` as an output unless it is new, an empty directory, or (with overwrite) a plain
    file/directory that holds no store and is no parent of the working directory. Returns the path.

    Outputs never go inside (or replace) a store: a store's model and audit log are its record."""
    path = Path(path)
    resolved = path.resolve()
    store = enclosing_store(resolved)
    if store is not None:
        where = "is the store" if store == resolved else f"is inside the store {store}"
        raise OutputExistsError(f"{flag} {path} {where}; write outputs outside the store (e.g. next to it)")
    if not path.exists() and not path.is_symlink():
        return path
    if kind == "file":
        if path.is_dir():
            raise OutputExistsError(f"{flag} {path} is a directory; name a file")
        if not overwrite:
            raise OutputExistsError(f"{flag} {path} already exists; choose another path or pass --overwrite to replace it")
        return path
    if not path.is_dir():
        raise OutputExistsError(f"{flag} {path} exists and is not a directory; choose another path")
    if not any(path.iterdir()):
        return path
    inner = _contained_store(resolved)
    if inner is not None:
        raise OutputExistsError(f"{flag} {path} contains the store {inner}; choose another path (not even --overwrite "
                                "replaces a store)")
    if not overwrite:
        raise OutputExistsError(f"{flag} {path} already exists and is not empty; choose another path or pass "
                                "--overwrite to replace it")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputExistsError(f"{flag} {path} is the working directory or one of its parents; refusing to replace it "
                                "even with --overwrite")
    return path
