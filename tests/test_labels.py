"""Connected components across blocks equal scipy.ndimage.label on the whole array."""

from __future__ import annotations

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
    assert len(list((res.work / "maps").iterdir())) == 2 * 3 * 2


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
    assert set(kept) == set(ids[counts >= small].tolist())
    band = filter_sizes(client, res.path, tmp_path / "band", min_size=5, max_size=small)
    want = np.where(np.isin(ref, ids[(counts >= 5) & (counts <= small)]), ref, 0)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "band"), mode="r")[...], want)
    assert set(band) == set(ids[(counts >= 5) & (counts <= small)].tolist())
