"""Raster-order ranks over a grid of blocks (engine.ranks) equal a sort of all the keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blocks import Block
from engine.labelfiles import load_arrays
from engine.ranks import GroupCounts, Ranker, RankGrid


def _keys_in_blocks(keys: np.ndarray, grid: RankGrid):
    """``keys_of`` for a set of keys: each block's keys, sorted, and how many there are."""
    pos = np.unravel_index(keys, grid.shape)
    flat = np.ravel_multi_index(tuple(p // b for p, b in zip(pos, grid.block_shape,
                                                            strict=True)), grid.grid_shape)

    def keys_of(index):
        mine = np.sort(keys[flat == np.ravel_multi_index(index, grid.grid_shape)])
        return mine, len(mine)
    return keys_of


def _run_levels(grid: RankGrid, keys_of) -> tuple[int, ...]:
    """Every level's pass, lowest first, as the runner would; the slabs' offsets."""
    grid.make_folders()
    results = {}
    for level in range(grid.top, -1, -1):
        task = GroupCounts(grid, level, keys_of)
        for index in np.ndindex(*grid.grid_shape[:level + 1]):
            results[(level, index)] = task(Block(index, (), (), ()))
    counts = [results[(0, (s,))][0] for s in range(grid.grid_shape[0])]
    return tuple(int(o) for o in np.concatenate([[0], np.cumsum(counts)]))


def _check(tmp_path, shape, block_shape, density, seed):
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    keys = np.flatnonzero(rng.random(size) < density).astype(np.uint64)
    grid = RankGrid(tuple(shape), tuple(block_shape), str(tmp_path))
    offsets = _run_levels(grid, _keys_in_blocks(keys, grid))
    assert offsets[-1] == len(keys)
    shuffled = rng.permutation(keys)
    # the reference: position in the sorted list of all keys
    expected = np.searchsorted(np.sort(keys), shuffled)
    ranker = Ranker(grid, offsets)
    np.testing.assert_array_equal(ranker.ranks(shuffled), expected)
    keys_of = _keys_in_blocks(keys, grid)
    for index in np.ndindex(*grid.grid_shape):  # keys known to lie in one block
        mine = keys_of(index)[0]
        np.testing.assert_array_equal(ranker.ranks_in(index, mine),
                                      np.searchsorted(np.sort(keys), mine))
    return grid


@pytest.mark.parametrize(("shape", "block_shape"), [
    ((37,), (8,)), ((13, 29), (4, 6)), ((9, 11, 14), (4, 3, 5)), ((5, 6, 7, 8), (2, 4, 3, 3)),
    ((16, 16, 16), (16, 16, 16)), ((7, 1, 30), (3, 1, 7))])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.6, 1.0])
def test_ranks_equal_a_sort_of_all_keys(tmp_path, shape, block_shape, density):
    _check(tmp_path, shape, block_shape, density, seed=len(shape))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ranks_on_any_layout(tmp_path_factory, data):
    ndim = data.draw(st.integers(1, 4))
    shape = tuple(data.draw(st.integers(1, 12)) for _ in range(ndim))
    block = tuple(data.draw(st.integers(1, s)) for s in shape)
    density = data.draw(st.sampled_from([0.02, 0.3, 0.9]))
    _check(tmp_path_factory.mktemp("r"), shape, block, density, data.draw(st.integers(0, 99)))


def test_files_hold_a_block_face_at_most(tmp_path):
    """No file (what a task holds) grows with the volume's cross-section: block files hold
    a block's keys and a face of counts, group files a face of counts at most."""
    shape, block = (12, 96, 96), (4, 8, 8)
    grid = _check(tmp_path, shape, block, 0.5, seed=5)
    face = block[0] * block[1]
    for path in (tmp_path / "ranks").rglob("*"):
        if path.is_file():
            arrays = load_arrays(path)
            assert all(a.size <= face for name, a in arrays.items() if name != "keys"), path
            if "keys" in arrays:
                assert arrays["keys"].size <= math.prod(block)
    assert len(list((tmp_path / "ranks" / "blocks").iterdir())) == math.prod(grid.grid_shape)
