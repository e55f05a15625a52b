"""Distance transform, seeds, per-axis sigma and polarity, blockwise against whole-image
references (scipy, scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import h_maxima

from engine.errors import OptionError
from engine.segment.blockops import apply_blockwise, reduce_blockwise
from engine.segment.distance import DistanceTransform
from engine.segment.filters import (
    Filament,
    FilamentStats,
    Spot,
    filament_l3_min,
    hessian_eigenvalues,
    spot_response,
)
from engine.segment.seeds import HMAXIMA_AGREEMENT, HMaxima, LocalMaxima
from tests.segment_helpers import blobs

SHAPE = (23, 37, 29)
LAYOUTS = [(8, 12, 7), (5, 36, 28), (23, 37, 29), (1, 17, 30)]
LAYOUTS_2D = [(12, 7), (37, 29), (1, 30)]


def _mask(shape, seed=0, level=0.55):
    return blobs(shape, seed, sigma=2.0) > level


def _ball(radii):
    """An ellipsoid footprint built independently of the engine's."""
    idx = np.indices([2 * int(r) + 1 for r in radii]).astype(float)
    return sum(((i - int(r)) / r) ** 2 for i, r in zip(idx, radii, strict=True)) <= 1


# --------------------------------------------------------------------------- distance


@pytest.mark.parametrize("block", LAYOUTS)
@pytest.mark.parametrize("sampling,cap", [((1.0, 1.0, 1.0), 3.0), ((2.0, 0.5, 0.7), 2.5),
                                          ((1.0, 1.0, 1.0), 9.0)])
def test_distance_transform_is_scipys_capped_for_any_layout(block, sampling, cap):
    mask = _mask(SHAPE)
    op = DistanceTransform(cap, sampling=sampling)
    got = apply_blockwise(op, mask, block)
    want = np.minimum(ndi.distance_transform_edt(mask, sampling=sampling), cap)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6)
    if cap == 9.0:  # beyond every distance of this mask: scipy's transform itself
        assert ndi.distance_transform_edt(mask).max() < cap
    # the halo follows the sampling: a cap of 2.5 µm is 2 voxels of 2 µm, 5 of 0.5 µm
    if sampling == (2.0, 0.5, 0.7):
        assert op.halo(3) == (2, 5, 4)


@pytest.mark.parametrize("block", LAYOUTS_2D)
def test_distance_transform_2d_and_without_background(block):
    mask = _mask(SHAPE[1:], 3)
    got = apply_blockwise(DistanceTransform(4.0), mask, block)
    np.testing.assert_allclose(got, np.minimum(ndi.distance_transform_edt(mask), 4.0), rtol=1e-6)
    # one background voxel in a corner: blocks that cannot see it give the cap
    full = np.ones(SHAPE[1:], bool)
    full[0, 0] = False
    got = apply_blockwise(DistanceTransform(6.0), full, block)
    np.testing.assert_allclose(got, np.minimum(ndi.distance_transform_edt(full), 6.0), rtol=1e-6)
    assert (apply_blockwise(DistanceTransform(6.0), np.ones((5, 5), bool), (2, 2)) == 6).all()


def test_distance_transform_refuses_a_wrong_sampling():
    with pytest.raises(OptionError, match="sampling"):
        DistanceTransform(2.0, sampling=(1.0, 0.0, 1.0))
    with pytest.raises(OptionError, match="3 values for a 2D image"):
        DistanceTransform(2.0, sampling=(1.0, 1.0, 1.0)).halo(2)


# --------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("block", LAYOUTS)
@pytest.mark.parametrize("min_distance,min_value", [(2.0, None), ((1.0, 3.0, 2.5), 0.4)])
def test_local_maxima_are_exact_for_any_layout(block, min_distance, min_value):
    img = blobs(SHAPE, 1, sigma=1.5)
    op = LocalMaxima(min_distance, min_value)
    got = apply_blockwise(op, img, block)
    radii = min_distance if isinstance(min_distance, tuple) else (min_distance,) * 3
    want = img == ndi.maximum_filter(img, footprint=_ball(radii), mode="nearest")
    if min_value is not None:
        want &= img > min_value
    np.testing.assert_array_equal(got, want)
    assert 3 <= want.sum() < img.size // 20


def test_local_maxima_seeds_are_at_least_min_distance_apart():
    img = blobs(SHAPE, 2, sigma=1.5)
    peaks = np.argwhere(LocalMaxima(4.0)(img))
    d = np.sqrt(((peaks[:, None] - peaks[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 4.0


def test_h_maxima_agree_with_the_whole_image_as_stated():
    img = blobs(SHAPE, 4, sigma=1.5)
    want = h_maxima(img, 0.05) != 0
    assert 3 <= want.sum()
    # >= 3 blocks per axis, halo smaller than the block: the documented agreement
    for block, halo in [((8, 12, 10), 6), ((7, 9, 9), 5)]:
        assert all(-(-s // b) >= 3 and halo < b for s, b in zip(SHAPE, block, strict=True))
        got = apply_blockwise(HMaxima(0.05, halo), img, block)
        agree = float(np.mean(got == want))
        print(f"h_maxima blockwise {block} halo {halo}: {agree:.5f} of voxels equal")
        assert agree >= HMAXIMA_AGREEMENT
    assert not HMaxima(0.05, 5, min_value=2.0)(img).any()  # above the image's maximum


# --------------------------------------------------------------------------- per-axis sigma


def test_spot_per_axis_sigma_equals_scipys_log_when_isotropic_and_is_blockwise_exact():
    img = blobs(SHAPE, 5, sigma=1.5)
    iso = -(1.5 ** 2) * ndi.gaussian_laplace(img.astype(np.float64), 1.5, mode="reflect")
    np.testing.assert_allclose(spot_response(img, (1.5, 1.5, 1.5)), iso, atol=1e-12)
    op = Spot((((0.8, 1.6, 2.0), 0.01),))
    assert op.halo(3) == (3, 6, 8)
    for block in LAYOUTS:
        np.testing.assert_array_equal(apply_blockwise(op, img, block), op(img))
    with pytest.raises(OptionError, match="2 values, but the filter runs along 3 axes"):
        Spot((((1.0, 2.0), 0.01),)).halo(3)


def test_spot_per_axis_sigma_is_the_physical_log_on_any_grid():
    """A blob sampled at 1 µm and at (1, 0.5, 0.5) µm: with sigma in µm / voxel size the
    response at its centre is the same (the scale-normalised LoG in physical space)."""
    def stack(voxel):
        grid = np.meshgrid(*(np.arange(round(32 / v)) * v for v in voxel), indexing="ij")
        return np.exp(-sum((g - 16) ** 2 for g in grid) / (2 * 3.0 ** 2))

    coarse = spot_response(stack((1.0, 1.0, 1.0)), 3.0)
    fine = spot_response(stack((1.0, 0.5, 0.5)), (3.0, 6.0, 6.0))
    print(fine[16, 32, 32], coarse[16, 16, 16])
    assert fine[16, 32, 32] == pytest.approx(coarse[16, 16, 16], rel=0.01)


def test_filament_per_axis_sigma_and_polarity():
    img = blobs(SHAPE, 6, sigma=1.5)
    np.testing.assert_allclose(hessian_eigenvalues(img, (1.2, 1.2, 1.2)),
                               hessian_eigenvalues(img, 1.2), atol=1e-12)
    scales = (((1.0, 1.5, 1.5), 0.2),)
    l3 = reduce_blockwise(FilamentStats(scales), img, (8, 12, 7))
    assert l3 == (filament_l3_min(img, (1.0, 1.5, 1.5)),)
    op = Filament(scales, l3_min=l3)
    for block in LAYOUTS:
        np.testing.assert_array_equal(apply_blockwise(op, img, block), op(img))
    # dark structures: the bright filter of the negated image
    dark_l3 = reduce_blockwise(FilamentStats(scales, polarity="dark"), img, (8, 12, 7))
    assert dark_l3 == reduce_blockwise(FilamentStats(scales), -img, (8, 12, 7))
    dark = Filament(scales, l3_min=dark_l3, polarity="dark")
    np.testing.assert_array_equal(apply_blockwise(dark, img, (8, 12, 7)),
                                  Filament(scales, l3_min=dark_l3)(-img))
    assert dark(img).any() and not np.array_equal(dark(img), op(img))
