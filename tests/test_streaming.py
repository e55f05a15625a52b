"""Streaming reductions: results folded as they arrive equal NumPy on the whole array, and
the client holds a bounded number of partials whatever the block count."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest

from engine import stats
from engine.blocks import Block, BlockGrid
from engine.runner import TreeFold, run_blocks

SHAPE = (23, 37, 19)
ODD_LAYOUTS = [(5, 7, 3), (23, 37, 19), (1, 37, 19), (9, 2, 11)]


def test_tree_fold_does_not_depend_on_arrival_order():
    """A non-commutative combine (concatenation) gives the numbered order for any
    arrival order, and in-order arrival holds at most one partial per tree level."""
    n = 1000
    want = tuple(range(n))
    rng = np.random.default_rng(0)
    for order in (range(n), reversed(range(n)), rng.permutation(n).tolist()):
        fold = TreeFold(operator.add)
        for i in order:
            fold.add(i, (i,))
        assert fold.result() == want
    fold = TreeFold(operator.add)
    for i in range(n):
        fold.add(i, (i,))
    assert fold.peak <= math.ceil(math.log2(n)) + 1
    assert fold.result() == want and not fold.nodes  # the partials are given up
    assert TreeFold(operator.add).result(initial=()) == ()


def test_float_fold_is_deterministic():
    """Chan's update is associative only up to rounding; the fixed tree makes it
    reproducible whatever the arrival order."""
    rng = np.random.default_rng(1)
    parts = [stats.value_range(rng.normal(size=7)) for _ in range(300)]
    results = set()
    for _ in range(3):
        fold = TreeFold(stats.merge_range)
        for i in rng.permutation(len(parts)).tolist():
            fold.add(i, parts[i])
        results.add(fold.result())
    assert len(results) == 1


def _values(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(2)
    if dtype == "float32":
        img = rng.normal(3.0, 2.0, SHAPE).astype(np.float32)
        img[rng.random(SHAPE) < 0.05] = np.nan
        return img
    return rng.integers(-700, 900, SHAPE).astype(dtype)


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_streamed_bincount_equals_numpy(client, layout):
    img = _values("int16")
    hist = stats.histogram(client, da.from_array(img, chunks=layout))
    v = img.ravel().astype(np.int64)
    lo = int(v.min())
    assert hist.exact and hist.edges[0] == lo - 0.5
    np.testing.assert_array_equal(hist.counts, np.bincount(v - lo))
    assert hist.sum == float(v.sum()) and hist.sum_sq == float(np.dot(v, v))
    assert hist.count == v.size and hist.min == v.min() and hist.max == v.max()


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_streamed_float_histogram_equals_numpy(client, layout):
    """Counts equal ``np.histogram`` exactly; the sum is the correctly rounded sum of the
    block sums (``math.fsum``), whatever order the blocks finished in."""
    img = _values("float32")
    hist = stats.histogram(client, da.from_array(img, chunks=layout), bins=97)
    v = img[~np.isnan(img)]
    counts, edges = np.histogram(v, bins=97, range=(v.min(), v.max()))
    np.testing.assert_array_equal(hist.counts, counts)
    np.testing.assert_array_equal(hist.edges, edges.astype(np.float64))
    block_sums = []
    for block in BlockGrid(SHAPE, layout):
        b = img[block.write].astype(np.float64)
        b = b[~np.isnan(b)]
        if b.size:
            block_sums.append(float(b.sum()))
    assert hist.sum == math.fsum(block_sums)
    np.testing.assert_allclose(hist.mean, v.astype(np.float64).mean(), rtol=1e-12)
    np.testing.assert_allclose(hist.std, v.astype(np.float64).std(), rtol=1e-10)


@dataclass(frozen=True)
class VoxelCount:
    """Cheap block task: the block's voxel count."""

    def __call__(self, block: Block) -> int:
        return block.write_size


@pytest.mark.slow
def test_20000_blocks_hold_a_bounded_number_of_partials(client):
    """A reduction over 20,000 tiny blocks keeps no per-block results on the client and
    never holds more partials than the in-flight window plus one per tree level."""
    grid = BlockGrid((20_000,), 1)
    window = 128
    report = run_blocks(client, grid, VoxelCount(), name="count", max_in_flight=window,
                        combine=operator.add, initial=0)
    assert report.value == 20_000 and report.computed == 20_000
    assert report.results == {}
    assert 0 < report.held_peak <= window + math.ceil(math.log2(20_000)) + 1


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_streamed_label_sizes_equal_bincount(client, tmp_path, layout):
    """Sizes of sparse, gapped ids (as sorted arrays) equal ``np.bincount`` exactly."""
    import zarr

    from engine.labels import label_sizes

    rng = np.random.default_rng(3)
    lab = (rng.integers(0, 3000, SHAPE) * 7).astype(np.uint32)  # ids 7, 14, …; 0 excluded
    arr = zarr.create_array(store=str(tmp_path / "lab"), shape=SHAPE, chunks=layout,
                            dtype=np.uint32, zarr_format=3)
    arr[...] = lab
    sizes = label_sizes(client, tmp_path / "lab")
    counts = np.bincount(lab.ravel())
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    np.testing.assert_array_equal(sizes.ids, ids)
    np.testing.assert_array_equal(sizes.counts, counts[ids])
    assert sizes.ids.dtype == np.uint64 and sizes.counts.dtype == np.int64
    assert sizes == dict(zip(ids.tolist(), counts[ids].tolist(), strict=True))


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_count_labels_equals_unique(client, tmp_path, layout, monkeypatch):
    """Distinct labels counted once however many blocks an id spans, merged over many
    shards (a budget of a few hundred rows), equal ``np.unique``; listed up to ``limit``."""
    import zarr

    from engine.labels import count_labels

    rng = np.random.default_rng(5)
    # ids spread over a wide range (gaps, and ids past 2**31), each in many blocks
    lab = rng.choice(np.r_[0, rng.integers(1, 2**32 - 1, 2500)], SHAPE).astype(np.uint32)
    arr = zarr.create_array(store=str(tmp_path / "lab"), shape=SHAPE, chunks=layout,
                            dtype=np.uint32, zarr_format=3)
    arr[...] = lab
    ids = np.unique(lab)
    ids = ids[ids > 0]
    monkeypatch.setenv("VOXELMILL_TABLE_BUDGET_MIB", str(4000 * 16 / 2**20))
    n, listed = count_labels(client, tmp_path / "lab", layout, tmp_path / "count",
                             limit=ids.size)
    assert n == ids.size and listed == ids.tolist()
    n, listed = count_labels(client, tmp_path / "lab", layout, tmp_path / "count",
                             limit=ids.size - 1)
    assert n == ids.size and listed is None
    assert not (tmp_path / "count").exists()


def test_merge_by_id_equals_a_dense_reference():
    from engine.labels import merge_by_id

    rng = np.random.default_rng(4)
    tables = []
    for _ in range(9):
        ids = np.unique(rng.integers(1, 500, 60)).astype(np.uint64)
        tables.append((ids, rng.integers(0, 100, ids.size), rng.normal(size=ids.size)))
    fold = TreeFold(lambda a, b: merge_by_id(a, b, (np.add, np.maximum)))
    for i in rng.permutation(len(tables)).tolist():
        fold.add(i, tables[i])
    ids, total, top = fold.result()
    want_total, want_top = np.zeros(500, np.int64), np.full(500, -np.inf)
    for t_ids, t_count, t_val in tables:
        np.add.at(want_total, t_ids.astype(np.int64), t_count)
        np.maximum.at(want_top, t_ids.astype(np.int64), t_val)
    present = np.flatnonzero(np.isfinite(want_top))
    np.testing.assert_array_equal(ids, present)
    np.testing.assert_array_equal(total, want_total[present])
    np.testing.assert_array_equal(top, want_top[present])


@pytest.mark.parametrize("layout", ODD_LAYOUTS)
def test_block_reduce_moments_equal_numpy(layout):
    """A segment reduction merged pairwise equals NumPy's moments of the whole array."""
    from engine.segment.blockops import reduce_blockwise
    from engine.segment.execute import Moments

    img = np.random.default_rng(5).normal(10.0, 3.0, SHAPE).astype(np.float32)
    every, inside = reduce_blockwise(Moments((9.0, 12.0, True)), img, layout)
    v = img.astype(np.float64).ravel()
    sel = v[(v >= 9.0) & (v <= 12.0)]
    for got, want in ((every, v), (inside, sel)):
        assert got["count"] == want.size
        assert got["min"] == want.min() and got["max"] == want.max()
        np.testing.assert_allclose(got["mean"], want.mean(), rtol=1e-13)
        np.testing.assert_allclose(got["std"], want.std(), rtol=1e-11)


def test_object_tables_with_a_million_ids_equal_numpy():
    """Per-object sizes and extrema of over 10⁶ ids, merged as sorted arrays over an odd
    layout, equal a dense NumPy reference."""
    from engine.labels import merge_counts
    from engine.segment.blockops import reduce_blockwise
    from engine.segment.objects import ObjectExtrema

    rng = np.random.default_rng(6)
    shape = (100, 150, 200)
    lab = rng.integers(0, 1_200_001, shape).astype(np.uint32)
    img = rng.normal(size=shape).astype(np.float32)
    ids, lo, hi = reduce_blockwise(ObjectExtrema(), [img, lab], (37, 41, 61))
    want_lo = np.full(1_200_001, np.inf, np.float32)
    want_hi = np.full(1_200_001, -np.inf, np.float32)
    np.minimum.at(want_lo, lab.ravel(), img.ravel())
    np.maximum.at(want_hi, lab.ravel(), img.ravel())
    counts = np.bincount(lab.ravel(), minlength=1_200_001)
    present = np.flatnonzero(counts)
    present = present[present > 0]
    assert present.size > 1_000_000
    np.testing.assert_array_equal(ids, present)
    np.testing.assert_array_equal(lo, want_lo[present])
    np.testing.assert_array_equal(hi, want_hi[present])

    fold = TreeFold(merge_counts)
    for n, block in enumerate(BlockGrid(shape, (37, 41, 61))):
        got_ids, got_counts = np.unique(lab[block.write], return_counts=True)
        keep = got_ids > 0
        fold.add(n, (got_ids[keep].astype(np.uint64), got_counts[keep]))
    got_ids, got_counts = fold.result()
    np.testing.assert_array_equal(got_ids, present)
    np.testing.assert_array_equal(got_counts, counts[present])


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_object_histograms_equal_numpy(tmp_path, dtype):
    """Per-object histograms (masked-object thresholding) equal NumPy's of each object's
    voxels, for integer and float images."""
    from engine.objtables import ShardedTable
    from engine.segment.blockops import reduce_blockwise
    from engine.segment.objects import (
        ObjectExtrema,
        ObjectHistograms,
        histogram_bits,
        object_histogram,
    )

    rng = np.random.default_rng(7)
    lab = rng.integers(0, 60, SHAPE).astype(np.uint32)
    img = (rng.integers(0, 4000, SHAPE) if dtype == "uint16"
           else rng.normal(size=SHAPE)).astype(dtype)
    ids, lo, hi = reduce_blockwise(ObjectExtrema(), [img, lab], (5, 7, 3))
    extrema = ShardedTable.write(tmp_path / "ext", (ids, lo, hi))
    bits = histogram_bits(img.dtype, int((hi.astype(float) - lo).max()) + 1)
    keys, counts = reduce_blockwise(ObjectHistograms(extrema, bits), [img, lab], (9, 13, 11))
    assert np.unique(keys >> np.uint64(bits)).tolist() == ids.tolist()
    for i, a, b in zip(ids.tolist(), lo, hi, strict=True):
        v = img[lab == i]
        want = (np.bincount(v.astype(np.int64) - int(a), minlength=int(b) - int(a) + 1)
                if dtype == "uint16" else np.histogram(v, bins=256, range=(a, b))[0])
        rows = (keys >> np.uint64(bits)) == i
        got = object_histogram(keys[rows], counts[rows], bits, a, b, img.dtype)
        np.testing.assert_array_equal(got.counts, want)
