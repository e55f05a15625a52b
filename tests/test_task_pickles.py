"""What a block task carries does not grow with the volume (issue 17): readers, not graphs.

A dask array's graph holds a task per chunk, so a block task that carried one built (and
culled) O(blocks) graph entries per block to read its region, O(blocks²) per pass. Each
reader here is pickled for a volume of 4 chunks and one of 400: the sizes must be equal
(the dask array's graph grows a hundredfold), and it reads the same voxels as the dask
array.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

import engine.runner
from engine.io import open_volume
from engine.io.sources import InMemorySource, reader_of, view
from engine.pyramid import build_pyramid, plan_levels

SMALL, LARGE = (8, 8, 4), (16, 40, 40)  # 4 and 400 chunks of 4³
CHUNK = 4


def _zarr_array(path: Path, shape: tuple[int, ...], stored: str) -> np.ndarray:
    """A plain zarr array of ``shape`` (NGFF order) stored in the axis order ``stored``."""
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    order = ["zyx".index(a) for a in stored]
    arr = zarr.create_array(store=str(path), shape=data.transpose(order).shape,
                            chunks=(CHUNK,) * 3, dtype=data.dtype, zarr_format=3)
    arr[...] = data.transpose(order)
    return data


@pytest.mark.parametrize("stored", ["zyx", "xzy"])
def test_a_volume_reader_pickles_the_same_for_4_and_400_chunks(tmp_path, stored):
    sizes, graphs = [], []
    for name, shape in (("a", SMALL), ("b", LARGE)):
        data = _zarr_array(tmp_path / f"{name}.zarr", shape, stored)
        vol = open_volume(tmp_path / f"{name}.zarr", axes=stored)
        reader = reader_of(vol.data)
        sizes.append(len(pickle.dumps(reader)))
        graphs.append(len(vol.data.__dask_graph__()))  # tasks a read materialized before
        region = (slice(1, 7), slice(3, 8), slice(0, 3))
        np.testing.assert_array_equal(reader.read_region(region), data[region])
        np.testing.assert_array_equal(reader.read_region(region), vol.data[region].compute())
    assert sizes[0] == sizes[1]
    assert graphs[1] >= 100 * graphs[0] / 2


def test_a_view_matches_numpy_indexing_and_nests_into_one():
    data = np.arange(2 * 3 * 4 * 5, dtype=">i4").reshape(2, 3, 4, 5)
    src = InMemorySource(data)
    inner = view(src, order=(3, 1, 0, 2))  # x, c, t, z
    outer = view(inner, index=(None, 2, None, None), order=(2, 1, 0))  # z, t, x at c = 2
    expect = data.transpose(3, 1, 0, 2)[:, 2].transpose(2, 1, 0)
    assert outer.shape == expect.shape and outer.dtype == np.dtype("<i4")
    assert outer.base is src  # one view of the file, whatever was chained
    region = (slice(1, 4), slice(0, 2), slice(2, 5))
    np.testing.assert_array_equal(outer.read_region(region), expect[region])
    scaled = view(src, dtype=np.float32, scaling=(0.5, 2.0))
    np.testing.assert_array_equal(scaled.read_region((slice(0, 2),) * 4),
                                  data[:2, :2, :2, :2].astype(np.float32) * np.float32(0.5)
                                  + np.float32(2.0))


def test_reader_of_refuses_a_dask_graph():
    with pytest.raises(TypeError, match="dask graph"):
        reader_of(da.zeros((8, 8), chunks=4) + 1)


def test_a_pyramid_task_pickles_the_same_for_4_and_400_blocks(tmp_path, monkeypatch):
    """The convert path: ``build_pyramid`` given the volume's dask array, as convert gives
    it, builds tasks that carry the file's reader."""
    seen = []
    monkeypatch.setattr(engine.runner, "run_passes", lambda client, passes, **_: seen.extend(
        (len(p.grid), p.task) for p in passes))
    for name, shape in (("a", SMALL), ("b", LARGE)):
        _zarr_array(tmp_path / f"{name}.zarr", shape, "zyx")
        vol = open_volume(tmp_path / f"{name}.zarr", axes="zyx")
        levels = plan_levels(shape, "zyx", (1.0,) * 3, (CHUNK,) * 3, max_levels=1)
        build_pyramid(None, vol.data, tmp_path / f"{name}.out", levels, (CHUNK,) * 3,
                      budget_bytes=CHUNK**3 * 2)
    (n_small, small), (n_large, large) = seen
    assert (n_small, n_large) == (4, 400)
    assert len(pickle.dumps(small)) == len(pickle.dumps(large))
