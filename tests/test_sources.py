"""Lazy sources behave like numpy arrays under dask and pickle without their voxels."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engine.io.sources import InMemorySource, RawFileSource, to_dask

KEYS = [np.s_[1, 2:4], np.s_[:, 3], np.s_[5, 6, 7], np.s_[..., 9], np.s_[3:9, ::2],
        np.s_[::-3, 5:1:-1], np.s_[[1, 5, 2], :, 3:9], np.s_[:, [-1, 3]], np.s_[-4:, -7:-2]]


@pytest.fixture(scope="module")
def array_and_file(tmp_path_factory):
    a = np.random.default_rng(0).random((30, 40, 50)).astype(">f4")  # big-endian on disk
    path = tmp_path_factory.mktemp("raw") / "raw.bin"
    path.write_bytes(b"HEADER" + a.tobytes())
    return a, path


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_dask_indexing_matches_numpy(array_and_file, key):
    a, path = array_and_file
    for src in (RawFileSource(str(path), 6, a.shape, a.dtype), InMemorySource(a.astype("f4"))):
        d = to_dask(src, "zyx", chunks=(8, 16, 16))
        got = d[key].compute()
        assert got.dtype == np.dtype("float32")  # native byte order
        np.testing.assert_array_equal(got, a[key])


def test_raw_source_pickles_as_a_path(array_and_file):
    a, path = array_and_file
    d = to_dask(RawFileSource(str(path), 6, a.shape, a.dtype), "zyx", chunks=(8, 16, 16))
    assert len(pickle.dumps(d)) < 20_000 < a.nbytes


def test_truncated_raw_file_is_an_input_error(array_and_file, tmp_path):
    from engine.errors import InputError

    a, path = array_and_file
    short = tmp_path / "short.bin"
    short.write_bytes(path.read_bytes()[: a.nbytes // 2])
    with pytest.raises(InputError, match="short.bin"):
        RawFileSource(str(short), 6, a.shape, a.dtype)[25:, :, :]


@pytest.mark.parametrize("max_bytes", [10**9, 20 * 30 * 8 * 5, 1])
def test_export_slabs_stay_under_the_memory_cap(max_bytes):
    import dask.array as da

    from engine.io import iter_slabs

    a = np.arange(50 * 20 * 30).reshape(50, 20, 30)
    slabs = list(iter_slabs(da.from_array(a, chunks=(16, 20, 30)), max_bytes=max_bytes))
    np.testing.assert_array_equal(np.concatenate(slabs), a)
    plane = 20 * 30 * 8
    assert all(s.nbytes <= max(max_bytes, plane) for s in slabs)
    assert all(s.shape[0] <= 16 for s in slabs)  # never across two read chunks
