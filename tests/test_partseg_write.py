"""Writing PartSeg projects: ``engine.io.partseg.write_project`` and ``voxelmill export
… .tgz``, read back with ``engine.io.partseg.read`` (the reader the PartSeg-format tests in
test_io_partseg.py check against PartSeg's own layout) and checked member by member."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.errors import InputError, OptionError
from engine.io import open_volume
from engine.io.partseg import read, write_project
from engine.learn.data import IGNORE, open_sources, parse_sources
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.export import export, plan_export
from tests.conftest import run_cli

RNG = np.random.default_rng(5)


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.mark.parametrize("name", ["p.tgz", "p.tbz2", "p.tar.gz"])
def test_round_trip_3d_multichannel(tmp_path: Path, name: str) -> None:
    image = RNG.integers(0, 4000, (2, 5, 12, 10)).astype(np.uint16)  # czyx
    roi = np.zeros((5, 12, 10), np.uint64)
    roi[1:3, 2:6, 3:7] = 1
    roi[2:4, 7:11, 1:4] = 70000  # needs uint32: kept exactly
    mask = image[0] > 1000
    labeling = (roi > 0).astype(np.uint8) + (roi == 70000)
    path = write_project(tmp_path / name, image, "czyx", (1000.0, 210.0, 210.0), "nm", roi,
                         ("DAPI", "GFP"), mask=mask, alternative={"Labeling": labeling})
    vol = read(path)
    assert vol.axes == "czyx" and vol.channel_names == ("DAPI", "GFP")
    assert vol.unit == "micrometer" and vol.voxel_size == pytest.approx((1.0, 0.21, 0.21))
    np.testing.assert_array_equal(vol.data.compute(), image)
    assert set(vol.labels) == {"roi", "mask", "alt_Labeling"}
    np.testing.assert_array_equal(vol.labels["roi"].data.compute(), roi)
    np.testing.assert_array_equal(vol.labels["mask"].data.compute(), mask.astype(np.uint8))
    np.testing.assert_array_equal(vol.labels["alt_Labeling"].data.compute(), labeling)

    # the members as PartSeg's save_project lays them out, checked with tifffile / numpy
    m = members(path)
    assert list(m) == ["segmentation.tif", "alternative.npz", "mask.tif", "image.tif",
                       "algorithm.json", "metadata.json"]
    assert json.loads(m["metadata.json"])["project_version_info"] == "1.1"
    assert json.loads(m["algorithm.json"])["algorithm_name"] == "voxelmill"
    with tifffile.TiffFile(io.BytesIO(m["image.tif"])) as tif:
        series = tif.series[0]
        # unsqueezed, as stored (tifffile adds the samples axis S of size 1)
        assert tif.is_ome and series.get_axes(False) == "TZCYXS"
        assert series.get_shape(False) == (1, 5, 2, 12, 10, 1)
        size = re.search(r'PhysicalSizeX="([^"]+)"', tif.ome_metadata)
        assert size and float(size[1]) == pytest.approx(0.21)
        assert 'PhysicalSizeXUnit="µm"' in tif.ome_metadata
        assert 'Name="GFP"' in tif.ome_metadata
    seg = tifffile.imread(io.BytesIO(m["segmentation.tif"]))
    assert seg.shape == (1, 5, 12, 10) and seg.dtype == np.uint32  # TZYX, PartSeg's ROI shape
    with np.load(io.BytesIO(m["alternative.npz"])) as npz:
        assert npz["Labeling"].shape == (1, 5, 12, 10)


def test_round_trip_2d_single_channel_and_errors(tmp_path: Path) -> None:
    image = RNG.random((9, 11)).astype(np.float32)
    roi = (image > 0.5).astype(np.uint8)
    path = write_project(tmp_path / "flat.tgz", image, "yx", (0.35, 0.35), "micrometer", roi)
    vol = open_volume(path)
    assert vol.axes == "yx" and vol.voxel_size == pytest.approx((0.35, 0.35))
    np.testing.assert_array_equal(vol.data.compute(), image)
    np.testing.assert_array_equal(vol.labels["roi"].data.compute(), roi)
    assert "mask" not in vol.labels
    with pytest.raises(InputError, match="does not fit"):
        write_project(tmp_path / "bad.tgz", image, "yx", (1, 1), "micrometer", roi[:5])
    with pytest.raises(InputError, match="not integer labels"):
        write_project(tmp_path / "bad.tgz", image, "yx", (1, 1), "micrometer", image)
    with pytest.raises(OptionError, match=".tgz"):
        write_project(tmp_path / "bad.zip", image, "yx", (1, 1), "micrometer", roi)


def _image_with_labels(tmp: Path, client) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    image = RNG.integers(0, 255, (2, 6, 20, 24)).astype(np.uint8)
    roi = np.zeros((6, 20, 24), np.uint32)
    roi[1:4, 2:9, 3:10] = 1
    roi[2:6, 11:18, 12:22] = 2
    labeling = np.where(roi == 1, 1, np.where(roi == 2, 3, 0)).astype(np.uint8)
    labels = {"cells": roi, "cells_classes": labeling, "fov": np.ones_like(labeling)}
    paths = []
    for name, arr in labels.items():
        np.save(tmp / f"{name}.npy", arr)
        paths.append((name, str(tmp / f"{name}.npy")))
    tifffile.imwrite(tmp / "img.ome.tif", image, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeZ": 0.5, "PhysicalSizeY": 0.2, "PhysicalSizeX": 0.2,
        "Channel": {"Name": ["DAPI", "GFP"]}})
    img = tmp / "img.ome.zarr"
    convert(tmp / "img.ome.tif", img, ConvertOptions(chunks=(4, 8, 8), labels=tuple(paths)),
            client)
    return img, image, labels


def test_export_partseg_project_and_train_from_it(tmp_path: Path, client) -> None:
    img, image, labels = _image_with_labels(tmp_path, client)
    dst = tmp_path / "out.tgz"
    export(img, dst, client, label="cells", mask="fov",
           alternative=(("Labeling", "cells_classes"),))
    vol = read(dst)
    assert vol.axes == "czyx" and vol.channel_names == ("DAPI", "GFP")
    assert vol.voxel_size == pytest.approx((0.5, 0.2, 0.2))
    np.testing.assert_array_equal(vol.data.compute(), image)
    np.testing.assert_array_equal(vol.labels["roi"].data.compute(), labels["cells"])
    np.testing.assert_array_equal(vol.labels["alt_Labeling"].data.compute(),
                                  labels["cells_classes"])
    np.testing.assert_array_equal(vol.labels["mask"].data.compute(), labels["fov"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial left

    # a region and one channel
    export(img, tmp_path / "crop.tbz2", client, roi="1:5,0:10,4:20", channel=1, label="cells")
    crop = read(tmp_path / "crop.tbz2")
    assert crop.axes == "zyx"
    np.testing.assert_array_equal(crop.data.compute(), image[1, 1:5, 0:10, 4:20])
    np.testing.assert_array_equal(crop.labels["roi"].data.compute(),
                                  labels["cells"][1:5, 0:10, 4:20])

    # readable as a training source, Trapalyzer style: Labeling with class 3 ignored
    specs = parse_sources([{"path": str(dst), "labels": "Labeling",
                            "classes": {1: 1, 3: "ignore"}}], "data.train")
    (tv,) = open_sources(specs)
    got = tv.label.compute()
    classes = labels["cells_classes"].astype(np.int64)
    want = np.where(classes == 3, IGNORE, classes)
    np.testing.assert_array_equal(got, want)
    assert tv.image.shape == (2, 6, 20, 24) and tv.channel_names == ("DAPI", "GFP")

    with pytest.raises(OptionError, match="--label"):
        plan_export(img, tmp_path / "x.tgz")
    with pytest.raises(OptionError, match="PartSeg projects only"):
        plan_export(img, tmp_path / "x.tif", mask="fov")
    with pytest.raises(OptionError, match="--alternative 'nope'"):
        plan_export(img, tmp_path / "x.tgz", label="cells", alternative=(("A", "nope"),))


def test_cli_export_partseg(tmp_path: Path, client) -> None:
    img, image, labels = _image_with_labels(tmp_path, client)
    dst = tmp_path / "cli.tgz"
    res = run_cli("export", str(img), str(dst), "--label", "cells", "--alternative",
                  "Labeling=cells_classes", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    vol = read(dst)
    np.testing.assert_array_equal(vol.labels["alt_Labeling"].data.compute(),
                                  labels["cells_classes"])
    res = run_cli("export", str(img), str(tmp_path / "no.tgz"))
    assert res.returncode == 2 and "give --label" in res.stderr
    assert not (tmp_path / "no.tgz").exists()
