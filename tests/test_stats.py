"""Global statistics: blockwise histograms equal numpy / scikit-image on the whole array."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import filters

from engine import stats
from engine.errors import InputError, OptionError

SHAPE = (30, 41, 25)
LAYOUTS = [(7, 13, 10), (30, 41, 25), (4, 41, 13), (11, 9, 25)]


def _image(dtype: str, seed: int = 0) -> np.ndarray:
    """Bimodal test volume of ``dtype`` (two Gaussian blobs of intensity over noise)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(SHAPE)
    fg = ((z - 15) ** 2 + (y - 20) ** 2 + (x - 12) ** 2) < 120
    if dtype == "uint8":
        img = np.where(fg, rng.normal(170, 20, SHAPE), rng.normal(60, 15, SHAPE))
        return np.clip(img, 3, 250).astype(np.uint8)
    if dtype == "uint16":
        img = np.where(fg, rng.normal(900, 80, SHAPE), rng.normal(300, 60, SHAPE))
        return np.clip(img, 100, 1500).astype(np.uint16)
    if dtype == "int16":
        img = np.where(fg, rng.normal(200, 40, SHAPE), rng.normal(-300, 50, SHAPE))
        return img.astype(np.int16)
    img = np.where(fg, rng.normal(5.0, 0.7, SHAPE), rng.normal(1.0, 0.5, SHAPE)).astype(dtype)
    if dtype.startswith("float"):
        img[rng.random(SHAPE) < 0.03] = np.nan
    return img


def _check_moments(hist: stats.Histogram, values: np.ndarray) -> None:
    v = values.astype(np.float64)
    assert hist.count == v.size == hist.counts.sum()
    assert hist.min == v.min() and hist.max == v.max()
    np.testing.assert_allclose(hist.sum, v.sum(), rtol=1e-12)
    np.testing.assert_allclose(hist.sum_sq, np.dot(v, v), rtol=1e-12)
    np.testing.assert_allclose(hist.mean, v.mean(), rtol=1e-12)
    np.testing.assert_allclose(hist.std, v.std(), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_integer_histogram_exact_for_any_layout(client, dtype):
    img = _image(dtype)
    values = img.ravel()
    ref_counts, ref_centers = np.bincount(values.astype(np.int64) - values.min()), None
    ref_centers = np.arange(values.min(), values.max() + 1)
    first = None
    for chunks in LAYOUTS:
        hist = stats.histogram(client, da.from_array(img, chunks=chunks))
        assert hist.exact and hist.counts.dtype == np.int64 and hist.edges.dtype == np.float64
        np.testing.assert_array_equal(hist.counts, ref_counts)
        np.testing.assert_array_equal(hist.centers, ref_centers)
        np.testing.assert_array_equal(hist.counts, np.histogram(values, bins=hist.edges)[0])
        _check_moments(hist, values)
        # exact integers: moments are identical bit for bit across layouts
        if first is None:
            first = hist
        assert (hist.sum, hist.sum_sq, hist.m2) == (first.sum, first.sum_sq, first.m2)
        q = [0, 1, 12.5, 50, 73.3, 99, 100]
        np.testing.assert_array_equal(hist.percentile(q), np.percentile(values, q))
        assert stats.threshold_median(hist) == np.median(values)


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_integer_thresholds_equal_skimage(client, dtype):
    img = _image(dtype)
    hist = stats.histogram(client, da.from_array(img, chunks=(7, 13, 10)))
    assert stats.threshold_otsu(hist) == filters.threshold_otsu(img)
    assert stats.threshold_triangle(hist) == filters.threshold_triangle(img)
    assert stats.threshold_yen(hist) == filters.threshold_yen(img)
    assert stats.threshold_isodata(hist) == filters.threshold_isodata(img)
    np.testing.assert_array_equal(stats.threshold_multiotsu(hist, classes=3),
                                  filters.threshold_multiotsu(img, classes=3))
    np.testing.assert_allclose(stats.threshold_mean(hist), filters.threshold_mean(img),
                               rtol=1e-12)


def test_float_histogram_with_nan_any_layout(client):
    img = _image("float32")
    values = img[~np.isnan(img)]
    # numpy's own result on the whole float32 array (float32 edges, as numpy bins them)
    ref_counts, ref_edges = np.histogram(values, bins=stats.DEFAULT_BINS)
    for chunks in LAYOUTS:
        hist = stats.histogram(client, da.from_array(img, chunks=chunks))
        assert not hist.exact and hist.counts.size == stats.DEFAULT_BINS
        np.testing.assert_array_equal(hist.edges, ref_edges)
        np.testing.assert_array_equal(hist.counts, ref_counts)
        _check_moments(hist, values)
        width = hist.edges[1] - hist.edges[0]
        q = np.array([0, 2, 25, 50, 90, 100])
        assert np.all(np.abs(hist.percentile(q) - np.percentile(values, q)) <= width)


def test_float_thresholds_within_one_bin(client):
    img = _image("float32")
    img[np.isnan(img)] = 1.0  # skimage's thresholds do not ignore NaN
    hist = stats.histogram(client, da.from_array(img, chunks=(7, 13, 10)), bins=256)
    width = hist.edges[1] - hist.edges[0]
    assert abs(stats.threshold_otsu(hist) - filters.threshold_otsu(img)) <= width
    assert abs(stats.threshold_triangle(hist) - filters.threshold_triangle(img)) <= width
    np.testing.assert_allclose(stats.threshold_multiotsu(hist),
                               filters.threshold_multiotsu(img), atol=width)
    fine = stats.histogram(client, da.from_array(img, chunks=(11, 5, 25)))
    assert abs(stats.threshold_otsu(fine) - filters.threshold_otsu(img)) <= width
    np.testing.assert_allclose(stats.threshold_mean(fine), np.mean(img, dtype=np.float64),
                               rtol=1e-12)
    assert abs(stats.threshold_median(fine) - np.median(img)) <= fine.edges[1] - fine.edges[0]


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_mask_restricts_voxels(client, dtype):
    img = _image(dtype)
    mask = _image("uint8", seed=3) > 80
    for chunks, mask_chunks in [((7, 13, 10), (10, 10, 10)), ((30, 41, 25), (7, 13, 10))]:
        hist = stats.histogram(client, da.from_array(img, chunks=chunks),
                               mask=da.from_array(mask, chunks=mask_chunks))
        values = img[mask]
        values = values[~np.isnan(values)] if dtype == "float32" else values
        np.testing.assert_array_equal(hist.counts, np.histogram(values, bins=hist.edges)[0])
        _check_moments(hist, values)
    if dtype == "uint16":
        assert stats.threshold_otsu(hist) == filters.threshold_otsu(img[mask])


def test_block_shape_option_and_wide_integers(client):
    img = _image("uint16").astype(np.int64) * 1000 - 7  # wide ints, range > 2**16
    arr = da.from_array(img, chunks=(10, 41, 25))
    a = stats.histogram(client, arr, block_shape=(7, 13, 10))
    b = stats.histogram(client, arr, block_shape=(3, 41, 9))
    ref_counts, ref_edges = np.histogram(img.astype(np.float64), bins=stats.DEFAULT_BINS)
    for hist in (a, b):
        np.testing.assert_array_equal(hist.edges, ref_edges)
        np.testing.assert_array_equal(hist.counts, ref_counts)
        _check_moments(hist, img.ravel())
    small = stats.histogram(client, da.from_array(img // 1000, chunks=(7, 13, 10)))
    assert small.exact  # int64 with a narrow range: exact bins after a min/max pass
    assert stats.threshold_otsu(small) == filters.threshold_otsu(img // 1000)


def test_merge_histograms(client):
    img = _image("uint8")
    left = stats.histogram(client, da.from_array(img[:13], chunks=(7, 13, 10)), bins=64)
    full = stats.histogram(client, da.from_array(img, chunks=(7, 13, 10)), bins=64)
    with pytest.raises(OptionError):
        left.merge(full)  # different ranges give different edges
    rest = stats.Histogram(full.counts - left.counts, full.edges)
    merged = stats.Histogram(left.counts, full.edges, count=left.count, sum=left.sum,
                             sum_sq=left.sum_sq, min=left.min, max=left.max, m2=left.m2)
    v = img[13:].astype(np.float64).ravel()
    rest.count, rest.sum, rest.sum_sq = v.size, v.sum(), np.dot(v, v)
    rest.min, rest.max, rest.m2 = v.min(), v.max(), np.sum((v - v.mean()) ** 2)
    out = merged.merge(rest)
    np.testing.assert_array_equal(out.counts, full.counts)
    assert (out.count, out.min, out.max) == (full.count, full.min, full.max)
    np.testing.assert_allclose([out.mean, out.std], [full.mean, full.std], rtol=1e-12)


def test_edge_cases(client):
    const = da.full((9, 8), 7, dtype=np.uint8, chunks=4)
    hist = stats.histogram(client, const)
    assert hist.counts.tolist() == [72] and hist.std == 0
    assert stats.threshold_otsu(hist) == 7 == stats.threshold_triangle(hist)
    empty = stats.histogram(client, da.from_array(np.full((5, 5), np.nan, np.float32), chunks=2))
    assert empty.count == 0 and np.isnan(empty.mean) and np.isnan(empty.percentile(50))
    with pytest.raises(OptionError):
        stats.threshold_otsu(empty)
    only_inf = stats.histogram(client, da.from_array(np.array([np.inf, -np.inf]), chunks=1))
    assert only_inf.count == 0
    with pytest.raises(OptionError):
        stats.histogram(client, const, mask=da.ones((3, 3), dtype=bool))
    with pytest.raises(OptionError):
        hist.percentile(101)


def test_real_image_otsu(client):
    shared = Path(__file__).resolve().parents[2] / "shared"
    path = shared / "data" / "real" / "stardist_dsb2018_img2d.tif"
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    import tifffile

    img = tifffile.imread(path)
    hist = stats.histogram(client, da.from_array(img, chunks=(100, 77)))
    assert stats.threshold_otsu(hist) == filters.threshold_otsu(img)
    assert stats.threshold_triangle(hist) == filters.threshold_triangle(img)
    np.testing.assert_array_equal(hist.percentile([1, 50, 99.8]),
                                  np.percentile(img, [1, 50, 99.8]))


@pytest.mark.parametrize("chunks", [(7, 13, 10), (30, 41, 25)])
def test_float32_thresholds_equal_scikit_image_bit_for_bit(client, chunks):
    rng = np.random.default_rng(5)
    img = ndi.gaussian_filter(rng.random((30, 41, 25)).astype(np.float32), 2)
    hist = stats.histogram(client, da.from_array(img, chunks=chunks), bins=256)
    assert stats.threshold_otsu(hist) == filters.threshold_otsu(img)
    assert stats.threshold_triangle(hist) == filters.threshold_triangle(img)
    np.testing.assert_array_equal(stats.threshold_multiotsu(hist, classes=3),
                                  filters.threshold_multiotsu(img, classes=3))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_percentiles_of_float_data_equal_numpy(client, dtype, monkeypatch):
    rng = np.random.default_rng(8)
    img = (rng.standard_normal((30, 41, 25)) ** 3).astype(dtype)  # heavy tails, dense centre
    img[3, 4, 5] = np.nan
    q = [0, 0.5, 13, 50, 87.5, 99.5, 100]
    ref = np.nanpercentile(img, q)
    got = stats.percentile(client, da.from_array(img, chunks=(7, 13, 10)), q)
    np.testing.assert_array_equal(got, ref)
    monkeypatch.setattr(stats, "SELECT_LIMIT", 50)  # force refinement passes
    got = stats.percentile(client, da.from_array(img, chunks=(11, 41, 4)), [50, 99.5])
    np.testing.assert_array_equal(got, np.nanpercentile(img, [50, 99.5]))


def test_display_windows_ignore_non_finite(tmp_path):
    """NaN and ±inf leave the window as numpy computes it over the finite voxels only."""
    import zarr

    from engine.stats import display_windows

    rng = np.random.default_rng(5)
    data = rng.normal(3.0, 2.0, (2, 6, 7, 8)).astype(np.float32)
    data[0, 1, 2, 3], data[0, 0, 0, 0], data[1, 5, 6, 7] = np.nan, np.inf, -np.inf
    arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, chunks=data.shape,
                            dtype=data.dtype)
    arr[...] = data
    data[1] = np.nan  # a channel with no finite value at all
    arr[...] = data
    got = display_windows(tmp_path / "a", "czyx", 2)
    finite = data[0][np.isfinite(data[0])].astype(np.float64)
    lo, hi = np.percentile(finite, [0.1, 99.9])
    assert got[0] == pytest.approx((finite.min(), finite.max(), lo, hi))
    assert got[1] == (0.0, 1.0, 0.0, 1.0)

    # the smallest level is read through the checked reader: a damaged chunk is named
    chunked = zarr.create_array(str(tmp_path / "b"), shape=(8, 8), chunks=(4, 4),
                                dtype=np.float32)
    chunked[...] = 1.0
    chunk = tmp_path / "b" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    with pytest.raises(InputError, match=r"chunk \(1, 0\) cannot be read.*b/c/1/0"):
        display_windows(tmp_path / "b", "yx", 1)


def test_non_finite_values_are_ignored_by_every_statistic(client):
    """NaN, +inf and -inf are not counted: histogram, extrema, moments, Otsu, exact
    percentiles and segment's normalization moments equal NumPy's (and scikit-image's) on
    the finite voxels alone, for a layout that splits them across blocks."""
    from engine.segment.execute import Moments

    rng = np.random.default_rng(11)
    img = rng.normal(5, 2, (20, 23, 17)).astype(np.float32)
    img[1, 2, 3], img[4, 5, 6], img[7, 8, 9], img[19, 22, 16] = np.nan, np.inf, -np.inf, np.inf
    finite = img[np.isfinite(img)]
    data = da.from_array(img, chunks=(7, 9, 5))
    hist = stats.histogram(client, data, bins=256)
    counts, edges = np.histogram(finite, bins=256)
    assert hist.count == finite.size == img.size - 4
    np.testing.assert_array_equal(hist.counts, counts)
    np.testing.assert_array_equal(hist.edges, edges)
    assert (hist.min, hist.max) == (finite.min(), finite.max())
    f64 = finite.astype(np.float64)
    np.testing.assert_allclose([hist.mean, hist.std], [f64.mean(), f64.std()], rtol=1e-12)
    assert stats.threshold_otsu(hist) == filters.threshold_otsu(finite)
    q = [0, 1, 50, 99.8, 100]
    np.testing.assert_array_equal(stats.percentile(client, data, q), np.percentile(finite, q))
    # the normalize step's moments, from two blocks merged as the runner merges them
    op = Moments()
    whole = (slice(None),) * 3
    every, _ = op.finish(op.merge(op.partial(whole, img[:9]), op.partial(whole, img[9:])))
    assert every["count"] == finite.size
    assert (every["min"], every["max"]) == (f64.min(), f64.max())
    np.testing.assert_allclose([every["mean"], every["std"]], [f64.mean(), f64.std()],
                               rtol=1e-12)
