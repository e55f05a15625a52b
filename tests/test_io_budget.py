"""Declared sizes are checked before allocation: a compressed stream that declares more
than deflate can expand to is refused, legitimate maximally compressible files still
open, and what a reader holds whole must fit the memory budget."""

from __future__ import annotations

import h5py
import nrrd
import numpy as np
import pytest

from engine.errors import InputError, OptionError
from engine.io import open_volume
from engine.io.budget import (
    BUDGET_ENV,
    DEFLATE_MAX_RATIO,
    DISK_ENV,
    check_deflate,
    check_output_size,
)


def test_all_zero_compressed_files_still_open(tmp_path):
    """Zeros compress best (close to deflate's limit): the bound must not refuse them."""
    zeros = np.zeros((64, 96, 80), np.uint8)
    nrrd.write(str(tmp_path / "z.nrrd"), zeros, {"encoding": "gzip"}, index_order="C")
    np.savez_compressed(tmp_path / "z.npz", a=zeros)
    for name in ("z.nrrd", "z.npz"):
        vol = open_volume(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(vol.data), zeros)


def test_deflate_bound():
    check_deflate("f", (DEFLATE_MAX_RATIO * 10,), np.dtype("u1"), 10)  # exactly the limit
    with pytest.raises(InputError, match=r"f: declares 10330 uint8.*10-byte compressed"):
        check_deflate("f", (DEFLATE_MAX_RATIO * 10 + 10,), np.dtype("u1"), 10)


def test_hdf5_chunk_over_the_memory_budget(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("raw", shape=(64, 64, 64), chunks=(64, 64, 64), dtype="u1",
                         compression="gzip")
    assert open_volume(tmp_path / "c.h5").shape == (64, 64, 64)
    monkeypatch.setenv(BUDGET_ENV, "0.1")  # 104857 bytes < one 262144-byte chunk
    with pytest.raises(InputError, match=r"c\.h5: declares 64×64×64 uint8.*storage chunk"
                       r".*memory budget"):
        open_volume(tmp_path / "c.h5")


def test_compressed_nrrd_over_the_memory_budget(tmp_path, monkeypatch):
    data = np.arange(40 * 50 * 30, dtype=np.uint16).reshape(40, 50, 30)
    nrrd.write(str(tmp_path / "a.nrrd"), data, {"encoding": "gzip"}, index_order="C")
    monkeypatch.setenv(BUDGET_ENV, "0.05")
    with pytest.raises(InputError, match=r"a\.nrrd: declares 40×50×30 uint16.*decompressed "
                       r"whole.*memory budget"):
        open_volume(tmp_path / "a.nrrd")


def test_output_size_against_free_disk(tmp_path, monkeypatch):
    """An output's size is checked against the free disk of the nearest existing folder
    of its destination (or VOXELMILL_FREE_DISK_MIB), naming the option and the number."""
    monkeypatch.delenv(DISK_ENV, raising=False)
    dst = tmp_path / "not" / "yet" / "out.ome.zarr"
    check_output_size(dst, 1, "--scale 2")
    with pytest.raises(OptionError, match=r"--scale 1e\+09: the output .*out.ome.zarr would "
                                          r"hold about 1e\+30 bytes \(uncompressed\).* bytes "
                                          r"free on its file system; where you know it fits "
                                          r"compressed, set VOXELMILL_FREE_DISK_MIB to the MiB "
                                          r"you allow it$"):
        check_output_size(dst, 10**30, "--scale 1e+09")
    with pytest.raises(OptionError, match=r"bytes free on its file system$"):
        check_output_size(dst, 10**30, "--size 9", copies=True)  # an exact size
    monkeypatch.setenv(DISK_ENV, "1")
    check_output_size(dst, 2**20, "--size 8")
    with pytest.raises(OptionError, match=r"1\.05e\+06 bytes free .*VOXELMILL_FREE_DISK_MIB"):
        check_output_size(dst, 2**20 + 1, "--size 8")
    assert not (tmp_path / "not").exists()
