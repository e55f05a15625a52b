"""NRRD and NIfTI: round trips through our writers, and files written by pynrrd / nibabel."""

from __future__ import annotations

import gzip
from pathlib import Path

import dask.array as da
import nibabel as nib
import nrrd
import numpy as np
import pytest

from engine.errors import InputError
from engine.io import iter_slabs, open_volume, writer_for
from engine.volume import Volume

RNG = np.random.default_rng(7)


def volume(array: np.ndarray, axes: str, voxel: tuple[float, ...], unit: str = "micrometer",
           names: tuple[str, ...] = ()) -> Volume:
    # chunks of 2 along axis 0, so writers receive several slabs
    chunks = (2,) + array.shape[1:]
    return Volume(da.from_array(array, chunks=chunks), axes, voxel, unit, channel_names=names)


def export(vol: Volume, path: Path) -> Path:
    writer_for(path).write(vol, path, iter_slabs(vol.data))
    return path


# --------------------------------------------------------------------------- NRRD


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "float32", "float64", "int64"])
def test_nrrd_roundtrip_zyx(tmp_path: Path, dtype: str) -> None:
    array = (RNG.random((5, 6, 7)) * 200).astype(dtype)
    path = export(volume(array, "zyx", (2.0, 0.5, 0.25)), tmp_path / "vol.nrrd")

    back = open_volume(path)
    assert back.axes == "zyx"
    assert back.dtype == np.dtype(dtype)
    assert back.voxel_size == (2.0, 0.5, 0.25)
    assert back.unit == "micrometer"
    np.testing.assert_array_equal(back.data.compute(), array)

    # pynrrd, an independent reader, sees the same voxels and spacing (x, y, z order)
    ref, header = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(ref, array)
    np.testing.assert_allclose(np.linalg.norm(header["space directions"], axis=1),
                               [0.25, 0.5, 2.0])
    assert header["encoding"] == "raw"
    assert list(header["space units"]) == ["microns"] * 3


def test_nrrd_roundtrip_channels_2d_and_units(tmp_path: Path) -> None:
    cz = RNG.random((2, 3, 4, 5)).astype(np.float32)
    back = open_volume(export(volume(cz, "czyx", (3.0, 1.5, 1.5), "nanometer"),
                              tmp_path / "c.nrrd"))
    assert back.axes == "czyx" and back.unit == "nanometer"
    assert back.voxel_size == (3.0, 1.5, 1.5)
    np.testing.assert_array_equal(back.data.compute(), cz)
    ref, header = nrrd.read(str(tmp_path / "c.nrrd"), index_order="C")
    np.testing.assert_array_equal(ref, cz)
    assert header["kinds"][-1] == "list"

    yx = RNG.integers(0, 1000, (6, 9)).astype(np.uint16)
    back = open_volume(export(volume(yx, "yx", (0.2, 0.1)), tmp_path / "img.nrrd"))
    assert back.axes == "yx" and back.voxel_size == (0.2, 0.1)
    np.testing.assert_array_equal(back.data.compute(), yx)


def test_nrrd_reads_pynrrd_raw_with_spacings(tmp_path: Path) -> None:
    array = RNG.integers(0, 255, (4, 5, 6)).astype(np.uint8)
    path = tmp_path / "spacings.nrrd"
    nrrd.write(str(path), array, {"encoding": "raw", "spacings": [0.1, 0.2, 0.3]},
               index_order="C")
    vol = open_volume(path)
    assert vol.axes == "zyx"
    assert vol.voxel_size == (0.3, 0.2, 0.1)
    assert vol.unit == "micrometer"  # no units in the header
    np.testing.assert_array_equal(vol.data.compute(), array)


def test_nrrd_big_endian_and_byte_skip(tmp_path: Path) -> None:
    array = RNG.integers(-3000, 3000, (3, 4, 5)).astype(">i2")
    path = tmp_path / "big.nrrd"
    nrrd.write(str(path), array, {"encoding": "raw", "space units": ["mm", "mm", "mm"],
                                  "space directions": np.diag([0.5, 0.5, 1.0])},
               index_order="C")
    vol = open_volume(path)
    assert vol.dtype == np.dtype("int16") and vol.dtype.isnative
    assert vol.unit == "millimeter" and vol.voxel_size == (1.0, 0.5, 0.5)
    np.testing.assert_array_equal(vol.data.compute(), array)

    # detached header whose data file starts with 16 junk bytes ('byte skip: 16')
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"J" * 16 + array.astype("<i2").tobytes())
    nhdr = tmp_path / "vol.nhdr"
    nhdr.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 5 4 3\nspacings: 1 2 3\n"
                    "endian: little\nencoding: raw\nbyte skip: 16\ndata file: data.raw\n")
    vol = open_volume(nhdr)
    assert vol.voxel_size == (3.0, 2.0, 1.0)
    np.testing.assert_array_equal(vol.data.compute(), array)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_nrrd_reads_compressed_with_channel_axis(tmp_path: Path, encoding: str) -> None:
    # channels as the fastest NRRD axis (a 'vector' kind with a 'none' direction)
    array = RNG.integers(0, 100, (3, 4, 5, 2)).astype(np.int16)  # C order z, y, x, c
    path = tmp_path / f"{encoding}.nrrd"
    directions = np.array([[np.nan] * 3, [0.3, 0, 0], [0, 0.4, 0], [0, 0, 0.5]])
    nrrd.write(str(path), array, {"encoding": encoding, "space dimension": 3,
                                  "space directions": directions,
                                  "kinds": ["vector", "domain", "domain", "domain"],
                                  "space units": ["um", "um", "um"]}, index_order="C")
    vol = open_volume(path)
    assert vol.axes == "czyx"
    assert vol.shape == (2, 3, 4, 5)
    assert vol.voxel_size == pytest.approx((0.5, 0.4, 0.3))
    np.testing.assert_array_equal(vol.data.compute(), np.moveaxis(array, -1, 0))


def test_nrrd_raw_channel_first_axis_is_lazy(tmp_path: Path) -> None:
    array = RNG.integers(0, 100, (3, 4, 5, 2)).astype(np.uint16)
    path = tmp_path / "vec.nrrd"
    nrrd.write(str(path), array, {"encoding": "raw",
                                  "kinds": ["RGB-color", "domain", "domain", "domain"]},
               index_order="C")
    vol = open_volume(path)
    assert vol.axes == "czyx"
    # the graph reads from the file, it does not hold the voxels
    assert "RawFileSource" in repr(dict(vol.data.dask))
    np.testing.assert_array_equal(vol.data[1, 2].compute(), array[2, :, :, 1])


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32", "uint16"])
def test_nifti_roundtrip(tmp_path: Path, suffix: str, dtype: str) -> None:
    array = (RNG.random((5, 6, 7)) * 200).astype(dtype)
    path = export(volume(array, "zyx", (2.0, 0.5, 0.25)), tmp_path / f"vol{suffix}")

    back = open_volume(path)
    assert back.axes == "zyx" and back.dtype == np.dtype(dtype)
    assert back.voxel_size == (2.0, 0.5, 0.25) and back.unit == "micrometer"
    np.testing.assert_array_equal(back.data.compute(), array)

    img = nib.load(str(path))  # independent reader: x, y, z order
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), array.T)
    assert img.header.get_zooms() == (0.25, 0.5, 2.0)
    assert img.header.get_xyzt_units()[0] == "micron"
    np.testing.assert_allclose(np.diag(img.affine)[:3], [0.25, 0.5, 2.0])


def test_nifti_roundtrip_converts_units_and_channels(tmp_path: Path) -> None:
    array = RNG.random((2, 3, 4, 5)).astype(np.float32)
    vol = volume(array, "czyx", (40.0, 8.0, 8.0), "nanometer", ("a", "b"))
    back = open_volume(export(vol, tmp_path / "c.nii.gz"))
    assert back.axes == "czyx"
    assert back.unit == "micrometer"  # written in micrometres
    assert back.voxel_size == pytest.approx((0.04, 0.008, 0.008))
    np.testing.assert_array_equal(back.data.compute(), array)
    img = nib.load(str(tmp_path / "c.nii.gz"))
    assert img.shape == (5, 4, 3, 1, 2)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj)[:, :, :, 0, 1], array[1].T)

    yx = RNG.integers(0, 9, (6, 9)).astype(np.int16)
    back = open_volume(export(volume(yx, "yx", (0.3, 0.2)), tmp_path / "img.nii"))
    assert back.axes == "yx" and back.voxel_size == pytest.approx((0.3, 0.2))
    np.testing.assert_array_equal(back.data.compute(), yx)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_reads_nibabel_files(tmp_path: Path, suffix: str) -> None:
    xyz = RNG.random((7, 6, 5)).astype(np.float32)
    img = nib.Nifti1Image(xyz, np.diag([0.3, 0.4, 0.5, 1.0]))
    img.header.set_xyzt_units("mm")
    path = tmp_path / f"nib{suffix}"
    nib.save(img, str(path))
    vol = open_volume(path)
    assert vol.axes == "zyx" and vol.shape == (5, 6, 7)
    assert vol.unit == "millimeter"
    assert vol.voxel_size == (0.5, 0.4, 0.3)
    np.testing.assert_array_equal(vol.data.compute(), xyz.T)
    # a region reads the same voxels as nibabel's own slicing
    np.testing.assert_array_equal(vol.data[1:4, 2:5, 3].compute(),
                                  np.asanyarray(img.dataobj)[3, 2:5, 1:4].T)
    if suffix == ".nii.gz":  # whole z-slab chunks for the gzip stream
        assert vol.data.chunks[1:] == ((6,), (7,))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_scaling_applied_lazily(tmp_path: Path, suffix: str) -> None:
    xyz = RNG.integers(-100, 100, (6, 5, 4)).astype(np.int16)
    img = nib.Nifti1Image(xyz, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / f"scaled{suffix}"
    nib.save(img, str(path))
    vol = open_volume(path)
    assert vol.dtype == np.float32
    expected = nib.load(str(path)).get_fdata()
    np.testing.assert_allclose(vol.data.compute(), expected.T, rtol=1e-6)
    assert vol.unit == "millimeter"  # xyzt_units unknown → millimetre, as NIfTI says


def test_nifti_2d_and_time(tmp_path: Path) -> None:
    xy = RNG.integers(0, 50, (8, 6)).astype(np.uint8)
    nib.save(nib.Nifti1Image(xy, np.diag([0.2, 0.3, 1.0, 1.0])), str(tmp_path / "two.nii"))
    vol = open_volume(tmp_path / "two.nii")
    assert vol.axes == "yx" and vol.voxel_size == (0.3, 0.2)
    np.testing.assert_array_equal(vol.data.compute(), xy.T)

    xyzt = RNG.integers(0, 50, (4, 3, 2, 5)).astype(np.uint8)
    nib.save(nib.Nifti1Image(xyzt, np.eye(4)), str(tmp_path / "t.nii.gz"))
    vol = open_volume(tmp_path / "t.nii.gz")
    assert vol.axes == "tzyx" and vol.shape == (5, 2, 3, 4)
    np.testing.assert_array_equal(vol.data.compute(), xyzt.T)


@pytest.mark.parametrize("suffix,cut,garbage", [
    (".nrrd", 10, b"\x00\x01 this is not nrrd\n\n" + bytes(100)),
    (".nii", 7, b"not a nifti header" * 30),
])
def test_corrupt_inputs_name_the_file(tmp_path: Path, suffix: str, cut: int,
                                      garbage: bytes) -> None:
    array = RNG.integers(0, 255, (4, 5, 6)).astype(np.uint16)
    good = export(volume(array, "zyx", (1.0, 1.0, 1.0)), tmp_path / f"good{suffix}")

    truncated = tmp_path / f"short{suffix}"
    truncated.write_bytes(good.read_bytes()[:-cut])
    with pytest.raises(InputError, match=f"short{suffix}.*truncated"):
        open_volume(truncated)

    bad = tmp_path / f"garbage{suffix}"
    bad.write_bytes(garbage)
    with pytest.raises(InputError, match=f"garbage{suffix}"):
        open_volume(bad)


def test_nifti_gzip_cut_in_the_voxels_and_empty_file(tmp_path: Path) -> None:
    # gzip cut in the voxels: the header opens lazily, the read names the file
    big = RNG.integers(0, 60000, (20, 30, 40)).astype(np.uint16)  # incompressible
    whole = export(volume(big, "zyx", (1.0, 1.0, 1.0)), tmp_path / "big.nii").read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(whole)[: len(whole) // 2])
    vol = open_volume(cut)
    with pytest.raises(InputError, match="cut.nii.gz"):
        vol.data.compute()

    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.nii.gz"):
        open_volume(empty)
