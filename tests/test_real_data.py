"""The real files in ../shared/data/real convert with the voxel sizes their README gives."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from engine.pipelines.convert import ConvertOptions, convert

# file → (axes, shape, voxel size, unit) as stated in ../shared/data/real/README.md
EXPECTED = {
    "cylindra_13pf_MT_cryoet.tif": ("zyx", (36, 206, 94), (1.052, 1.052, 1.052), "nanometer"),
    "bbbc022_IXMtest_A02_s9_3ch.tif": ("cyx", (3, 395, 695), (1.0, 1.0), "micrometer"),
    "instanseg_fluorescence_example_2ch.tif": ("cyx", (2, 450, 450), (1.0, 1.0), "micrometer"),
    "stardist_dsb2018_img2d.tif": ("yx", (512, 512), (1.0, 1.0), "micrometer"),
    "tardis_et_patch_0_0_30_47_25.tif": ("zyx", (96, 96, 96), (1.0, 1.0, 1.0), "micrometer"),
    "plantseg_sample_ovule.h5:raw": ("zyx", (32, 128, 128), (0.235, 0.15, 0.15), "micrometer"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_converts_with_its_voxel_size(real_data, client, tmp_path, name):
    axes, shape, voxel, unit = EXPECTED[name]
    src = f"{real_data}/{name}"
    res = convert(src, tmp_path / "out.ome.zarr",
                  ConvertOptions(chunks=(32,), assume_voxel_size=True), client,
                  report=lambda _: None)
    group = zarr.open_group(str(res.destination), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    assert "".join(a["name"] for a in ms["axes"]) == axes
    assert group["0"].shape == shape
    spatial_scale = [s for a, s in zip(axes, ms["datasets"][0]["coordinateTransformations"][0]
                                       ["scale"], strict=True) if a in "zyx"]
    np.testing.assert_allclose(spatial_scale, voxel, rtol=1e-6)
    assert {a.get("unit") for a in ms["axes"] if a["name"] in "zyx"} == {unit}
    if name.endswith(".tif"):  # voxels identical to what tifffile reads
        np.testing.assert_array_equal(group["0"][...], tifffile.imread(src))
    assert len(res.levels) >= 2 or max(shape[-2:]) <= 32


def test_real_labels_attach_to_their_image(real_data, client, tmp_path):
    img = real_data / "tardis_et_patch_0_0_30_47_25.tif"
    mask = real_data / "tardis_et_patch_0_0_30_47_25_mask.tif"
    res = convert(img, tmp_path / "et.ome.zarr", ConvertOptions(
        chunks=(32,), labels=(("microtubules", str(mask)),), assume_voxel_size=True), client,
        report=lambda _: None)
    lab = zarr.open_group(str(res.destination / "labels" / "microtubules"), mode="r")
    np.testing.assert_array_equal(lab["0"][...], tifffile.imread(mask))
    assert lab.attrs["ome"]["image-label"]["colors"][0]["label-value"] == 1


def _reference_nuclei(img: np.ndarray) -> np.ndarray:
    """gaussian 1 → Otsu → holes ≤ 50 px filled → labels (4-connected) → ≥ 20 px, whole image."""
    from scipy import ndimage as ndi
    from skimage import filters, measure

    smooth = ndi.gaussian_filter(img.astype(np.float32), 1.0, mode="nearest")
    mask = smooth > filters.threshold_otsu(smooth)
    bg = measure.label(~mask, connectivity=1)
    holes = np.bincount(bg.ravel()) <= 50
    holes[0] = False
    lab = measure.label(mask | holes[bg], connectivity=1)
    return np.where(np.bincount(lab.ravel())[lab] >= 20, lab, 0)


NUCLEI_WORKFLOW = {"steps": [
    {"name": "smooth", "function": "gaussian", "parameters": {"sigma": 1.0}},
    {"name": "mask", "function": "threshold", "parameters": {"method": "otsu"}},
    {"name": "filled", "function": "fill_holes", "parameters": {"max_size": 50}},
    {"name": "nuclei", "function": "label", "parameters": {"connectivity": 1}},
    {"name": "kept", "function": "size_filter", "parameters": {"min_size": 20}},
]}


def test_real_nuclei_segment_like_the_in_memory_reference(real_data, client, tmp_path):
    import yaml

    from engine.pipelines.segment import SegmentOptions, segment

    src = real_data / "stardist_dsb2018_img2d.tif"
    res = convert(src, tmp_path / "nuclei.ome.zarr",
                  ConvertOptions(chunks=(64,), assume_voxel_size=True), client,
                  report=lambda _: None)
    wf = tmp_path / "nuclei.yaml"
    wf.write_text(yaml.safe_dump(NUCLEI_WORKFLOW))
    out = segment(res.destination, SegmentOptions(str(wf), "nuclei", block=(128, 192)), client,
                  report=lambda _: None)
    img = tifffile.imread(src)
    ref = _reference_nuclei(img)
    got = zarr.open_array(str(out.destination / "0"), mode="r")[...]
    np.testing.assert_array_equal(got, ref)  # same ids, raster order of first pixels
    # and it is a sensible segmentation of the annotated nuclei
    truth = tifffile.imread(real_data / "stardist_dsb2018_mask2d.tif") > 0
    dice = 2 * np.sum((got > 0) & truth) / (np.sum(got > 0) + np.sum(truth))
    assert dice > 0.8, dice


def test_real_ovule_membranes_segment_like_the_in_memory_reference(real_data, client,
                                                                   tmp_path):
    from scipy import ndimage as ndi
    from skimage import filters, measure

    from engine.pipelines.segment import SegmentOptions, segment

    res = convert(f"{real_data}/plantseg_sample_ovule.h5:raw", tmp_path / "ovule.ome.zarr",
                  ConvertOptions(chunks=(16, 32, 32)), client, report=lambda _: None)
    out = segment(res.destination, SegmentOptions("threshold", "walls"), client,
                  report=lambda _: None)
    import h5py

    with h5py.File(real_data / "plantseg_sample_ovule.h5", "r") as f:
        raw = f["raw"][...]
    smooth = ndi.gaussian_filter(raw.astype(np.float32), 2, mode="nearest")
    lab = measure.label(smooth > filters.threshold_otsu(smooth))
    ref = np.where(np.bincount(lab.ravel())[lab] >= 10, lab, 0)
    got = zarr.open_array(str(out.destination / "0"), mode="r")[...]
    assert ref.max() >= 1
    np.testing.assert_array_equal(got, ref)
