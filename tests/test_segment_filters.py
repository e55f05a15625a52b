"""Blockwise filters (engine.segment.filters) equal their whole-array computation.

Images: float32 to float tolerance; masks: exactly. References are scipy / scikit-image
where they exist, otherwise the module's own whole-array function applied to the whole
array (with whole-image statistics), plus independent checks of that function: ITK's
diffusion stencil written as a per-voxel loop, Hessian eigenvalues from scikit-image and the
Allen vesselness written element by element.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.feature import hessian_matrix, hessian_matrix_eigvals

from engine.errors import OptionError
from engine.segment.blockops import apply_blockwise, reduce_blockwise
from engine.segment.filters import (
    EdgePreserving,
    EdgePreservingStats,
    Filament,
    FilamentStats,
    Gaussian,
    Spot,
    anisotropic_diffusion,
    filament_l3_min,
    filament_response,
    gaussian_radius,
    hessian_eigenvalues,
    mean_sq_gradient,
    spot_response,
    vesselness,
)
from tests.segment_helpers import blobs

SHAPE = (23, 37, 29)
SHAPE_2D = (37, 29)
# odd sizes, 1-voxel remainders at the far edges, whole volume, single planes
LAYOUTS = [(8, 12, 7), (5, 36, 28), (23, 37, 29), (1, 17, 30)]
LAYOUTS_2D = [(12, 7), (36, 28), (37, 29), (1, 30)]
CASES = [(SHAPE, b) for b in LAYOUTS] + [(SHAPE_2D, b) for b in LAYOUTS_2D]
CASE_IDS = ["x".join(map(str, b)) for _, b in CASES]


@functools.cache
def image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random float32 image in [0, 1] with blob and ridge structures."""
    img = blobs(shape, seed, sigma=1.5)
    img.setflags(write=False)
    return img


def safe_cutoff(response: np.ndarray, q: float) -> float:
    """A cutoff near the ``q`` quantile of ``response``, halfway across a clear gap between
    two response values, so float rounding cannot move a voxel across it."""
    v = np.unique(response)
    for j in range(int(q * (len(v) - 1)), len(v) - 1):
        if v[j + 1] - v[j] > 1e-6 * max(1.0, abs(v[j])):
            return float((v[j] + v[j + 1]) / 2)
    raise AssertionError("no gap in the response")


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize(("shape", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("sigma", "truncate", "mode"), [
    (1.5, 4.0, "nearest"), ("per-axis", 3.0, "reflect"), (1.2, 4.0, "constant"),
    (0.8, 4.0, "mirror")])
def test_gaussian_equals_scipy(shape, block, sigma, truncate, mode):
    img = image(shape)
    if sigma == "per-axis":
        sigma = (1.0, 2.0, 0.7)[-img.ndim:]
    op = Gaussian(sigma, truncate, mode)
    want = ndi.gaussian_filter(img.astype(np.float32), sigma, mode=mode, truncate=truncate)
    close(apply_blockwise(op, img, block), want)
    radii = np.broadcast_to([gaussian_radius(s, truncate) for s in np.atleast_1d(sigma)],
                            (img.ndim,))
    assert op.halo(img.ndim) == tuple(radii)


@pytest.mark.parametrize(("sigma", "mode", "slice_wise"), [
    (2.0, "nearest", False), ((1.0, 2.0, 0.7), "reflect", False), (1.2, "constant", False),
    (1.5, "nearest", True)])
def test_gaussian_interior_is_the_cropped_whole_bit_for_bit(sigma, mode, slice_wise):
    """The halo cut axis by axis (what blocks run) gives exactly the values of filtering
    the whole padded block and cropping it."""
    op = Gaussian(sigma, 4.0, mode, slice_wise=slice_wise)
    halo = op.halo(3)
    padded = np.random.default_rng(3).random(tuple(20 + 2 * h for h in halo), np.float32)
    crop = tuple(slice(h, h + 20) for h in halo)
    got = op.interior(crop, padded)
    assert got.dtype == np.float32 and got.shape == (20, 20, 20)
    np.testing.assert_array_equal(got, op(padded)[crop])


@pytest.mark.parametrize("block", LAYOUTS)
@pytest.mark.parametrize("sigma", [1.5, (2.0, 0.7)])
def test_gaussian_slice_wise_equals_per_plane(block, sigma):
    img = image(SHAPE)
    op = Gaussian(sigma, 3.0, "nearest", slice_wise=True)
    # the Allen segmenter's image_smoothing_gaussian_slice_by_slice (nearest, truncate 3)
    want = np.stack([ndi.gaussian_filter(p, sigma, mode="nearest", truncate=3.0) for p in img])
    close(apply_blockwise(op, img, block), want)
    assert op.halo(3)[0] == 0


def test_gaussian_slice_wise_on_2d_is_2d():
    img = image(SHAPE_2D)
    op, flat = Gaussian(1.3, slice_wise=True), Gaussian(1.3)
    assert op.halo(2) == flat.halo(2)
    np.testing.assert_array_equal(op(img), flat(img))


# --------------------------------------------------------------------------- diffusion


def itk_diffusion_loop(img: np.ndarray, iterations: int, conductance: float, dt: float,
                       g2: float) -> np.ndarray:
    """ITK's GradientNDAnisotropicDiffusionFunction update, voxel by voxel (zero-flux
    boundary as clamped indices), with a fixed average squared gradient ``g2``."""
    u = img.astype(np.float64)
    ndim, shape = u.ndim, u.shape
    m_k = -2.0 * conductance ** 2 * g2

    for _ in range(iterations):
        def at(x, off, u=u):
            return u[tuple(min(max(x[a] + off[a], 0), shape[a] - 1) for a in range(ndim))]

        new = u.copy()
        for x in np.ndindex(shape):
            def e(a, s=1):
                return tuple(s if b == a else 0 for b in range(ndim))

            def add(*offs):
                return tuple(sum(o[a] for o in offs) for a in range(ndim))

            zero = (0,) * ndim
            dx = [(at(x, e(a)) - at(x, e(a, -1))) / 2 for a in range(ndim)]
            delta = 0.0
            for i in range(ndim):
                fwd = at(x, e(i)) - at(x, zero)
                bwd = at(x, zero) - at(x, e(i, -1))
                acc = acc_d = 0.0
                for j in range(ndim):
                    if j != i:
                        aug = (at(x, add(e(i), e(j))) - at(x, add(e(i), e(j, -1)))) / 2
                        dim = (at(x, add(e(i, -1), e(j))) - at(x, add(e(i, -1), e(j, -1)))) / 2
                        acc += 0.25 * (dx[j] + aug) ** 2
                        acc_d += 0.25 * (dx[j] + dim) ** 2
                delta += (fwd * np.exp((fwd ** 2 + acc) / m_k)
                          - bwd * np.exp((bwd ** 2 + acc_d) / m_k))
            new[x] = u[x] + dt * delta
        u = new
    return u


@pytest.mark.parametrize("shape", [(5, 6, 4), (7, 5)])
def test_diffusion_is_itks_scheme(shape):
    img = image(shape, seed=3).astype(np.float64)
    g2 = mean_sq_gradient(img)
    want = itk_diffusion_loop(img, 3, 0.8, 0.1, g2)
    got = anisotropic_diffusion(img, 3, 0.8, 0.1, g2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_diffusion_conserves_mean_and_keeps_edges():
    rng = np.random.default_rng(5)
    step = np.zeros((20, 24, 24))
    step[:, :, 12:] = 1.0
    noisy = step + rng.normal(0, 0.05, step.shape)
    g2 = mean_sq_gradient(noisy)
    out = anisotropic_diffusion(noisy, 10, 1.2, 0.0625, g2)
    # zero flux through the faces and a conservative flux form: the mean is unchanged
    assert out.mean() == pytest.approx(noisy.mean(), rel=1e-12)
    flat = out[:, :, 2:9]
    assert flat.std() < 0.5 * noisy[:, :, 2:9].std()  # noise is smoothed ...
    contrast = out[:, :, 12].mean() - out[:, :, 11].mean()
    linear = ndi.gaussian_filter(noisy, (0, 1.0, 1.0), mode="nearest")  # similar smoothing
    assert contrast > 0.85  # ... the edge is kept (linear smoothing: about 0.4)
    assert contrast > 1.5 * (linear[:, :, 12].mean() - linear[:, :, 11].mean())


@pytest.mark.parametrize(("shape", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("variant", ["stats", "fixed", "slice_wise"])
def test_edge_preserving_blockwise_equals_whole(shape, block, variant):
    img = image(shape)
    slice_wise = variant == "slice_wise"
    g2 = None if variant == "fixed" else mean_sq_gradient(img, slice_wise)
    conductance = 0.05 if variant == "fixed" else 1.2  # fixed G = 1: k in intensity units
    op = EdgePreserving(6, conductance, 0.0625, slice_wise, g2)
    want = anisotropic_diffusion(img, 6, conductance, 0.0625, g2, slice_wise)
    got = apply_blockwise(op, img, block)
    close(got, want.astype(np.float32))
    assert np.abs(want - img).max() > 0.01  # it did smooth
    if slice_wise and img.ndim == 3:
        assert op.halo(3) == (0, 6, 6)
        per_plane = np.stack([anisotropic_diffusion(p, 6, conductance, 0.0625, g2) for p in img])
        np.testing.assert_allclose(want, per_plane, rtol=1e-12, atol=1e-14)
    else:
        assert op.halo(img.ndim) == (6,) * img.ndim


def test_edge_preserving_default_run_and_2d_slice_wise():
    img = image(SHAPE)
    op = EdgePreserving(mean_sq_gradient=mean_sq_gradient(img))  # 10 steps, Allen defaults
    close(apply_blockwise(op, img, (8, 12, 7)), op(img))
    img2 = image(SHAPE_2D)
    a, b = EdgePreserving(4, slice_wise=True), EdgePreserving(4)
    assert a.halo(2) == b.halo(2)
    np.testing.assert_array_equal(a(img2), b(img2))


@pytest.mark.parametrize("slice_wise", [False, True])
def test_edge_preserving_stats_layout_independent(slice_wise):
    for shape, layouts in ((SHAPE, LAYOUTS), (SHAPE_2D, LAYOUTS_2D)):
        img = image(shape).astype(np.float64)
        axes = [1, 2] if slice_wise and img.ndim == 3 else list(range(img.ndim))
        padded = np.pad(img, 1, mode="edge")
        core = (slice(1, -1),) * img.ndim
        want = sum(np.gradient(padded, axis=a)[core] ** 2 for a in axes).mean()
        assert mean_sq_gradient(img, slice_wise) == pytest.approx(want, rel=1e-12)
        for block in layouts:
            got = reduce_blockwise(EdgePreservingStats(slice_wise), img, block)
            assert got == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- spot


def allen_spot(img: np.ndarray, sigma: float, slice_wise: bool) -> np.ndarray:
    x = img.astype(np.float64)
    if slice_wise and x.ndim == 3:
        return np.stack([-(sigma ** 2) * ndi.gaussian_laplace(p, sigma) for p in x])
    return -(sigma ** 2) * ndi.gaussian_laplace(x, sigma)


@pytest.mark.parametrize(("shape", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("slice_wise", [False, True])
def test_spot_blockwise_equals_scipy(shape, block, slice_wise):
    img = image(shape)
    sigmas = (1.0, 2.5)
    responses = [allen_spot(img, s, slice_wise) for s in sigmas]
    scales = tuple((s, safe_cutoff(r, q)) for s, r, q in zip(sigmas, responses, (0.8, 0.6),
                                                            strict=True))
    want = np.zeros(img.shape, bool)
    for (_, cut), r in zip(scales, responses, strict=True):
        want |= r > cut
    op = Spot(scales, slice_wise)
    got = apply_blockwise(op, img, block)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)
    assert 0.05 < want.mean() < 0.6
    r = gaussian_radius(2.5, 4.0)
    assert op.halo(img.ndim) == ((0, r, r) if slice_wise and img.ndim == 3 else (r,) * img.ndim)
    np.testing.assert_allclose(op.response(img), np.max(responses, axis=0).astype(np.float32))
    np.testing.assert_allclose(spot_response(img, 1.0, slice_wise), responses[0], rtol=1e-12,
                               atol=1e-14)


def test_spot_finds_blobs():
    img = np.zeros((21, 21, 21))
    img[5, 5, 5] = img[15, 12, 8] = 1.0
    img = ndi.gaussian_filter(img, 1.5) * 10
    mask = Spot(((1.5, 0.05),))(img)
    lab, n = ndi.label(mask)
    assert n == 2 and mask[5, 5, 5] and mask[15, 12, 8]


# --------------------------------------------------------------------------- filament


def allen_vesselness_scalar(l2: float, l3: float, tau: float, l3_min: float) -> float:
    """The Allen segmenter's compute_vesselness3D for one voxel, written out with branches."""
    if l2 >= 0 or l3 >= 0:
        return 0.0
    lrho = tau * l3_min if tau * l3_min < l3 < 0 else l3
    if l2 < 0.5 * lrho:
        return 1.0
    den = (2 * abs(l2) + abs(lrho - l2)) ** 3
    return 27 * l2 ** 2 * abs(lrho - l2) / (den if den != 0 else 1e-10)


def test_vesselness_formula():
    rng = np.random.default_rng(7)
    eig = rng.normal(0, 1, (400, 3))
    eig[:40] = -np.abs(eig[:40])  # tube-like: all negative
    eig[40:50, 1:] = 0.0
    eig = np.take_along_axis(eig, np.argsort(np.abs(eig), axis=-1), axis=-1)
    l3_min = eig[:, 2].min()
    for tau in (0.5, 0.75, 1.0):
        got = vesselness(eig, tau, l3_min)
        want = [allen_vesselness_scalar(e[1], e[2], tau, l3_min) for e in eig]
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
        # 2D: lambda_2 plays both roles
        got2 = vesselness(eig[:, 1:], tau, eig[:, 2].min())
        want2 = [allen_vesselness_scalar(e[2], e[2], tau, eig[:, 2].min()) for e in eig]
        np.testing.assert_allclose(got2, want2, rtol=1e-13, atol=0)
    # Jerman's form where |l2| <= |lrho| / 2 (lrho = tau * l3_min = -1 here), else 1
    l2, l3 = -0.4, -0.9
    r = vesselness(np.array([[0.0, l2, l3], [0.0, -0.6, l3]]), 1.0, -1.0)
    assert r[0] == pytest.approx(l2 ** 2 * (-1.0 - l2) * 27 / (l2 - 1.0) ** 3, rel=1e-12)
    assert r[1] == 1.0


@pytest.mark.parametrize(("shape", "sigma"), [((18, 21, 19), 1.5), ((25, 22), 1.0)])
def test_hessian_eigenvalues_match_skimage(shape, sigma):
    img = image(shape, seed=2).astype(np.float64)
    # scikit-image: gaussian (truncate 4, nearest) then np.gradient twice
    h = hessian_matrix(img, sigma, mode="nearest", use_gaussian_derivatives=False)
    want = np.moveaxis(np.asarray(hessian_matrix_eigvals(h)), 0, -1) * sigma ** 2
    want = np.take_along_axis(want, np.argsort(np.abs(want), axis=-1), axis=-1)
    got = hessian_eigenvalues(img, sigma, truncate=4.0)
    inner = (slice(2, -2),) * img.ndim  # np.gradient is one-sided on the outer layers
    np.testing.assert_allclose(got[inner], want[inner], rtol=1e-9, atol=1e-12)
    # everywhere, the definition is: extend by 2 edge voxels, central differences, crop
    hp = hessian_matrix(np.pad(img, 2, mode="edge"), sigma, mode="nearest",
                        use_gaussian_derivatives=False)
    wp = np.moveaxis(np.asarray(hessian_matrix_eigvals(hp)), 0, -1)[inner] * sigma ** 2
    wp = np.take_along_axis(wp, np.argsort(np.abs(wp), axis=-1), axis=-1)
    np.testing.assert_allclose(got, wp, rtol=1e-9, atol=1e-12)


def test_hessian_slice_wise_is_per_plane():
    img = image((6, 20, 17), seed=4)
    got = hessian_eigenvalues(img, 1.2, slice_wise=True)
    want = np.stack([hessian_eigenvalues(p, 1.2) for p in img])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_supports_are_the_halos():
    """The value at a voxel needs exactly the halo of context: a window of halo - 1
    changes it (checked at the window's centre)."""
    img = image((31, 31, 31), seed=6).astype(np.float64)
    c = 15
    for sigma in (1.0, 2.0):
        fil = Filament(((sigma, 0.1),), l3_min=(-1.0,)).halo(3)[0]
        spot = Spot(((sigma, 0.1),)).halo(3)[0]
        for h, f in ((fil, lambda x, s=sigma: hessian_eigenvalues(x, s)),
                     (spot, lambda x, s=sigma: spot_response(x, s))):
            full = f(img)[c, c, c]
            for w, same in ((h, True), (h - 1, False)):
                win = img[c - w:c + w + 1, c - w:c + w + 1, c - w:c + w + 1]
                assert np.allclose(f(win)[w, w, w], full, rtol=0, atol=1e-13) == same


@pytest.mark.parametrize("slice_wise", [False, True])
def test_filament_stats_layout_independent(slice_wise):
    scales = ((1.0, 0.1), (2.0, 0.1))
    for shape, layouts in ((SHAPE, LAYOUTS), (SHAPE_2D, LAYOUTS_2D)):
        img = image(shape)
        want = tuple(filament_l3_min(img, s, slice_wise) for s, _ in scales)
        assert all(v < 0 for v in want)
        for block in layouts:
            assert reduce_blockwise(FilamentStats(scales, slice_wise), img, block) == want


@pytest.mark.parametrize(("shape", "block"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize(("slice_wise", "tau"), [(False, 1.0), (False, 0.6), (True, 1.0)])
def test_filament_blockwise_equals_whole(shape, block, slice_wise, tau):
    img = image(shape)
    sigmas = (1.0, 2.0)
    l3 = tuple(filament_l3_min(img, s, slice_wise) for s in sigmas)
    responses = [filament_response(img, s, tau, m, slice_wise)
                 for s, m in zip(sigmas, l3, strict=True)]
    scales = tuple((s, safe_cutoff(r, 0.85)) for s, r in zip(sigmas, responses, strict=True))
    want = np.zeros(img.shape, bool)
    for (_, cut), r in zip(scales, responses, strict=True):
        want |= r > cut
    stats = reduce_blockwise(FilamentStats(scales, slice_wise), img, block)
    assert stats == l3
    op = Filament(scales, tau, slice_wise, stats)
    got = apply_blockwise(op, img, block)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, want)
    assert 0.02 < want.mean() < 0.5
    r = gaussian_radius(2.0, 3.0) + 2
    assert op.halo(img.ndim) == ((0, r, r) if slice_wise and img.ndim == 3 else (r,) * img.ndim)
    np.testing.assert_allclose(op.response(img), np.max(responses, axis=0).astype(np.float32))


def test_filament_finds_a_tube():
    z, y, x = np.mgrid[:21, :25, :30]
    tube = np.exp(-((z - 10) ** 2 + (y - 12) ** 2) / (2 * 1.5 ** 2))  # along x
    l3 = (filament_l3_min(tube, 1.5),)
    resp = Filament(((1.5, 0.5),), l3_min=l3).response(tube)
    assert resp[10, 12, 5:25].min() > 0.9
    assert resp[(np.abs(z - 10) > 5) | (np.abs(y - 12) > 5)].max() < 0.01
    # the 2D filter sees the tube as a line in the plane z = 10
    r2 = filament_response(tube[10], 1.5, 1.0, filament_l3_min(tube[10], 1.5))
    assert r2[12, 5:25].min() > 0.9 and r2[:5].max() < 0.01


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(("make", "message"), [
    (lambda: Gaussian(0), "sigma"),
    (lambda: Gaussian((1, -2, 1)), "sigma"),
    (lambda: Gaussian(1, truncate=0), "truncate"),
    (lambda: Gaussian(1, mode="wrap"), "'wrap'"),
    (lambda: Gaussian(1, slice_wise="yes"), "slice_wise"),
    (lambda: EdgePreserving(0), "iterations"),
    (lambda: EdgePreserving(2.5), "iterations"),
    (lambda: EdgePreserving(conductance=-1), "conductance"),
    (lambda: EdgePreserving(time_step=0.3), "time_step"),
    (lambda: EdgePreserving(mean_sq_gradient=float("nan")), "mean_sq_gradient"),
    (lambda: Spot(()), "at least one"),
    (lambda: Spot(((1.0,),)), "pair"),
    (lambda: Spot(((0.0, 0.1),)), "sigma"),
    (lambda: Spot(((1.0, float("inf")),)), "cutoff"),
    (lambda: Filament(((1, 0.1),), tau=0), "tau"),
    (lambda: Filament(((1, 0.1),), tau=1.5), "tau"),
    (lambda: Filament(((1, 0.1),), l3_min=(-1.0, -2.0)), "l3_min"),
    (lambda: FilamentStats("x"), "pair"),
])
def test_invalid_parameters(make, message):
    with pytest.raises(OptionError, match=message):
        make()


def test_parameters_checked_against_the_image():
    with pytest.raises(OptionError, match=r"3 values, but the filter runs along 2 axes"):
        Gaussian((1, 2, 2), slice_wise=True).halo(3)
    with pytest.raises(OptionError, match="2D or 3D"):
        Spot(((1, 0.1),)).halo(4)
    with pytest.raises(OptionError, match="FilamentStats"):
        Filament(((1, 0.1),))(image(SHAPE_2D))


def test_ops_are_hashable_picklable_and_normalised():
    ops = [Gaussian([1, 2, 2]), EdgePreserving(3, 1, 0.1, True, 0.5),
           Spot([[1, 0.04], [2, 0.04]]), Filament([[1, 0.1]], 0.5, True, [-0.3]),
           FilamentStats([[1, 0.1]]), EdgePreservingStats(True)]
    for op in ops:
        assert pickle.loads(pickle.dumps(op)) == op
        hash(op)
    assert ops[0].sigma == (1.0, 2.0, 2.0)
    assert ops[2].scales == ((1.0, 0.04), (2.0, 0.04))
    assert ops[3].l3_min == (-0.3,)
    assert dataclasses.replace(ops[3], tau=1.0).tau == 1.0
