"""A folder of 2D TIFF slices read as a z-stack, one file per z-plane, read on demand.

Files ``*.tif``/``*.tiff`` are ordered naturally (``slice2`` before ``slice10``). Every
slice must be a single 2D image of the same shape and dtype; RGB(A) slices (samples per
pixel 3 or 4, interleaved or planar) become a ``czyx`` stack with channels ``red``,
``green``, ``blue`` (``alpha``). Multi-page files are refused: they are stacks themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from engine.errors import InputError, OptionError
from engine.io.axes import arrange, stored_axes, usable_sizes, voxel_problem
from engine.io.sources import Source
from engine.io.tiff import check_declared_size
from engine.volume import Volume, convert_length, normalize_unit

SUFFIXES = (".tif", ".tiff")
RGB_NAMES = ("red", "green", "blue", "alpha")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: ``a2`` < ``a10``."""
    return [int(part) if part.isdigit() else part.lower()
            for part in re.split(r"(\d+)", name)]


def slice_files(path: Path) -> list[Path]:
    """The folder's TIFF files in natural order (hidden files such as ``._x.tif`` skipped)."""
    files = [p for p in Path(path).iterdir()
             if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_slice(path: str) -> np.ndarray:
    """One slice as ``(y, x)`` or ``(y, x, samples)``."""
    try:
        return tifffile.imread(path)
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read this TIFF slice ({exc})") from None


@dataclass(frozen=True)
class FolderSource(Source):
    """A stack of slice files; a read opens only the files of the z-range it covers."""

    paths: tuple[str, ...]
    shape: tuple[int, ...]  # (z, y, x) or (c, z, y, x)
    dtype: np.dtype
    slice_axes: str = "YX"  # as tifffile reports a file: "YX", "YXS" or "SYX"

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        zkey, ykey, xkey = key[-3:]
        out = np.empty(tuple(s.stop - s.start for s in key), dtype=self.dtype)
        for i, z in enumerate(range(zkey.start, zkey.stop)):
            plane = read_slice(self.paths[z])
            if self.slice_axes == "YXS":  # samples last → first, like the channel axis
                plane = np.moveaxis(plane, -1, 0)
            expected = (self.shape[0], *self.shape[-2:]) if self.ndim == 4 else self.shape[-2:]
            if plane.shape != tuple(expected):
                raise InputError(f"{self.paths[z]}: slice shape changed since the stack was "
                                 "opened")
            if self.ndim == 4:
                out[:, i] = plane[key[0], ykey, xkey]
            else:
                out[i] = plane[ykey, xkey]
        return out


def _describe(path: Path) -> tuple[tuple[int, ...], np.dtype, str]:
    """Shape, dtype and axes of a slice file, from its header only."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_declared_size(path, tif.pages[0])  # a slice is read whole: its header first
            return tuple(series.shape), np.dtype(series.dtype), series.axes
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
        raise InputError(f"{path}: not a readable TIFF slice ({exc})") from None


def _voxel_size(path: Path) -> tuple[dict[str, float | None], str]:
    """Recorded (z, y, x) voxel sizes (``None`` where not recorded) and unit, from the
    first slice.

    ImageJ metadata give the unit and z ``spacing``; X/YResolution give pixels per unit.
    Without ImageJ metadata only centimetre resolution units are trusted: an inch unit
    is almost always a 72-dpi default that says nothing about the sample.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            meta = tif.imagej_metadata or {}
            res = [tags[n].value if n in tags else None for n in ("YResolution", "XResolution")]
            res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except (tifffile.TiffFileError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable TIFF slice ({exc})") from None
    unit, factor = "micrometer", None
    if meta.get("unit"):
        try:
            unit, factor = normalize_unit(str(meta["unit"])), 1.0
        except OptionError:
            unit, factor = "micrometer", None  # "pixel", "inch": no physical size
    elif res_unit == 3:
        factor = convert_length(1.0, "millimeter", "micrometer") * 10.0  # µm per cm
    sizes: dict[str, float | None] = {"z": None, "y": None, "x": None}
    if factor is None:
        return sizes, unit
    for ax, value in zip("yx", res, strict=True):
        if value is not None and value[1] > 0:
            # pixels per unit of 0 records an impossible size, refused like a size of 0
            sizes[ax] = value[1] / value[0] * factor if value[0] > 0 else float("nan")
    if "spacing" in meta:
        sizes["z"] = float(meta["spacing"])
    return sizes, unit


def read(path: Path, axes: str | None = None, **_: object) -> Volume:
    """Open a folder of 2D TIFF slices as a lazy z-stack.

    Parameters
    ----------
    path : Path
        A directory holding one ``.tif``/``.tiff`` file per z-plane.
    axes : str, optional
        Names of the stack's axes as stored: (file, y, x), or (sample, file, y, x) for
        RGB slices (``--axes``), e.g. ``cyx`` when each file is a channel, ``tyx`` when
        each is a time point. Default ``zyx`` (``czyx``).

    Returns
    -------
    Volume
        ``zyx`` (``czyx`` for RGB slices), one read chunk per file; voxel size from the
        first file's ImageJ metadata or resolution tags; with none, ``voxel_size_problem``
        says it is not recorded.
    """
    path = Path(path)
    files = slice_files(path)
    if not files:
        raise InputError(f"{path}: the folder holds no .tif/.tiff files")
    shape, dtype, file_axes = _describe(files[0])
    samples = shape[file_axes.index("S")] if "S" in file_axes else 0
    rgb = file_axes in ("YXS", "SYX") and samples in (3, 4)
    if not (file_axes == "YX" or rgb):
        raise InputError(f"{files[0]}: a slice must be a single 2D (or RGB) image, "
                         f"not axes {file_axes} of shape {shape}")
    for f in files[1:]:
        other = _describe(f)
        if other != (shape, dtype, file_axes):
            raise InputError(f"{f}: slice has shape {other[0]} {other[1]}, but {files[0].name} "
                             f"has {shape} {dtype}; all slices must match")
    sizes, unit = _voxel_size(files[0])
    names: tuple[str, ...] = ()
    if rgb:
        y, x = (shape[0], shape[1]) if file_axes == "YXS" else (shape[1], shape[2])
        stack_shape = (samples, len(files), y, x)
        axes_out, chunks = "czyx", (samples, 1, y, x)
        names = RGB_NAMES[:samples]
    else:
        stack_shape = (len(files), *shape)
        axes_out, chunks = "zyx", (1, *shape)
    # one chunk per file: a file is the unit of I/O, so a region reads only its own files
    source = FolderSource(tuple(str(f) for f in files), stack_shape, dtype.newbyteorder("="),
                          file_axes)
    named = stored_axes(path, axes, axes_out, stack_shape)
    # the sizes belong to the stored positions (file, y, x), whatever they are named
    by_name = dict(zip(named[-3:], (sizes["z"], sizes["y"], sizes["x"]), strict=True))
    if named[0] != "c":
        names = ()  # the RGB names belong to the sample axis only
    data, named = arrange(source, named, chunks, name="folder")
    recorded = [by_name.get(a) for a in named if a in "zyx"]
    if "z" in named and by_name.get("z") is None and any(v is not None for v in recorded):
        recorded[0] = 1.0  # y/x recorded without a z spacing: ImageJ's default of 1 unit
    return Volume(data, named, usable_sizes(recorded), unit, channel_names=names,
                  source=str(path), voxel_size_problem=voxel_problem(recorded))
