"""The gradient shards the writer appends to in place must be what zarr reads, however written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from lmclean.errors import StoreError
from lmclean.store import format as fmt
from lmclean.store.codec import crc32c
from lmclean.store.shard import EMPTY, ENTRY, ShardRowArray, data_start, read_row

P, T = 3000, 10


def _array(path: Path, rows: int = 4, codec: str = "auto") -> zarr.Array:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    return root.create_array("grad", shape=(T, P), chunks=(rows, P), dtype="float32", fill_value=np.nan,
                             serializer=fmt.grad_serializer("fp32", codec, P), compressors=None,
                             chunk_key_encoding=fmt.FLAT_KEYS)


def _rows(seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed).standard_normal((T, P)).astype(np.float32)
    g[:, : P // 4] = 0.0  # the zero runs that lz4 compresses
    return g


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
@pytest.mark.parametrize("codec", ["auto", "blosc", "none"])
def test_rows_appended_in_place_read_back_through_zarr(tmp_path: Path, direct: bool, codec: str) -> None:
    g = _rows()
    writer = ShardRowArray(tmp_path, _array(tmp_path, codec=codec))
    writer.direct = direct
    for t in range(7):  # shard 0 full, shard 1 holds rows 4-6, shard 2 (rows 8-9) never created
        writer.write(t, g[t])
    assert writer.first_missing(7) == 4  # rows 4-6 are staged: shard 0 went out when shard 1 began
    writer.write_staged()
    writer.close()
    got = zarr.open_array(str(tmp_path / "grad"), mode="r")[:]
    assert np.array_equal(got[:7], g[:7])
    assert np.isnan(got[7:]).all()  # never-written rows read as the fill, in a shard and past it
    assert sorted(p.name for p in (tmp_path / "grad").iterdir()) == ["c.0.0", "c.1.0", "zarr.json"]
    assert writer.first_missing(7) is None and writer.first_missing(8) == 7
    first = (tmp_path / "grad" / "c.0.0").read_bytes()
    offsets = np.frombuffer(first[: 4 * ENTRY.size], dtype="<u8").reshape(4, 2)[:, 0]
    assert offsets[0] == data_start(4) and (offsets % fmt.SHARD_ALIGN == 0).all()  # O_DIRECT-ready layout
    assert first[4 * ENTRY.size: 4 * ENTRY.size + 4] == crc32c(first[: 4 * ENTRY.size])  # the index's checksum


@pytest.mark.parametrize("direct", [True, False], ids=["O_DIRECT", "page-cache"])
def test_rows_larger_than_the_staging_buffer_go_out_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              direct: bool) -> None:
    """A large model's row is not copied whole into the staging buffer: it is written in pieces
    of STAGE_BYTES (here 8 KB against 12 KB rows), the buffer staying that size."""
    import lmclean.store.shard as shard_mod

    monkeypatch.setattr(shard_mod, "STAGE_BYTES", 2 * fmt.SHARD_ALIGN)
    g = _rows()
    writer = ShardRowArray(tmp_path, _array(tmp_path, codec="none"))
    writer.direct = direct
    for t in range(T):
        writer.write(t, g[t])
    writer.write_staged()
    assert writer._scratch is not None and len(writer._scratch) == 2 * fmt.SHARD_ALIGN
    writer.close()
    assert np.array_equal(zarr.open_array(str(tmp_path / "grad"), mode="r")[:], g)


def test_resume_inside_a_shard_keeps_earlier_rows_and_forgets_later_ones(tmp_path: Path) -> None:
    g, h = _rows(0), _rows(1)
    writer = ShardRowArray(tmp_path, _array(tmp_path))
    for t in range(7):
        writer.write(t, g[t])
    writer.write_staged()
    writer.close()
    again = ShardRowArray(tmp_path, zarr.open_group(str(tmp_path), mode="r")["grad"])
    again.write(5, h[5])  # resumed from step 5: rows 4 kept, 6 forgotten until rewritten
    again.write_staged()
    assert again.first_missing(7) == 6
    again.write(6, h[6])
    with pytest.raises(StoreError, match="row 8 written out of order"):
        again.write(8, h[8])
    again.write_staged()
    again.close()
    got = zarr.open_array(str(tmp_path / "grad"), mode="r")[:]
    assert np.array_equal(got[:5], g[:5]) and np.array_equal(got[5:7], h[5:7])
    # the shard was cut back to its kept rows before the new ones went in: no stale bytes kept
    raw = (tmp_path / "grad" / "c.1.0").read_bytes()
    entries = np.frombuffer(raw[: 4 * ENTRY.size], dtype="<u8").reshape(4, 2)
    assert (tmp_path / "grad" / "c.1.0").stat().st_size <= int(entries[2].sum()) + fmt.SHARD_ALIGN
    assert (entries[3] == EMPTY).all() and raw[4 * ENTRY.size: 4 * ENTRY.size + 4] == crc32c(raw[: 4 * ENTRY.size])


def test_resume_inside_a_damaged_shard_is_an_error(tmp_path: Path) -> None:
    writer = ShardRowArray(tmp_path, _array(tmp_path))
    writer.write(0, _rows()[0])
    writer.write_staged()
    writer.close()
    again = ShardRowArray(tmp_path, zarr.open_group(str(tmp_path), mode="r")["grad"])
    with pytest.raises(StoreError, match=r"shard c\.0\.0 lacks rows before step 2"):
        again.write(2, _rows()[2])
    with (tmp_path / "grad" / "c.0.0").open("r+b") as f:  # a torn index: resume must not trust it
        f.write(b"\0" * 8)
    with pytest.raises(StoreError, match=r"the index of shard grad/c\.0\.0 fails its checksum"):
        ShardRowArray(tmp_path, zarr.open_group(str(tmp_path), mode="r")["grad"]).write(1, _rows()[1])
    with pytest.raises(StoreError, match=r"shard c\.1\.0 holding step 4 is missing"):
        ShardRowArray(tmp_path, zarr.open_group(str(tmp_path), mode="r")["grad"]).write(5, _rows()[5])


def test_read_row_tells_absent_from_truncated(tmp_path: Path) -> None:
    writer = ShardRowArray(tmp_path, _array(tmp_path))
    writer.write(0, _rows()[0])
    writer.write_staged()
    writer.close()
    shard = tmp_path / "grad" / "c.0.0"
    assert read_row(shard, 0, 4) is not None and read_row(shard, 1, 4) is None
    assert read_row(tmp_path / "grad" / "c.1.0", 0, 4) is None
    os.truncate(shard, data_start(4) + 10)
    with pytest.raises(StoreError, match="truncated: row 0"):
        read_row(shard, 0, 4)
    os.truncate(shard, 20)
    with pytest.raises(StoreError, match="truncated inside its index"):
        read_row(shard, 0, 4)


def test_zarr_metadata_other_than_lmclean_shards_is_refused(tmp_path: Path) -> None:
    root = zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    end_index = root.create_array("g", shape=(T, P), chunks=(1, P), shards=(4, P), dtype="float32")  # index at the end
    with pytest.raises(StoreError, match="one-row chunks with a checksummed index at the start"):
        fmt.shard_rows(end_index)
    unchecked = root.create_array("u", shape=(T, P), chunks=(4, P), dtype="float32", compressors=None,
                                  serializer=zarr.codecs.ShardingCodec(chunk_shape=(1, P), index_location="start",
                                                                       index_codecs=[zarr.codecs.BytesCodec()]))
    with pytest.raises(StoreError, match="checksummed index"):  # format version 1's index: no checksum
        fmt.shard_rows(unchecked)
    plain = root.create_array("h", shape=(T, P), chunks=(1, P), dtype="float32")
    assert fmt.shard_rows(plain) is None


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_file_system_refusing_o_direct_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    refusal: str) -> None:
    """Some file systems refuse O_DIRECT at open (older tmpfs), others only at the first write."""
    import errno

    import lmclean.store.shard as shard_mod

    real_open, real_pwrite, direct_fds = os.open, os.pwrite, set()

    def fake_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT and refusal == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags, *args, **kwargs)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_pwrite(fd, data, offset):  # type: ignore[no-untyped-def]
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_mod.os, "open", fake_open)
    monkeypatch.setattr(shard_mod.os, "pwrite", fake_pwrite)
    g = _rows()
    writer = ShardRowArray(tmp_path, _array(tmp_path))
    for t in range(T):
        writer.write(t, g[t])
    writer.write_staged()
    assert not writer.direct
    writer.close()
    monkeypatch.undo()
    assert np.array_equal(zarr.open_array(str(tmp_path / "grad"), mode="r")[:], g)
