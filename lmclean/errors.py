"""One error hierarchy. Each class also inherits the matching builtin so callers can catch either.

Messages are one line that names the thing at fault and the fix; the CLI prints them and exits 1.
"""

from __future__ import annotations


class LmcleanError(Exception):
    """Base of every error lmclean raises on purpose."""


class ConfigError(LmcleanError, ValueError):
    """A config key is missing, unknown or has a value outside its allowed set."""


class DataError(LmcleanError, ValueError):
    """A data file or row is malformed, or sample ids are duplicated / unknown."""


class InputNotFoundError(LmcleanError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class StoreError(LmcleanError, RuntimeError):
    """The trajectory store is unreadable, corrupted or inconsistent."""


class StoreExistsError(StoreError, FileExistsError):
    """A store already exists where a new one would be created."""


class OutputExistsError(LmcleanError, FileExistsError):
    """An output path would overwrite a user's file, a store, or a directory without --overwrite."""


class StoreVersionError(StoreError):
    """The store was written by an incompatible format version."""


class StoreLockedError(StoreError):
    """Another lmclean process holds the store's lock."""


class ModelMismatchError(LmcleanError, ValueError):
    """A model does not match the store's parameter manifest."""


class ModelWriteError(LmcleanError, OSError):
    """A model directory could not be written (disk full, permissions); nothing was put in place."""


class UnsupportedError(LmcleanError, NotImplementedError):
    """A valid request that this version does not support yet."""


class DivergenceError(LmcleanError, ArithmeticError):
    """The propagated perturbation grew beyond the guard: the linearised map is not contracting."""


class AuditError(LmcleanError, RuntimeError):
    """The audit log is broken, tampered with, or does not match a model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what is true of the store afterwards (the CLI prints it and exits 130)."""
