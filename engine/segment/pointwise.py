"""Voxel-by-voxel functions of workflow steps (picklable, so views can travel to workers).

Each takes the regions of its inputs and returns the step's output for those voxels; the
constants (thresholds, stretch limits) come from global reductions computed beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.objtables import ShardedTable


@dataclass(frozen=True)
class Greater:
    """Foreground where ``image > threshold`` (scikit-image's convention)."""

    threshold: float

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return image > self.threshold


@dataclass(frozen=True)
class Stretch:
    """The Allen segmenter's intensity normalization with fixed global limits.

    Voxels above ``reset_above`` become ``reset_to`` (the upper-bound mode), values are
    clipped to ``[lo, hi]`` and mapped to ``(x - lo + 1e-8) / (hi - lo + 1e-8)``; float32.
    """

    lo: float
    hi: float
    reset_above: float | None = None
    reset_to: float = 0.0
    eps: float = 1e-8

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float64)
        if self.reset_above is not None:
            x = np.where(x > self.reset_above, self.reset_to, x)
        np.clip(x, self.lo, self.hi, out=x)
        return ((x - self.lo + self.eps) / (self.hi - self.lo + self.eps)).astype(np.float32)


@dataclass(frozen=True)
class Clip:
    """Clip to ``[lo, hi]``; with ``rescale`` map that range to ``[0, 1]``; float32."""

    lo: float
    hi: float
    rescale: bool = True

    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = np.clip(image.astype(np.float64), self.lo, self.hi)
        if self.rescale:
            x = (x - self.lo) / (self.hi - self.lo) if self.hi > self.lo else x * 0
        return x.astype(np.float32)


@dataclass(frozen=True)
class Negate:
    """Image inversion (``-x``, float32): dark structures become bright."""

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return np.negative(image, dtype=np.float32)


@dataclass(frozen=True)
class Not:
    """Mask inversion."""

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return mask == 0


@dataclass(frozen=True)
class NonZero:
    """Labels to a mask."""

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        return labels != 0


@dataclass(frozen=True)
class Combine:
    """Logical combination of masks: ``or``, ``and``, ``xor``, ``subtract`` (first minus the
    others)."""

    op: str

    def __call__(self, *masks: np.ndarray) -> np.ndarray:
        first, *rest = (m != 0 for m in masks)
        out = first.copy()
        for m in rest:
            if self.op == "or":
                out |= m
            elif self.op == "and":
                out &= m
            elif self.op == "xor":
                out ^= m
            else:
                out &= ~m
        return out


@dataclass(frozen=True)
class LocalThreshold:
    """Masked-object high level: inside object ``k``, foreground where
    ``image > threshold(k)`` (a sharded table ``(ids, thresholds)``,
    :mod:`engine.objtables`; objects without a threshold stay background)."""

    thresholds: ShardedTable

    def __call__(self, image: np.ndarray, objects: np.ndarray) -> np.ndarray:
        inside = objects != 0
        ids, inverse = np.unique(objects[inside], return_inverse=True)
        found, rows = self.thresholds.lookup(ids.astype(np.uint64))
        limit = np.full(ids.size, np.inf, rows[2].dtype if rows[2].size else np.float64)
        limit[found] = rows[2]
        out = np.zeros(image.shape, bool)
        out[inside] = image[inside] > limit[inverse]
        return out


@dataclass(frozen=True)
class AsLabels:
    """A mask as a label image (uint8, 1 = foreground)."""

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        return (mask != 0).astype(np.uint8)


@dataclass(frozen=True)
class AsType:
    """Values cast to ``dtype`` (as ``numpy.ndarray.astype``)."""

    dtype: np.dtype

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return data.astype(self.dtype, copy=False)
