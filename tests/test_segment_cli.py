"""``voxelmill segment``: NGFF labels out, identical to the whole-image reference; bad input
refused with one message, exit code 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models import v05
from scipy import ndimage as ndi
from skimage import filters, measure

from engine.pipelines.convert import ConvertOptions, convert
from engine.pyramid import downsample_mode
from tests.conftest import run_cli
from tests.segment_helpers import blobs, spots

CHANNELS = ["membrane", "nuclei"]


def threshold_preset_reference(img: np.ndarray) -> np.ndarray:
    """The 'threshold' preset on the whole array: gaussian 2 → Otsu → label → size ≥ 10."""
    smooth = ndi.gaussian_filter(img.astype(np.float32), 2, mode="nearest")
    lab = measure.label(smooth > filters.threshold_otsu(smooth))
    return np.where(np.bincount(lab.ravel())[lab] >= 10, lab, 0)


@pytest.fixture(scope="module")
def images(client, tmp_path_factory) -> dict[str, Path]:
    """A 3D volume and a 2-channel 2D slide, converted to OME-Zarr (16-voxel chunks)."""
    root = tmp_path_factory.mktemp("segment")
    vol = (spots((40, 56, 48), 21) * 1000).astype(np.uint16)
    np.save(root / "vol.npy", vol)
    slide = np.stack([blobs((90, 110), 22, sigma=2), blobs((90, 110), 23, sigma=3)])
    tifffile.imwrite(root / "slide.tif", (slide * 200).astype(np.uint8), imagej=True,
                     metadata={"axes": "CYX", "Labels": CHANNELS})
    out = {"root": root, "vol_data": root / "vol.npy", "slide_data": root / "slide.tif"}
    for name in ("vol", "slide"):
        src = root / (f"{name}.npy" if name == "vol" else "slide.tif")
        convert(src, root / f"{name}.ome.zarr",
                ConvertOptions(chunks=(16,), assume_voxel_size=True), client,
                report=lambda _: None)
        out[name] = root / f"{name}.ome.zarr"
    return out


def _labels(path: Path, level: int = 0) -> np.ndarray:
    return zarr.open_array(str(path / str(level)), mode="r")[...]


def test_preset_on_a_volume_writes_identical_ngff_labels_with_pyramid(images):
    src = images["vol"]
    res = run_cli("segment", str(src), "--workflow", "threshold", "--name", "blobs",
                  "--keep", "smooth", "--workers", "2", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    vol = np.load(images["vol_data"])
    ref = threshold_preset_reference(vol)
    got = _labels(src / "labels" / "blobs")
    assert got.dtype == np.uint32 and ref.max() > 5
    np.testing.assert_array_equal(got, ref)
    # label pyramid: the image's levels, each the mode of the one above
    image_levels = zarr.open_group(str(src), mode="r").attrs["ome"]["multiscales"][0]
    label_meta = zarr.open_group(str(src / "labels" / "blobs"), mode="r").attrs["ome"]
    assert [d["coordinateTransformations"] for d in label_meta["multiscales"][0]["datasets"]] \
        == [d["coordinateTransformations"] for d in image_levels["datasets"]]
    np.testing.assert_array_equal(_labels(src / "labels" / "blobs", 1),
                                  downsample_mode(got, (2, 2, 2)))
    # NGFF validity, the labels list, colours for every label value
    v05.Labels.from_zarr(zarr.open_group(str(src / "labels"), mode="r"))
    il = v05.ImageLabel.from_zarr(zarr.open_group(str(src / "labels" / "blobs"), mode="r"))
    colors = {c.label_value for c in il.ome_attributes.image_label.colors}
    assert colors == set(np.unique(ref).tolist()) - {0}
    assert f"{len(colors)} objects" in res.stdout
    # the kept intermediate: an OME-Zarr image of the smoothed volume
    kept = src / "intermediates" / "blobs" / "smooth"
    v05.Image.from_zarr(zarr.open_group(str(kept), mode="r"))
    np.testing.assert_allclose(_labels(kept), ndi.gaussian_filter(vol.astype(np.float32), 2,
                                                                  mode="nearest"),
                               rtol=1e-5, atol=1e-3)
    # nothing left behind
    assert sorted(p.name for p in (src / "labels").iterdir()) == ["blobs", "zarr.json"]
    # `info` lists the new labels
    res = run_cli("info", str(src), "--json")
    assert res.returncode == 0, res.stderr
    assert "blobs" in json.loads(res.stdout)["labels"]


WORKFLOW_2D = """
name: nuclei-2d
steps:
  - name: smooth
    function: gaussian
    parameters: {sigma: 1.5}
  - name: mask
    function: threshold
    parameters: {method: triangle}
  - name: filled
    function: fill_holes
    parameters: {min_size: 0, max_size: 40}
  - name: nuclei
    function: label
    parameters: {connectivity: 1}
"""


def test_2d_slide_channel_by_name(images, tmp_path):
    """(Also: the embedded cluster's default shape for a NumPy command, a single-threaded
    worker per core.)"""
    from engine.cluster import ClusterOptions, local_cluster_shape

    wf = tmp_path / "nuclei.yaml"
    wf.write_text(WORKFLOW_2D)
    res = run_cli("segment", str(images["slide"]), "--workflow", str(wf), "--name", "nuclei",
                  "--channel", "nuclei", "--block", "32,64")
    assert res.returncode == 0, res.stderr
    workers, threads = local_cluster_shape(ClusterOptions(gil_bound=True))
    assert threads == 1
    assert f"local cluster: {workers} worker(s) × 1 thread(s)" in res.stderr, res.stderr
    img = tifffile.imread(images["slide_data"])[1]
    smooth = ndi.gaussian_filter(img.astype(np.float32), 1.5, mode="nearest")
    mask = smooth > filters.threshold_triangle(smooth)
    bg = measure.label(~mask, connectivity=1)
    holes = np.bincount(bg.ravel()) <= 40
    holes[0] = False
    ref = measure.label(mask | holes[bg], connectivity=1)
    got = _labels(images["slide"] / "labels" / "nuclei")
    assert got.shape == img.shape and ref.max() > 3
    np.testing.assert_array_equal(got, ref)


def _assert_refused(res, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    for needle in needles:
        assert needle in res.stderr, res.stderr


def _snapshot(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_bad_input_is_refused_and_nothing_is_written(images, tmp_path):
    src = images["vol"]
    before = _snapshot(src)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - name: s\n    function: gausian\n  - name: t\n"
                   "    function: threshold\n    parameters: {method: otsu, value: -1}\n"
                   "    inputs: [nowhere]\n")
    _assert_refused(run_cli("segment", str(src), "--workflow", str(bad), "--name", "x"),
                    "bad.yaml", "gausian", "gaussian", "nowhere")
    _assert_refused(run_cli("segment", str(src), "--workflow", "membranes", "--name", "x"),
                    "membranes", "membrane")
    _assert_refused(run_cli("segment", str(src), "--workflow", "threshold", "--name", "x",
                            "--channel", "1"), "--channel 1", "no channel axis")
    _assert_refused(run_cli("segment", str(images["slide"]), "--workflow", "threshold",
                            "--name", "x"), "2 channels", "membrane", "--channel")
    _assert_refused(run_cli("segment", str(images["slide"]), "--workflow", "threshold",
                            "--name", "x", "--channel", "5"), "--channel 5", "out of range")
    _assert_refused(run_cli("segment", str(images["slide"]), "--workflow", "threshold",
                            "--name", "x", "--channel", "dapi"), "'dapi'", "nuclei")
    _assert_refused(run_cli("segment", str(images["vol_data"]), "--workflow", "threshold",
                            "--name", "x"), "vol.npy", "convert")
    _assert_refused(run_cli("segment", str(src), "--workflow", "threshold", "--name", "../x"),
                    "--name")
    _assert_refused(run_cli("segment", str(src), "--workflow", "threshold", "--name", "x",
                            "--keep", "smoth"), "smoth")
    _assert_refused(run_cli("segment", str(src), "--workflow", "threshold", "--name", "x",
                            "--block", "20,16,16"), "--block", "multiple")
    conn = tmp_path / "conn.yaml"
    conn.write_text("steps:\n  - {name: t, function: threshold}\n"
                    "  - {name: l, function: label, parameters: {connectivity: 3}}\n")
    _assert_refused(run_cli("segment", str(images["slide"]), "--workflow", str(conn),
                            "--name", "x", "--channel", "0"), "connectivity 3")
    assert _snapshot(src) == before


def test_existing_label_needs_overwrite(images, client):
    from engine.errors import DestinationError
    from engine.pipelines.segment import SegmentOptions, segment

    src = images["vol"]
    opts = SegmentOptions("threshold", "again", block=(16, 32, 32))
    first = segment(src, opts, client, report=lambda _: None)
    _assert_refused(run_cli("segment", str(src), "--workflow", "threshold", "--name", "again"),
                    "again", "--overwrite")
    with pytest.raises(DestinationError):
        segment(src, opts, client, report=lambda _: None)
    opts.overwrite = True
    opts.workflow = "spot"
    second = segment(src, opts, client, report=lambda _: None)
    assert first.destination == second.destination
    names = zarr.open_group(str(src / "labels"), mode="r").attrs["ome"]["labels"]
    assert names.count("again") == 1


def test_list_steps_documents_every_step():
    res = run_cli("segment", "unused", "--list-steps")
    assert res.returncode == 0, res.stderr
    for step in ("normalize", "masked_object", "graph_cut", "fill_holes", "watershed"):
        assert step in res.stdout
