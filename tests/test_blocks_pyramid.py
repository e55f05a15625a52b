"""The block grid and the pyramid: blockwise equals whole-array, on odd layouts too."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import zarr
from skimage.transform import downscale_local_mean

from engine.blocks import BlockGrid, pad_read
from engine.errors import OptionError
from engine.io.omezarr import create_level
from engine.io.sources import InMemorySource
from engine.pyramid import (
    build_pyramid,
    downsample_mean,
    downsample_mode,
    plan_levels,
    plan_passes,
)


def test_grid_tiles_the_volume_exactly_once_with_halos():
    grid = BlockGrid((37, 50, 23), (16, 20, 23), halo=(2, 3, 0), chunks=(8, 10, 23))
    assert grid.grid_shape == (3, 3, 1) and len(grid) == 9
    cover = np.zeros((37, 50, 23), np.int32)
    data = np.arange(37 * 50 * 23, dtype=np.float64).reshape(37, 50, 23)
    for b in grid:
        cover[b.write] += 1
        padded = pad_read(data[b.read], b, mode="reflect")
        assert padded.shape == tuple(s + 2 * h for s, h in zip(b.shape, grid.halo, strict=True))
        np.testing.assert_array_equal(padded[b.crop], data[b.write])
        # the padding equals numpy's whole-array padding, cut at the same place
        whole = np.pad(data, [(h, h) for h in grid.halo], mode="reflect")
        ref = whole[tuple(slice(w.start, w.stop + 2 * h) for w, h in
                          zip(b.write, grid.halo, strict=True))]
        np.testing.assert_array_equal(padded, ref)
    assert (cover == 1).all()


def test_misaligned_blocks_are_refused():
    with pytest.raises(OptionError, match="not aligned"):
        BlockGrid((64, 64), (24, 32), chunks=(16, 16))


def test_layout_hash_changes_with_layout_and_identity():
    a = BlockGrid((64, 64), 32).layout_hash(op="x", sigma=1.0)
    assert a == BlockGrid((64, 64), 32).layout_hash(op="x", sigma=1.0)
    assert a != BlockGrid((64, 64), 16).layout_hash(op="x", sigma=1.0)
    assert a != BlockGrid((64, 64), 32).layout_hash(op="x", sigma=2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16])
def test_mean_matches_scikit_image_on_even_shapes(dtype):
    rng = np.random.default_rng(0)
    data = (rng.random((16, 24, 32)) * 200).astype(dtype)
    got = downsample_mean(data, (2, 2, 2))
    ref = downscale_local_mean(data.astype(np.float64), (2, 2, 2))
    if np.dtype(dtype).kind == "f":
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, np.rint(ref).astype(dtype))


def test_mode_picks_the_majority_label():
    lab = np.zeros((4, 4), np.uint16)
    lab[:2, :2] = [[5, 5], [5, 7]]
    lab[:2, 2:] = [[1, 2], [2, 3]]
    lab[2:, :2] = [[9, 9], [9, 9]]
    out = downsample_mode(lab, (2, 2))
    assert out.tolist() == [[5, 2], [9, 0]]


def test_anisotropic_volumes_halve_xy_first():
    levels = plan_levels((40, 512, 512), "zyx", (4.0, 1.0, 1.0), (64, 64, 64))
    assert [lv.factors for lv in levels[1:3]] == [(1, 2, 2), (1, 2, 2)]
    assert levels[3].factors == (2, 2, 2)
    assert all(s <= 64 for s in levels[-1].shape)
    # NGFF translation puts each level's voxel centres where the mean put them
    assert levels[1].translation == (0.0, 0.5, 0.5)


def _whole_pyramid(data, levels, method):
    down = downsample_mean if method == "mean" else downsample_mode
    out = [data]
    for lv in levels[1:]:
        out.append(down(out[-1], lv.factors))
    return out


@pytest.mark.parametrize("shape,chunks,budget", [
    ((37, 70, 53), (8, 16, 16), 2**14),      # odd shape, tiny budget: many passes
    ((37, 70, 53), (16, 16, 16), 2**22),     # fused levels
    ((3, 101, 77), (1, 32, 32), 2**16),      # channels, 2D
    ((64, 64, 64), (64, 64, 64), 2**26),     # a single chunk, no pyramid
])
@pytest.mark.parametrize("method", ["mean", "mode"])
def test_blockwise_pyramid_equals_whole_array(client, tmp_path, shape, chunks, budget, method):
    rng = np.random.default_rng(1)
    if method == "mean":
        data = rng.normal(size=shape).astype(np.float32)
    else:
        data = rng.integers(0, 5, size=shape).astype(np.uint32)
    axes = "cyx" if shape[0] == 3 else "zyx"
    levels = plan_levels(shape, axes, (1.0,) * 3, chunks)
    assert len(plan_passes(levels, chunks, data.itemsize, budget)) >= 1
    for i, lv in enumerate(levels):
        create_level(tmp_path, str(i), lv.shape, [min(c, s) for c, s in
                     zip(chunks, lv.shape, strict=True)], data.dtype, axes, "0.5")
    build_pyramid(client, InMemorySource(data), tmp_path, levels, chunks,
                  method=method, budget_bytes=budget)
    for i, ref in enumerate(_whole_pyramid(data, levels, method)):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / str(i)))[...], ref)


def test_write_covering_part_of_a_shard_is_refused(tmp_path):
    """Two tasks writing halves of one shard would each rewrite the whole shard: the
    write helper refuses a region that is not a union of whole shards."""
    import zarr

    from engine.pyramid import MisalignedWrite, write_chunkwise

    arr = zarr.create_array(store=str(tmp_path / "a"), shape=(64, 64), chunks=(8, 8),
                            shards=(32, 32), dtype="uint8", zarr_format=3)
    with pytest.raises(MisalignedWrite, match="axis 1 is not aligned"):
        write_chunkwise(arr, (slice(0, 32), slice(0, 16)), np.ones((32, 16), np.uint8))
    assert not any((tmp_path / "a").rglob("c/*"))  # nothing written
    write_chunkwise(arr, (slice(32, 64), slice(0, 64)), np.ones((32, 64), np.uint8))
    assert arr[...].sum() == 32 * 64


@dataclass(frozen=True)
class SlowCorner:
    """Level-0 voxels whose read of the region at the origin takes a while."""

    data: np.ndarray

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def read_region(self, region: tuple[slice, ...]) -> np.ndarray:
        if all(r.start == 0 for r in region):
            time.sleep(1.5)
        return self.data[region]


def test_a_coarser_level_starts_before_the_finer_one_is_done(client, tmp_path):
    data = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    chunks = (8, 8)
    levels = plan_levels(data.shape, "yx", (1.0, 1.0), chunks)
    assert [lv.shape for lv in levels] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    for i, lv in enumerate(levels):
        create_level(tmp_path, str(i), lv.shape, chunks, data.dtype, "yx", "0.5")
    # one level per pass: pass 0 writes levels 0 and 1, pass 1 level 2 from level 1
    reports = build_pyramid(client, SlowCorner(data), tmp_path, levels, chunks, budget_bytes=1)
    assert len(reports) == 3
    # level 2's far corner comes from level-0 blocks other than the slow one: it was
    # written while the slow block was still reading, not after the whole first pass
    slow = (tmp_path / "0" / "c" / "0" / "0").stat().st_mtime
    assert (tmp_path / "2" / "c" / "1" / "1").stat().st_mtime < slow
    for i, ref in enumerate(_whole_pyramid(data, levels, "mean")):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / str(i)))[...], ref)


def test_a_pass_keeps_four_blocks_per_thread():
    """Levels are fused into one pass only while it keeps ``min_blocks`` blocks (build_pyramid
    asks four per cluster thread): 512³ in 64³ chunks is one pass of 8 blocks of 256³ with
    the default, two passes whose first has 64 blocks of 128³ for 16 threads."""
    levels = plan_levels((512,) * 3, "zyx", (1.0,) * 3, (64,) * 3)
    default = plan_passes(levels, (64,) * 3, 4, 2**26)
    assert default[0].block_shape == (256,) * 3 and default[0].levels == (0, 1, 2)
    wide = plan_passes(levels, (64,) * 3, 4, 2**26, min_blocks=64)
    assert wide[0].block_shape == (128,) * 3 and wide[0].levels == (0, 1)
    assert [lv for p in wide for lv in p.levels] == list(range(len(levels)))
