"""The on-disk trajectory store (Zarr v3): format, background writer, reader, check. Knows nothing of autograd."""

from lmclean.store.check import CheckReport, check_store
from lmclean.store.format import FORMAT_VERSION
from lmclean.store.reader import StepRecord, TrajectoryStore
from lmclean.store.writer import StoreWriter

__all__ = ["FORMAT_VERSION", "CheckReport", "StepRecord", "StoreWriter", "TrajectoryStore", "check_store"]
