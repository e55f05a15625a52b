"""PartSeg projects, built here exactly as PartSeg's own writers lay them out.

The layout follows PartSeg's source (4DNucleome/PartSeg):
``package/PartSegCore/analysis/save_functions.py`` (``save_project``),
``package/PartSegImage/image_writer.py`` (``ImageWriter`` OME-TIFF; the ImageJ writer of
the 2019 format-1.0 era), ``package/PartSegCore/analysis/load_functions.py``
(``load_project_from_tar``: version from metadata.json, "1.0" → segmentation.npz).
"""

from __future__ import annotations

import io
import json
import tarfile
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.errors import InputError
from engine.io import open_volume

RNG = np.random.default_rng(11)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # PartSegCore.io_utils.get_tarinfo: a plain member with the buffer's size
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def ome_image_tif(data_tzcyx: np.ndarray, spacing_m: tuple[float, ...],
                  channel_names: list[str]) -> bytes:
    """``ImageWriter.save(image, buff, compression=None)`` of PartSeg ≥ 0.13."""
    spacing = tuple(float(x * 10**6) for x in spacing_m)  # Image.get_um_spacing
    times, layers, channels = data_tzcyx.shape[:3]
    plane_li = [
        {"TheT": t, "TheZ": z, "TheC": c, "PositionZ": 0, "PositionY": 0, "PositionX": 0,
         "PositionZUnit": "µm", "PositionYUnit": "µm", "PositionXUnit": "µm"}
        for t, z, c in product(range(times), range(layers), range(channels))
    ]
    metadata = {
        "Pixels": {
            "PhysicalSizeZ": spacing[0] if len(spacing) == 3 else 1,
            "PhysicalSizeY": spacing[-2],
            "PhysicalSizeX": spacing[-1],
            "TimeIncrement": 1.0,
            "PhysicalSizeZUnit": "µm",
            "PhysicalSizeYUnit": "µm",
            "PhysicalSizeXUnit": "µm",
            "TimeIncrementUnit": "s",
        },
        "Plane": plane_li,
        "Creator": "PartSeg",
        "Name": "sample",
        "Channel": {"Name": channel_names, "axes": "TZYXC",
                    "Color": [-16776961, 16711935, 65535][:channels]},
    }
    buff = io.BytesIO()
    tifffile.imwrite(buff, data_tzcyx, ome=True, software="PartSeg", metadata=metadata,
                     compression=None)
    return buff.getvalue()


def imagej_image_tif(data_tzcyx: np.ndarray, spacing_um: tuple[float, float, float],
                     labels: list[str]) -> bytes:
    """The 2019 ``ImageWriter.save``: an ImageJ hyperstack, µm, ``Labels`` per plane.

    PartSeg passed ``resolution=[1/x for x in spacing[-2:]]`` (y first) where tifffile
    expects x first; with the usual isotropic y/x spacing that makes no difference.
    """
    layers = data_tzcyx.shape[1]
    metadata = {"mode": "color", "spacing": spacing_um[0], "unit": "\\u00B5m",
                "Labels": labels * layers, "Ranges": [0.0, 100.0] * len(labels)}
    buff = io.BytesIO()
    tifffile.imwrite(buff, data_tzcyx, imagej=True, software="PartSeg", metadata=metadata,
                     resolution=[1 / x for x in spacing_um[-2:]])
    return buff.getvalue()


def tif(array: np.ndarray) -> bytes:
    buff = io.BytesIO()
    tifffile.imwrite(buff, array)  # segmentation.tif / mask.tif: no metadata
    return buff.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buff = io.BytesIO()
    np.savez(buff, **arrays)
    return buff.getvalue()


def write_project(path: Path, members: dict[str, bytes]) -> Path:
    ext = path.suffix.lower()
    mode = "w:bz2" if ext in (".bz2", ".tbz2") else "w:gz"
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return path


ALGORITHM = json.dumps({"algorithm_name": "Lower threshold",
                        "values": {"threshold": {"values": {"threshold": 8000}}}}).encode()


def current_project(path: Path, image: np.ndarray, roi: np.ndarray, spacing_m, names,
                    mask: np.ndarray | None = None, alternative: dict | None = None) -> Path:
    """save_project's member order: segmentation, alternative, mask, image, json files."""
    members = {"segmentation.tif": tif(roi)}
    if alternative:
        members["alternative.npz"] = npz(**alternative)
    if mask is not None:
        members["mask.tif"] = tif(mask.astype(np.uint8))
    members["image.tif"] = ome_image_tif(image, spacing_m, names)
    members["algorithm.json"] = ALGORITHM
    members["metadata.json"] = json.dumps({"project_version_info": "1.1",
                                           "roi_annotations": {}}).encode()
    return write_project(path, members)


@pytest.fixture
def stack() -> dict:
    z, c, y, x = 5, 2, 12, 10
    image = RNG.integers(0, 4000, (1, z, c, y, x)).astype(np.uint16)  # TZCYX
    roi = np.zeros((1, z, y, x), dtype=np.uint8)  # the image's array shape, TZYX
    roi[0, 1:3, 2:6, 3:7] = 1
    roi[0, 2:4, 7:11, 1:4] = 2
    mask = (image[:, :, 0] > 1000).astype(np.uint8)
    return {"image": image, "roi": roi, "mask": mask, "spacing_m": (1e-6, 2.1e-7, 2.1e-7)}


@pytest.mark.parametrize("name", ["project.tgz", "project.tbz2", "project.tar.gz"])
def test_current_project(tmp_path: Path, stack: dict, name: str) -> None:
    alt = {"previous": (stack["roi"] * 3).astype(np.uint16)}
    path = current_project(tmp_path / name, stack["image"], stack["roi"], stack["spacing_m"],
                           ["DAPI", "GFP"], mask=stack["mask"], alternative=alt)
    vol = open_volume(path)
    assert vol.axes == "czyx"
    assert vol.channel_names == ("DAPI", "GFP")
    assert vol.unit == "micrometer"
    assert vol.voxel_size == pytest.approx((1.0, 0.21, 0.21))
    np.testing.assert_array_equal(vol.data.compute(), stack["image"][0].transpose(1, 0, 2, 3))

    assert set(vol.labels) == {"roi", "mask", "alt_previous"}
    roi = vol.labels["roi"]
    assert roi.axes == "zyx" and roi.voxel_size == vol.voxel_size
    assert roi.dtype.kind in "iu"
    np.testing.assert_array_equal(roi.data.compute(), stack["roi"][0])
    np.testing.assert_array_equal(vol.labels["mask"].data.compute(), stack["mask"][0])
    np.testing.assert_array_equal(vol.labels["alt_previous"].data.compute(), alt["previous"][0])


def test_current_project_2d_single_channel(tmp_path: Path) -> None:
    image = RNG.integers(0, 255, (1, 1, 1, 9, 11)).astype(np.uint8)
    roi = (image[:, :, 0] > 128).astype(np.uint8)
    path = current_project(tmp_path / "flat.tgz", image, roi, (5e-7, 5e-7), ["only"])
    vol = open_volume(path)
    assert vol.axes == "yx" and vol.channel_names == ()
    assert vol.voxel_size == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(vol.data.compute(), image[0, 0, 0])
    assert vol.labels["roi"].axes == "yx"
    np.testing.assert_array_equal(vol.labels["roi"].data.compute(), roi[0, 0])
    assert "mask" not in vol.labels


@pytest.mark.parametrize("with_metadata", [True, False])
def test_format_1_0_project(tmp_path: Path, stack: dict, with_metadata: bool) -> None:
    image = stack["image"]
    roi_zyx = stack["roi"][0]  # 2019 projects kept the ROI without the time axis
    members = {
        "segmentation.npz": npz(segmentation=roi_zyx, full_segmentation=roi_zyx,
                                mask=stack["mask"][0]),
        "image.tif": imagej_image_tif(image, (1.0, 0.25, 0.25), ["ch1", "ch2"]),
        "algorithm.json": ALGORITHM,
    }
    if with_metadata:  # metadata.json saying 1.0; the oldest projects have none at all
        members["metadata.json"] = json.dumps({"project_version_info": "1.0"}).encode()
    path = write_project(tmp_path / "old.tbz2", members)
    vol = open_volume(path)
    assert vol.axes == "czyx"
    assert vol.channel_names == ("ch1", "ch2")
    assert vol.voxel_size == pytest.approx((1.0, 0.25, 0.25))
    np.testing.assert_array_equal(vol.data.compute(), image[0].transpose(1, 0, 2, 3))
    assert set(vol.labels) == {"roi", "mask"}
    np.testing.assert_array_equal(vol.labels["roi"].data.compute(), roi_zyx)
    np.testing.assert_array_equal(vol.labels["mask"].data.compute(), stack["mask"][0])


def test_broken_projects_name_the_file(tmp_path: Path, stack: dict) -> None:
    good = current_project(tmp_path / "good.tgz", stack["image"], stack["roi"],
                           stack["spacing_m"], ["a", "b"])
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="cut.tgz.*(corrupt|truncated)"):
        open_volume(cut)

    junk = tmp_path / "junk.tbz2"
    junk.write_bytes(RNG.integers(0, 255, 5000).astype(np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.tbz2"):
        open_volume(junk)

    no_image = write_project(tmp_path / "noimage.tgz", {"segmentation.tif": tif(stack["roi"]),
                                                        "algorithm.json": ALGORITHM})
    with pytest.raises(InputError, match="noimage.tgz.*image.tif"):
        open_volume(no_image)

    wrong = current_project(tmp_path / "wrong.tgz", stack["image"], stack["roi"][:, :2],
                            stack["spacing_m"], ["a", "b"])
    with pytest.raises(InputError, match="wrong.tgz.*roi"):
        open_volume(wrong)


def test_project_converts_to_ngff_with_labels(tmp_path: Path, stack: dict, client) -> None:
    """The round trip users need: a PartSeg project becomes an image with NGFF labels."""
    import zarr

    from engine.pipelines.convert import ConvertOptions, convert

    alt = {"previous": (stack["roi"] * 3).astype(np.uint16)}
    path = current_project(tmp_path / "p.tgz", stack["image"], stack["roi"], stack["spacing_m"],
                           ["DAPI", "GFP"], mask=stack["mask"], alternative=alt)
    res = convert(path, tmp_path / "p.ome.zarr", ConvertOptions(chunks=(4,)), client,
                  report=lambda _: None)
    g = zarr.open_group(str(res.destination), mode="r")
    ome = g.attrs["ome"]
    assert [c["label"] for c in ome["omero"]["channels"]] == ["DAPI", "GFP"]
    scale = ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([1.0, 1.0, 0.21, 0.21])
    assert sorted(zarr.open_group(str(res.destination / "labels"), mode="r")
                  .attrs["ome"]["labels"]) == ["alt_previous", "mask", "roi"]
    np.testing.assert_array_equal(g["labels/roi/0"][...], stack["roi"][0])
    np.testing.assert_array_equal(g["labels/alt_previous/0"][...], alt["previous"][0])
    values = [c["label-value"] for c in
              g["labels/roi"].attrs["ome"]["image-label"]["colors"]]
    assert values == [1, 2]
