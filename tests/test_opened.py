"""Arrays kept open per thread (``engine.io.opened``): the same object while the array's
metadata is unchanged, a fresh one once the array is written anew at the same path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from engine.io.opened import open_array


def test_an_unchanged_array_is_opened_once_per_thread(tmp_path):
    path = tmp_path / "a"
    zarr.create_array(store=str(path), shape=(8, 8), chunks=(4, 4), dtype="u2", zarr_format=3)
    first = open_array(path, "r+")
    assert open_array(str(path), "r+") is first
    assert open_array(path, "r") is not first  # another mode, another object
    first[:4, :4] = 7
    assert int(open_array(path)[0, 0]) == 7
    other: list = []
    thread = threading.Thread(target=lambda: other.append(open_array(path, "r+")))
    thread.start()
    thread.join()
    assert other[0] is not first  # never shared between threads


def test_an_array_written_anew_at_the_same_path_is_opened_anew(tmp_path):
    path = tmp_path / "a"
    zarr.create_array(store=str(path), shape=(8, 8), chunks=(4, 4), dtype="u2", zarr_format=3)
    before = open_array(path, "r+")
    # same path, at once (same file-system timestamps, maybe the same inode)
    zarr.create_array(store=str(path), shape=(6, 10), chunks=(3, 5), dtype="f4",
                      zarr_format=3, overwrite=True)
    after = open_array(path, "r+")
    assert after is not before
    assert (after.shape, after.chunks, after.dtype) == ((6, 10), (3, 5), np.dtype("f4"))


def test_config_is_applied_and_only_existing_arrays_are_kept(tmp_path):
    path = tmp_path / "a"
    zarr.create_array(store=str(path), shape=(4,), chunks=(2,), dtype="u1", zarr_format=3)
    arr = open_array(path, "r+", {"write_empty_chunks": True})
    arr[:] = 0
    assert sorted(p.name for p in (path / "c").iterdir()) == ["0", "1"]  # empty chunks kept
    assert open_array(path, "r+", {"write_empty_chunks": True}) is arr
    assert open_array(path, "r+") is not arr
    with pytest.raises(ValueError, match="only 'r' and 'r\\+'"):
        open_array(path, "w")
    with pytest.raises(Exception):  # noqa: B017 - zarr's own error for a missing array
        open_array(tmp_path / "missing")
