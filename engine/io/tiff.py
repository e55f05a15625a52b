"""TIFF, BigTIFF, OME-TIFF and ImageJ hyperstacks, read lazily through tifffile's zarr store."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile

from engine.errors import InputError, OptionError
from engine.io.axes import arrange, axes_hint, stored_axes, usable_sizes, voxel_problem
from engine.io.sources import ZarrSource, default_chunks, view
from engine.volume import Volume, convert_length, normalize_unit

#: tifffile axis codes → NGFF axes (S = samples, Q/I/O = unnamed page sequences → z).
_AXIS_MAP = {"T": "t", "C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x",
             "Q": "z", "I": "z", "O": "z"}


def _ngff_axes(path: Path, tif_axes: str, shape: tuple[int, ...]) -> tuple[str, list[int]]:
    """Map tifffile axes to NGFF names, dropping singleton extra axes; return the keep list.

    Raises
    ------
    InputError
        When an axis has no NGFF name (or two map to one name), suggesting ``--axes``.
    """
    names, keep = [], []
    for i, (a, n) in enumerate(zip(tif_axes, shape, strict=True)):
        name = _AXIS_MAP.get(a)
        if name is None or name in names:
            if n == 1:
                continue
            raise InputError(f"{path}: TIFF axes {tif_axes!r} (shape {shape}) cannot be mapped "
                             f"to t, c, z, y, x: axis {a!r} of length {n} is unknown; "
                             + axes_hint(shape))
        names.append(name)
        keep.append(i)
    return "".join(names), keep


def _ome_pixels(tif: tifffile.TiffFile) -> tuple[dict[str, float], str | None, list[str]]:
    sizes: dict[str, float] = {}
    unit: str | None = None
    channels: list[str] = []
    try:
        root = ET.fromstring(tif.ome_metadata or "")
    except ET.ParseError:
        return sizes, unit, channels
    pixels = next((e for e in root.iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return sizes, unit, channels
    for ax in "XYZ":
        value = pixels.get(f"PhysicalSize{ax}")
        if value is not None:
            u = pixels.get(f"PhysicalSize{ax}Unit", "µm")
            sizes[ax.lower()] = convert_length(float(value), u, "micrometer")
            unit = "micrometer"
    channels = [c.get("Name") or f"channel {i}"
                for i, c in enumerate(e for e in pixels if e.tag.endswith("Channel"))]
    return sizes, unit, channels


def _imagej_or_tags(tif: tifffile.TiffFile) -> tuple[dict[str, float], str | None, list[str]]:
    page = tif.pages.first
    sizes: dict[str, float] = {}
    unit: str | None = None
    channels: list[str] = []
    ij = tif.imagej_metadata or {}
    res_unit = page.tags.get("ResolutionUnit")
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if ij:
        ij_unit = str(ij.get("unit", "")).replace("\\u00B5", "µ")
        if ij_unit and ij_unit.lower() not in ("pixel", "pixels", ""):
            try:
                unit = normalize_unit(ij_unit)
            except OptionError:  # a unit we do not know: leave the sizes at 1
                unit = None
        if unit and "spacing" in ij:
            sizes["z"] = float(ij["spacing"])
        labels = ij.get("Labels")
        if isinstance(labels, list | tuple) and labels:
            channels = [str(s) for s in labels]
    elif res_unit is not None and int(res_unit.value) == 3:  # centimetre
        unit = "micrometer"
    if unit and xres is not None and yres is not None:
        scale = 1.0 if ij else 1e4  # ImageJ: pixels per `unit`; tags: pixels per cm
        for ax, tag in (("x", xres), ("y", yres)):
            num, den = tag.value
            if num:
                sizes[ax] = scale * den / num
    return sizes, unit, channels


#: The most bytes one strip or tile may decode to: a reader holds one whole, so a header
#: declaring more is refused before anything is allocated (2 GiB).
MAX_CHUNK_BYTES = 2**31


def check_declared_size(path: Path, page: tifffile.TiffPage | tifffile.TiffFrame) -> None:
    """Refuse a page whose header declares more pixels than the file can hold or than one
    reader may decode: the sizes are checked against the file before any allocation.

    Raises
    ------
    InputError
        Naming the file, the page and the declared numbers.
    """
    key = page.keyframe or page  # a frame of a multi-page series shares its keyframe's tags
    chunk = math.prod(key.chunks) * np.dtype(key.dtype).itemsize
    if chunk > MAX_CHUNK_BYTES:
        raise InputError(
            f"{path}: page {page.index} declares strips or tiles of {key.chunks} pixels "
            f"({chunk:.3g} bytes each), more than the {MAX_CHUNK_BYTES:.3g} bytes a reader may "
            f"hold; the header (ImageWidth {key.imagewidth}, ImageLength {key.imagelength}) "
            "is damaged or the file needs tiling")
    stored = sum(page.databytecounts)
    if int(key.compression) == 1 and stored < key.nbytes:  # uncompressed: every byte stored
        raise InputError(
            f"{path}: page {page.index} declares {key.nbytes:.3g} bytes of uncompressed pixels "
            f"(shape {key.shape}) but stores {stored} bytes; the header is damaged")


def read(path: Path, series: int = 0, axes: str | None = None, **_: object) -> Volume:
    """Open a TIFF lazily (series 0, full resolution).

    Parameters
    ----------
    path : Path
        The TIFF file.
    series : int
        The image series to read.
    axes : str, optional
        One letter of ``tczyx`` per axis of the series as tifffile reports its shape
        (``--axes``); by default tifffile's axis codes, singleton unknown axes dropped.

    Returns
    -------
    Volume
        Voxel size from OME ``PhysicalSize*`` (converted to µm), ImageJ ``spacing``/``unit``
        with the resolution tags, or resolution tags in centimetres; a file with none of
        these records no voxel size (``voxel_size_problem`` says so, sizes are 1 µm).
    """
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(f"{path}: TIFF contains no image series")
        s = tif.series[series]
        tif_axes, shape, dtype = s.axes, tuple(s.shape), np.dtype(s.dtype)
        size = path.stat().st_size
        for page in s.pages:
            if page is None:
                continue
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)]
            if ends and max(ends) > size:
                raise InputError(f"{path}: truncated TIFF: image data of page {page.index} "
                                 f"ends at byte {max(ends)} but the file has {size} bytes")
            check_declared_size(path, page)
        if tif.is_ome:
            sizes, unit, channels = _ome_pixels(tif)
        else:
            sizes, unit, channels = _imagej_or_tags(tif)
    source = ZarrSource(str(path), kind="tiff", series=series, shape=shape, dtype=dtype)
    if axes is not None:
        named = stored_axes(path, axes, None, shape)
        chunks = default_chunks(shape, named, dtype.itemsize)
    else:
        named, keep = _ngff_axes(path, tif_axes, shape)
        if "y" not in named or "x" not in named:
            raise InputError(f"{path}: TIFF axes {tif_axes!r} (shape {shape}) have no y/x "
                             "image plane; " + axes_hint(shape))
        chunks = default_chunks(shape, "".join(_AXIS_MAP.get(a, "t") for a in tif_axes),
                                dtype.itemsize)
        # drop singleton axes that have no NGFF name
        source = view(source, index=[None if i in keep else 0 for i in range(len(shape))])
        chunks = tuple(c for i, c in enumerate(chunks) if i in keep)
    data, named = arrange(source, named, chunks, name="tiff")
    spatial = "".join(a for a in named if a in "zyx")
    recorded = [sizes.get(a) for a in spatial]
    problem = voxel_problem(recorded)
    voxel = usable_sizes(recorded)
    nchan = data.shape[named.index("c")] if "c" in named else 0
    names = tuple(channels) if len(channels) == nchan else ()
    return Volume(data, named, voxel, unit or "micrometer", channel_names=names,
                  source=str(path), voxel_size_problem=problem)


def write(volume: Volume, path: Path, slabs: Iterable[np.ndarray]) -> None:
    """Write an OME-TIFF (BigTIFF when large), page by page, with physical sizes in µm."""
    axes = volume.axes.upper()
    spatial = dict(zip(volume.spatial_axes, volume.voxel_size, strict=True))
    meta: dict[str, object] = {"axes": axes}
    for ax in volume.spatial_axes:
        meta[f"PhysicalSize{ax.upper()}"] = convert_length(spatial[ax], volume.unit, "micrometer")
        meta[f"PhysicalSize{ax.upper()}Unit"] = "µm"
    if volume.channel_names:
        meta["Channel"] = {"Name": list(volume.channel_names)}
    plane = volume.shape[-2:]

    def pages() -> Iterable[np.ndarray]:
        if volume.data.ndim == 2:  # slabs are rows of the single plane
            yield np.concatenate(list(slabs), axis=0)
            return
        for slab in slabs:
            yield from slab.reshape((-1, *plane))

    tifffile.imwrite(
        path, data=pages(), shape=volume.shape, dtype=volume.dtype, ome=True,
        bigtiff=volume.nbytes > 2**31, metadata=meta, photometric="minisblack",
    )
