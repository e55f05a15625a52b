"""``voxelmill preprocess``: blockwise rescaling equals ``scipy.ndimage.zoom`` on the whole
array, labels by nearest neighbour there and back, a workflow's image output equals the
whole-array computation, bad input refused with exit code 2 and nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import v05
from scipy import ndimage as ndi

from engine import provenance
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.preprocess import (
    PreprocessOptions,
    plan_back,
    plan_preprocess,
    preprocess,
    resample_region,
    run_back,
    zoom_shape,
)
from tests.conftest import run_cli

GAUSS_INVERT = """
steps:
  - {name: smooth, function: gaussian, parameters: {sigma: 1.5}}
  - {name: flip, function: invert}
"""


def _zoom(x: np.ndarray, factors, order: int = 1) -> np.ndarray:
    """The reference: the whole array through scipy."""
    src = x.astype(np.float32) if order else x
    return ndi.zoom(src, factors, order=order, mode="nearest", grid_mode=True)


def _read(path: Path, level: int = 0) -> np.ndarray:
    return zarr.open_array(str(path / str(level)), mode="r")[...]


@pytest.fixture(scope="module")
def images(client, tmp_path_factory) -> dict:
    """A 2-channel 2D slide with labels and a 3D volume with labels, as OME-Zarr with odd
    shapes and small chunks, so every run has several blocks and ragged edges."""
    root = tmp_path_factory.mktemp("preprocess")
    rng = np.random.default_rng(4)
    slide = ndi.gaussian_filter(rng.normal(size=(2, 61, 83)), (0, 2, 2)) * 4000 + 2000
    slide = np.clip(slide, 0, 65535).astype(np.uint16)
    cells = ndi.label(ndi.gaussian_filter(rng.normal(size=(61, 83)), 3) > 0.05)[0]
    tifffile.imwrite(root / "slide.ome.tif", slide, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["fluo", "bright"]},
                               "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    tifffile.imwrite(root / "cells.tif", cells.astype(np.uint16))
    vol = (ndi.gaussian_filter(rng.normal(size=(19, 27, 33)), 1.5) * 1000).astype(np.float32)
    blobs = ndi.label(vol > 50)[0].astype(np.uint32)
    np.save(root / "vol.npy", vol)
    np.save(root / "blobs.npy", blobs)
    out = {"root": root, "slide_data": slide, "cells": cells, "vol_data": vol, "blobs": blobs}
    for name, src, labels in (("slide", "slide.ome.tif", (("cells", "cells.tif"),)),
                              ("vol", "vol.npy", (("blobs", "blobs.npy"),))):
        convert(root / src, root / f"{name}.ome.zarr",
                ConvertOptions(chunks=(8,), labels=tuple((n, str(root / p)) for n, p in labels),
                               voxel_size=(2.0, 1.0, 1.0) if name == "vol" else None,
                               assume_voxel_size=True),
                client, report=lambda _: None)
        out[name] = root / f"{name}.ome.zarr"
    return out


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("shape, factors", [((13,), (2.3,)), ((17, 23), (0.37, 1.61)),
                                            ((9, 14, 11), (1.5, 0.5, 3.0)),
                                            ((40, 7), (0.25, 1.0))])
def test_resample_region_equals_zoom_on_any_region(shape, factors, order):
    """Any output region computed from its own input region equals the whole-array zoom."""
    rng = np.random.default_rng(0)
    x = (rng.random(shape) * 1000).astype(np.float32 if order else np.uint16)
    ref = _zoom(x, factors, order)
    out_shape = zoom_shape(shape, factors)
    assert ref.shape == out_shape
    for _ in range(6):  # random regions, including edges
        lo = [int(rng.integers(0, n)) for n in out_shape]
        write = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(lo, out_shape,
                                                                             strict=True))
        got = resample_region(lambda r: x[r], shape, out_shape, write, order)
        if order:
            np.testing.assert_allclose(got, ref[write], rtol=1e-6, atol=1e-3)
        else:
            np.testing.assert_array_equal(got, ref[write])


@pytest.mark.parametrize("scale, block", [((2.3,), (16, 24)), ((0.45,), (8, 8)),
                                          ((1.7, 0.6), None)])
def test_slide_blockwise_equals_whole_array_zoom(images, client, tmp_path, scale, block):
    dst = tmp_path / "scaled.ome.zarr"
    res = preprocess(images["slide"], dst, PreprocessOptions(scale=scale, labels=("cells",),
                                                             block=block),
                     client, report=lambda _: None)
    slide, cells = images["slide_data"], images["cells"]
    factors = scale * 2 if len(scale) == 1 else scale
    got = _read(dst)
    assert got.dtype == np.float32 and got.shape[0] == 2
    for c in range(2):
        np.testing.assert_allclose(got[c], _zoom(slide[c], factors), rtol=1e-6, atol=1e-2)
    np.testing.assert_array_equal(_read(dst / "labels" / "cells"), _zoom(cells, factors, 0))
    # metadata: channel names kept, voxel size × n_in / n_out, a valid NGFF image and labels
    v05.Image.from_zarr(zarr.open_group(str(dst), mode="r"))
    v05.ImageLabel.from_zarr(zarr.open_group(str(dst / "labels" / "cells"), mode="r"))
    d = omezarr.describe(dst)
    assert d["channels"] == ["fluo", "bright"] and d["labels"] == ["cells"]
    expected = [0.5 * n / m for n, m in zip(slide.shape[1:], got.shape[1:], strict=True)]
    assert d["levels"][0]["scale"][1:] == pytest.approx(expected)
    assert res.shape == got.shape[1:]
    assert [e["op"] for e in provenance.read(dst)] == ["preprocess"]
    assert provenance.read(dst / "labels" / "cells")[0]["parameters"]["scale"] == list(factors)


@pytest.mark.parametrize("scale", [(1.6,), (0.55, 0.7, 1.3)])
def test_volume_blockwise_equals_whole_array_zoom(images, client, tmp_path, scale):
    dst = tmp_path / "vol2.ome.zarr"
    preprocess(images["vol"], dst, PreprocessOptions(scale=scale, labels=("blobs",),
                                                     block=(8, 16, 8)),
               client, report=lambda _: None)
    factors = scale * 3 if len(scale) == 1 else scale
    np.testing.assert_allclose(_read(dst), _zoom(images["vol_data"], factors), rtol=1e-5,
                               atol=1e-3)
    np.testing.assert_array_equal(_read(dst / "labels" / "blobs"),
                                  _zoom(images["blobs"], factors, 0))
    d = omezarr.describe(dst)
    expected = [v * n / m for v, n, m in zip((2.0, 1.0, 1.0), images["vol_data"].shape,
                                             d["levels"][0]["shape"], strict=True)]
    assert d["levels"][0]["scale"] == pytest.approx(expected)


def test_labels_there_and_back_round_trip(images, client, tmp_path):
    """×2 up, labels carried along, then back onto the original grid: the original labels."""
    up = tmp_path / "up.ome.zarr"
    preprocess(images["slide"], up, PreprocessOptions(scale=(2.0,), channels=("bright",),
                                                      labels=("cells",)),
               client, report=lambda _: None)
    assert omezarr.describe(up)["channels"] == ["bright"]
    res = run_back(plan_back(up, images["slide"], "cells", "cells_back"), client,
                   report=lambda _: None)
    back = _read(images["slide"] / "labels" / "cells_back")
    np.testing.assert_array_equal(back, images["cells"])
    assert res.n_labels == int(images["cells"].max())
    assert "cells_back" in omezarr.label_names(images["slide"])
    v05.ImageLabel.from_zarr(zarr.open_group(str(images["slide"] / "labels" / "cells_back"),
                                             mode="r"))
    # a non-integer factor: back onto exactly the original's shape, nearest neighbour
    odd = tmp_path / "odd.ome.zarr"
    preprocess(images["slide"], odd, PreprocessOptions(scale=(0.7,), labels=("cells",)),
               client, report=lambda _: None)
    run_back(plan_back(odd, images["slide"], "cells", "cells_odd"), client,
             report=lambda _: None)
    small = _read(odd / "labels" / "cells")
    got = _read(images["slide"] / "labels" / "cells_odd")
    assert got.shape == images["cells"].shape
    ref = np.zeros_like(got)
    for (y, x), _ in np.ndenumerate(got):  # the back mapping written out independently
        sy = min(max((y + 0.5) * small.shape[0] / got.shape[0] - 0.5, 0), small.shape[0] - 1)
        sx = min(max((x + 0.5) * small.shape[1] / got.shape[1] - 0.5, 0), small.shape[1] - 1)
        ref[y, x] = small[int(np.floor(sy + 0.5)), int(np.floor(sx + 0.5))]
    np.testing.assert_array_equal(got, ref)
    # the wrong original (another field of view) is refused
    np.save(tmp_path / "other.npy", np.zeros((61, 90), np.uint8))
    convert(tmp_path / "other.npy", tmp_path / "other.ome.zarr",
            ConvertOptions(voxel_size=(0.5,)), client,
            report=lambda _: None)
    with pytest.raises(InputError, match="same field of view on axis x"):
        plan_back(odd, tmp_path / "other.ome.zarr", "cells")
    with pytest.raises(InputError, match="spatial axes"):
        plan_back(odd, images["vol"], "cells")


def test_workflow_image_output_equals_whole_array(images, client, tmp_path):
    """Rescale, then gaussian → invert on each channel: equal to scipy on the whole array."""
    wf = tmp_path / "gi.yaml"
    wf.write_text(GAUSS_INVERT)
    dst = tmp_path / "gi.ome.zarr"
    preprocess(images["slide"], dst, PreprocessOptions(workflow=str(wf), scale=(0.8,),
                                                       block=(16, 16)),
               client, report=lambda _: None)
    got = _read(dst)
    for c in range(2):
        ref = -ndi.gaussian_filter(_zoom(images["slide_data"][c], (0.8, 0.8)), 1.5,
                                   mode="nearest")
        np.testing.assert_allclose(got[c], ref, rtol=1e-5, atol=1e-2)
    # without scaling the workflow runs on the original grid
    same = tmp_path / "same.ome.zarr"
    preprocess(images["vol"], same, PreprocessOptions(workflow=str(wf), block=(8, 8, 16)),
               client, report=lambda _: None)
    np.testing.assert_allclose(_read(same), -ndi.gaussian_filter(images["vol_data"], 1.5,
                                                                 mode="nearest"),
                               rtol=1e-5, atol=1e-3)


def test_plan_refuses_bad_options(images, tmp_path):
    dst = tmp_path / "x.ome.zarr"
    for opts, error, match in (
            (PreprocessOptions(scale=(0.0,)), OptionError, "positive"),
            (PreprocessOptions(scale=(1.0, 2.0, 3.0)), OptionError, "one per spatial axis"),
            (PreprocessOptions(scale=(2.0,), object_width=5.0), OptionError, "not both"),
            (PreprocessOptions(object_width=-3.0), OptionError, "object-width"),
            (PreprocessOptions(scale=(0.001,)), OptionError, "larger factor"),
            (PreprocessOptions(channels=("nope",)), OptionError, "nope"),
            (PreprocessOptions(labels=("nope",)), InputError, "no label image 'nope'"),
            (PreprocessOptions(workflow="threshold"), OptionError, "produces labels"),
    ):
        with pytest.raises(error, match=match):
            plan_preprocess(images["slide"], dst, opts)
    assert not dst.exists()
    # --object-width W --target-width T is the factor T / W
    plan = plan_preprocess(images["slide"], dst, PreprocessOptions(object_width=20.0,
                                                                   target_width=10.0))
    assert plan.factors == (0.5, 0.5) and plan.out_shape == zoom_shape((61, 83), (0.5, 0.5))


def test_cli_writes_and_refuses(images, tmp_path):
    dst = tmp_path / "cli.ome.zarr"
    res = run_cli("preprocess", str(images["slide"]), str(dst), "--channel", "bright",
                  "--object-width", "20", "--labels", "cells", "--workers", "1",
                  "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr
    assert "scale 0.5, 0.5" in res.stdout and dst.exists()
    np.testing.assert_allclose(_read(dst)[0], _zoom(images["slide_data"][1], 0.5), rtol=1e-6,
                               atol=1e-2)
    bad = tmp_path / "bad.ome.zarr"
    for args, match in (
            ((str(images["slide"]), str(dst)), "exists"),
            ((str(tmp_path / "missing.ome.zarr"), str(bad)), "no such OME-Zarr image"),
            ((str(images["slide"]), str(bad), "--channel", "7"), "out of range"),
            ((str(images["slide"]), str(bad), "--scale", "-2"), "positive"),
            (("--back", str(dst), "--labels", "nope", "--into", str(images["slide"])),
             "no label image"),
    ):
        res = run_cli("preprocess", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert match in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not bad.exists() and not (tmp_path / ".bad.ome.zarr.partial").exists()
