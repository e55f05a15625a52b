"""HDF5 datasets (a real PlantSeg file and synthetic ones) and folders of TIFF slices."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

import engine.io.folder as folder
from engine.errors import InputError
from engine.io import open_volume

RNG = np.random.default_rng(3)
SHARED = Path(__file__).resolve().parents[2] / "shared"
OVULE = SHARED / "data" / "real" / "plantseg_sample_ovule.h5"


# --------------------------------------------------------------------------- HDF5


def test_real_plantseg_ovule() -> None:
    if not OVULE.exists():
        pytest.skip(f"{OVULE} is not available")
    raw = open_volume(OVULE)  # two datasets: "raw" is the default
    assert raw.axes == "zyx" and raw.shape == (32, 128, 128) and raw.dtype == np.uint8
    assert raw.voxel_size == pytest.approx((0.235, 0.15, 0.15))
    assert raw.unit == "micrometer"
    with h5py.File(OVULE, "r") as f:
        expected_raw = f["raw"][:]
        expected_label = f["label"][10:20, 5:70, 40:41]
    np.testing.assert_array_equal(raw.data.compute(), expected_raw)

    label = open_volume(f"{OVULE}:label")
    assert label.dtype == np.uint16 and label.voxel_size == raw.voxel_size
    np.testing.assert_array_equal(label.data[10:20, 5:70, 40:41].compute(), expected_label)


def test_hdf5_dataset_choice_and_attributes(tmp_path: Path) -> None:
    single = tmp_path / "single.h5"
    data = RNG.random((3, 4, 5, 6)).astype(np.float32)
    with h5py.File(single, "w") as f:
        ds = f.create_dataset("group/volume", data=data, chunks=(1, 2, 5, 6))
        ds.attrs["resolution"] = [0.5, 0.25, 0.25]
    vol = open_volume(single)  # the only dataset, in a group
    assert vol.axes == "czyx" and vol.voxel_size == (0.5, 0.25, 0.25)
    np.testing.assert_array_equal(vol.data.compute(), data)
    # the lazy source pickles as a path, not as voxels
    graph = dict(vol.data.dask)
    assert len(pickle.dumps(graph)) < data.nbytes

    many = tmp_path / "many.h5"
    with h5py.File(many, "w") as f:
        f.create_dataset("a", data=np.zeros((4, 4), np.uint8))
        f.create_dataset("b", data=np.ones((4, 4), np.uint8))
    with pytest.raises(InputError, match=r"many.h5.*\ba\b.*\bb\b"):
        open_volume(many)
    b = open_volume(f"{many}:b")
    assert b.axes == "yx" and b.voxel_size == (1.0, 1.0)
    assert int(b.data.sum().compute()) == 16
    with pytest.raises(InputError, match="many.h5.*'c'.*a, b"):
        open_volume(many, dataset="c")

    cremi = tmp_path / "cremi.hdf"
    with h5py.File(cremi, "w") as f:
        f.create_dataset("volumes/raw", data=np.full((2, 3, 4), 7, np.uint8))
        f.create_dataset("volumes/labels/neuron_ids", data=np.zeros((2, 3, 4), np.uint64))
    vol = open_volume(cremi)
    assert vol.source.endswith(":volumes/raw") and int(vol.data.max().compute()) == 7


def test_hdf5_corrupt(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(InputError, match="bad.h5"):
        open_volume(bad)


# --------------------------------------------------------------------------- folders


def write_slices(directory: Path, stack: np.ndarray, names: list[str], **kwargs) -> None:
    directory.mkdir()
    for plane, name in zip(stack, names, strict=True):
        tifffile.imwrite(directory / name, plane, **kwargs)


def test_folder_natural_order_and_voxel_size(tmp_path: Path) -> None:
    stack = RNG.integers(0, 60000, (12, 7, 9)).astype(np.uint16)
    names = [f"slice{i}.tif" for i in range(1, 13)]  # slice10 sorts after slice9
    write_slices(tmp_path / "stack", stack, names, imagej=True, resolution=(1 / 0.2, 1 / 0.2),
                 metadata={"unit": "um", "spacing": 0.8})
    (tmp_path / "stack" / "notes.txt").write_text("not a slice")
    vol = open_volume(tmp_path / "stack")
    assert vol.axes == "zyx" and vol.shape == (12, 7, 9)
    assert vol.unit == "micrometer"
    assert vol.voxel_size == pytest.approx((0.8, 0.2, 0.2))
    np.testing.assert_array_equal(vol.data.compute(), stack)
    assert folder.slice_files(tmp_path / "stack")[9].name == "slice10.tif"


def test_folder_reads_only_needed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = RNG.integers(0, 255, (10, 6, 8)).astype(np.uint8)
    write_slices(tmp_path / "s", stack, [f"img_{i:03d}.tiff" for i in range(10)])
    vol = open_volume(tmp_path / "s")
    assert vol.voxel_size == (1.0, 1.0, 1.0)  # no resolution metadata
    read: list[str] = []
    original = folder.read_slice

    def counting(path: str) -> np.ndarray:
        read.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(folder, "read_slice", counting)
    region = vol.data[3:5, 1:4, 2:6].compute(scheduler="sync")
    np.testing.assert_array_equal(region, stack[3:5, 1:4, 2:6])
    assert sorted(read) == ["img_003.tiff", "img_004.tiff"]


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_folder_rgb_slices_become_channels(tmp_path: Path, planar: str) -> None:
    stack = RNG.integers(0, 255, (3, 5, 6, 3)).astype(np.uint8)
    planes = stack if planar == "contig" else np.moveaxis(stack, -1, 1)
    write_slices(tmp_path / "rgb", planes, ["a1.tif", "a2.tif", "a3.tif"], photometric="rgb",
                 planarconfig=planar)
    vol = open_volume(tmp_path / "rgb")
    assert vol.axes == "czyx" and vol.channel_names == ("red", "green", "blue")
    np.testing.assert_array_equal(vol.data.compute(), np.moveaxis(stack, -1, 0))
    np.testing.assert_array_equal(vol.data[2, 1, 1:3].compute(), stack[1, 1:3, :, 2])


def test_folder_mismatch_names_the_odd_file(tmp_path: Path) -> None:
    stack = np.zeros((3, 4, 5), np.uint8)
    write_slices(tmp_path / "m", stack, ["s1.tif", "s2.tif", "s10.tif"])
    tifffile.imwrite(tmp_path / "m" / "s2.tif", np.zeros((4, 6), np.uint8))
    tifffile.imwrite(tmp_path / "m" / "s10.tif", np.zeros((4, 5), np.uint16))
    with pytest.raises(InputError, match=r"s2.tif.*\(4, 6\)"):
        open_volume(tmp_path / "m")

    (tmp_path / "multi").mkdir()
    tifffile.imwrite(tmp_path / "multi" / "z.tif", np.zeros((3, 4, 5), np.uint8),
                     photometric="minisblack")
    with pytest.raises(InputError, match="z.tif.*2D"):
        open_volume(tmp_path / "multi")
