"""Euclidean distance transform with anisotropic sampling, exact blockwise up to a cap.

:class:`DistanceTransform` gives every foreground voxel of a mask its distance to the
nearest background voxel, in physical units (the voxel size as ``sampling``), as
:func:`scipy.ndimage.distance_transform_edt` does on the whole image, but capped at
``max_distance``: ``min(edt(mask, sampling), max_distance)``.

Why the cap makes it exact: a block reads its write region plus a halo of
``ceil(max_distance / sampling[a])`` voxels along each axis ``a``. If a voxel's true
distance ``d`` is at most ``max_distance``, its nearest background voxel lies within
``max_distance`` of it, so within the halo along every axis: the block sees it and finds
the same ``d``. If ``d > max_distance``, the block sees a subset of the background, so it
finds a distance ``>= d > max_distance``, and both are capped to ``max_distance``. Beyond the
volume edges the mask is padded by repeating the edge voxel (``"edge"``): a padded
background voxel ``q`` repeats the volume voxel ``e`` that clamps ``q`` into the volume, and
clamping into a box never moves a point away from a point inside it, so ``e`` is at least as
close to every volume voxel as ``q``: padding adds no shorter distance (scipy measures to
background voxels inside the array only). A read region without background gives
``max_distance`` everywhere: its voxels lie farther than the halo from any background
voxel of the volume. So the blockwise result equals the
capped whole-image transform exactly, for any block layout (tested against scipy).

Choose ``max_distance`` at least the radius of the largest object whose interior matters
(for splitting touching nuclei: their radius); the halo, and so the memory of a block,
grows with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from engine.errors import OptionError
from engine.segment.blockops import BlockOp
from engine.segment.params import computed, param

__all__ = ["DistanceTransform", "capped_distance"]


def capped_distance(mask: np.ndarray, max_distance: float,
                    sampling: tuple[float, ...] | None = None) -> np.ndarray:
    """``min(distance_transform_edt(mask, sampling), max_distance)`` as float32.

    Parameters
    ----------
    mask : ndarray of bool, shape (Y, X) or (Z, Y, X)
        Foreground ``True``; the distance is measured to the nearest ``False`` voxel.
    max_distance : float
        The cap, in the units of ``sampling``.
    sampling : tuple of float, optional
        Voxel size per axis (µm); ``None``: 1 on every axis.

    Returns
    -------
    ndarray of float32, ``mask.shape``
        0 on background; ``max_distance`` everywhere when the mask holds no background.
    """
    fg = np.asarray(mask) != 0
    if fg.all():  # scipy has no background to measure to
        return np.full(fg.shape, max_distance, np.float32)
    d = ndi.distance_transform_edt(fg, sampling=sampling)
    return np.minimum(d, max_distance).astype(np.float32)


@dataclass(frozen=True)
class DistanceTransform(BlockOp):
    """Capped Euclidean distance to the background, in physical units; float32.

    Exactly ``min(scipy.ndimage.distance_transform_edt(mask, sampling), max_distance)``
    of the whole mask (see the module's docstring for why).

    Parameters
    ----------
    max_distance : float
        Cap of the distance, µm (the unit of ``sampling``); sets the halo.
    sampling : tuple of float or None
        Voxel size per axis (z, y, x) in µm, from the image (filled in by the executor);
        ``None``: 1 per axis (distances in voxels).
    """

    max_distance: float = param(
        "float", name="max_distance_um", minimum=0, exclusive_minimum=True,
        doc="Distances are capped at this (µm, or voxels when the image has no physical "
            "voxel size); set it to about the largest object radius. It sets the halo.")
    sampling: tuple[float, ...] | None = computed()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling is not None:
            s = tuple(float(v) for v in self.sampling)
            if not all(math.isfinite(v) and v > 0 for v in s):
                raise OptionError(f"distance_transform sampling must be finite and > 0, got "
                                  f"{list(self.sampling)}")
            object.__setattr__(self, "sampling", s)

    def _sampling(self, ndim: int) -> tuple[float, ...]:
        if self.sampling is None:
            return (1.0,) * ndim
        if len(self.sampling) != ndim:
            raise OptionError(f"distance_transform sampling {list(self.sampling)} has "
                              f"{len(self.sampling)} values for a {ndim}D image")
        return self.sampling

    def halo(self, ndim: int) -> tuple[int, ...]:
        return tuple(math.ceil(self.max_distance / s) for s in self._sampling(ndim))

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return capped_distance(mask, self.max_distance, self._sampling(mask.ndim))
