"""Per-object tables sharded on disk (engine.objtables) and the size filter built on them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from engine import events
from engine.blocks import BlockGrid
from engine.labels import LabelCounts, filter_sizes
from engine.objtables import reduce_objects, shard_starts


def keep_all(table):
    return table, int(table[0].size)


def _store(path, data, chunks):
    arr = zarr.create_array(store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
                            zarr_format=3)
    arr[...] = data
    return str(path)


def test_shard_starts_cover_the_range_within_the_budget():
    starts = shard_starts(10, 1009, rows=10_000, row_bytes=16, budget=16_000)
    assert starts[0] == 10 and len(starts) == 30
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert shard_starts(5, 5, rows=1, row_bytes=16, budget=1) == (5,)
    top = 2**64 - 1
    assert shard_starts(top - 3, top, rows=4, row_bytes=16, budget=1)[-1] == top


@pytest.mark.parametrize("budget", [1 << 30, 40_000])
def test_sharded_label_sizes_equal_bincount(client, tmp_path, budget):
    rng = np.random.default_rng(3)
    lab = rng.integers(0, 20_000, (40, 50, 30)).astype(np.uint32)
    src = _store(tmp_path / "lab", lab, (13, 17, 11))
    seen: list[dict] = []
    with events.listen(seen.append):
        table, summaries = reduce_objects(
            client, BlockGrid(lab.shape, (13, 17, 11)), LabelCounts(src), ("add",), keep_all,
            tmp_path / "work", name="sizes", budget=budget)
    ends = {e["stage"]: e for e in seen if e["event"] == "stage-end"}
    assert ends["sizes-partials"]["voxels"] == lab.size
    assert ends["sizes-shards"]["voxels"] is None  # shards are id ranges, not voxels
    counts = np.bincount(lab.ravel())
    present = np.flatnonzero(counts)[1:]  # 0 is background
    assert sum(summaries) == present.size
    assert (len(table.starts) > 1) == (budget < 1 << 20)
    probe = np.arange(0, 20_001, dtype=np.uint64)
    found, rows = table.lookup(probe)
    np.testing.assert_array_equal(probe[found], present)
    np.testing.assert_array_equal(rows[2], counts[present])
    assert not (tmp_path / "work" / "parts").exists()


@pytest.mark.parametrize("relabel", [False, True])
def test_size_filter_with_huge_sparse_ids_equals_numpy(client, tmp_path, monkeypatch, relabel):
    """Ids near 2⁶⁴ (a dense lookup table would need exabytes), several shards."""
    from skimage.segmentation import relabel_sequential

    monkeypatch.setenv("VOXELMILL_TABLE_BUDGET_MIB", "0.01")
    rng = np.random.default_rng(8)
    pool = np.array([0, 7, 2**40 + 3, 2**63 + 11, 2**64 - 2, 2**64 - 1, 12345], np.uint64)
    lab = pool[rng.integers(0, pool.size, (20, 24, 18))]
    lab[:5] = 2**40 + 3  # one large object
    src = _store(tmp_path / "lab", lab, (6, 7, 5))
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    low = int(np.median(counts))
    n = filter_sizes(client, src, tmp_path / "out", min_size=low, relabel=relabel)
    keep = ids[counts >= low]
    want = np.where(np.isin(lab, keep), lab, 0)
    if relabel:
        want = relabel_sequential(want)[0]
    assert n == keep.size
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out"), mode="r")[...], want)


def test_masked_object_over_many_shards_equals_allen(client, tmp_path, monkeypatch):
    """Many objects, per-object tables cut into several shards by a tiny budget: the
    masked-object threshold still equals the Allen segmenter's algorithm."""
    from tests.segment_helpers import blobs, run_steps
    from tests.test_segment_steps import allen_masked_object

    monkeypatch.setenv("VOXELMILL_TABLE_BUDGET_MIB", "0.002")
    img = blobs((24, 40, 36), 3, sigma=1.2)
    ref = allen_masked_object(img, "triangle", 10, 0.98)
    got = run_steps(client, tmp_path, img, [
        {"name": "mo", "function": "masked_object",
         "parameters": {"global_method": "triangle", "object_min_size": 10,
                        "local_adjust": 0.98}}], (8, 13, 12))
    shards = list((tmp_path / "mo-tables" / "otsu").glob("shard-*.c0.npy"))
    assert len(shards) > 1
    assert ref.any() and not ref.all()
    np.testing.assert_array_equal(got, ref)
