"""Round trips through OME-Zarr: what goes in comes back out, voxel for voxel, with its
dtype and voxel size; exported regions and levels are exactly the expected sub-arrays.

References are independent of the engine: the input arrays themselves, the zarr arrays
read directly, ``skimage.transform.downscale_local_mean`` for the mean pyramid, and the
files read back with mrcfile and tifffile.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr
from skimage.transform import downscale_local_mean

from engine.errors import DestinationError
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.export import export
from tests.conftest import run_cli, write_mrc

SHAPE = (37, 70, 53)           # no axis a multiple of the 16-voxel chunk: edge blocks
VOXEL = (4.0, 2.0, 2.0)        # Å, z, y, x
QUIET = {"report": lambda _: None}


def random_volume(dtype: str, shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return rng.normal(0, 100, shape).astype(dt)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dt)


def level(path: Path, i: int = 0, group: str = "") -> np.ndarray:
    return np.asarray(zarr.open_array(str(path / group / str(i)), mode="r")[...])


def mrc_voxel(path: Path) -> tuple[float, float, float]:
    """Voxel size (z, y, x) from the header, in Å."""
    with mrcfile.open(path, permissive=False) as m:
        vs = m.voxel_size
        return float(vs.z), float(vs.y), float(vs.x)


def read_mrc(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=False) as m:
        return np.array(m.data)


def ome_pixels(path: Path) -> dict[str, object]:
    """PhysicalSize* (in µm) and channel names from an OME-TIFF's XML."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        root = ET.fromstring(tif.ome_metadata)
    pixels = next(e for e in root.iter() if e.tag.endswith("Pixels"))
    out: dict[str, object] = {}
    for ax in "XYZ":
        if pixels.get(f"PhysicalSize{ax}") is not None:
            assert pixels.get(f"PhysicalSize{ax}Unit", "µm") in ("µm", "um")
            out[ax.lower()] = float(pixels.get(f"PhysicalSize{ax}"))
    out["channels"] = [c.get("Name") for c in pixels if c.tag.endswith("Channel")]
    return out


# ------------------------------------------------------------------------------------ MRC

@pytest.mark.parametrize("dtype", ["float32", "int16", "uint16"])
def test_mrc_round_trip(tmp_path: Path, client, dtype: str) -> None:
    data = random_volume(dtype)
    src = write_mrc(tmp_path / "in.mrc", data, voxel_size=VOXEL[::-1])
    src_bytes = src.read_bytes()
    convert(src, tmp_path / "a.ome.zarr", ConvertOptions(chunks=(16,)), client, **QUIET)
    z0 = level(tmp_path / "a.ome.zarr")
    assert z0.dtype == data.dtype
    np.testing.assert_array_equal(z0, data)

    export(tmp_path / "a.ome.zarr", tmp_path / "out.mrc", client)
    back = read_mrc(tmp_path / "out.mrc")
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(mrc_voxel(tmp_path / "out.mrc"), VOXEL)
    with mrcfile.open(tmp_path / "out.mrc") as m:   # header statistics of the data written
        np.testing.assert_allclose([m.header.dmin, m.header.dmax],
                                   [data.min(), data.max()])
        np.testing.assert_allclose(m.header.dmean, data.mean(dtype=np.float64), rtol=1e-5)
    assert src.read_bytes() == src_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.zarr", "in.mrc", "out.mrc"]


def test_mrc_round_trip_cli(tmp_path: Path) -> None:
    """The one round trip through the console script, as a user runs it."""
    data = random_volume("int16", seed=3)
    write_mrc(tmp_path / "tomo.mrc", data, voxel_size=VOXEL[::-1])
    cluster = ("--workers", "1", "--threads-per-worker", "1")
    res = run_cli("convert", "tomo.mrc", "tomo.ome.zarr", "--chunks", "16", *cluster,
                  cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("export", "tomo.ome.zarr", "back.mrc", *cluster, cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    back = read_mrc(tmp_path / "back.mrc")
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(mrc_voxel(tmp_path / "back.mrc"), VOXEL)


# ----------------------------------------------------------------------------------- TIFF

def test_tiff_3d_round_trip(tmp_path: Path, client) -> None:
    data = random_volume("uint16", shape=(21, 70, 45), seed=4)
    sizes = {"z": 0.5, "y": 0.1625, "x": 0.1625}
    tifffile.imwrite(tmp_path / "stack.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", **{f"PhysicalSize{a.upper()}": v
                                                 for a, v in sizes.items()},
                               **{f"PhysicalSize{a.upper()}Unit": "µm" for a in sizes}})
    convert(tmp_path / "stack.ome.tif", tmp_path / "s.ome.zarr", ConvertOptions(chunks=(16,)),
            client, **QUIET)
    np.testing.assert_array_equal(level(tmp_path / "s.ome.zarr"), data)
    export(tmp_path / "s.ome.zarr", tmp_path / "back.ome.tif", client)
    back = tifffile.imread(tmp_path / "back.ome.tif")
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    px = ome_pixels(tmp_path / "back.ome.tif")
    for a, v in sizes.items():
        assert px[a] == pytest.approx(v)


def test_uint64_tiff_with_labels_converts(tmp_path: Path, client) -> None:
    """tifffile reads 64-bit TIFFs as numpy's ``ulonglong`` ('Q'), equal to uint64 but a type
    zarr does not know: the image and its label image (ids past 2³²) convert, values kept."""
    data = (np.arange(6 * 20 * 24, dtype=np.uint64).reshape(6, 20, 24) + 2**40)
    tifffile.imwrite(tmp_path / "big.tif", data)
    tifffile.imwrite(tmp_path / "lab.tif", (data % 7) * 2**33)
    assert tifffile.imread(tmp_path / "big.tif").dtype.char == "Q"  # what this guards
    convert(tmp_path / "big.tif", tmp_path / "b.ome.zarr", ConvertOptions(
        chunks=(8,), assume_voxel_size=True, labels=(("ids", str(tmp_path / "lab.tif")),)),
        client, **QUIET)
    np.testing.assert_array_equal(level(tmp_path / "b.ome.zarr"), data)
    np.testing.assert_array_equal(level(tmp_path / "b.ome.zarr", 0, "labels/ids"),
                                  (data % 7) * 2**33)


def test_tiff_2d_multichannel_round_trip(tmp_path: Path, client) -> None:
    data = random_volume("uint8", shape=(3, 90, 77), seed=5)
    names = ["brightfield", "GFP", "nuclei"]
    tifffile.imwrite(tmp_path / "slide.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": names},
                               "PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": 0.65, "PhysicalSizeYUnit": "µm"})
    convert(tmp_path / "slide.ome.tif", tmp_path / "s.ome.zarr", ConvertOptions(chunks=(32,)),
            client, **QUIET)
    np.testing.assert_array_equal(level(tmp_path / "s.ome.zarr"), data)
    export(tmp_path / "s.ome.zarr", tmp_path / "back.ome.tif", client)
    with tifffile.TiffFile(tmp_path / "back.ome.tif") as tif:
        assert tif.series[0].axes == "CYX"
        back = tif.series[0].asarray()
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back, data)
    px = ome_pixels(tmp_path / "back.ome.tif")
    assert px["x"] == pytest.approx(0.65) and px["y"] == pytest.approx(0.65)
    assert px["channels"] == names


def test_export_one_channel(tmp_path: Path, client) -> None:
    data = random_volume("uint16", shape=(2, 40, 35), seed=10)
    tifffile.imwrite(tmp_path / "slide.ome.tif", data, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["a", "b"]}})
    convert(tmp_path / "slide.ome.tif", tmp_path / "s.ome.zarr",
            ConvertOptions(chunks=(16,), assume_voxel_size=True), client, **QUIET)
    export(tmp_path / "s.ome.zarr", tmp_path / "b.tif", client, channel=1, roi="3:40,0:20")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "b.tif"), data[1, 3:40, 0:20])
    export(tmp_path / "s.ome.zarr", tmp_path / "a.mrc", client, channel=0)
    np.testing.assert_array_equal(read_mrc(tmp_path / "a.mrc"), data[0])


# ------------------------------------------------------------------------------------ NPY

@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_round_trip(tmp_path: Path, client, order: str) -> None:
    data = random_volume("float32", seed=6)
    np.save(tmp_path / "vol.npy", np.asarray(data, order=order))
    convert(tmp_path / "vol.npy", tmp_path / "v.ome.zarr",
            ConvertOptions(chunks=(16,), assume_voxel_size=True), client, **QUIET)
    z0 = level(tmp_path / "v.ome.zarr")
    assert z0.dtype == np.float32
    np.testing.assert_array_equal(z0, data)


# ------------------------------------------------------------------------ levels and ROIs

@pytest.fixture(scope="module")
def even(tmp_path_factory, client) -> dict[str, object]:
    """An even-shaped float32 volume with isotropic voxels, with a label image."""
    d = tmp_path_factory.mktemp("even")
    data = random_volume("float32", shape=(32, 64, 48), seed=8)
    lab = np.zeros(data.shape, np.uint16)
    lab[3:20, 10:50, 5:30] = 12
    lab[22:30, 40:60, 20:45] = 300
    write_mrc(d / "img.mrc", data, voxel_size=1.5)
    write_mrc(d / "lab.mrc", lab, voxel_size=1.5)
    convert(d / "img.mrc", d / "img.ome.zarr",
            ConvertOptions(chunks=(16,), labels=(("cells", str(d / "lab.mrc")),)), client,
            **QUIET)
    return {"dir": d, "data": data, "labels": lab, "zarr": d / "img.ome.zarr"}


def test_mean_pyramid_equals_downscale_local_mean(even) -> None:
    data = even["data"].astype(np.float64)
    for i, f in [(1, 2), (2, 4)]:
        got = level(even["zarr"], i)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, downscale_local_mean(data, (f, f, f)),
                                   rtol=1e-5, atol=1e-4)


def test_export_level_and_roi(even, tmp_path: Path, client) -> None:
    roi = "3:11,5:29,7:24"          # crosses chunk borders of level 1 (16³ chunks)
    sub = (slice(3, 11), slice(5, 29), slice(7, 24))
    export(even["zarr"], tmp_path / "l1.mrc", client, level=1, roi=roi)
    got = read_mrc(tmp_path / "l1.mrc")
    np.testing.assert_array_equal(got, level(even["zarr"], 1)[sub])
    reference = downscale_local_mean(even["data"].astype(np.float64), (2, 2, 2))[sub]
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(mrc_voxel(tmp_path / "l1.mrc"), (3.0, 3.0, 3.0))

    export(even["zarr"], tmp_path / "l0.mrc", client, roi="10:32,15:64,0:17")
    np.testing.assert_array_equal(read_mrc(tmp_path / "l0.mrc"),
                                  even["data"][10:32, 15:64, 0:17])
    export(even["zarr"], tmp_path / "open.mrc", client, level=2, roi=":5,3:,:")
    np.testing.assert_array_equal(read_mrc(tmp_path / "open.mrc"),
                                  level(even["zarr"], 2)[:5, 3:, :])


def test_odd_shape_pyramid_and_roi(tmp_path: Path, client) -> None:
    """Odd edges are replicated before the 2× mean (the documented rule), on edge blocks."""
    data = random_volume("float32", seed=9)
    write_mrc(tmp_path / "in.mrc", data, voxel_size=VOXEL[::-1])
    convert(tmp_path / "in.mrc", tmp_path / "a.ome.zarr", ConvertOptions(chunks=(16,)),
            client, **QUIET)
    # z is twice as coarse: level 1 halves y and x only
    padded = np.pad(data.astype(np.float64), [(0, 0), (0, 0), (0, 1)], mode="edge")
    expected = downscale_local_mean(padded, (1, 2, 2))
    got = level(tmp_path / "a.ome.zarr", 1)
    assert got.shape == (37, 35, 27)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)

    export(tmp_path / "a.ome.zarr", tmp_path / "edge.mrc", client, level=1,
           roi="30:37,20:35,10:27")
    np.testing.assert_array_equal(read_mrc(tmp_path / "edge.mrc"), got[30:37, 20:35, 10:27])
    np.testing.assert_allclose(mrc_voxel(tmp_path / "edge.mrc"), (4.0, 4.0, 4.0))


def test_export_label_image(even, tmp_path: Path, client) -> None:
    export(even["zarr"], tmp_path / "cells.mrc", client, label="cells")
    got = read_mrc(tmp_path / "cells.mrc")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, even["labels"])
    np.testing.assert_allclose(mrc_voxel(tmp_path / "cells.mrc"), (1.5, 1.5, 1.5))

    export(even["zarr"], tmp_path / "cells.tif", client, label="cells", level=1,
           roi="0:16,4:20,0:24")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cells.tif"),
                                  level(even["zarr"], 1, "labels/cells")[0:16, 4:20, 0:24])


def test_export_overwrite(even, tmp_path: Path, client) -> None:
    dst = tmp_path / "out.mrc"
    dst.write_bytes(b"an earlier export")
    with pytest.raises(DestinationError):
        export(even["zarr"], dst, client, roi="0:4,0:4,0:4")
    assert dst.read_bytes() == b"an earlier export"
    export(even["zarr"], dst, client, roi="0:4,0:4,0:4", overwrite=True)
    np.testing.assert_array_equal(read_mrc(dst), even["data"][:4, :4, :4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mrc"]
