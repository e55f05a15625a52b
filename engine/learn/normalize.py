"""Intensity normalization from global statistics of a whole source volume, never per patch.

Training stores the mode and the numbers in the checkpoint; inference computes the same
statistics over the volume it predicts (one reduction pass) or reuses the stored ones, so
that a voxel is normalized the same way whichever crop or block it falls in.

Modes, per channel ``c`` of an image ``(C, *spatial)``:

``percentile``
    ``(x - p_low) / (p_high - p_low)`` with exact percentiles (:func:`numpy.percentile`,
    "linear") of the whole channel; the Allen Cell Structure Segmenter and CSBDeep use
    percentile scaling to be robust to hot pixels.
``meanstd``
    ``(x - mean) / std``.
``minmax``
    ``(x - min) / (max - min)``.
``none``
    unchanged (offset 0, scale 1).

A constant channel gets scale 1 (never a division by 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import OptionError

MODES = ("percentile", "meanstd", "minmax", "none")
#: below this many bytes a dask array is computed whole instead of reduced blockwise
SMALL_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Normalization:
    """How to normalize: ``mode`` and, for ``percentile``, the ``low``/``high`` percentiles."""

    mode: str = "percentile"
    low: float = 1.0
    high: float = 99.8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise OptionError(f"normalization mode must be one of {', '.join(MODES)}, "
                              f"not {self.mode!r}")
        for name in ("low", "high"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise OptionError(f"normalization {name} must be a number, not {v!r}")
        if not 0 <= self.low < self.high <= 100:
            raise OptionError(f"normalization percentiles need 0 <= low < high <= 100, got "
                              f"low {self.low}, high {self.high}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "low": float(self.low), "high": float(self.high)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalization:
        if not isinstance(d, Mapping):
            raise OptionError(f"normalization must be a mapping (mode, low, high), not {d!r}")
        unknown = sorted(set(d) - {"mode", "low", "high"})
        if unknown:
            raise OptionError(f"normalization: unknown key(s) {', '.join(map(str, unknown))}; "
                              "known: mode, low, high")
        return cls(**dict(d))


@dataclass(frozen=True)
class ChannelStats:
    """The numbers of one volume: ``(x - offset[c]) / scale[c]`` per channel ``c``."""

    offset: tuple[float, ...]
    scale: tuple[float, ...]

    def to_dict(self) -> dict[str, list[float]]:
        return {"offset": [float(v) for v in self.offset], "scale": [float(v) for v in self.scale]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelStats:
        try:
            offset = tuple(float(v) for v in d["offset"])
            scale = tuple(float(v) for v in d["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OptionError(f"normalization statistics need offset and scale lists ({exc})"
                              ) from None
        if len(offset) != len(scale) or not all(s > 0 for s in scale):
            raise OptionError(f"normalization statistics: {len(offset)} offsets and "
                              f"{len(scale)} scales, scales must be > 0")
        return cls(offset, scale)


def _scale(v: float) -> float:
    return float(v) if np.isfinite(v) and v > 0 else 1.0


def _numpy_stats(channel: np.ndarray, norm: Normalization) -> tuple[float, float]:
    x = np.asarray(channel, dtype=np.float64).ravel()
    if norm.mode == "percentile":
        lo, hi = np.percentile(x, [norm.low, norm.high])
        return float(lo), _scale(hi - lo)
    if norm.mode == "meanstd":
        return float(x.mean()), _scale(x.std())
    if norm.mode == "minmax":
        return float(x.min()), _scale(x.max() - x.min())
    return 0.0, 1.0


def _blockwise_stats(client: Any, channel: Any, norm: Normalization) -> tuple[float, float]:
    from engine import stats

    if norm.mode == "percentile":
        lo, hi = stats.percentile(client, channel, [norm.low, norm.high])
        return float(lo), _scale(hi - lo)
    hist = stats.histogram(client, channel, moments=True)
    if norm.mode == "meanstd":
        return float(hist.mean), _scale(hist.std)
    return float(hist.min), _scale(hist.max - hist.min)


def compute_stats(data: Any, norm: Normalization, client: Any = None) -> ChannelStats:
    """Global per-channel statistics of a whole volume.

    Parameters
    ----------
    data : numpy.ndarray or dask.array.Array, shape (C, *spatial), or sequence of C references
        Any numeric dtype. A reference (``read_region``, ``shape``, ``dtype``, ``chunks``:
        e.g. an :class:`engine.segment.refs.Stored` channel) is what the blockwise tasks
        carry as it is; a dask array's graph, which grows with the volume, travels with
        every task.
    norm : Normalization
    client : distributed.Client, optional
        With a client, channels larger than 256 MiB (dask arrays or references) are
        reduced blockwise on the cluster (exact: :func:`engine.stats.percentile`,
        histogram moments); otherwise each channel is computed whole.

    Returns
    -------
    ChannelStats
    """
    offsets, scales = [], []
    for c in range(len(data)):
        channel = data[c]
        lazy = hasattr(channel, "dask") or hasattr(channel, "read_region")
        nbytes = int(np.prod(channel.shape)) * np.dtype(channel.dtype).itemsize
        if norm.mode == "none":
            o, s = 0.0, 1.0
        elif client is not None and lazy and nbytes > SMALL_BYTES:
            o, s = _blockwise_stats(client, channel, norm)
        else:
            if hasattr(channel, "read_region"):
                channel = channel.read_region(tuple(slice(0, n) for n in channel.shape))
            elif hasattr(channel, "dask"):
                channel = channel.compute(scheduler="synchronous")
            o, s = _numpy_stats(channel, norm)
        offsets.append(o)
        scales.append(s)
    return ChannelStats(tuple(offsets), tuple(scales))


def apply_stats(image: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """``(image[c] - offset[c]) / scale[c]`` as float32, shape ``(C, *spatial)``."""
    if image.shape[0] != len(stats.offset):
        raise OptionError(f"image has {image.shape[0]} channels, normalization statistics "
                          f"{len(stats.offset)}")
    shape = (-1,) + (1,) * (image.ndim - 1)
    off = np.asarray(stats.offset, np.float32).reshape(shape)
    sc = np.asarray(stats.scale, np.float32).reshape(shape)
    out = image.astype(np.float32)  # a new array: subtract and divide in place (same values)
    out -= off
    out /= sc
    return out


def pooled_stats(parts: Sequence[ChannelStats]) -> ChannelStats:
    """Per-channel mean of several volumes' statistics (a summary for metadata)."""
    if not parts:
        raise OptionError("no statistics to pool")
    off = np.mean([p.offset for p in parts], axis=0)
    sc = np.mean([p.scale for p in parts], axis=0)
    return ChannelStats(tuple(float(v) for v in off), tuple(float(v) for v in sc))
