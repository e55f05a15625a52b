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
