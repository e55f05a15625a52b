"""``Volume``: a lazy dask array with its axes, voxel size, unit and channel names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dask.array as da
import numpy as np

from engine.errors import OptionError

#: NGFF axis order; every Volume's axes are an ordered subset of it.
AXIS_ORDER = "tczyx"
SPATIAL = "zyx"

#: Units as NGFF names them, with their length in metres.
UNIT_METRES = {
    "angstrom": 1e-10,
    "nanometer": 1e-9,
    "micrometer": 1e-6,
    "millimeter": 1e-3,
    "meter": 1.0,
}
UNIT_ALIASES = {
    "a": "angstrom", "å": "angstrom", "ang": "angstrom", "angstrom": "angstrom",
    "angstroms": "angstrom",
    "nm": "nanometer", "nanometer": "nanometer", "nanometers": "nanometer",
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "micron": "micrometer",
    "microns": "micrometer", "micrometer": "micrometer", "micrometers": "micrometer",
    "\\u00b5m": "micrometer",
    "mm": "millimeter", "millimeter": "millimeter", "millimeters": "millimeter",
    "m": "meter", "meter": "meter",
}


def normalize_unit(unit: str) -> str:
    """Return the NGFF name of a length unit (``"Å"`` → ``"angstrom"``)."""
    key = unit.strip().lower()
    if key not in UNIT_ALIASES:
        raise OptionError(
            f"unknown length unit {unit!r}; use one of angstrom, nanometer, micrometer, millimeter"
        )
    return UNIT_ALIASES[key]


def convert_length(value: float, unit: str, to: str) -> float:
    """Convert a length from ``unit`` to ``to`` (both NGFF unit names or aliases)."""
    return value * UNIT_METRES[normalize_unit(unit)] / UNIT_METRES[normalize_unit(to)]


@dataclass(frozen=True)
class Volume:
    """A lazy image: a dask array plus the metadata that gives it physical meaning.

    Parameters
    ----------
    data : dask.array.Array
        The voxels, never loaded as a whole. ``data.ndim == len(axes)``.
    axes : str
        Axis names in NGFF order, an ordered subset of ``"tczyx"`` that contains
        ``"yx"`` (e.g. ``"zyx"`` for a tomogram, ``"cyx"`` for a multichannel slide).
    voxel_size : tuple of float
        Physical size of one voxel along each spatial axis present in ``axes``
        (z, y, x order), in ``unit``.
    unit : str
        NGFF length unit of ``voxel_size`` (``"angstrom"``, ``"nanometer"``, ``"micrometer"``).
    channel_names : tuple of str
        One name per channel when ``"c"`` is in ``axes``, else empty.
    labels : dict of str to Volume
        Label images that belong to this image (same spatial shape, integer dtype).
    source : str
        Where the volume came from, for messages and metadata.
    voxel_size_problem : str
        Empty when the file records a usable voxel size; otherwise why not (e.g.
        "records no physical voxel size"), and ``voxel_size`` is a placeholder of 1.
    """

    data: da.Array
    axes: str
    voxel_size: tuple[float, ...]
    unit: str = "micrometer"
    channel_names: tuple[str, ...] = ()
    labels: dict[str, Volume] = field(default_factory=dict)
    source: str = ""
    voxel_size_problem: str = ""

    def __post_init__(self) -> None:
        if len(self.axes) != self.data.ndim:
            raise OptionError(
                f"{self.source or 'volume'}: axes {self.axes!r} do not match the "
                f"{self.data.ndim}-dimensional data of shape {self.data.shape}"
            )
        if "".join(a for a in AXIS_ORDER if a in self.axes) != self.axes or "yx" not in self.axes:
            raise OptionError(
                f"{self.source or 'volume'}: axes {self.axes!r} must be an ordered subset of "
                f"'tczyx' that contains y and x"
            )
        if len(self.voxel_size) != len(self.spatial_axes):
            raise OptionError(
                f"{self.source or 'volume'}: {len(self.voxel_size)} voxel sizes given for "
                f"spatial axes {self.spatial_axes!r}"
            )
        check_voxel_size(self.voxel_size, self.source)
        object.__setattr__(self, "unit", normalize_unit(self.unit))
        if "c" in self.axes:
            n = self.data.shape[self.axes.index("c")]
            names = tuple(self.channel_names) or tuple(f"channel {i}" for i in range(n))
            if len(names) != n:
                raise OptionError(
                    f"{self.source or 'volume'}: {len(names)} channel names for {n} channels"
                )
            object.__setattr__(self, "channel_names", names)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPATIAL)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def scale(self) -> tuple[float, ...]:
        """Per-axis scale in NGFF form: voxel size on spatial axes, 1 elsewhere."""
        sizes = dict(zip(self.spatial_axes, self.voxel_size, strict=True))
        return tuple(float(sizes.get(a, 1.0)) for a in self.axes)

    def with_voxel_size(self, voxel_size: Sequence[float], unit: str | None = None) -> Volume:
        """Return a copy with another voxel size (and unit), which counts as given."""
        return replace(self, voxel_size=tuple(float(v) for v in voxel_size),
                       unit=unit or self.unit, voxel_size_problem="")


def check_voxel_size(voxel_size: Sequence[float], where: str = "") -> None:
    """Refuse voxel sizes that are not finite and positive."""
    for v in voxel_size:
        if not np.isfinite(v) or v <= 0:
            raise OptionError(
                f"{where + ': ' if where else ''}invalid voxel size {tuple(voxel_size)}: "
                "every value must be a positive finite number"
            )


def select_channel(volume: Volume, channel: str | int | None
                   ) -> tuple[Any, str, tuple[int, ...]]:
    """The image's data with one channel (and time point) chosen: spatial axes only, and
    the indices chosen on the leading (t, c) axes."""
    data, axes, prefix = volume.data, volume.axes, ()
    if "t" in axes:
        if data.shape[axes.index("t")] != 1:
            raise OptionError(f"{volume.source}: has {data.shape[axes.index('t')]} time points; "
                              "choose one by exporting or converting a single time point")
        data = data[(slice(None),) * axes.index("t") + (0,)]
        axes = axes.replace("t", "")
        prefix = (0,)
    if "c" in axes:
        n = data.shape[axes.index("c")]
        names = list(volume.channel_names) or [f"channel {i}" for i in range(n)]
        listing = ", ".join(f"{i} = {name}" for i, name in enumerate(names))
        if channel is None:
            if n != 1:
                raise OptionError(f"{volume.source}: has {n} channels ({listing}); choose one "
                                  "with --channel")
            index = 0
        elif isinstance(channel, str) and not channel.lstrip("-").isdigit():
            if channel not in names:
                raise OptionError(f"--channel {channel!r}: no such channel in "
                                  f"{volume.source} ({listing})")
            index = names.index(channel)
        else:
            index = int(channel)
            if not 0 <= index < n:
                raise OptionError(f"--channel {index}: out of range; {volume.source} has {n} "
                                  f"channel(s) ({listing})")
        data = data[(slice(None),) * axes.index("c") + (index,)]
        axes = axes.replace("c", "")
        prefix = (*prefix, index)
    elif channel not in (None, 0, "0"):
        raise OptionError(f"--channel {channel}: {volume.source} has no channel axis")
    return data, axes, prefix


#: default storage chunk edge of a converted image: volumes, and 2D images.
DEFAULT_CHUNK_3D = 128
DEFAULT_CHUNK_2D = 1024


def per_axis(volume: Volume, values: Sequence[int], what: str) -> tuple[int, ...]:
    """Expand a spatial option (one value, or one per spatial axis) to every axis (1 on t/c)."""
    spatial = volume.spatial_axes
    if len(values) == 1:
        values = tuple(values) * len(spatial)
    if len(values) != len(spatial):
        example = ",".join(str(values[0]) for _ in spatial)
        raise OptionError(f"{what} {','.join(map(str, values))}: give one value or one per "
                          f"spatial axis ({spatial}) of {volume.source or 'the image'}, e.g. "
                          f"{what} {values[0]} or {what} {example}")
    if any(v < 1 for v in values):
        raise OptionError(f"{what} {values}: sizes must be positive")
    by_axis = dict(zip(spatial, values, strict=True))
    return tuple(by_axis.get(a, 1) for a in volume.axes)


def spatial_chunks(volume: Volume, chunks: Sequence[int] | None) -> tuple[int, ...]:
    """Full chunk shape (one per axis, clipped to the volume) from the chunk option."""
    if chunks is None:
        default = DEFAULT_CHUNK_3D if "z" in volume.spatial_axes else DEFAULT_CHUNK_2D
        chunks = (default,)
    full = per_axis(volume, chunks, "--chunks")
    return tuple(min(c, s) for c, s in zip(full, volume.shape, strict=True))
