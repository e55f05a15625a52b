"""Smoothing and structure filters (Allen Cell Structure Segmenter, MISIC), blockwise.

Every filter is a :class:`~engine.segment.blockops.BlockOp` whose halo covers its whole
support, so ``apply_blockwise(op, image, block)`` equals the whole-array computation with the
same boundary mode (to float rounding for images, exactly for masks). Whole-image
statistics (the vesselness ``min(lambda_3)``, the diffusion's mean squared gradient) come
from :class:`~engine.segment.blockops.BlockReduce` reductions over all blocks and are passed
to the operation as dataclass fields, never recomputed per block.

The step parameters of each operation (type, default, range and the documentation that
``voxelmill segment --list-steps`` prints) are declared on its fields
(:func:`engine.segment.params.param`); the docstrings add what matters to Python callers.

All sizes are in voxels; axes are ``(y, x)`` or ``(z, y, x)``. ``slice_wise=True`` on a 3D
image filters each z-plane (axis 0) independently in 2D (halo 0 on axis 0); on a 2D image
it changes nothing.

============================  ==============================================================
operation                     Allen segmenter counterpart
============================  ==============================================================
:class:`Gaussian`             ``image_smoothing_gaussian_3d`` / ``..._slice_by_slice``
:class:`EdgePreserving`       ``edge_preserving_smoothing_3d`` (ITK gradient anisotropic
                              diffusion)
:class:`Spot`                 ``dot_3d_wrapper`` / ``dot_2d_slice_by_slice_wrapper``
:class:`Filament`             ``filament_3d_wrapper`` / ``filament_2d_wrapper``
                              (``vesselness3D`` / ``vesselness2D``)
============================  ==============================================================

MISIC's preprocessing (the scikit-image functions it calls):

============================  ==============================================================
operation                     scikit-image counterpart
============================  ==============================================================
:class:`Gamma`                ``exposure.adjust_gamma`` of an image in [0, 1]
:class:`UnsharpMask`          ``filters.unsharp_mask(..., preserve_range=True)``
:class:`ShapeIndex`           ``feature.shape_index`` at several sigmas, combined
============================  ==============================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine import stats
from engine.blocks import Region
from engine.errors import OptionError
from engine.segment.blockops import BlockOp, BlockReduce, numpy_pad_mode
from engine.segment.params import Sigma, computed, param, slice_wise_doc

__all__ = [
    "POLARITIES", "EdgePreserving", "EdgePreservingStats", "Filament", "FilamentStats", "Gamma",
    "Gaussian", "ShapeIndex", "Spot", "UnsharpMask", "anisotropic_diffusion", "axis_sigmas",
    "filament_l3_min",
    "filament_response", "gaussian_radius", "hessian_eigenvalues", "mean_sq_gradient",
    "shape_index", "spot_response", "vesselness",
]

HESSIAN_TRUNCATE = 3.0
"""Gaussian truncation of the Allen segmenter's Hessian (``compute_3d_hessian_matrix``)."""

LOG_TRUNCATE = 4.0
"""Gaussian truncation of :func:`scipy.ndimage.gaussian_laplace` (its default)."""

# scipy.ndimage modes a block reproduces by padding its own read region ("wrap" would need
# voxels from the opposite side of the volume, which a block never reads).
_BLOCK_MODES = ("reflect", "nearest", "mirror", "constant")


# --------------------------------------------------------------------------- helpers


def gaussian_radius(sigma: float, truncate: float) -> int:
    """Kernel radius of :func:`scipy.ndimage.gaussian_filter`: ``int(truncate*sigma + 0.5)``."""
    return int(truncate * float(sigma) + 0.5)


def _axes(ndim: int, slice_wise: bool, what: str) -> tuple[int, ...]:
    """The axes a filter runs along: all of them, or (y, x) when slice-wise on 3D."""
    if ndim not in (2, 3):
        raise OptionError(f"{what} works on 2D or 3D images, got a {ndim}D image")
    return tuple(range(1, ndim)) if slice_wise and ndim == 3 else tuple(range(ndim))


def _per_axis(values: dict[int, int], ndim: int) -> tuple[int, ...]:
    return tuple(values.get(a, 0) for a in range(ndim))


def axis_sigmas(sigma: Sigma, ndim: int, slice_wise: bool, what: str) -> dict[int, float]:
    """Sigma per filtered axis (axes not filtered are absent).

    ``sigma`` is one value for every filtered axis, or one per filtered axis ((z, y, x),
    or (y, x) when slice-wise on a 3D image); :class:`OptionError` when the count differs.
    """
    axes = _axes(ndim, slice_wise, what)
    if isinstance(sigma, tuple):
        if len(sigma) != len(axes):
            names = "".join("zyx"[a + 3 - ndim] for a in axes)
            raise OptionError(f"{what} sigma {list(sigma)} has {len(sigma)} values, but the "
                              f"filter runs along {len(axes)} axes ({', '.join(names)})")
        return dict(zip(axes, sigma, strict=True))
    return dict.fromkeys(axes, float(sigma))


def _radius(sigma: Sigma, truncate: float, ndim: int, slice_wise: bool, what: str
            ) -> dict[int, int]:
    """Kernel radius per filtered axis."""
    return {a: gaussian_radius(s, truncate)
            for a, s in axis_sigmas(sigma, ndim, slice_wise, what).items()}


_SCALES_DOC = ("List of [sigma, cutoff] pairs: the filter runs at each sigma (voxels, the "
               "structure's radius; one number, or a list with one per filtered axis) and "
               "its response is thresholded at cutoff; the masks of all scales are combined "
               "with OR. Lower a cutoff to detect fainter structures.")


def _scales(doc: str = _SCALES_DOC) -> Any:
    """The required ``scales`` parameter of the spot and filament filters."""
    return param("scales", doc=doc, unit="length")


# --------------------------------------------------------------------------- gaussian


@dataclass(frozen=True)
class Gaussian(BlockOp):
    """Gaussian smoothing, :func:`scipy.ndimage.gaussian_filter`; float32 output.

    Equals ``gaussian_filter(image.astype(float32), sigma, mode=mode, truncate=truncate)``
    on the whole array; with ``slice_wise`` each z-plane is smoothed in 2D (y, x), as the
    Allen segmenter's ``image_smoothing_gaussian_slice_by_slice``.

    The Allen segmenter smooths with ``mode="nearest"`` and ``truncate=3.0``; the default
    here is scipy's ``truncate=4.0`` (a slightly wider kernel). Set ``truncate: 3`` to
    reproduce the Allen numbers exactly.

    Parameters
    ----------
    sigma : float or tuple of float
        One value for every filtered axis, or one per filtered axis ((z, y, x), or (y, x)
        when slice-wise on a 3D image).
    truncate : float
        The halo is ``int(truncate*sigma + 0.5)``.
    mode : str
        scipy.ndimage boundary mode (``constant``: 0 beyond the edge); ``wrap`` is not
        offered: a block cannot read the opposite side of the volume.
    slice_wise : bool
        Smooth each z-plane separately (no smoothing along z).
    """

    sigma: float | tuple[float, ...] = param(
        "float_or_floats", minimum=0, exclusive_minimum=True, unit="length",
        doc="Standard deviation in voxels; one number, or one per axis (z, y, x).")
    truncate: float = param("float", 4.0, minimum=0, exclusive_minimum=True,
                            doc="Kernel radius in standard deviations (sets the halo).")
    mode: str = param("str", "nearest", choices=_BLOCK_MODES,
                      doc="How the image is extended beyond its edges (scipy's boundary mode).")
    slice_wise: bool = param("bool", False, doc=slice_wise_doc("the smoothing"))

    @property
    def pad_mode(self) -> str:
        return numpy_pad_mode(self.mode)

    def _sigmas(self, ndim: int) -> dict[int, float]:
        """Sigma per filtered axis (axes not filtered are absent)."""
        return axis_sigmas(self.sigma, ndim, self.slice_wise, "gaussian")

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _per_axis({a: gaussian_radius(s, self.truncate)
                          for a, s in self._sigmas(ndim).items()}, ndim)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        sig = self._sigmas(image.ndim)
        # sigma 0 makes scipy skip an axis entirely, which is exactly the per-plane 2D filter
        sigma = [sig.get(a, 0.0) for a in range(image.ndim)]
        return ndi.gaussian_filter(image.astype(np.float32, copy=False), sigma,
                                   mode=self.mode, truncate=self.truncate)

    def interior(self, crop: tuple[slice, ...], image: np.ndarray) -> np.ndarray:
        # gaussian_filter is one 1D pass per axis in axis order, float32 in between: cutting
        # an axis's halo right after its pass leaves the later passes fewer lines (a tenth
        # less work at 128³ blocks, halo 8) and every kept value as it was
        sig = self._sigmas(image.ndim)
        out = image.astype(np.float32, copy=False)
        for axis in range(image.ndim):
            if sig.get(axis, 0.0) > 1e-15:  # scipy skips the same axes
                out = ndi.gaussian_filter1d(out, sig[axis], axis=axis, mode=self.mode,
                                            truncate=self.truncate)
            out = out[(slice(None),) * axis + (crop[axis],)]
        return out


# --------------------------------------------------------------------------- diffusion


def _sl(ndim: int, axis: int, sl: slice) -> tuple[slice, ...]:
    return tuple(sl if a == axis else slice(None) for a in range(ndim))


def _interior(arr: np.ndarray, axes: Sequence[int], skip: Sequence[int]) -> np.ndarray:
    """Drop the 1-voxel pad layer along ``axes`` except ``skip``."""
    return arr[tuple(slice(1, -1) if a in axes and a not in skip else slice(None)
                     for a in range(arr.ndim))]


def mean_sq_gradient(image: np.ndarray, slice_wise: bool = False) -> float:
    """Mean over all voxels of the squared gradient magnitude (whole-array reference).

    ``|grad I|^2 = sum_a ((I[x+e_a] - I[x-e_a]) / 2)^2`` over the diffusion axes, with the
    edge voxel replicated beyond the volume (zero-flux Neumann): ITK's
    ``CalculateAverageGradientMagnitudeSquared``. float64.
    """
    x = np.asarray(image, dtype=np.float64)
    return float(_sq_gradient(np.pad(x, 1, mode="edge"), _axes(x.ndim, slice_wise,
                                                                "edge_preserving")).mean())


def _sq_gradient(padded: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    """Squared central-difference gradient of a 1-voxel-padded array (pad cropped)."""
    core = _interior(padded, range(padded.ndim), ())
    out = np.zeros(core.shape)
    for a in axes:
        c = (padded[_sl(padded.ndim, a, slice(2, None))]
             - padded[_sl(padded.ndim, a, slice(None, -2))]) / 2
        out += _interior(c, range(padded.ndim), (a,)) ** 2
    return out


def anisotropic_diffusion(image: np.ndarray, iterations: int = 10, conductance: float = 1.2,
                          time_step: float = 0.0625, mean_sq_gradient: float | None = None,
                          slice_wise: bool = False) -> np.ndarray:
    """Gradient anisotropic (Perona-Malik) diffusion with zero-flux boundaries; float64.

    The explicit scheme of ITK's ``GradientNDAnisotropicDiffusionFunction`` (unit spacing).
    Each of the ``iterations`` steps replicates the edge voxels (zero-flux Neumann boundary)
    and updates every voxel by

    .. math::

        I \\leftarrow I + \\Delta t \\sum_a \\big(F_a(x + e_a/2) - F_a(x - e_a/2)\\big),
        \\qquad F_a(x + e_a/2) = D_a \\, \\exp\\big(-g_a^2 / (2 k^2 G^2)\\big),

    with the half-voxel difference ``D_a = I[x+e_a] - I[x]``, the gradient magnitude at the
    half voxel ``g_a^2 = D_a^2 + sum_{b != a} ((c_b[x] + c_b[x+e_a]) / 2)^2`` (``c_b`` the
    central difference along ``b``), ``k = conductance`` and ``G^2 = mean_sq_gradient``.

    ITK recomputes ``G^2`` (the mean squared gradient of the current image) before every
    iteration; here it is fixed for the whole run -- normally the input's value from
    :class:`EdgePreservingStats` -- because a per-iteration global statistic cannot be
    computed blockwise. ``None`` uses ``G = 1``, ITK's "fixed average gradient magnitude"
    option: ``conductance`` then is in intensity units (times sqrt 2). ``G = 0`` (a flat
    image) stops diffusion, as in ITK.

    Parameters
    ----------
    image : ndarray
        2D or 3D image, any real dtype.
    iterations, conductance, time_step : int, float, float
        See :class:`EdgePreserving`.
    mean_sq_gradient : float or None
        ``G^2`` above.
    slice_wise : bool
        Diffuse along y and x only (each z-plane separately).

    Returns
    -------
    ndarray of float64, the shape of ``image``.
    """
    u = np.array(image, dtype=np.float64)
    ndim = u.ndim
    axes = _axes(ndim, slice_wise, "edge_preserving")
    k2 = 2.0 * conductance ** 2 * (1.0 if mean_sq_gradient is None else mean_sq_gradient)
    pad = [(1, 1) if a in axes else (0, 0) for a in range(ndim)]
    for _ in range(iterations):
        # replicating the edge voxel each step makes the flux through the volume faces 0
        p = np.pad(u, pad, mode="edge")
        # central differences c_b, full length (n + 2) along the other padded axes
        central = {b: (p[_sl(ndim, b, slice(2, None))] - p[_sl(ndim, b, slice(None, -2))]) / 2
                   for b in axes}
        delta = np.zeros_like(u)
        for a in axes:
            d = _interior(p[_sl(ndim, a, slice(1, None))] - p[_sl(ndim, a, slice(None, -1))],
                          axes, (a,))  # n_a + 1 half voxels along a
            g2 = d * d
            for b in axes:
                if b != a:
                    c = _interior(central[b], axes, (a, b))
                    half = (c[_sl(ndim, a, slice(None, -1))] + c[_sl(ndim, a, slice(1, None))])
                    g2 += 0.25 * half * half
            flux = d * np.exp(-g2 / k2) if k2 > 0 else np.zeros_like(d)
            delta += flux[_sl(ndim, a, slice(1, None))] - flux[_sl(ndim, a, slice(None, -1))]
        u += time_step * delta
    return u


@dataclass(frozen=True)
class EdgePreserving(BlockOp):
    """Edge-preserving smoothing: gradient anisotropic diffusion; float32 output.

    The Allen segmenter's ``edge_preserving_smoothing_3d`` (ITK's
    ``GradientAnisotropicDiffusionImageFilter``), re-implemented in NumPy: see
    :func:`anisotropic_diffusion` for the exact scheme and its one deviation from ITK (the
    conductance scale ``G^2`` is fixed for the run instead of recomputed every iteration).

    Halo ``iterations`` per diffused axis: every step reads a 1-voxel neighbourhood
    (diagonals included), so errors from a block's cut edge travel one voxel per step.
    Pad mode ``"symmetric"`` (scipy ``reflect``): a mirror image evolves as its own mirror
    image under this scheme, so diffusing the mirrored block equals the zero-flux boundary
    at every step -- the block result equals the whole-array one to float rounding.

    Parameters
    ----------
    iterations : int
        Number of explicit steps.
    conductance : float
        ``k``: edges whose gradient is well above ``k * sqrt(2) * G`` are kept.
    time_step : float
        ``Delta t``; ITK advises <= 0.0625 in 3D and <= 0.125 in 2D.
    slice_wise : bool
        Diffuse each z-plane separately.
    mean_sq_gradient : float or None
        Whole-image mean squared gradient ``G^2`` of the input (from
        :class:`EdgePreservingStats`); ``None`` uses ``G = 1`` (see
        :func:`anisotropic_diffusion`).
    """

    iterations: int = param("int", 10, minimum=1, maximum=200,
                            doc="Diffusion steps; more steps smooth more (and cost more).")
    conductance: float = param(
        "float", 1.2, minimum=0, exclusive_minimum=True,
        doc="Edge sensitivity: lower keeps weaker edges, higher smooths across them.")
    time_step: float = param(
        "float", 0.0625, minimum=0, maximum=0.25, exclusive_minimum=True,
        doc="Diffusion time step; <= 0.25 keeps the scheme stable (0.0625 in 3D).")
    slice_wise: bool = param("bool", False, doc=slice_wise_doc("the diffusion"))
    mean_sq_gradient: float | None = computed()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mean_sq_gradient is not None:
            g = float(self.mean_sq_gradient)
            if not (math.isfinite(g) and g >= 0):
                raise OptionError(f"edge_preserving mean_sq_gradient must be finite and >= 0, "
                                  f"got {self.mean_sq_gradient!r}")
            object.__setattr__(self, "mean_sq_gradient", g)

    @property
    def pad_mode(self) -> str:
        return "symmetric"

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _per_axis(dict.fromkeys(_axes(ndim, self.slice_wise, "edge_preserving"),
                                       self.iterations), ndim)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return anisotropic_diffusion(image, self.iterations, self.conductance, self.time_step,
                                     self.mean_sq_gradient, self.slice_wise).astype(np.float32)


@dataclass(frozen=True)
class EdgePreservingStats(BlockReduce):
    """Whole-image mean squared gradient ``G^2`` for :class:`EdgePreserving` (a float).

    Equals :func:`mean_sq_gradient` of the whole image: central differences along the
    diffused axes, the edge voxel replicated beyond the volume (halo 1).
    """

    slice_wise: bool = param("bool", False, doc=slice_wise_doc("the diffusion"))

    @property
    def pad_mode(self) -> str:
        return "edge"

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _per_axis(dict.fromkeys(_axes(ndim, self.slice_wise, "edge_preserving"), 1),
                         ndim)

    def partial(self, crop: Region, image: np.ndarray) -> tuple[int, int]:
        """The block's sum of squared gradients (exact fixed point, see
        :func:`engine.stats.to_fixed`) and its voxel count."""
        axes = _axes(image.ndim, self.slice_wise, "edge_preserving")
        # pad one more voxel so _sq_gradient's output has the padded shape; crop lies inside
        x = np.pad(image.astype(np.float64), 1, mode="edge")
        sq = _sq_gradient(x, axes)[crop]
        return stats.to_fixed(float(sq.sum())), int(sq.size)

    def merge(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return a[0] + b[0], a[1] + b[1]

    def finish(self, merged: tuple[int, int]) -> float:
        # the exact total rounded once: math.fsum of the block sums
        total, count = merged
        return stats.from_fixed(total) / count if count else 0.0


# --------------------------------------------------------------------------- spot


def spot_response(image: np.ndarray, sigma: Sigma, slice_wise: bool = False) -> np.ndarray:
    """Scale-normalised negative Laplacian of Gaussian, ``-sigma^2 LoG(image)``; float64.

    The Allen segmenter's ``dot_3d`` / ``dot_2d``: :func:`scipy.ndimage.gaussian_laplace`
    with its defaults (``mode="reflect"``, ``truncate=4.0``) on the image in float64; with
    ``slice_wise`` the 2D Laplacian (y, x) of each z-plane (``dot_slice_by_slice``).

    With one sigma per filtered axis the response is ``-sum_a sigma_a^2 d^2/dx_a^2 G``,
    each second derivative normalised by its own axis's sigma: for sigmas that are one
    physical sigma divided by the voxel size, that is the isotropic scale-normalised LoG
    in physical space (the same response on any voxel grid).
    """
    x = np.asarray(image, dtype=np.float64)
    sig = axis_sigmas(sigma, x.ndim, slice_wise, "spot")
    if len(sig) == x.ndim and not isinstance(sigma, tuple):
        return -(float(sigma) ** 2) * ndi.gaussian_laplace(x, float(sigma), mode="reflect")
    # second Gaussian derivatives along the filtered axes, sigma 0 (skipped) elsewhere
    sigmas = [sig.get(a, 0.0) for a in range(x.ndim)]
    out = np.zeros_like(x)
    for a, s in sig.items():
        order = [2 if b == a else 0 for b in range(x.ndim)]
        d2 = ndi.gaussian_filter(x, sigmas, order=order, mode="reflect")
        out += d2 if not isinstance(sigma, tuple) else s ** 2 * d2
    # one sigma: normalised once, as the Allen segmenter does
    return -(float(sigma) ** 2) * out if not isinstance(sigma, tuple) else -out


@dataclass(frozen=True)
class Spot(BlockOp):
    """Spot (dot) filter: ``mask |= -sigma^2 LoG(image, sigma) > cutoff`` per scale; bool.

    The Allen segmenter's ``dot_3d_wrapper`` (3D) and ``dot_2d_slice_by_slice_wrapper``
    (``slice_wise``), see :func:`spot_response`. Bright round objects of radius about
    ``sigma * sqrt(ndim)`` give a positive response.

    Halo: the largest ``int(4*sigma + 0.5)``, the support of scipy's Gaussian second
    derivatives; pad mode ``"symmetric"`` (scipy ``reflect``, gaussian_laplace's default).

    Parameters
    ----------
    scales : tuple of (sigma, cutoff)
        Gaussian sigma in voxels and the response cutoff of each scale.
    slice_wise : bool
        2D filter on each z-plane.
    """

    scales: tuple[tuple[Sigma, float], ...] = _scales()
    slice_wise: bool = param("bool", False, doc=slice_wise_doc())

    @property
    def pad_mode(self) -> str:
        return "symmetric"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(bool)

    def halo(self, ndim: int) -> tuple[int, ...]:
        radii = [_radius(s, LOG_TRUNCATE, ndim, self.slice_wise, "spot") for s, _ in self.scales]
        return _per_axis({a: max(r[a] for r in radii) for a in radii[0]}, ndim)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        mask = np.zeros(image.shape, bool)
        for sigma, cutoff in self.scales:
            mask |= spot_response(image, sigma, self.slice_wise) > cutoff
        return mask

    def response(self, image: np.ndarray) -> np.ndarray:
        """Maximum response over the scales (float32), for choosing cutoffs by eye."""
        return np.max([spot_response(image, s, self.slice_wise) for s, _ in self.scales],
                      axis=0).astype(np.float32)


# --------------------------------------------------------------------------- filament


def hessian_eigenvalues(image: np.ndarray, sigma: Sigma, slice_wise: bool = False,
                        truncate: float = HESSIAN_TRUNCATE) -> np.ndarray:
    """Scale-normalised Hessian eigenvalues, sorted by absolute value; float64.

    The Allen segmenter's ``absolute_3d_hessian_eigenvalues(..., scale=True,
    whiteonblack=True)``: ``S = gaussian_filter(image, sigma, mode="nearest",
    truncate=3.0)``, first derivatives by central differences (:func:`numpy.gradient`), the
    Hessian ``H_ab`` by central differences of those, times ``sigma^2``; eigenvalues sorted
    by ``|lambda|`` ascending (``lambda_1`` along a filament, ``lambda_2, lambda_3`` across).

    One deliberate difference: :func:`numpy.gradient` switches to one-sided differences on
    the outer voxel layer; here ``S`` is computed on the image extended by 2 replicated edge
    voxels, so central differences apply everywhere (consistent with ``mode="nearest"``,
    and what makes the result independent of the block layout). Voxels >= 2 from the edge
    are unaffected.

    With one sigma per filtered axis, ``H_ab`` is scaled by ``sigma_a * sigma_b``: for
    sigmas that are one physical sigma over the voxel size, that is the physical Hessian
    times the physical sigma squared (the same eigenvalues on any voxel grid).

    Returns
    -------
    ndarray of float64, shape ``image.shape + (k,)`` with ``k`` the number of filtered axes
    (3, or 2 for 2D images and slice-wise filtering).
    """
    x = np.asarray(image, dtype=np.float64)
    ndim = x.ndim
    sig = axis_sigmas(sigma, ndim, slice_wise, "filament")
    axes = tuple(sig)
    k = len(axes)
    x = np.pad(x, [(2, 2) if a in axes else (0, 0) for a in range(ndim)], mode="edge")
    smooth = ndi.gaussian_filter(x, [sig.get(a, 0.0) for a in range(ndim)],
                                 mode="nearest", truncate=truncate)
    core = tuple(slice(2, -2) if a in axes else slice(None) for a in range(ndim))
    grads = [np.gradient(smooth, axis=a) for a in axes]
    hess = np.empty(image.shape + (k, k))
    for p in range(k):
        for q in range(p, k):
            scale = sigma ** 2 if not isinstance(sigma, tuple) else \
                sig[axes[p]] * sig[axes[q]]
            h = np.gradient(grads[p], axis=axes[q])[core] * scale
            hess[..., p, q] = h
            hess[..., q, p] = h
    eig = np.empty(image.shape + (k,))
    step = 16  # eigvalsh works on copies: bound its temporaries by going plane-slab-wise
    for z in range(0, max(image.shape[0], 1), step):
        eig[z:z + step] = np.linalg.eigvalsh(hess[z:z + step])
    order = np.argsort(np.abs(eig), axis=-1, kind="stable")
    return np.take_along_axis(eig, order, axis=-1)


def vesselness(eigenvalues: np.ndarray, tau: float, l3_min: float) -> np.ndarray:
    """The Allen segmenter's Jerman-style vesselness from sorted eigenvalues; float64.

    ``compute_vesselness3D`` (k = 3: ``l2, l3 = lambda_2, lambda_3``) and
    ``compute_vesselness2D`` (k = 2: ``l2 = l3 = lambda_2``, the larger-magnitude one)::

        lrho = tau * l3_min        where l3 < 0 and l3 > tau * l3_min, else l3
        R    = 27 l2^2 |lrho - l2| / (2 |l2| + |lrho - l2|)^3   (0 denominator -> 1e-10)
        R    = 1                   where l2 < lrho / 2
        R    = 0                   where l2 >= 0 or l3 >= 0 (or R is infinite)

    Where ``lrho <= l2 < 0`` (a bright tube, ``|l2| <= |lrho|``) ``R`` is Jerman et al.
    (2016)'s ``l2^2 (lrho - l2) 27 / (l2 + lrho)^3``. ``l3_min`` is the minimum of ``l3``
    over the *whole image* (:class:`FilamentStats`), so ``lrho`` is a global regularisation.
    Responses lie in [0, 1].
    """
    l2 = eigenvalues[..., 1]
    l3 = eigenvalues[..., -1]
    t = tau * l3_min
    lrho = np.where((l3 < 0) & (l3 > t), t, l3)
    d = np.abs(lrho - l2)
    den = (2 * np.abs(l2) + d) ** 3
    den[den == 0] = 1e-10
    with np.errstate(over="ignore", invalid="ignore"):
        r = 27 * l2 ** 2 * d / den
    r[l2 < 0.5 * lrho] = 1
    r[(l2 >= 0) | (l3 >= 0) | ~np.isfinite(r)] = 0
    return r


POLARITIES = ("bright", "dark")
"""Structures a filament filter looks for: brighter or darker than their surroundings."""


def _oriented(image: np.ndarray, polarity: str) -> np.ndarray:
    """The image with the sought structures bright: negated for dark ones (float64)."""
    x = np.asarray(image, dtype=np.float64)
    return -x if polarity == "dark" else x


def filament_response(image: np.ndarray, sigma: Sigma, tau: float, l3_min: float,
                      slice_wise: bool = False, polarity: str = "bright") -> np.ndarray:
    """Vesselness of one scale (:func:`hessian_eigenvalues` then :func:`vesselness`);
    ``polarity="dark"`` finds dark filaments (the vesselness of the negated image)."""
    return vesselness(hessian_eigenvalues(_oriented(image, polarity), sigma, slice_wise),
                      tau, l3_min)


def filament_l3_min(image: np.ndarray, sigma: Sigma, slice_wise: bool = False,
                    polarity: str = "bright") -> float:
    """Whole-array ``min(lambda_3)`` of one scale (what :class:`FilamentStats` reduces)."""
    return float(hessian_eigenvalues(_oriented(image, polarity), sigma,
                                     slice_wise)[..., -1].min())


def _filament_halo(scales: tuple[tuple[Sigma, float], ...], ndim: int,
                   slice_wise: bool) -> tuple[int, ...]:
    # Gaussian support plus 2: the Hessian is a central difference of central differences
    radii = [_radius(s, HESSIAN_TRUNCATE, ndim, slice_wise, "filament") for s, _ in scales]
    return _per_axis({a: max(r[a] for r in radii) + 2 for a in radii[0]}, ndim)


def _polarity() -> Any:
    return param("str", "bright", choices=POLARITIES,
                 doc="bright: structures brighter than their surroundings (fluorescence, "
                     "contrast-inverted tomograms); dark: darker ones (membranes and "
                     "microtubules in an ordinary electron tomogram).")


@dataclass(frozen=True)
class Filament(BlockOp):
    """Filament (vesselness) filter: ``mask |= vesselness > cutoff`` per scale; bool.

    The Allen segmenter's ``filament_3d_wrapper`` (3D, :func:`vesselness` on
    :func:`hessian_eigenvalues`) and ``filament_2d_wrapper`` (2D images, and each z-plane
    with ``slice_wise``), generalised to any ``tau`` as ``vesselness3D``/``vesselness2D``
    (the wrappers fix ``tau = 1``). Bright filaments on a dark background, or with
    ``polarity="dark"`` dark ones on a bright background (the vesselness of the negated
    image: membranes and microtubules in an ordinary electron tomogram).

    ``tau * min(lambda_3)`` is a whole-image statistic: run :class:`FilamentStats` over all
    blocks first and pass its result as ``l3_min``. Slice-wise, Allen takes the minimum
    over each plane concatenated with the z maximum projection (and zeroes the last 3
    columns of each plane, artefacts of that concatenation); here it is the minimum over
    all planes of the volume, and no column is zeroed.

    Halo: ``int(3*sigma + 0.5) + 2`` for the largest sigma (Gaussian support plus the two
    nested central differences); pad mode ``"edge"`` (Allen smooths with ``nearest``).

    Parameters
    ----------
    scales : tuple of (sigma, cutoff)
        Gaussian sigma in voxels (about the filament radius) and the response cutoff of
        each scale (responses lie in [0, 1]).
    tau : float
        Lower values raise the response of weak filaments.
    slice_wise : bool
        2D filter on each z-plane.
    polarity : str
        ``"bright"`` or ``"dark"`` structures.
    l3_min : tuple of float or None
        Whole-image ``min(lambda_3)`` per scale, from :class:`FilamentStats`; required to run.
    """

    scales: tuple[tuple[Sigma, float], ...] = _scales()
    tau: float = param("float", 1.0, minimum=0, maximum=1, exclusive_minimum=True,
                       doc="Response uniformity (Jerman's tau): lower values give a more "
                           "uniform response along the structure and at junctions.")
    slice_wise: bool = param("bool", False, doc=slice_wise_doc())
    l3_min: tuple[float, ...] | None = computed()
    polarity: str = _polarity()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l3_min is not None:
            l3 = tuple(float(v) for v in self.l3_min)
            if len(l3) != len(self.scales) or not all(math.isfinite(v) for v in l3):
                raise OptionError(f"filament l3_min {list(self.l3_min)} must hold one finite "
                                  f"value per scale ({len(self.scales)})")
            object.__setattr__(self, "l3_min", l3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(bool)

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _filament_halo(self.scales, ndim, self.slice_wise)

    def _l3(self) -> tuple[float, ...]:
        if self.l3_min is None:
            raise OptionError("filament needs l3_min, the whole-image statistic computed by "
                              "FilamentStats over all blocks")
        return self.l3_min

    def __call__(self, image: np.ndarray) -> np.ndarray:
        mask = np.zeros(image.shape, bool)
        for (sigma, cutoff), m in zip(self.scales, self._l3(), strict=True):
            mask |= filament_response(image, sigma, self.tau, m, self.slice_wise,
                                      self.polarity) > cutoff
        return mask

    def response(self, image: np.ndarray) -> np.ndarray:
        """Maximum vesselness over the scales (float32), for choosing cutoffs by eye."""
        return np.max([filament_response(image, s, self.tau, m, self.slice_wise, self.polarity)
                       for (s, _), m in zip(self.scales, self._l3(), strict=True)],
                      axis=0).astype(np.float32)


@dataclass(frozen=True)
class FilamentStats(BlockReduce):
    """Per-scale whole-image ``min(lambda_3)`` for :class:`Filament` (a tuple of floats).

    ``lambda_3`` is the largest-magnitude eigenvalue of :func:`hessian_eigenvalues`
    (``lambda_2`` of the 2D filter); the partial of a block is its minimum over the write
    region, ``combine`` the minimum of those: exactly :func:`filament_l3_min` of the whole
    image, for any block layout.
    """

    scales: tuple[tuple[Sigma, float], ...] = _scales()
    slice_wise: bool = param("bool", False, doc=slice_wise_doc())
    polarity: str = _polarity()

    @property
    def pad_mode(self) -> str:
        return "edge"

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _filament_halo(self.scales, ndim, self.slice_wise)

    def partial(self, crop: Region, image: np.ndarray) -> tuple[float, ...]:
        x = _oriented(image, self.polarity)
        return tuple(float(hessian_eigenvalues(x, s, self.slice_wise)[crop][..., -1].min())
                     for s, _ in self.scales)

    def merge(self, a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(float(v) for v in np.minimum(np.asarray(a, np.float64),
                                                  np.asarray(b, np.float64)))


# --------------------------------------------------------------------------- MISIC preprocessing
#
# MISIC (Panigrahi et al., eLife 2021) segments bacteria from the shape index of the image;
# its handbook suggests gamma adjustment and an unsharp mask before it. The three filters
# below reproduce scikit-image's functions, which MISIC calls.

SKIMAGE_TRUNCATE = 4.0
"""Gaussian truncation of scikit-image's ``gaussian`` (scipy's default)."""


def _float_like_skimage(image: np.ndarray) -> np.ndarray:
    """``image`` in the float type scikit-image computes in: float32 for float16/float32
    inputs, float64 otherwise (``img_as_float`` / ``_supported_float_type``); no rescaling."""
    dtype = np.float32 if image.dtype in (np.float16, np.float32) else np.float64
    return np.asarray(image).astype(dtype, copy=False)


@dataclass(frozen=True)
class Gamma(BlockOp):
    """Gamma adjustment of an image in [0, 1]: ``clip(x, 0, 1) ** gamma``; float32.

    Equals ``skimage.exposure.adjust_gamma(clip(x, 0, 1), gamma)`` for a float32 image
    (scikit-image scales float images by the range [0, 1], so the clip is what it
    assumes). Use it after ``normalize`` or ``clip_percentiles``: values outside [0, 1] are
    clipped first. ``gamma < 1`` brightens faint objects (MISIC's handbook: 0.2 to 0.5 for
    fluorescence with uneven expression), ``gamma > 1`` darkens.

    Voxel-wise (halo 0): the workflow runs it as a view on read, never stored.

    Parameters
    ----------
    gamma : float
        The exponent.
    """

    gamma: float = param("float", 1.0, minimum=0, exclusive_minimum=True,
                         doc="The exponent: < 1 brightens faint objects (0.2 to 0.5 in "
                             "MISIC's handbook for uneven fluorescence), > 1 darkens.")

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(image).astype(np.float32, copy=False), 0, 1)
        return np.power(x, np.float32(self.gamma), dtype=np.float32)


@dataclass(frozen=True)
class UnsharpMask(BlockOp):
    """Unsharp masking: ``x + amount * (x - gaussian(x, radius))``; float32.

    Exactly ``skimage.filters.unsharp_mask(x, radius, amount, preserve_range=True)``
    (``channel_axis=None``): the blur is :func:`scipy.ndimage.gaussian_filter` with
    ``sigma=radius``, ``mode="reflect"`` (the edge voxel repeated, scikit-image's choice
    here, not ``nearest``) and ``truncate=4.0``, computed in float32 for float32 input
    (float64 for integer or float64 input) and returned as float32. With
    ``preserve_range=True`` scikit-image does not clip, and neither does this filter:
    sharpening overshoots below the minimum and above the maximum of the input. (Without
    it, scikit-image would first rescale integer images to [0, 1] and clip the result to
    [0, 1] or [-1, 1].) With ``slice_wise`` each z-plane is sharpened in 2D, as
    scikit-image on each plane.

    Halo: ``int(4*radius + 0.5)`` on the blurred axes; pad mode ``"symmetric"`` (scipy
    ``reflect``).

    Parameters
    ----------
    radius : float or tuple of float
        Standard deviation of the Gaussian blur in voxels (scikit-image's ``radius``), one
        per filtered axis if a tuple.
    amount : float
        Gain of the detail ``x - blur(x)``; 0 returns the image, negative values blur.
    slice_wise : bool
        Sharpen each z-plane separately.
    """

    radius: float | tuple[float, ...] = param(
        "float_or_floats", 1.0, minimum=0, exclusive_minimum=True, unit="length",
        doc="Standard deviation of the Gaussian blur in voxels; one number, or one per "
            "axis (z, y, x).")
    amount: float = param("float", 1.0,
                          doc="Gain of the details (x - blur); MISIC's handbook uses 2 for "
                              "fluorescence.")
    slice_wise: bool = param("bool", False, doc=slice_wise_doc("the sharpening"))

    @property
    def pad_mode(self) -> str:
        return "symmetric"

    def halo(self, ndim: int) -> tuple[int, ...]:
        return _per_axis(_radius(self.radius, SKIMAGE_TRUNCATE, ndim, self.slice_wise,
                                 "unsharp_mask"), ndim)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = _float_like_skimage(image)
        sig = axis_sigmas(self.radius, x.ndim, self.slice_wise, "unsharp_mask")
        sigma = [sig.get(a, 0.0) for a in range(x.ndim)]
        blurred = ndi.gaussian_filter(x, sigma, mode="reflect", truncate=SKIMAGE_TRUNCATE)
        # scikit-image's order of operations, so float32 results match it bit for bit
        return (x + (x - blurred) * self.amount).astype(np.float32, copy=False)


SHAPE_INDEX_COMBINE = ("mean", "max")
"""How :class:`ShapeIndex` combines its scales."""


def _inside_box(inside: np.ndarray | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The box of ``True`` voxels of ``inside`` (the volume part of a padded read region):
    one slice per axis; the whole array when ``inside`` is ``None``."""
    if inside is None:
        return tuple(slice(None) for _ in shape)
    box = []
    for a in range(inside.ndim):
        hit = np.flatnonzero(inside.any(axis=tuple(b for b in range(inside.ndim) if b != a)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def _shape_index_axes(ndim: int, slice_wise: bool) -> tuple[int, ...]:
    """The (y, x) axes of the shape index; :class:`OptionError` for 3D without slice_wise."""
    axes = _axes(ndim, slice_wise, "shape_index")
    if len(axes) != 2:
        raise OptionError("shape_index is defined for 2D images: on a 3D image set "
                          "slice_wise: true (each z-plane gets its 2D shape index)")
    return axes


def shape_index(image: np.ndarray, sigma: float, slice_wise: bool = False,
                inside: np.ndarray | None = None) -> np.ndarray:
    """Koenderink's shape index of a 2D image, or of each z-plane of a 3D one.

    ``(2/pi) arctan((l2 + l1) / (l2 - l1))`` with ``l1 >= l2`` the eigenvalues of the
    Hessian: exactly ``skimage.feature.shape_index(image, sigma, mode="reflect")`` (the
    Gaussian smoothing ``gaussian_filter(image, sigma, mode="reflect", truncate=4)``, the
    Hessian by :func:`numpy.gradient` of :func:`numpy.gradient`, one-sided differences on
    the outer voxel layer, the eigenvalues by the closed 2x2 formula, in float32 for
    float32 input), except where scikit-image gives NaN: in flat regions (both eigenvalues
    0, e.g. a constant background) the index is undefined and is 0 here (a "saddle", the
    middle of the scale). Values lie in [-1, 1]: -1 a dark spherical cup, -0.5 a dark
    trough (valley), 0 a saddle, 0.5 a bright ridge, 1 a bright spherical cap.

    Parameters
    ----------
    image : ndarray, shape (Y, X), or (Z, Y, X) with ``slice_wise``
        Any real dtype (integer images are computed in float64, as scikit-image does).
    sigma : float
        Standard deviation of the Gaussian smoothing in voxels, > 0.
    slice_wise : bool
        Required for 3D images: the index of each z-plane (the Hessian of (y, x)).
    inside : ndarray of bool, optional
        When ``image`` is a padded read region: ``True`` on the voxels that belong to the
        volume (a box), ``False`` on the padding beyond the volume edges. The Hessian's
        one-sided differences are taken at the volume edges, as on the whole volume.
        ``None``: the whole array is the volume.

    Returns
    -------
    ndarray of float32, ``image.shape``; 0 outside ``inside``.
    """
    x = _float_like_skimage(image)
    axes = _shape_index_axes(x.ndim, slice_wise)
    smooth = ndi.gaussian_filter(x, [sigma if a in axes else 0.0 for a in range(x.ndim)],
                                 mode="reflect", truncate=SKIMAGE_TRUNCATE)
    box = _inside_box(inside, x.shape)
    s = smooth[box]
    out = np.zeros(x.shape, np.float32)
    if any(s.shape[a] < 2 for a in axes):
        raise OptionError(f"shape_index needs at least 2 voxels along y and x, got an image "
                          f"of shape {list(image.shape)}")
    grads = [np.gradient(s, axis=a) for a in axes]
    h00 = np.gradient(grads[0], axis=axes[0])
    h01 = np.gradient(grads[0], axis=axes[1])
    h11 = np.gradient(grads[1], axis=axes[1])
    half_trace = (h00 + h11) / 2
    root = np.sqrt(h01 ** 2 + ((h00 - h11) / 2) ** 2)
    l1 = half_trace + root
    l2 = half_trace - root
    with np.errstate(divide="ignore", invalid="ignore"):
        si = (2.0 / np.pi) * np.arctan((l2 + l1) / (l2 - l1))
    out[box] = np.nan_to_num(si, nan=0.0)
    return out


@dataclass(frozen=True)
class ShapeIndex(BlockOp):
    """Multi-scale shape index (:func:`shape_index`), MISIC's network input; float32.

    The shape index at each scale ``sigma`` of ``sigmas``, combined voxel-wise by their
    ``mean`` or ``max``. MISIC computes ``skimage.feature.shape_index`` at sigma 1, 1.5 and
    2 (after reflect-padding the image by 15 pixels) and gives the three maps to its network
    as three channels, without combining them; a single-channel step must combine: the
    default ``mean`` keeps the average of what those channels show, ``max`` favours the
    most convex scale (bright caps and ridges win). With one sigma both are that scale's
    index.

    2D only, as scikit-image's shape index: a 3D image needs ``slice_wise`` (each z-plane
    in 2D) and is refused otherwise.

    Blockwise exactness: the whole-volume Hessian uses one-sided differences on the volume's
    outer voxel layer, which a block can only reproduce if it knows where the volume ends.
    So the op takes a second input, ``inside``: a boolean array that is ``True`` everywhere
    in the volume, padded with ``False`` (pad mode ``"constant"``); run it as
    ``apply_blockwise(op, [image, np.ones(image.shape, bool)], block)``. Halo:
    ``int(4*sigma + 0.5) + 2`` for the largest sigma (the Gaussian's support plus the two
    nested central differences) on y and x; the image is padded ``"symmetric"`` (scipy
    ``reflect``).

    Parameters
    ----------
    sigmas : tuple of float
        Gaussian scales in voxels (about a quarter to half the object width).
    combine : str
        ``"mean"`` or ``"max"`` over the scales.
    slice_wise : bool
        Shape index of each z-plane of a 3D image (required for 3D).
    """

    sigmas: tuple[float, ...] = param(
        "floats", [1.0], minimum=0, exclusive_minimum=True,
        doc="Gaussian scales of the Hessian in voxels (MISIC: 1, 1.5 and 2, at an object "
            "width of about 10 pixels).")
    combine: str = param("str", "mean", choices=SHAPE_INDEX_COMBINE,
                         doc="How the scales are combined: mean or max. MISIC feeds its "
                             "network the scales as separate channels; mean keeps their "
                             "average.")
    slice_wise: bool = param("bool", False,
                             doc="Compute the 2D shape index of each z-plane (last two axes) "
                                 "of a 3D image; required for 3D images (the shape index is "
                                 "defined in 2D).")

    @property
    def pad_modes(self) -> tuple[str, ...]:
        return ("symmetric", "constant")

    def check_dims(self, ndim: int) -> tuple[int, ...]:
        """The filtered axes; :class:`OptionError` unless they are two (2D, or slice-wise)."""
        return _shape_index_axes(ndim, self.slice_wise)

    def halo(self, ndim: int) -> tuple[int, ...]:
        r = max(gaussian_radius(s, SKIMAGE_TRUNCATE) for s in self.sigmas) + 2
        return _per_axis(dict.fromkeys(self.check_dims(ndim), r), ndim)

    def __call__(self, image: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
        self.check_dims(image.ndim)
        maps = [shape_index(image, s, self.slice_wise, inside) for s in self.sigmas]
        if len(maps) == 1:
            return maps[0]
        if self.combine == "max":
            return np.max(maps, axis=0).astype(np.float32)
        return np.mean(np.asarray(maps, np.float64), axis=0).astype(np.float32)
