"""The face graph's merge tree: its geometry, and tables bounded by the boxes' surfaces."""

from __future__ import annotations

import itertools

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from engine.facegraph import FacePairs, FaceTree
from engine.labelfiles import SHIFT, load_arrays
from engine.labels import label


def _tree(grid_shape, connectivity=1, work="unused"):
    struct = ndi.generate_binary_structure(len(grid_shape), connectivity)
    return FaceTree(FacePairs(work, struct, grid_shape))


@pytest.mark.parametrize("grid_shape", [(1,), (5,), (5, 1, 3), (4, 4), (3, 7, 2)])
def test_every_block_descends_from_the_root_once(grid_shape):
    tree = _tree(grid_shape)
    assert tree.levels == max(int(g - 1).bit_length() for g in grid_shape)
    assert tree.shape(tree.levels) == (1,) * len(grid_shape)
    if tree.levels == 0:
        return
    # walk down from the root: every level's nodes are somebody's child exactly once
    nodes = [(0,) * len(grid_shape)]
    for level in range(tree.levels, 0, -1):
        below = [c for n in nodes for c in tree.children(level, n)]
        assert len(below) == len(set(below)) == int(np.prod(tree.shape(level - 1)))
        for n in nodes:
            lo, hi = tree.box(level, n)
            kids = tree.children(level, n)
            for pos, c in enumerate(kids):
                assert tree.position(level - 1, c) == (n, pos)
                clo, chi = tree.box(level - 1, c) if level > 1 else (c, tuple(i + 1 for i in c))
                assert all(a <= b < d <= e for a, b, d, e in zip(lo, clo, chi, hi, strict=True))
        nodes = below
    assert sorted(nodes) == sorted(itertools.product(*map(range, grid_shape)))


@pytest.mark.parametrize(("connectivity", "density"), [(1, 0.3), (3, 0.08)])
def test_node_tables_hold_only_the_surface_of_their_box(client, tmp_path, connectivity,
                                                        density):
    """Noise just below percolation in 4³ blocks (many objects cross faces): each node
    keeps open only face components on its box's surface, at most one per surface voxel,
    and only pairs with an end outside the box; the root keeps nothing open. Labels equal
    scipy's."""
    mask = np.random.default_rng(connectivity).random((22, 24, 19)) < density
    struct = ndi.generate_binary_structure(3, connectivity)
    res = label(client, da.from_array(mask, chunks=(4, 4, 4)), tmp_path / "lab",
                connectivity=connectivity, lazy=True)
    np.testing.assert_array_equal(res.source.read_region((slice(0, 22), slice(0, 24),
                                                          slice(0, 19))),
                                  ndi.label(mask, structure=struct)[0])
    gshape = (6, 6, 5)
    tree = _tree(gshape, connectivity, str(res.work))
    assert tree.levels == 3
    closed = 0
    for level in range(1, tree.levels + 1):
        for node in itertools.product(*map(range, tree.shape(level))):
            f = load_arrays(tree.node_file(level, node))
            lo, hi = tree.box(level, node)
            where = np.unravel_index((f["bcomp"] >> SHIFT).astype(np.int64), gshape)
            on_surface = np.zeros(len(f["bcomp"]), bool)
            for k in range(3):
                on_surface |= (where[k] == lo[k]) & (lo[k] > 0)
                on_surface |= (where[k] == hi[k] - 1) & (hi[k] < gshape[k])
            assert on_surface.all()
            dims = [min(b * 4, s) - a * 4 for a, b, s in zip(lo, hi, mask.shape, strict=True)]
            surface = np.prod(dims) - np.prod([max(d - 2, 0) for d in dims])
            assert len(np.unique(f["bclass"])) <= len(f["bcomp"]) <= surface
            ends = [np.unravel_index((f["xpairs"][:, i] >> SHIFT).astype(np.int64), gshape)
                    for i in (0, 1)]
            inside = np.ones(len(f["xpairs"]), bool)
            for idx in ends:
                for k in range(3):
                    inside &= (idx[k] >= lo[k]) & (idx[k] < hi[k])
            assert not inside.any()
            closed += len(f["key"]) - len(np.unique(f["bclass"]))
            if level == tree.levels:
                assert len(f["bcomp"]) == len(f["xpairs"]) == 0
    # every object that has a face component is closed at exactly one node
    faces = set()
    for index in itertools.product(*map(range, gshape)):
        faces.update(tree.faces_of(index)[0].tolist())
    assert closed == len(faces) > 100


def test_the_client_receives_nothing_per_face_component(client, tmp_path, monkeypatch):
    """Every block result the client gathers while labelling is a few numbers, for a grid
    with a handful of face components as for the same grid full of them (noise below
    percolation: thousands): no face table or pair list travels to the client."""
    import pickle

    import distributed

    import engine.labels as labelling

    monkeypatch.setattr(labelling, "VALUES_LIMIT", 0)  # no list of ids per block either
    sizes: list[int] = []  # pickled bytes of each block's result
    original = distributed.Client.gather

    def counting(self, futures, *args, **kwargs):
        values = original(self, futures, *args, **kwargs)
        for bundle in values:  # a task's value: (result, seconds, first) per block
            sizes.extend(len(pickle.dumps(result)) for result, *_ in bundle)
        return values

    monkeypatch.setattr(distributed.Client, "gather", counting)
    sparse = np.zeros((32, 32, 32), bool)
    sparse[2:30, 10:12, 10:12] = True  # one rod through four blocks
    dense = np.random.default_rng(0).random((32, 32, 32)) < 0.25
    received = []
    for name, mask in (("sparse", sparse), ("dense", dense)):
        sizes.clear()
        res = label(client, da.from_array(mask, chunks=(8, 8, 8)), tmp_path / name,
                    connectivity=1)
        assert res.n_labels == ndi.label(mask)[1]
        received.append(list(sizes))
    faces = 0
    for index in itertools.product(range(4), repeat=3):  # the dense grid's face components
        sl = tuple(slice(8 * i, 8 * i + 8) for i in index)
        local, _ = ndi.label(dense[sl])
        faces += len(np.unique(np.concatenate([local[0].ravel(), local[-1].ravel(),
                                               local[:, 0].ravel(), local[:, -1].ravel(),
                                               local[..., 0].ravel(), local[..., -1].ravel()])))
    assert faces > 1000
    # results: the local and tree passes' None, a slab's two counts, a block's largest id
    # and count of interior objects (and, in an empty block, its empty list of ids)
    assert max(max(r) for r in received) < 160
    assert len(received[0]) == len(received[1]) >= 64 + 4 + 64
    assert sum(received[1]) < 1.1 * sum(received[0])


def test_tree_passes_report_no_voxels(client, tmp_path):
    """The stage events of the merge, resolve and ranks passes (over tree nodes, rows and
    slabs of blocks) give no voxels or Mvoxel/s; the local and relabel passes count the volume's."""
    from engine import events

    mask = np.random.default_rng(1).random((20, 20, 20)) < 0.2
    seen: list[dict] = []
    with events.listen(seen.append):
        label(client, da.from_array(mask, chunks=(5, 5, 5)), tmp_path / "lab")
    ends = {e["stage"]: e for e in seen if e["event"] == "stage-end"}
    assert ends["label-local"]["voxels"] == ends["label-relabel"]["voxels"] == mask.size
    nodes = [e for name, e in ends.items() if name.startswith(
        ("label-merge", "label-resolve", "label-ranks"))]
    assert len(nodes) == 6  # two levels each way over 4 x 4 x 4 blocks, rows and slabs
    assert all(e["voxels"] is None and e["mvoxels_per_s"] is None for e in nodes)
