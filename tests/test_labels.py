"""Connected components across blocks equal scipy.ndimage.label on the whole array."""

from __future__ import annotations

import time
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from engine.errors import OptionError
from engine.labels import label


def _blobs(shape, seed, threshold=0.75, sigma=1.5):
    rng = np.random.default_rng(seed)
    smooth = ndi.gaussian_filter(rng.random(shape), sigma)
    return smooth > np.quantile(smooth, threshold)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("block", [(7, 13, 10), (16, 16, 16), (30, 41, 25)])
def test_3d_labels_identical_to_whole_volume(client, tmp_path, connectivity, block):
    mask = _blobs((30, 41, 25), seed=connectivity)
    ref, n = ndi.label(mask, structure=ndi.generate_binary_structure(3, connectivity))
    res = label(client, da.from_array(mask, chunks=block), tmp_path / "lab",
                connectivity=connectivity)
    got = zarr.open_array(str(res.path), mode="r")[...]
    assert res.n_labels == n > 5
    np.testing.assert_array_equal(got, ref)  # same ids, not just the same partition
    assert not any(p.name.endswith("labels-work") for p in tmp_path.iterdir())


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("slice_wise", [False, True])
def test_noise_linked_through_edges_and_corners(client, tmp_path, connectivity, slice_wise):
    """Sparse noise (a third of the voxels) in 4³ blocks: objects join across block
    faces, edges and corners only through diagonal steps, so a neighbour block the face
    pass skipped (it reads only those its structure reaches) would split them."""
    mask = np.random.default_rng(connectivity).random((13, 14, 15)) < 0.3
    struct = ndi.generate_binary_structure(3, connectivity)
    if slice_wise:
        struct[0] = struct[2] = False
    ref, n = ndi.label(mask, structure=struct)
    res = label(client, da.from_array(mask, chunks=(4, 4, 4)), tmp_path / "lab",
                connectivity=connectivity, slice_wise=slice_wise)
    np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...], ref)
    assert res.n_labels == n


@pytest.mark.parametrize("connectivity", [1, 2])
def test_2d_snakes_crossing_many_blocks(client, tmp_path, connectivity):
    # a spiral and diagonal chains: components that wind through many blocks and touch
    # only at corners
    mask = np.zeros((64, 64), bool)
    mask[2, 2:60] = mask[2:60, 59] = mask[59, 5:60] = mask[10:60, 5] = True
    for i in range(20, 50):
        mask[i, i] = True  # diagonal: one object only with corner connectivity
    ref, n = ndi.label(mask, structure=ndi.generate_binary_structure(2, connectivity))
    res = label(client, da.from_array(mask, chunks=(5, 7)), tmp_path / "lab",
                connectivity=connectivity)
    np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...], ref)
    assert res.n_labels == n


def test_empty_and_full_masks(client, tmp_path):
    for value in (False, True):
        mask = np.full((12, 9), value)
        res = label(client, da.from_array(mask, chunks=(5, 4)), tmp_path / f"l{value}")
        got = zarr.open_array(str(res.path), mode="r")[...]
        np.testing.assert_array_equal(got, ndi.label(mask)[0])


def test_bad_connectivity(client, tmp_path):
    with pytest.raises(OptionError, match="connectivity 4"):
        label(client, da.zeros((4, 4, 4), chunks=2, dtype=bool), tmp_path / "x",
              connectivity=4)


def test_lazy_view_applies_the_block_maps_on_read(client, tmp_path):
    mask = _blobs((30, 41, 25), seed=9)
    ref, n = ndi.label(mask, structure=ndi.generate_binary_structure(3, 3))
    res = label(client, da.from_array(mask, chunks=(8, 16, 16)), tmp_path / "lab",
                connectivity=3, block_shape=(16, 16, 16), lazy=True)
    assert res.path is None and res.n_labels == n
    np.testing.assert_array_equal(res.view.compute(), ref)
    np.testing.assert_array_equal(res.view[3:20, 10:30, 5:9].compute(), ref[3:20, 10:30, 5:9])
    assert (res.work / "maps").is_dir()  # the maps stay on disk, one file per block
    assert len(list((res.work / "maps").glob("[0-9]*.npy"))) == 2 * 3 * 2
    # the reference block tasks read: the same labels, for regions across block borders,
    # and it pickles small (paths and shapes, not a task per block)
    import pickle

    src = res.source
    assert src.dtype == res.dtype
    for region in [(slice(0, 30), slice(0, 41), slice(0, 25)),
                   (slice(3, 20), slice(10, 33), slice(5, 9)),
                   (slice(16, 30), slice(32, 41), slice(0, 16))]:
        np.testing.assert_array_equal(src.read_region(region), ref[region])
    assert len(pickle.dumps(src)) < 1000


def test_size_filter_uses_global_sizes_of_objects_cut_by_blocks(client, tmp_path):
    from skimage.morphology import remove_small_objects

    from engine.labels import filter_sizes, label_sizes

    mask = _blobs((30, 41, 25), seed=4, threshold=0.8)
    ref, _ = ndi.label(mask)
    res = label(client, da.from_array(mask, chunks=(7, 9, 8)), tmp_path / "lab")
    sizes = label_sizes(client, res.path)
    ids, counts = np.unique(ref[ref > 0], return_counts=True)
    assert sizes == dict(zip(ids.tolist(), counts.tolist(), strict=True))
    # thresholds between object sizes, so both kept and removed objects span blocks
    small = int(np.median(counts))
    kept = filter_sizes(client, res.path, tmp_path / "kept", min_size=small)
    got = zarr.open_array(str(tmp_path / "kept"), mode="r")[...]
    np.testing.assert_array_equal(got, remove_small_objects(ref, max_size=small - 1))
    assert kept == np.count_nonzero(counts >= small)
    band = filter_sizes(client, res.path, tmp_path / "band", min_size=5, max_size=small)
    want = np.where(np.isin(ref, ids[(counts >= 5) & (counts <= small)]), ref, 0)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "band"), mode="r")[...], want)
    assert band == np.count_nonzero((counts >= 5) & (counts <= small))


def test_scratch_folders_beside_the_output_are_never_someone_elses(client, tmp_path):
    """The labelling's work folder and the size filter's scratch are hidden siblings of the
    output: a file or folder of that name that voxelmill did not make is refused with its
    name, untouched; one voxelmill left (marked, or of an older version) is replaced."""
    from engine.errors import DestinationError
    from engine.labels import filter_sizes
    from engine.output import SCRATCH_MARK

    mask = _blobs((20, 21, 22), seed=6)
    ref, _ = ndi.label(mask)
    work = tmp_path / ".lab.labels-work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(DestinationError, match=r"\.lab\.labels-work"):
        label(client, da.from_array(mask, chunks=8), tmp_path / "lab")
    assert (work / "notes" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lab.labels-work"]
    (tmp_path / ".sizes-user").write_text("keep")
    (tmp_path / ".kept.sizes").symlink_to(tmp_path / ".sizes-user")
    for work, leftover in ((tmp_path / ".lab2.labels-work", SCRATCH_MARK),
                           (tmp_path / ".lab3.labels-work", "blocks")):
        (work / leftover).mkdir(parents=True)  # an earlier run's: replaced
        res = label(client, da.from_array(mask, chunks=8), work.parent / work.name[1:-12])
        np.testing.assert_array_equal(zarr.open_array(str(res.path))[...], ref)
        assert not work.exists()
    with pytest.raises(DestinationError, match=r"\.kept\.sizes"):
        filter_sizes(client, res.path, tmp_path / "kept", min_size=3)
    assert (tmp_path / ".sizes-user").read_text() == "keep" and not (tmp_path / "kept").exists()
    (tmp_path / ".kept.sizes").unlink()
    (tmp_path / ".kept.sizes").mkdir()  # empty: taken over, and removed after
    assert filter_sizes(client, res.path, tmp_path / "kept", min_size=3) > 3
    assert not (tmp_path / ".kept.sizes").exists()


def _reference(mask, connectivity, min_size=0, max_size=None, sequential=False):
    from skimage.measure import label as sk_label

    ref = sk_label(mask, connectivity=connectivity)
    ids, counts = np.unique(ref[ref > 0], return_counts=True)
    keep = (counts >= min_size) & (counts <= (max_size if max_size is not None else np.inf))
    ref = np.where(np.isin(ref, ids[keep]), ref, 0)
    if sequential:
        ref = sk_label(ref > 0, connectivity=connectivity)
    return ref


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("block", [(5, 7, 6), (11, 40, 1), (29, 1, 24)])
def test_fused_size_filter_equals_skimage(client, tmp_path, sequential, block):
    mask = _blobs((29, 41, 25), seed=11, threshold=0.7, sigma=1.2)
    full = _reference(mask, 3)
    counts = np.bincount(full.ravel())[1:]
    lo, hi = int(np.percentile(counts, 30)), int(np.percentile(counts, 90))
    ref = _reference(mask, 3, lo, hi, sequential)
    res = label(client, da.from_array(mask, chunks=block), tmp_path / "lab",
                connectivity=None, min_size=lo, max_size=hi, sequential=sequential)
    np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...], ref)
    assert res.n_labels == ref.max()
    assert res.n_objects == len(np.unique(ref)) - 1


def test_3d_corner_chain_through_many_blocks(client, tmp_path):
    # a diagonal staircase touching only at corners: one object with full connectivity,
    # one voxel per object with face connectivity; plus a helix winding through blocks
    mask = np.zeros((24, 24, 24), bool)
    for i in range(24):
        mask[i, i, 23 - i] = True
    t = np.linspace(0, 6 * np.pi, 400)
    z = np.clip((t / t.max() * 23).round().astype(int), 0, 23)
    y = (12 + 9 * np.sin(t)).round().astype(int)
    x = (12 + 9 * np.cos(t)).round().astype(int)
    mask[z, y, x] = True
    for connectivity in (1, 2, 3):
        ref = _reference(mask, connectivity)
        res = label(client, da.from_array(mask, chunks=(6, 7, 5)), tmp_path / f"c{connectivity}",
                    connectivity=connectivity)
        np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...], ref)


def test_slice_wise_labels_every_plane_alone(client, tmp_path):
    mask = _blobs((9, 30, 31), seed=3, threshold=0.6)
    ref = np.zeros(mask.shape, np.int64)
    offset = 0
    for z in range(mask.shape[0]):  # planes labelled alone, numbered in raster order
        lab, n = ndi.label(mask[z], structure=np.ones((3, 3)))
        ref[z] = np.where(lab > 0, lab + offset, 0)
        offset += n
    res = label(client, da.from_array(mask, chunks=(2, 7, 9)), tmp_path / "lab",
                connectivity=3, slice_wise=True)
    np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...], ref)


def test_label_reads_zarr_paths_and_views(client, tmp_path):
    from dataclasses import dataclass

    mask = _blobs((20, 33), seed=5, threshold=0.5)
    zarr.create_array(store=str(tmp_path / "img"), data=(~mask).astype(np.uint8),
                      chunks=(6, 8))

    @dataclass(frozen=True)
    class Inverted:  # a derived view: anything with read_region works as the mask
        path: str
        shape: tuple = (20, 33)
        chunks: tuple = (6, 8)

        def read_region(self, region):
            return zarr.open_array(self.path, mode="r")[region] == 0

    res = label(client, Inverted(str(tmp_path / "img")), tmp_path / "lab", connectivity=2)
    np.testing.assert_array_equal(zarr.open_array(str(res.path), mode="r")[...],
                                  _reference(mask, 2))


def test_property_any_layout_any_connectivity_equals_skimage(client):
    """Random masks, random block shapes (odd sizes, 1-voxel blocks and remainders)."""
    import tempfile
    from pathlib import Path

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from skimage.measure import label as sk_label

    @st.composite
    def cases(draw):
        ndim = draw(st.integers(2, 3))
        shape = tuple(draw(st.integers(1, 13)) for _ in range(ndim))
        block = tuple(draw(st.integers(1, s)) for s in shape)
        density = draw(st.floats(0.2, 0.8))
        seed = draw(st.integers(0, 2**16))
        connectivity = draw(st.integers(1, ndim))
        mask = np.random.default_rng(seed).random(shape) < density
        return mask, block, connectivity

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case):
        mask, block, connectivity = case
        with tempfile.TemporaryDirectory() as tmp:
            res = label(client, da.from_array(mask, chunks=block), Path(tmp) / "lab",
                        connectivity=connectivity)
            got = zarr.open_array(str(res.path), mode="r")[...]
        np.testing.assert_array_equal(got, sk_label(mask, connectivity=connectivity))

    check()


@dataclass(frozen=True)
class SlowLast:
    """A mask whose region at the far corner takes a while to read."""

    data: np.ndarray
    chunks: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def read_region(self, region: tuple[slice, ...]) -> np.ndarray:
        if all(r.stop == s for r, s in zip(region, self.data.shape, strict=True)):
            time.sleep(1.5)
        return self.data[region]


def test_faces_are_paired_while_other_blocks_are_still_labelled(client, tmp_path,
                                                                  monkeypatch):
    from engine import facegraph

    paired: list[float] = []  # the in-process cluster runs the tasks in this process
    original = facegraph.FacePairs.pairs
    monkeypatch.setattr(facegraph.FacePairs, "pairs",
                        lambda self, index, files=None: paired.append(time.time())
                        or original(self, index, files))
    mask = _blobs((40, 40), seed=3)
    # 8 x 8 blocks: the first box of the face graph's tree (2 x 2 blocks, paired with the
    # next row and column) waits on blocks far ahead of the slow last one, which on a 4 x 4
    # grid could share its bundle
    res = label(client, SlowLast(mask, (5, 5)), tmp_path / "lab", connectivity=2,
                lazy=True)
    np.testing.assert_array_equal(res.source.read_region((slice(0, 40), slice(0, 40))),
                                  ndi.label(mask, structure=np.ones((3, 3), bool))[0])
    # faces were paired before the slow last block's labels were stored
    assert len(paired) == 64
    assert min(paired) < (res.work / "blocks" / "63.bin").stat().st_mtime


def test_concatenate_tables_consumes_list_partials_only():
    """Block results (tuples) are left as they are; the fold's partials (lists) give up
    each column once it is joined, so no second copy of a whole table is held."""
    from engine.labels import concatenate_tables

    block = (np.arange(3), np.arange(3) * 10)
    partial = [np.arange(2), np.arange(2) * 10]
    out = concatenate_tables(partial, block)
    np.testing.assert_array_equal(out[0], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(out[1], [0, 10, 0, 10, 20])
    assert partial == [None, None]
    np.testing.assert_array_equal(block[1], [0, 10, 20])
    with pytest.raises(ValueError, match="2 and 1 columns"):
        concatenate_tables(block, (np.arange(1),))
