"""The worker chunk cache returns exactly what zarr returns, never a stale chunk."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from engine.io import chunkcache


@pytest.fixture(autouse=True)
def _fresh_cache():
    chunkcache.clear()
    yield
    chunkcache.clear()


def _array(path, data, chunks, shards=None):
    arr = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
                            zarr_format=3, overwrite=True, shards=shards)
    arr[...] = data
    return str(path)


# a plain array's chunks are read from their files one by one (engine.io.chunkfiles); a
# sharded one's go through zarr, one by one or as their bounding box
@pytest.mark.parametrize("shards", [None, (1, 16, 32, 14)])
@pytest.mark.parametrize("direct", [True, False])  # chunks decoded one by one, or as a box
@pytest.mark.parametrize("limit_mib", ["0", "0.05", "64"])  # off, evicting, holding all
def test_regions_equal_zarr_slicing(tmp_path, monkeypatch, limit_mib, direct, shards):
    monkeypatch.setenv("VOXELMILL_CHUNK_CACHE_MIB", limit_mib)
    monkeypatch.setattr(chunkcache, "DIRECT_BYTES", 0 if direct else 2**30)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, (2, 23, 37, 29)).astype(np.uint16)
    path = _array(tmp_path / "a.zarr", data, (1, 8, 16, 7), shards)
    for _ in range(40):
        lo = [int(rng.integers(0, n)) for n in data.shape[1:]]
        hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, data.shape[1:], strict=True)]
        region = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        np.testing.assert_array_equal(chunkcache.read_chunked(path, region, (1,)),
                                      data[(1, *region)])
    aligned = (slice(8, 16), slice(16, 37), slice(0, 14))  # whole chunks, read directly
    np.testing.assert_array_equal(chunkcache.read_chunked(path, aligned, (0,)),
                                  data[(0, *aligned)])


def test_an_array_written_anew_is_not_served_stale(tmp_path):
    path = tmp_path / "b.zarr"
    first = np.arange(20 * 20, dtype=np.int32).reshape(20, 20)
    region = (slice(3, 17), slice(5, 19))  # not chunk-aligned: goes through the cache
    np.testing.assert_array_equal(
        chunkcache.read_chunked(_array(path, first, (8, 8)), region), first[region])
    second = -first
    np.testing.assert_array_equal(
        chunkcache.read_chunked(_array(path, second, (8, 8)), region), second[region])


@pytest.mark.parametrize(("memory_limit", "mib"), [
    (None, 512.0), (2**30, 256.0), (64 * 2**30, 512.0), (100 * 2**20, 25.0),
])
def test_cache_size_for_a_worker_memory_limit(memory_limit, mib):
    """512 MiB, but no more than a quarter of the worker's memory limit."""
    assert chunkcache.cache_mib_for(memory_limit) == mib
