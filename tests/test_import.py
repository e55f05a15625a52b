"""Importing what a microscope writes: ``--axes`` for files that do not say what their axes
are, voxel sizes that are recorded or not, ``info`` on containers, and messages that print
user text as it is. (The refusals themselves run through the CLI in test_cli_errors.py.)

Every reference is the array as numpy/tifffile/h5py/mrcfile/zarr read it whole, moved
into NGFF axis order with ``np.moveaxis``/``np.transpose``.
"""

from __future__ import annotations

import json

import h5py
import mrcfile
import nrrd
import numpy as np
import pytest
import tifffile
import zarr

from engine.blocks import check_block
from engine.errors import InputError, OptionError
from engine.io import open_volume
from engine.io.axes import check_axes, example_axes
from engine.pipelines.convert import ConvertOptions, convert, plan_conversion
from tests.conftest import run_cli, write_mrc

RNG = np.random.default_rng(7)
#: a two-channel stack stored z, c, y, x: what tifffile reports as QQYX
ZCYX = RNG.integers(0, 60000, (12, 2, 20, 24), dtype=np.uint16)


def as_czyx(data: np.ndarray) -> np.ndarray:
    return np.moveaxis(data, 1, 0)


@pytest.fixture()
def qqyx(tmp_path):
    path = tmp_path / "two channels.tif"
    tifffile.imwrite(path, ZCYX, metadata={"axes": "QQYX"})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "QQYX"  # the case as tifffile reports it
    return path


def test_qqyx_tiff_converts_with_axes(qqyx, tmp_path):
    dst = tmp_path / "two.ome.zarr"
    res = run_cli("convert", str(qqyx), str(dst), "--axes", "zcyx", "--voxel-size",
                  "0.3,0.1,0.1", "--chunks", "8", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    group = zarr.open_group(str(dst), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == list("czyx")
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.3, 0.1, 0.1]
    np.testing.assert_array_equal(group["0"][...], as_czyx(tifffile.imread(qqyx)))


@pytest.mark.parametrize("given, expected", [("zcyx", "czyx"), ("czyx", "czyx"),
                                             ("tzyx", "tzyx"), ("ZCYX", "czyx")])
def test_tiff_axes_name_each_stored_axis(qqyx, given, expected):
    vol = open_volume(qqyx, axes=given)
    assert vol.axes == expected
    order = [given.lower().index(a) for a in expected]
    np.testing.assert_array_equal(vol.data.compute(), np.transpose(ZCYX, order))


def test_axes_for_hdf5_npy_mrc_folder_and_zarr_arrays(tmp_path):
    data = RNG.integers(0, 255, (6, 3, 10, 12), dtype=np.uint8)  # stored z, c, y, x
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["raw"] = data
        f["raw"].attrs["element_size_um"] = [2.0, 0.5, 0.25]  # the spatial axes, stored order
    np.save(tmp_path / "s.npy", data)
    np.save(tmp_path / "f.npy", np.asfortranarray(data))
    zarr.create_array(str(tmp_path / "plain.zarr"), data=data)
    h5 = open_volume(f"{tmp_path / 's.h5'}:raw", axes="zcyx")
    assert (h5.axes, h5.voxel_size, h5.voxel_size_problem) == ("czyx", (2.0, 0.5, 0.25), "")
    for path in (tmp_path / "s.h5", tmp_path / "s.npy", tmp_path / "f.npy",
                 tmp_path / "plain.zarr"):
        vol = open_volume(path, axes="zcyx")
        assert vol.axes == "czyx", path
        np.testing.assert_array_equal(vol.data.compute(), as_czyx(data))
    # an MRC stack of 2D images: its sections are channels (or time points)
    stack = RNG.random((3, 10, 12), dtype=np.float32)
    write_mrc(tmp_path / "st.mrc", stack, voxel_size=(2.0, 2.0, 4.0))  # mrcfile: x, y, z
    vol = open_volume(tmp_path / "st.mrc", axes="cyx")
    assert (vol.axes, vol.voxel_size, vol.unit) == ("cyx", (2.0, 2.0), "angstrom")
    np.testing.assert_array_equal(vol.data.compute(), stack)
    # a folder whose files are channels
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, plane in enumerate(stack):
        tifffile.imwrite(folder / f"ch{i}.tif", plane)
    vol = open_volume(folder, axes="cyx")
    assert vol.axes == "cyx" and vol.voxel_size_problem
    np.testing.assert_array_equal(vol.data.compute(), stack)
    with pytest.raises(InputError, match=r"--axes zyx names 3 axes .* has 4"):
        open_volume(tmp_path / "s.npy", axes="zyx")
    nrrd.write(str(tmp_path / "v.nrrd"), np.zeros((4, 5, 6), np.uint8), index_order="C")
    with pytest.raises(OptionError, match="records its axes"):
        open_volume(tmp_path / "v.nrrd", axes="zyx")


def test_axes_letters_and_examples():
    assert check_axes("ZCYX") == "zcyx"
    for bad in ("zqyx", "zzyx", "zcy", ""):
        with pytest.raises(OptionError, match="--axes"):
            check_axes(bad)
    assert example_axes((30, 2, 64, 64)) == "zcyx"
    assert example_axes((2, 30, 64, 64)) == "czyx"
    assert example_axes((5, 30, 64, 64)) == "czyx"
    assert example_axes((30, 64, 64)) == "zyx"


@pytest.mark.parametrize("kind", ["plain-tiff", "imagej-pixel", "npy", "hdf5", "mrc-unset",
                                  "folder", "nrrd-no-spacing"])
def test_unrecorded_voxel_size_needs_an_option(tmp_path, client, kind):
    data = RNG.integers(0, 255, (8, 16, 16), dtype=np.uint8)
    src = {"plain-tiff": "p.tif", "imagej-pixel": "ij.tif", "npy": "p.npy",
           "hdf5": "p.h5", "mrc-unset": "p.mrc", "folder": "slices",
           "nrrd-no-spacing": "p.nrrd"}[kind]
    path = tmp_path / src
    if kind == "plain-tiff":
        tifffile.imwrite(path, data)
    elif kind == "imagej-pixel":
        tifffile.imwrite(path, data, imagej=True, metadata={"unit": "pixel", "axes": "ZYX"})
    elif kind == "npy":
        np.save(path, data)
    elif kind == "hdf5":
        with h5py.File(path, "w") as f:
            f["raw"] = data
    elif kind == "nrrd-no-spacing":
        nrrd.write(str(path), data, index_order="C")
    elif kind == "mrc-unset":
        with mrcfile.new(path, data) as mrc:
            assert float(mrc.voxel_size.x) == 0.0
    else:
        path.mkdir()
        for i, plane in enumerate(data):
            tifffile.imwrite(path / f"z{i}.tif", plane)
    assert open_volume(path).voxel_size_problem == "records no physical voxel size"
    with pytest.raises(OptionError, match="--voxel-size .*--assume-voxel-size"):
        plan_conversion(path, tmp_path / "a.ome.zarr", ConvertOptions())
    with pytest.raises(OptionError, match="--assume-voxel-size"):  # a unit alone is no size
        plan_conversion(path, tmp_path / "a.ome.zarr", ConvertOptions(unit="nm"))
    assert not (tmp_path / "a.ome.zarr").exists()
    given = plan_conversion(path, tmp_path / "a.ome.zarr",
                            ConvertOptions(voxel_size=(2.0, 1.0, 1.0), unit="nm"))
    assert given.image.volume.voxel_size == (2.0, 1.0, 1.0)
    assert given.image.volume.unit == "nanometer"
    if kind == "npy":  # assumed: converts, 1 unit per voxel, the voxels unchanged
        res = convert(path, tmp_path / "b.ome.zarr",
                      ConvertOptions(assume_voxel_size=True, chunks=(8,)), client,
                      report=lambda _: None)
        group = zarr.open_group(str(res.destination), mode="r")
        scale = group.attrs["ome"]["multiscales"][0]["datasets"][0]
        assert scale["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]
        np.testing.assert_array_equal(group["0"][...], data)


def test_recorded_nan_sizes_are_refused(tmp_path):
    import nibabel

    img = nibabel.Nifti1Image(np.zeros((6, 5, 4), np.uint8), np.eye(4))
    img.header.set_zooms((0.5, float("nan"), 2.0))  # x, y, z (nibabel turns a 0 into 1)
    nibabel.save(img, tmp_path / "nan.nii")
    vol = open_volume(tmp_path / "nan.nii")
    assert vol.voxel_size_problem == "records an invalid voxel size (nan)"
    with pytest.raises(OptionError, match=r"nan.nii: records an invalid voxel size \(nan\); "):
        plan_conversion(tmp_path / "nan.nii", tmp_path / "z.ome.zarr", ConvertOptions())
    plan = plan_conversion(tmp_path / "nan.nii", tmp_path / "z.ome.zarr",
                           ConvertOptions(voxel_size=(2.0, 1.0, 0.5)))
    assert plan.image.volume.voxel_size == (2.0, 1.0, 0.5)


def test_recorded_voxel_sizes_are_kept(tmp_path):
    data = np.zeros((4, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", data, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                     metadata={"unit": "um", "spacing": 0.5, "axes": "ZYX"})
    vol = open_volume(tmp_path / "ij.tif")
    np.testing.assert_allclose(vol.voxel_size, (0.5, 0.2, 0.2))
    assert vol.voxel_size_problem == ""
    write_mrc(tmp_path / "v.mrc", data, voxel_size=(3.0, 2.0, 1.5))
    vol = open_volume(tmp_path / "v.mrc")
    assert (vol.voxel_size, vol.voxel_size_problem) == ((1.5, 2.0, 3.0), "")


def test_info_lists_every_dataset_of_an_hdf5_file(tmp_path):
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((6, 10, 12), np.uint8)
        f["label"] = np.zeros((6, 10, 12), np.uint16)
        f["predictions/membranes"] = np.zeros((2, 6, 10, 12), np.float32)
        f["raw"].attrs["element_size_um"] = [1.0, 0.5, 0.5]
    res = run_cli("info", str(path))
    assert res.returncode == 0, res.stderr
    for name, shape, dtype in (("raw", "(6, 10, 12)", "uint8"), ("label", "(6, 10, 12)",
                                                                  "uint16"),
                               ("predictions/membranes", "(2, 6, 10, 12)", "float32")):
        line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert shape in line and dtype in line, line
    assert "voxel size (1.0, 0.5, 0.5) micrometer" in res.stdout
    # the dataset syntax convert takes, and a dataset that records no voxel size
    res = run_cli("info", f"{path}:label", "--json")
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert (d["format"], d["dtype"], d["voxel_size"]) == ("hdf5", "uint16", None)
    assert len(d["arrays"]) == 3
    res = run_cli("info", f"{path}:label")
    assert "voxel size not recorded" in res.stdout


def test_info_on_containers_without_a_default_image(tmp_path):
    with h5py.File(tmp_path / "two.h5", "w") as f:  # no "raw": nothing to choose
        f["a"] = np.zeros((3, 4), np.uint8)
        f["b"] = np.zeros((5, 6, 7), np.int16)
    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    group.create_array("img", shape=(4, 8, 8), chunks=(2, 8, 8), dtype="uint16")
    group.create_array("sub/lab", shape=(4, 8, 8), chunks=(4, 4, 4), dtype="uint32")
    h5 = json.loads(run_cli("info", str(tmp_path / "two.h5"), "--json").stdout)
    assert [(a["name"], a["shape"], a["dtype"]) for a in h5["arrays"]] == [
        ("a", [3, 4], "uint8"), ("b", [5, 6, 7], "int16")]
    assert "choose one" in h5["error"]
    z = json.loads(run_cli("info", str(tmp_path / "plain.zarr"), "--json").stdout)
    assert [(a["name"], a["shape"], a["dtype"]) for a in z["arrays"]] == [
        ("img", [4, 8, 8], "uint16"), ("sub/lab", [4, 8, 8], "uint32")]
    one = json.loads(run_cli("info", str(tmp_path / "plain.zarr" / "sub" / "lab"),
                             "--json").stdout)
    assert (one["format"], one["axes"], one["chunks"]) == ("zarrarray", "zyx", [4, 4, 4])


def test_user_text_is_printed_as_it_is(tmp_path):
    """Paths with rich markup and emoji codes come out unchanged, in output and errors."""
    name = "a[b]c[/]:label:[red]x.npy"  # a folder "a[b]c[" holding "]:label:[red]x.npy"
    (tmp_path / name).parent.mkdir()
    np.save(tmp_path / name, np.zeros((3, 4, 5), np.uint8))
    res = run_cli("info", name, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(f"{name} (npy)"), res.stdout
    assert "🏷" not in res.stdout + res.stderr


def test_block_refusal_says_what_to_use():
    with pytest.raises(OptionError) as exc:
        check_block((32, 32, 32), (100, 100, 100), (100, 100, 100))
    msg = str(exc.value)
    assert "use --block 100,100,100 or a multiple" in msg
    assert "`voxelmill convert SRC OUT --chunks 32,32,32`" in msg
    with pytest.raises(OptionError, match=r"use --block 128,64 or a multiple$"):
        check_block((100, 64), (64, 64), (500, 500))
    check_block((128, 100), (64, 64), (500, 100))  # a block may end at the edge
