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
