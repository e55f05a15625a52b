"""Seeds for a watershed: local maxima (exact blockwise) and h-maxima (halo-limited).

Both turn an image (typically a distance transform or a smoothed intensity) into a mask
of seed voxels; a ``label`` step then gives each connected group of seed voxels one id
(on the whole volume, exactly), and a ``watershed`` grows them.

:class:`LocalMaxima` keeps a voxel when it is the largest value within an ellipsoid of
radius ``min_distance`` (per axis, so a radius in µm stays a sphere in space on anisotropic
voxels) and exceeds ``min_value``: ``image == maximum_filter(image, footprint, mode=
"nearest")``. The footprint lies within the halo, so the blockwise mask equals the
whole-image one exactly. Unlike :func:`skimage.feature.peak_local_max` it keeps every voxel
of a flat maximum and two equal maxima closer than ``min_distance`` that are not
connected; labelling the mask with full connectivity makes a plateau one seed.

:class:`HMaxima` is :func:`skimage.morphology.h_maxima`: the regional maxima of the image
whose height above their surroundings is at least ``h``. It is a morphological
reconstruction, a global flooding, so blockwise it is *not* exact: a block sees its halo
only, and a maximum whose dynamic is decided by a path leaving the halo may differ.
Measured in ``tests/test_segment_seeds.py`` on a smooth random 23x37x29 image (h 0.05 of
a [0, 1] range), 3 or more blocks per axis and a halo smaller than the block: blocks of
(8, 12, 10) with halo 6 give the whole-image maxima exactly, blocks of (7, 9, 9) with halo
5 agree on 99.992 % of the voxels (:data:`HMAXIMA_AGREEMENT` is the bound tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from engine.errors import OptionError
from engine.segment.blockops import BlockOp
from engine.segment.params import param

__all__ = ["HMAXIMA_AGREEMENT", "HMaxima", "LocalMaxima", "ellipsoid_footprint"]

HMAXIMA_AGREEMENT = 0.999
"""Lowest fraction of voxels on which blockwise h-maxima equal the whole-image ones in
the test's layouts (3 or more blocks per axis, halo smaller than the block)."""


def ellipsoid_footprint(radii: tuple[float, ...]) -> np.ndarray:
    """Boolean ellipsoid of the given radii (voxels, one per axis); shape ``2*floor(r)+1``.

    A voxel offset ``o`` is inside when ``sum((o_a / r_a)^2) <= 1``.
    """
    grids = np.meshgrid(*(np.arange(-math.floor(r), math.floor(r) + 1, dtype=np.float64)
                          for r in radii), indexing="ij")
    return sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)) <= 1.0


def _radii(min_distance: float | tuple[float, ...], ndim: int, what: str
           ) -> tuple[float, ...]:
    if isinstance(min_distance, tuple):
        if len(min_distance) != ndim:
            raise OptionError(f"{what} min_distance {list(min_distance)} has "
                              f"{len(min_distance)} values for a {ndim}D image")
        return min_distance
    return (float(min_distance),) * ndim


@dataclass(frozen=True)
class LocalMaxima(BlockOp):
    """Voxels that are the maximum of their ellipsoidal neighbourhood; bool.

    Exactly ``(image == maximum_filter(image, footprint=ellipsoid_footprint(r),
    mode="nearest")) & (image > min_value)`` of the whole image.

    Parameters
    ----------
    min_distance : float or tuple of float
        Radius of the neighbourhood in voxels, one value or one per axis (z, y, x); two
        seeds are at least this far apart unless they have the same value.
    min_value : float or None
        Only maxima above this value are kept; ``None``: all.
    """

    min_distance: float | tuple[float, ...] = param(
        "float_or_floats", 2.0, minimum=0, exclusive_minimum=True, unit="length",
        doc="Radius of the neighbourhood a seed must be the maximum of (voxels; one "
            "value or one per axis, below 1 on an axis: that axis's plane only); about the "
            "radius of the smallest object to split.")
    min_value: float | None = param(
        "float", None, nullable=True,
        doc="Only maxima above this value become seeds (e.g. a distance in µm on a "
            "distance transform); null: every maximum.")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(bool)

    def halo(self, ndim: int) -> tuple[int, ...]:
        return tuple(math.floor(r) for r in _radii(self.min_distance, ndim, "local_maxima"))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        fp = ellipsoid_footprint(_radii(self.min_distance, image.ndim, "local_maxima"))
        peaks = image == ndi.maximum_filter(image, footprint=fp, mode="nearest")
        if self.min_value is not None:
            peaks &= image > self.min_value
        return peaks


@dataclass(frozen=True)
class HMaxima(BlockOp):
    """:func:`skimage.morphology.h_maxima` of each padded read region; bool.

    Not exact blockwise (see the module's docstring); the halo is ``halo_size`` voxels
    on every axis.

    Parameters
    ----------
    h : float
        Minimal height of a maximum above the saddle that joins it to a higher one
        (image units).
    halo_size : int
        Voxels of context on each side of a block.
    min_value : float or None
        Only maxima above this value are kept; ``None``: all.
    """

    h: float = param("float", minimum=0, exclusive_minimum=True,
                     doc="Minimal dynamic of a maximum (image units): maxima that rise "
                         "less than h above the saddle to a higher one are dropped.")
    halo_size: int = param("int", 16, name="halo", minimum=0, unit="length",
                           doc="Context (voxels) read around each block; maxima whose "
                               "dynamic is decided farther away may differ from the "
                               "whole-image result.")
    min_value: float | None = param(
        "float", None, nullable=True,
        doc="Only maxima above this value become seeds; null: every maximum.")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(bool)

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (int(self.halo_size),) * ndim

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from skimage.morphology import h_maxima

        peaks = h_maxima(image, self.h) != 0
        if self.min_value is not None:
            peaks &= image > self.min_value
        return peaks
