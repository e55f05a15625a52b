"""The device pyramid (torch) equals engine.pyramid's NumPy downsampling voxel for voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.pyramid
from engine.predict.downsample import downsample_mean, downsample_mode
from engine.pyramid import downsample_mean as np_mean
from engine.pyramid import downsample_mode as np_mode


@pytest.mark.parametrize("shape,factors", [
    ((16, 20, 24), (2, 2, 2)), ((7, 9, 13), (2, 2, 2)), ((5, 12, 11), (1, 2, 2)),
    ((2, 7, 8, 9), (1, 2, 2, 2)), ((33, 17), (2, 2)),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
@pytest.mark.parametrize("slab", [None, 1])  # NumPy's sums whole, or one output plane a time
def test_mean_equals_numpy(shape, factors, dtype, slab, monkeypatch):
    if slab is not None:
        monkeypatch.setattr(engine.pyramid, "MEAN_SLAB_BYTES", slab)
    rng = np.random.default_rng(sum(shape))
    if np.dtype(dtype).kind == "f":
        # probabilities with tiny and large values in one window: exact sums matter
        data = (rng.random(shape) ** 8).astype(dtype)
    else:
        data = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    got = downsample_mean(torch.from_numpy(data), factors)
    np.testing.assert_array_equal(got.numpy(), np_mean(data, factors))


@pytest.mark.parametrize("shape,factors", [
    ((16, 20, 24), (2, 2, 2)), ((7, 9, 13), (2, 2, 2)), ((5, 12, 11), (1, 2, 2)),
    ((33, 17), (2, 2)),
])
@pytest.mark.parametrize("values", [2, 3, 50])
@pytest.mark.parametrize("known", [False, True])  # the value range given as ``classes``
def test_mode_equals_numpy_ties_included(shape, factors, values, known):
    rng = np.random.default_rng(values)
    data = rng.integers(0, values, shape).astype(np.uint8)
    got = downsample_mode(torch.from_numpy(data), factors, values if known else None)
    np.testing.assert_array_equal(got.numpy(), np_mode(data, factors))
