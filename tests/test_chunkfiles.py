"""Chunk files read and written without zarr's event loop (``engine.io.chunkfiles``): what
they read equals what zarr reads, what they write zarr reads back, for every layout they
take; every other layout goes through zarr itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

from engine.io.chunkfiles import ChunkFiles, write_region
from engine.io.integrity import read_checked
from engine.io.opened import open_array

SHAPE, CHUNKS = (13, 10, 7), (4, 4, 3)

LAYOUTS = {
    "v3-zstd-u2": (3, {}, "u2", 0),
    "v3-zstd-checksum-i8": (3, {"compressors": ZstdCodec(level=5, checksum=True)}, "i8", -1),
    "v3-blosc-lz4-f4": (3, {"compressors": BloscCodec(cname="lz4", clevel=5,
                                                      shuffle="shuffle")}, "f4", 0.0),
    "v3-blosc-bitshuffle-u1": (3, {"compressors": BloscCodec(cname="zstd", clevel=3,
                                                             shuffle="bitshuffle")}, "u1", 7),
    "v3-gzip-u4": (3, {"compressors": GzipCodec(level=3)}, "u4", 0),
    "v3-raw-i4": (3, {"compressors": None}, "i4", 0),
    "v3-big-endian-f8": (3, {"serializer": BytesCodec(endian="big")}, "f8", np.nan),
    "v3-bool": (3, {}, "bool", False),
    "v3-raw-bool": (3, {"compressors": None}, "bool", False),
    "v3-raw-big-endian-i2": (3, {"compressors": None, "serializer": BytesCodec(endian="big")},
                             "i2", 5),
    "v2-zstd-u2": (2, {}, "u2", 0),
    "v2-big-endian-u2": (2, {}, ">u2", 3),
    "v2-raw-f4": (2, {"compressors": None}, "f4", 0.0),
}


def _make(path: Path, layout: str, rng: np.random.Generator) -> tuple[zarr.Array, np.ndarray]:
    fmt, kw, dtype, fill = LAYOUTS[layout]
    arr = zarr.create_array(store=str(path), shape=SHAPE, chunks=CHUNKS, dtype=dtype,
                            fill_value=fill, zarr_format=fmt, **kw)
    data = (rng.random(SHAPE) * 100).astype(dtype)
    data[:4, :4, :3] = fill  # one chunk of fill values only
    arr[...] = data
    return arr, data


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reads_equal_zarr(tmp_path: Path, layout: str) -> None:
    """Whole, cut and integer-indexed selections (edge chunks included) equal zarr's, dtype
    and byte order too; ``out`` is filled and returned."""
    _, data = _make(tmp_path / "a", layout, np.random.default_rng(1))
    arr = open_array(tmp_path / "a")
    assert ChunkFiles.of(arr) is not None
    ref = zarr.open_array(str(tmp_path / "a"), mode="r")
    for sel in [(slice(None),) * 3, (slice(2, 11), slice(3, 10), slice(1, 6)),
                (5, slice(None), slice(2, 7)), (slice(0, 0), slice(None), slice(None)),
                (slice(12, 13), 9, 6)]:
        got = read_checked(arr, str(tmp_path / "a"), sel)
        want = np.asarray(ref[sel])
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, data[sel])
    out = np.empty((9, 7, 5), arr.dtype)
    assert read_checked(arr, str(tmp_path / "a"), (slice(2, 11), slice(3, 10), slice(1, 6)),
                        out=out) is out
    np.testing.assert_array_equal(out, data[2:11, 3:10, 1:6])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("write_empty", [False, True])
def test_writes_are_read_back_by_zarr(tmp_path: Path, layout: str, write_empty: bool) -> None:
    """Whole chunks written as files (edge chunks padded) read back through zarr; a chunk of
    fill values is removed unless ``write_empty_chunks`` is on, as zarr does."""
    rng = np.random.default_rng(2)
    _, data = _make(tmp_path / "a", layout, rng)
    fill = LAYOUTS[layout][3]
    new = (rng.random(SHAPE) * 100).astype(data.dtype)
    new[4:8, 4:8, 3:6] = fill  # chunk (1, 1, 1): fill values only, its file exists now
    region = (slice(4, 13), slice(4, 10), slice(3, 7))  # whole chunks up to the far edges
    chunk_file = ChunkFiles.of(open_array(tmp_path / "a")).file((1, 1, 1))
    assert chunk_file.exists()
    write_region(tmp_path / "a", region, new[region], {"write_empty_chunks": write_empty})
    expect = data.copy()
    expect[region] = new[region]
    got = np.asarray(zarr.open_array(str(tmp_path / "a"), mode="r")[...])
    np.testing.assert_array_equal(got, expect)
    assert chunk_file.exists() == write_empty
    assert not list((tmp_path / "a").rglob("*.partial"))


def test_other_layouts_go_through_zarr(tmp_path: Path) -> None:
    """Sharded arrays, arrays with filters and F order, and stores other than a local
    folder are not handled here: reads and writes (also of part of a chunk) go to zarr."""
    import numcodecs

    sharded = zarr.create_array(store=str(tmp_path / "s"), shape=(8, 8), chunks=(2, 2),
                                shards=(4, 4), dtype="u2", fill_value=0)
    filtered = zarr.create_array(store=str(tmp_path / "f"), shape=(8, 8), chunks=(4, 4),
                                 dtype="u2", fill_value=0, zarr_format=2,
                                 filters=[numcodecs.Delta(dtype="u2")])
    fortran = zarr.create_array(store=str(tmp_path / "o"), shape=(8, 8), chunks=(4, 4),
                                dtype="u2", fill_value=0, zarr_format=2, order="F")
    memory = zarr.create_array(store={}, shape=(8, 8), chunks=(4, 4), dtype="u2",
                               fill_value=0)
    for arr in (sharded, filtered, fortran, memory):
        assert ChunkFiles.of(arr) is None
    data = np.arange(64, dtype="u2").reshape(8, 8)
    for name in ("s", "f", "o"):
        write_region(tmp_path / name, (slice(0, 8), slice(0, 8)), data)
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / name))[...], data)
        np.testing.assert_array_equal(read_checked(open_array(tmp_path / name),
                                                   str(tmp_path / name), (slice(1, 7),) * 2),
                                      data[1:7, 1:7])
    # part of a chunk of a plain array: zarr's read-modify-write keeps the rest
    plain = tmp_path / "p"
    zarr.create_array(store=str(plain), shape=(8, 8), chunks=(4, 4), dtype="u2",
                      fill_value=0)[...] = data
    write_region(plain, (slice(1, 3), slice(0, 4)), np.zeros((2, 4), "u2"))
    expect = data.copy()
    expect[1:3, :4] = 0
    np.testing.assert_array_equal(zarr.open_array(str(plain))[...], expect)
