"""Crops read straight from the stores (no dask graph, chunks cached) equal the dask path's.

The reference is the volume's own dask arrays (``TrainVolume.image`` / ``label``: channel
selection, ``classes`` mapping, ignored values, cost maps), cropped by the sampler's dask
path and, independently, by slicing the whole computed arrays and padding by hand.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.curate import write_sample
from engine.io import chunkcache, open_volume
from engine.learn.data import (
    IGNORE,
    CropSampler,
    TrainVolume,
    open_sources,
    parse_sources,
    prepare,
)
from engine.learn.normalize import Normalization, apply_stats
from engine.patches.files import write_patch
from engine.pipelines.convert import ConvertOptions, convert

RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, client) -> dict[str, Path]:
    """A 3-channel 3D OME-Zarr (odd shape, chunks 8) with labels, a 2-channel 2D one, a
    curated sample (cost map) and an MRC patch folder."""
    tmp = tmp_path_factory.mktemp("crops")
    vol3 = RNG.integers(0, 60000, (3, 19, 23, 21)).astype(np.uint16)
    lab3 = RNG.choice([0, 0, 0, 1, 4, 5, 9], (19, 23, 21)).astype(np.uint16)
    tifffile.imwrite(tmp / "v.ome.tif", vol3, ome=True, photometric="minisblack",
                     metadata={"axes": "CZYX", "Channel": {"Name": ["a", "b", "c"]}})
    tifffile.imwrite(tmp / "l3.tif", lab3)
    slide = RNG.normal(100, 30, (2, 37, 45)).astype(np.float32)
    lab2 = RNG.choice([0, 1, 2, 3], (37, 45)).astype(np.uint8)
    tifffile.imwrite(tmp / "s.ome.tif", slide, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "BF"]}})
    tifffile.imwrite(tmp / "l2.tif", lab2)
    for name, labels, chunks in (("v", "l3", (8,)), ("s", "l2", (16,))):
        convert(tmp / f"{name}.ome.tif", tmp / f"{name}.ome.zarr",
                ConvertOptions(chunks=chunks, assume_voxel_size=True,
                               labels=(("cells", str(tmp / f"{labels}.tif")),)),
                client, report=lambda line: None)
    # a curated sample: ground truth with a cost map (0 = ignore)
    image = RNG.integers(0, 100, (30, 26)).astype(np.uint16)
    tifffile.imwrite(tmp / "img.tif", image)
    cost = RNG.integers(0, 3, image.shape).astype(np.uint8)
    (tmp / "curated").mkdir()
    write_sample(tmp / "curated", "sample_000", open_volume(tmp / "img.tif"), image,
                 (image > 50).astype(np.uint8), cost)
    (tmp / "curated" / "samples.csv").write_text("sample,image\nsample_000,/data/x.tif\n")
    # MRC patches (raw-file sources), labels 2 = ignore by default
    (tmp / "p" / "imagesCorr").mkdir(parents=True)
    for i in range(2):
        write_patch(tmp / "p" / "imagesCorr" / f"a_t_patch{i}.mrc",
                    RNG.normal(0, 1, (9, 13, 11)).astype(np.float32), (1.0,) * 3, "nm")
        write_patch(tmp / "p" / "labelsCorr" / f"a_t_patch{i}.mrc",
                    RNG.integers(0, 3, (9, 13, 11)).astype(np.int8), (1.0,) * 3, "nm")
    with open(tmp / "p" / "patches.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["name", "image"], ["a_t_patch0", "/d/a.mrc"], ["a_t_patch1", "/d/a.mrc"]])
    return {"3d": tmp / "v.ome.zarr", "2d": tmp / "s.ome.zarr", "samples": tmp / "curated",
            "patches": tmp / "p"}


CASES = {
    "3d-channels-classes": ("3d", {"labels": "cells", "channels": ["c", "a"],
                                   "classes": {1: 1, 4: 2, 5: "ignore", 9: 1}}),
    "3d-ignore": ("3d", {"labels": "cells", "ignore": [4, 9]}),
    "2d-channels-ignore": ("2d", {"channels": ["BF", "DAPI"], "ignore": [3]}),
    "2d-classes": ("2d", {"channels": [1], "classes": {1: 2, 2: "ignore", 3: 1}}),
    "cost": ("samples", {}),
    "mrc-patches": ("patches", {}),
}


def _whole(vol: TrainVolume) -> tuple[np.ndarray, np.ndarray]:
    return (apply_stats(np.asarray(vol.image.compute(scheduler="synchronous")), vol.stats),
            np.asarray(vol.label.compute(scheduler="synchronous")))


def _by_hand(whole: tuple[np.ndarray, np.ndarray], start: tuple[int, ...],
             patch: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The crop from the whole computed arrays, padded by hand."""
    image, label = whole
    out_i = np.zeros((image.shape[0], *patch), np.float32)
    out_l = np.full(patch, IGNORE, np.int64)
    src, dst = [], []
    for s, p, n in zip(start, patch, label.shape, strict=True):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out_i[(slice(None), *dst)] = image[(slice(None), *src)]
    out_l[tuple(dst)] = label[tuple(src)]
    return out_i, out_l


@pytest.mark.parametrize("cache_mib", ["0", "0.005", "64"])  # off, big ones direct, cached
@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_crops_equal_the_dask_path(stores, case, cache_mib, monkeypatch):
    monkeypatch.setenv("VOXELMILL_CHUNK_CACHE_MIB", cache_mib)
    chunkcache.clear()
    where, extra = CASES[case]
    vols = open_sources(parse_sources([{"path": str(stores[where]), **extra}], "d"))
    assert all(v.direct is not None for v in vols)  # else this test compares dask to dask
    prepare(vols, Normalization("meanstd"))
    via_dask = [replace(v, direct=None) for v in vols]
    ndim = vols[0].spatial_dims
    patch = (7, 10, 6) if ndim == 3 else (12, 17)
    direct = CropSampler(vols, patch, memory_bytes=0)
    reference = CropSampler(via_dask, patch, memory_bytes=0)
    wholes = [_whole(v) for v in vols]
    rng = np.random.default_rng(5)
    for _ in range(12):
        k = int(rng.integers(len(vols)))
        shape = vols[k].label.shape
        # starts from before the volume to past its end: padding on either side
        start = tuple(int(rng.integers(-p + 1, n)) for p, n in zip(patch, shape, strict=True))
        image, label = direct.crop(k, start)
        ref_image, ref_label = reference.crop(k, start)
        assert image.dtype == ref_image.dtype == np.float32 and label.dtype == np.int64
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(label, ref_label)
        hand_image, hand_label = _by_hand(wholes[k], start, patch)
        np.testing.assert_array_equal(image, hand_image)
        np.testing.assert_array_equal(label, hand_label)
    # random crops (foreground-centred ones read label chunks directly too)
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for _ in range(6):
        for x, y in zip(direct.sample(a), reference.sample(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_loader_threads_share_the_chunk_cache_safely(stores, monkeypatch):
    # each array fits in half the cache, all of them do not: evictions while reading
    monkeypatch.setenv("VOXELMILL_CHUNK_CACHE_MIB", "0.05")
    chunkcache.clear()
    vols = open_sources(parse_sources([{"path": str(stores["3d"]), "labels": "cells"}], "d"))
    prepare(vols, Normalization("none"))
    sampler = CropSampler(vols, (9, 9, 9), memory_bytes=0)
    reference = CropSampler([replace(v, direct=None) for v in vols], (9, 9, 9),
                            memory_bytes=0)
    starts = [tuple(int(s) for s in RNG.integers(-4, 20, 3)) for _ in range(48)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: sampler.crop(0, s), starts))
    for s, (image, label) in zip(starts, got, strict=True):
        ref_image, ref_label = reference.crop(0, s)
        np.testing.assert_array_equal(image, ref_image)
        np.testing.assert_array_equal(label, ref_label)


def test_derived_arrays_keep_the_dask_path(stores):
    (vol,) = open_sources(parse_sources([{"path": str(stores["3d"]), "labels": "cells"}],
                                        "d"))
    from engine.io.sources import source_of

    assert source_of(open_volume(stores["3d"]).data) is not None
    for derived in (vol.image, vol.label, open_volume(stores["3d"]).data[:, 1:],
                    open_volume(stores["3d"]).data.astype(np.float64)):
        assert source_of(derived) is None
