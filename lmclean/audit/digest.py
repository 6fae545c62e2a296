"""Content digests that identify a model's weights, a file, and a data set independently of layout.

``model_digest`` reads the safetensors header itself instead of loading tensors: the raw
little-endian bytes are exactly what a framework would load, every dtype (bfloat16, float8) is
covered without torch, and a large model is hashed by streaming rather than held in memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lmclean.audit.log import canonical_json
from lmclean.errors import DataError, InputNotFoundError

__all__ = ["content_fingerprint", "file_digest", "model_digest"]

_CHUNK = 16 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_DIGEST_TAG = b"lmclean-model-digest-v1\n"


def file_digest(path: Path | str) -> str:
    """sha256 hex of a plain file's bytes (configs, tokenizer files, data files)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"file {path} does not exist; check the path")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], int, int]:
    """Return (tensor entries, offset of the data buffer, buffer length); reject malformed files."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    raw_len = f.read(8)
    if len(raw_len) != 8:
        raise DataError(
            f"{path} is not a safetensors file (shorter than 8 bytes); re-save the model"
        )
    (n,) = struct.unpack("<Q", raw_len)
    if n > _MAX_HEADER or 8 + n > size:
        raise DataError(
            f"{path} is not a safetensors file (header length {n} invalid); re-save the model"
        )
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path} is not a safetensors file (header not JSON: {e}); re-save the model"
        ) from e
    if not isinstance(header, dict):
        raise DataError(
            f"{path} is not a safetensors file (header is not an object); re-save the model"
        )
    header.pop("__metadata__", None)
    buf_len = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            ok = (
                isinstance(entry["dtype"], str)
                and isinstance(entry["shape"], list)
                and all(type(x) is int for x in (begin, end, *entry["shape"]))
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or not (0 <= begin <= end <= buf_len):
            raise DataError(
                f"{path}: tensor {name!r} has a malformed header entry; re-save the model"
            )
    return header, 8 + n, buf_len


def _iter_bytes(f: BinaryIO, start: int, length: int) -> Iterator[bytes]:
    f.seek(start)
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise DataError(f"{getattr(f, 'name', '?')} ended early while reading tensor data")
        left -= len(chunk)
        yield chunk


def model_digest(model_dir: Path | str) -> str:
    """sha256 hex over all tensors in the ``*.safetensors`` files of ``model_dir``.

    Tensors are hashed in sorted-name order as a canonical header line
    ``{"dtype":..,"name":..,"nbytes":..,"shape":..}`` followed by the raw bytes, so re-saving the
    same weights gives the same digest whatever the sharding, tensor order or file metadata.
    Non-weight files (config, tokenizer) are not covered; use ``file_digest`` for those.
    A single ``.safetensors`` file may be passed instead of a directory.
    """
    model_dir = Path(model_dir)
    if model_dir.is_file() and model_dir.suffix == ".safetensors":
        files = [model_dir]
    elif model_dir.is_dir():
        files = sorted(p for p in model_dir.glob("*.safetensors")
                       if p.is_file() and p.name != "optimizer_delta.safetensors")  # weights only
        if not files:
            raise InputNotFoundError(
                f"no *.safetensors files in {model_dir}; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
    else:
        raise InputNotFoundError(f"model directory {model_dir} does not exist; check the path")

    index: dict[str, tuple[Path, dict[str, Any], int]] = {}
    for path in files:
        with path.open("rb") as f:
            header, data_start, _ = _read_header(f, path)
        for name, entry in header.items():
            if name in index:
                raise DataError(
                    f"tensor {name!r} appears in both {index[name][0].name} and {path.name}; "
                    f"remove the stale file from {model_dir}"
                )
            index[name] = (path, entry, data_start)

    h = hashlib.sha256(_DIGEST_TAG)
    handles: dict[Path, BinaryIO] = {}
    try:
        for name in sorted(index):
            path, entry, data_start = index[name]
            begin, end = entry["data_offsets"]
            meta = {
                "dtype": entry["dtype"],
                "name": name,
                "nbytes": end - begin,
                "shape": entry["shape"],
            }
            h.update(canonical_json(meta).encode("utf-8") + b"\n")
            if path not in handles:
                handles[path] = path.open("rb")
            for chunk in _iter_bytes(handles[path], data_start + begin, end - begin):
                h.update(chunk)
    finally:
        for handle in handles.values():
            handle.close()
    return h.hexdigest()


def content_fingerprint(token_ids: Sequence[int] | np.ndarray) -> str:
    """The store's data-set fingerprint: sha256 hex of the token ids as little-endian int32 bytes.

    Ids are range-checked first, because casting silently wraps values outside int32.
    """
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise DataError(f"token ids must be a flat sequence, got an array of shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iub":
        raise DataError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        info = np.iinfo(np.int32)
        if lo < info.min or hi > info.max:
            raise DataError(f"token ids must fit in int32, found range [{lo}, {hi}]")
    return hashlib.sha256(arr.astype("<i4").tobytes()).hexdigest()
