"""Every workflow step, run blockwise through the executors, equals the whole-array
computation with scipy / scikit-image (exactly for masks and labels)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import filters, measure, morphology

from tests.segment_helpers import LAYOUTS_3D, blobs, run_steps, spots

SHAPE = (23, 37, 29)


def allen_normalize(img: np.ndarray, scaling: list[float]) -> np.ndarray:
    """The Allen segmenter's intensity normalization, written from its documentation."""
    x = img.astype(np.float64).copy()
    if len(scaling) == 1:
        if scaling[0] >= 1:
            x[x > scaling[0]] = x.min()
        lo, hi = x.min(), x.max()
    elif len(scaling) == 2:
        m, s = x.mean(), x.std()
        lo, hi = max(m - scaling[0] * s, x.min()), min(m + scaling[1] * s, x.max())
    else:
        valid = x[(x > scaling[2]) & (x < scaling[3])]
        s = valid.std()
        lo = max(scaling[2] - scaling[0] * s, x.min())
        hi = min(scaling[3] + scaling[1] * s, x.max())
    x = np.clip(x, lo, hi)
    return (x - lo + 1e-8) / (hi - lo + 1e-8)


@pytest.mark.parametrize("scaling", [[0], [3000], [1.5, 2.5], [0.5, 3.0, 800, 3200]])
@pytest.mark.parametrize("block", LAYOUTS_3D[:2])
def test_normalize_modes(client, tmp_path, scaling, block):
    img = (blobs(SHAPE, 1) * 4000).astype(np.uint16)
    got = run_steps(client, tmp_path, img, [
        {"name": "n", "function": "normalize", "parameters": {"scaling": scaling}}],
        block, capture="n")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, allen_normalize(img, scaling), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", LAYOUTS_3D[:3])
def test_clip_percentiles(client, tmp_path, block):
    img = blobs(SHAPE, 2)
    lo, hi = np.percentile(img, [2.5, 97])
    got = run_steps(client, tmp_path, img, [
        {"name": "c", "function": "clip_percentiles",
         "parameters": {"low": 2.5, "high": 97}}], block, capture="c")
    np.testing.assert_allclose(got, (np.clip(img.astype(np.float64), lo, hi) - lo) / (hi - lo),
                               rtol=1e-5, atol=1e-6)


def _reference_threshold(img: np.ndarray, method: str) -> float:
    if method == "median":
        return np.percentile(img, 50)
    if method == "ave_tri_med":
        return (filters.threshold_triangle(img) + np.percentile(img, 50)) / 2
    if method == "multiotsu":
        return filters.threshold_multiotsu(img, classes=3)[1]
    return getattr(filters, f"threshold_{method}")(img)


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
@pytest.mark.parametrize("method", ["otsu", "triangle", "median", "ave_tri_med", "mean",
                                    "yen", "isodata", "multiotsu"])
def test_thresholds_give_the_whole_image_mask(client, tmp_path, dtype, method):
    img = blobs(SHAPE, 3)
    if dtype == "uint16":
        img = (img * 3000).astype(np.uint16)
    params = {"method": method, **({"level": 2} if method == "multiotsu" else {})}
    got = run_steps(client, tmp_path, img, [
        {"name": "t", "function": "threshold", "parameters": params}], (8, 12, 7))
    np.testing.assert_array_equal(got, img > _reference_threshold(img, method))


def test_absolute_threshold_with_factor(client, tmp_path):
    img = blobs(SHAPE, 4)
    got = run_steps(client, tmp_path, img, [
        {"name": "t", "function": "threshold",
         "parameters": {"method": "otsu", "factor": 0.8}}], (11, 36, 28))
    np.testing.assert_array_equal(got, img > filters.threshold_otsu(img) * 0.8)


def allen_masked_object(img: np.ndarray, method: str, min_size: int, adjust: float
                        ) -> np.ndarray:
    """Masked-object thresholding as the Allen segmenter's MO (its algorithm, skimage)."""
    if method == "triangle":
        t = filters.threshold_triangle(img)
    elif method == "median":
        t = np.percentile(img, 50)
    else:
        t = (filters.threshold_triangle(img) + np.percentile(img, 50)) / 2
    low = img > t
    lab, n = measure.label(low, connectivity=1, return_num=True)
    sizes = np.bincount(lab.ravel())
    lab[sizes[lab] < min_size] = 0
    lab, n = measure.label(lab > 0, connectivity=1, return_num=True)
    out = np.zeros(img.shape, bool)
    for i in range(1, n + 1):
        obj = lab == i
        out |= obj & (img > filters.threshold_otsu(img[obj]) * adjust)
    return out


@pytest.mark.parametrize("method", ["triangle", "median", "ave_tri_med"])
@pytest.mark.parametrize("block", [(8, 12, 7), (1, 19, 30)])
def test_masked_object_threshold_with_objects_across_blocks(client, tmp_path, method, block):
    img = blobs(SHAPE, 5, sigma=3)
    ref = allen_masked_object(img, method, 40, 0.98)
    got = run_steps(client, tmp_path, img, [
        {"name": "mo", "function": "masked_object",
         "parameters": {"global_method": method, "object_min_size": 40,
                        "local_adjust": 0.98}}], block)
    assert ref.any() and not ref.all()
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("block", LAYOUTS_3D)
def test_size_filter_on_a_mask_uses_global_object_sizes(client, tmp_path, block):
    img = blobs(SHAPE, 6, sigma=1.5)
    mask = img > 0.55
    sizes = np.bincount(measure.label(mask, connectivity=1).ravel())[1:]
    lo, hi = int(np.percentile(sizes, 40)), int(np.percentile(sizes, 95))
    lab = measure.label(mask, connectivity=1)
    keep = np.zeros(lab.max() + 1, bool)
    keep[1:] = (sizes >= lo) & (sizes <= hi)
    got = run_steps(client, tmp_path, img, [
        {"name": "t", "function": "threshold", "parameters": {"method": "absolute",
                                                               "value": 0.55}},
        {"name": "s", "function": "size_filter",
         "parameters": {"min_size": lo, "max_size": hi, "connectivity": 1}}], block)
    np.testing.assert_array_equal(got, keep[lab])


def allen_fill_holes(mask: np.ndarray, lo: int, hi: int, connectivity: int,
                     slice_wise: bool) -> np.ndarray:
    """Fill background components whose size is in [lo, hi] (per plane if slice_wise)."""
    def fill(m: np.ndarray) -> np.ndarray:
        bg = measure.label(~m, connectivity=min(connectivity, m.ndim))
        sizes = np.bincount(bg.ravel())
        hole = (sizes >= lo) & (sizes <= hi)
        hole[0] = False
        return m | hole[bg]

    return np.stack([fill(p) for p in mask]) if slice_wise else fill(mask)


@pytest.mark.parametrize("slice_wise", [False, True])
@pytest.mark.parametrize("block", LAYOUTS_3D[:3])
def test_fill_holes_by_hole_size(client, tmp_path, slice_wise, block):
    img = blobs(SHAPE, 7, sigma=1.2)
    mask = img > 0.4
    ref = allen_fill_holes(mask, 2, 30, 1, slice_wise)
    assert (ref != mask).sum() > 10
    got = run_steps(client, tmp_path, img, [
        {"name": "t", "function": "threshold", "parameters": {"method": "absolute",
                                                               "value": 0.4}},
        {"name": "f", "function": "fill_holes",
         "parameters": {"min_size": 2, "max_size": 30, "slice_wise": slice_wise}}], block)
    np.testing.assert_array_equal(got, ref)


def test_combine_and_invert(client, tmp_path):
    img = blobs(SHAPE, 8)
    steps = [
        {"name": "a", "function": "threshold", "inputs": ["raw"],
         "parameters": {"method": "absolute", "value": 0.3}},
        {"name": "neg", "function": "invert", "inputs": ["raw"]},
        {"name": "b", "function": "threshold", "inputs": ["neg"],
         "parameters": {"method": "absolute", "value": -0.6}},
        {"name": "both", "function": "combine", "inputs": ["a", "b"],
         "parameters": {"op": "and"}},
        {"name": "notboth", "function": "invert", "inputs": ["both"]},
        {"name": "out", "function": "combine", "inputs": ["notboth", "a"],
         "parameters": {"op": "subtract"}},
    ]
    got = run_steps(client, tmp_path, img, steps, (8, 12, 7))
    both = (img > 0.3) & (-img > -0.6)
    np.testing.assert_array_equal(got, ~both & ~(img > 0.3))


@pytest.mark.parametrize("block", LAYOUTS_3D)
def test_benchmark_pipeline_equals_scipy_and_skimage(client, tmp_path, block):
    # gaussian σ=2 → Otsu of the global histogram → labels → size filter (ids kept)
    img = spots(SHAPE, 1)
    smooth = ndi.gaussian_filter(img, 2, mode="nearest")
    lab = measure.label(smooth > filters.threshold_otsu(smooth))
    sizes = np.bincount(lab.ravel())
    ref = np.where(sizes[lab] >= 300, lab, 0)
    got = run_steps(client, tmp_path, img, [
        {"name": "g", "function": "gaussian", "parameters": {"sigma": 2.0}},
        {"name": "t", "function": "threshold", "parameters": {"method": "otsu"}},
        {"name": "l", "function": "label"},
        {"name": "s", "function": "size_filter", "parameters": {"min_size": 300}}], block)
    kept = np.unique(ref[ref > 0])
    assert 3 <= kept.size < lab.max()  # objects on both sides of the size limit
    np.testing.assert_array_equal(got, ref)


def test_label_connectivity_and_relabel(client, tmp_path):
    img = blobs((40, 50), 10, sigma=1.5)
    mask = img > 0.5
    lab = measure.label(mask, connectivity=1)
    sizes = np.bincount(lab.ravel())
    kept = np.where(sizes[lab] >= 8, lab, 0)
    ref = measure.label(kept > 0, connectivity=1)  # relabel: 1..n in raster order
    got = run_steps(client, tmp_path, img, [
        {"name": "t", "function": "threshold", "parameters": {"method": "absolute",
                                                               "value": 0.5}},
        {"name": "l", "function": "label", "parameters": {"connectivity": 1}},
        {"name": "s", "function": "size_filter",
         "parameters": {"min_size": 8, "relabel": True}}], (9, 13))
    np.testing.assert_array_equal(got, ref)
    # a label image that is also kept is not fused: the generic size filter path
    got = run_steps(client, tmp_path / "b", img, [
        {"name": "t", "function": "threshold", "parameters": {"method": "absolute",
                                                               "value": 0.5}},
        {"name": "l", "function": "label", "parameters": {"connectivity": 1}},
        {"name": "s", "function": "size_filter",
         "parameters": {"min_size": 8, "relabel": True}}], (9, 13), capture="l")
    np.testing.assert_array_equal(got, lab)


def test_remove_small_objects_reference_agrees():
    # the references above use bincount size filtering: check it against skimage's own
    mask = blobs(SHAPE, 11) > 0.5
    lab = measure.label(mask, connectivity=1)
    sizes = np.bincount(lab.ravel())
    ref = morphology.remove_small_objects(lab, max_size=9)
    np.testing.assert_array_equal(np.where(sizes[lab] >= 10, lab, 0), ref)


def test_chained_block_ops_run_as_one_sweep(client, tmp_path):
    # gaussian → gaussian → spot: each op's blocks start as soon as the blocks of the
    # previous one under their read region (halo included) are stored
    from engine import events

    img = blobs(SHAPE, 4)
    seen: list[dict] = []
    with events.listen(seen.append):
        got = run_steps(client, tmp_path, img, [
            {"name": "g1", "function": "gaussian", "parameters": {"sigma": 1.0}},
            {"name": "g2", "function": "gaussian", "parameters": {"sigma": 1.5}},
            {"name": "s", "function": "spot", "parameters": {"scales": [[1.0, 0.0]]}}],
            (8, 12, 7), capture="g2")
    want = ndi.gaussian_filter(ndi.gaussian_filter(img, 1.0, mode="nearest"), 1.5,
                               mode="nearest")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    stages = [(e["event"], e["stage"]) for e in seen if e["event"] in ("stage-start",
                                                                       "stage-end")]
    # one run of three passes: every pass started before the first one ended
    assert stages[:3] == [("stage-start", "g1"), ("stage-start", "g2"),
                          ("stage-start", "s")]
