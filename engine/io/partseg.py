"""PartSeg ROI-analysis projects (``.tgz``/``.tbz2``): image, channels, spacing, ROI, mask.

A project, as ``PartSegCore.analysis.save_functions.save_project`` writes it, is a gzip
(or bzip2, for ``.tbz2``/``.bz2``) tar archive holding:

``image.tif``
    The image as written by ``PartSegImage.ImageWriter.save``: since PartSeg 0.13.x an
    OME-TIFF of a ``TZCYX`` array with ``PhysicalSize{Z,Y,X}`` in µm and the channel
    names; before that (and in format 1.0 projects) an ImageJ hyperstack (``TZCYX``) with
    ``spacing``/``unit`` and X/Y resolution tags, channel names in ``Labels``.
``segmentation.tif``
    The ROI labels, ``tifffile.imwrite(roi)`` of the image's array without channels
    (``TZYX``); absent in format 1.0, which has ``segmentation.npz`` with the keys
    ``segmentation`` (and ``full_segmentation``, ``mask``) instead.
``mask.tif`` (optional), ``alternative.npz`` (optional, named alternative ROI maps),
``algorithm.json`` (the ROI extraction parameters), ``metadata.json``
(``project_version_info``, "1.0" when missing; ROI annotations), ``history/…``.

PartSeg keeps a project in memory while it works on it, so a project is small enough to
unpack in memory here too; and a compressed tar stream cannot be read at random offsets
anyway. The arrays become ``InMemorySource``-backed dask arrays.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import tifffile

from engine.errors import InputError, OptionError
from engine.io.sources import InMemorySource, to_dask
from engine.volume import Volume, convert_length, normalize_unit

#: members read from the archive; the rest (history, parameters) is not image data.
MEMBERS = ("image.tif", "segmentation.tif", "segmentation.npz", "mask.tif",
           "alternative.npz", "metadata.json", "algorithm.json")

#: PartSeg's "1.0" project format keeps labels in segmentation.npz.
OLD_VERSION = "1.0"


def _members(path: Path) -> dict[str, bytes]:
    """Read the members voxelmill needs in one pass over the (compressed) archive."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if name in MEMBERS and member.isfile():
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[name] = fh.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
        raise InputError(f"{path}: not a readable PartSeg project archive "
                         f"(corrupt or truncated: {exc})") from None
    return found


def _unit_factor(unit: Any, path: Path) -> float:
    """Micrometres per ``unit`` (PartSeg writes "µm"; ImageJ files may say "\\u00B5m")."""
    try:
        return convert_length(1.0, normalize_unit(str(unit)), "micrometer")
    except OptionError:
        raise InputError(f"{path}: image.tif has an unknown length unit {unit!r}") from None


def _ome_metadata(tif: tifffile.TiffFile, path: Path) -> tuple[list[float], list[str]]:
    """(z, y, x) physical size in µm and channel names from the first OME ``Pixels``.

    Parsed with ElementTree rather than ``tifffile.xml2dict``, which turns numeric-looking
    channel names ("010") into numbers.
    """
    root = ElementTree.fromstring(tif.ome_metadata)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return [1.0, 1.0, 1.0], []
    spacing = []
    for ax in "ZYX":
        size = pixels.get(f"PhysicalSize{ax}")
        factor = _unit_factor(pixels.get(f"PhysicalSize{ax}Unit", "µm"), path)
        spacing.append(float(size) * factor if size else 1.0)
    names = [ch.get("Name", "") for ch in pixels if ch.tag.rsplit("}", 1)[-1] == "Channel"]
    return spacing, names if all(names) else []


def _imagej_metadata(tif: tifffile.TiffFile, path: Path) -> tuple[list[float], list[str]]:
    """(z, y, x) spacing in µm from ImageJ ``spacing``/``unit`` and the resolution tags."""
    meta = tif.imagej_metadata or {}
    factor = _unit_factor(meta["unit"], path) if meta.get("unit") else 1.0
    tags = tif.pages[0].tags
    spacing = [float(meta.get("spacing", 1.0)) * factor]
    for name in ("YResolution", "XResolution"):
        num, den = tags[name].value if name in tags else (1, 1)
        spacing.append(den / num * factor if num else 1.0)
    labels = meta.get("Labels") or []
    return spacing, [str(x) for x in labels]


def _read_image(data: bytes, path: Path) -> tuple[np.ndarray, str, list[float], list[str]]:
    """The image as an NGFF-ordered array with its axes, µm spacing and channel names."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes = series.get_axes(False)
            array = series.asarray().reshape(series.get_shape(False))
            # PartSeg itself reads ImageJ metadata before OME (PartSegImage.image_reader)
            if tif.is_imagej:
                spacing, names = _imagej_metadata(tif, path)
            elif tif.is_ome:
                spacing, names = _ome_metadata(tif, path)
            else:
                spacing, names = [1.0, 1.0, 1.0], []
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError,
            ElementTree.ParseError) as exc:
        raise InputError(f"{path}: image.tif in the project is not a readable TIFF ({exc})"
                         ) from None
    # drop singleton axes that NGFF does not name (samples, unknown), keep t/c/z/y/x
    keep = []
    for i, ax in enumerate(axes):
        ax = ax.lower()
        if ax in "tczyx":
            keep.append(ax)
        elif array.shape[i] != 1:
            raise InputError(f"{path}: image.tif has an unsupported axis {ax!r} of size "
                             f"{array.shape[i]} (axes {axes})")
    array = array.reshape([n for n, ax in zip(array.shape, axes, strict=True)
                           if ax.lower() in "tczyx"])
    order = [keep.index(ax) for ax in "tczyx" if ax in keep]
    array = np.transpose(array, order)
    ngff = "".join(ax for ax in "tczyx" if ax in keep)
    # squeeze singleton T and C, and Z for a 2D image
    for ax in "tcz":
        if ax in ngff and array.shape[ngff.index(ax)] == 1:
            array = np.take(array, 0, axis=ngff.index(ax))
            ngff = ngff.replace(ax, "")
    if "c" in ngff:
        n = array.shape[ngff.index("c")]
        names = names[:n] if len(names) >= n else []
    else:
        names = []
    return np.ascontiguousarray(array), ngff, spacing, names


def _fit(array: np.ndarray, shape: tuple[int, ...], name: str, path: Path) -> np.ndarray:
    """Reshape a label array to ``shape`` by adding/dropping singleton axes only.

    PartSeg saves labels in the image's full ``TZYX`` shape, older versions without the
    singleton axes; both fit as long as the non-singleton sizes agree in order.
    """
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise InputError(f"{path}: {name} in the project holds {array.dtype} values, "
                         "not integer labels")
    if [n for n in array.shape if n != 1] != [n for n in shape if n != 1]:
        raise InputError(f"{path}: {name} in the project has shape {array.shape}, which does "
                         f"not fit the image's spatial shape {shape}")
    return array.reshape(shape)


def _load_npz(data: bytes, name: str, path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: {name} in the project is not a readable .npz ({exc})"
                         ) from None


def _load_tif(data: bytes, name: str, path: Path) -> np.ndarray:
    try:
        return tifffile.imread(io.BytesIO(data))
    except (tifffile.TiffFileError, ValueError, KeyError, IndexError) as exc:
        raise InputError(f"{path}: {name} in the project is not a readable TIFF ({exc})"
                         ) from None


def _version(members: dict[str, bytes], path: Path) -> str:
    if "metadata.json" not in members:
        return OLD_VERSION
    try:
        meta = json.loads(members["metadata.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: metadata.json in the project is not valid JSON ({exc})"
                         ) from None
    return str(meta.get("project_version_info", OLD_VERSION)) if isinstance(meta, dict) \
        else OLD_VERSION


def read(path: Path, **_: object) -> Volume:
    """Open a PartSeg project archive.

    Parameters
    ----------
    path : Path
        A ``.tgz``/``.tbz2``/``.tar.gz``/``.tar.bz2`` saved by PartSeg ROI Analysis.

    Returns
    -------
    Volume
        The image (``czyx``, ``cyx``, ``zyx`` or ``yx``; ``t`` first when there are
        several time points) with voxel size in micrometres and the channel names, and in
        ``labels``: ``"roi"`` (the segmentation), ``"mask"`` when the project has one, and
        ``"alt_<name>"`` for each alternative ROI map.
    """
    path = Path(path)
    members = _members(path)
    if "image.tif" not in members:
        hint = ""
        if "metadata.json" in members and "algorithm.json" not in members:
            hint = (" (this looks like a PartSeg ROI Mask project, which stores only the ROI "
                    "and a path to its image; open the image file itself)")
        raise InputError(f"{path}: not a PartSeg project: the archive has no image.tif{hint}")
    array, axes, spacing, names = _read_image(members["image.tif"], path)
    voxel = tuple(spacing[3 - len([a for a in axes if a in "zyx"]):])
    label_axes = axes.replace("c", "")
    label_shape = tuple(n for n, a in zip(array.shape, axes, strict=True) if a != "c")

    arrays: dict[str, np.ndarray] = {}
    version = _version(members, path)
    if "segmentation.tif" in members and (version != OLD_VERSION
                                          or "segmentation.npz" not in members):
        arrays["roi"] = _load_tif(members["segmentation.tif"], "segmentation.tif", path)
        if "mask.tif" in members:
            arrays["mask"] = _load_tif(members["mask.tif"], "mask.tif", path)
    elif "segmentation.npz" in members:
        seg = _load_npz(members["segmentation.npz"], "segmentation.npz", path)
        if "segmentation" not in seg:
            raise InputError(f"{path}: segmentation.npz in the project has no 'segmentation' "
                             f"array (it holds {sorted(seg)})")
        arrays["roi"] = seg["segmentation"]
        if seg.get("mask") is not None and seg["mask"].ndim > 0:
            arrays["mask"] = seg["mask"]
    else:
        raise InputError(f"{path}: the PartSeg project has neither segmentation.tif nor "
                         "segmentation.npz")
    if "alternative.npz" in members:
        for key, value in _load_npz(members["alternative.npz"], "alternative.npz", path).items():
            arrays[f"alt_{key}"] = value

    labels = {}
    for key, value in arrays.items():
        fitted = _fit(np.asarray(value), label_shape, key, path)
        src = InMemorySource(np.ascontiguousarray(fitted))
        labels[key] = Volume(to_dask(src, label_axes, name=f"partseg-{key}"), label_axes,
                             voxel, "micrometer", source=f"{path}:{key}")
    data = to_dask(InMemorySource(array), axes, name="partseg")
    return Volume(data, axes, voxel, "micrometer", channel_names=tuple(names), labels=labels,
                  source=str(path))
