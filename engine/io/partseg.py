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

:func:`write_project` is the mirror of :func:`read`: it writes the current (1.1) format as
``save_project`` does, in its member order: ``segmentation.tif`` (the ROI in the image's
``TZYX`` shape), ``alternative.npz`` (named maps, same shape), ``mask.tif`` (uint8),
``image.tif`` (OME-TIFF ``TZCYX``, physical sizes in µm, channel names), ``algorithm.json``
and ``metadata.json`` (``project_version_info`` "1.1", empty ``roi_annotations``).
"""

from __future__ import annotations

import io
import json
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import tifffile

from engine.errors import InputError, OptionError
from engine.io.budget import check_deflate, check_memory
from engine.io.sources import InMemorySource, to_dask
from engine.volume import Volume, convert_length, normalize_unit

#: members read from the archive; the rest (history, parameters) is not image data.
MEMBERS = ("image.tif", "segmentation.tif", "segmentation.npz", "mask.tif",
           "alternative.npz", "metadata.json", "algorithm.json")

#: PartSeg's "1.0" project format keeps labels in segmentation.npz.
OLD_VERSION = "1.0"
#: the project format :func:`write_project` writes (PartSegCore's ``project_version_info``)
VERSION = "1.1"
#: archive suffixes PartSeg saves projects with (bzip2 for .tbz2/.tar.bz2, else gzip)
SUFFIXES = (".tgz", ".tbz2", ".tar.gz", ".tar.bz2")


def _members(path: Path) -> dict[str, bytes]:
    """Read the members voxelmill needs in one pass over the (compressed) archive."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if name in MEMBERS and member.isfile():
                    # a member is read whole: its declared size must fit in memory
                    check_memory(path, (member.size,), np.dtype("u1"),
                                 f"its member {name!r} is unpacked into memory whole")
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


def _check_npz_members(data: bytes, name: str, path: Path) -> None:
    """Declared shapes of the arrays in an in-memory .npz against their compressed bytes
    (deflate's bound) and the memory budget, before ``np.load`` allocates them."""
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            with zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(fh))
            where = f"{path} ({name}: {info.filename})"
            if info.compress_type == zipfile.ZIP_DEFLATED:
                check_deflate(where, shape, dtype, info.compress_size)
            check_memory(where, shape, dtype, "a PartSeg array is read whole")


def _load_npz(data: bytes, name: str, path: Path) -> dict[str, np.ndarray]:
    try:
        _check_npz_members(data, name, path)
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


# ------------------------------------------------------------------------------ writing

def _to_tzyx(array: np.ndarray, axes: str) -> np.ndarray:
    """``array`` with NGFF ``axes`` (a subset of ``tczyx``) as PartSeg's ``T(Z)(C)YX``
    layout: singleton T and Z added, C kept where it is."""
    full = "tzcyx" if "c" in axes else "tzyx"
    order = [axes.index(a) for a in full if a in axes]
    out = np.transpose(array, order)
    for i, a in enumerate(full):
        if a not in axes:
            out = np.expand_dims(out, i)
    return out


def _tif_bytes(array: np.ndarray, **kwargs: Any) -> bytes:
    buff = io.BytesIO()
    tifffile.imwrite(buff, array, **kwargs)
    return buff.getvalue()


def image_tif(image: np.ndarray, axes: str, voxel_um: tuple[float, ...],
              channel_names: tuple[str, ...]) -> bytes:
    """``image.tif`` as PartSeg's ``ImageWriter.save`` writes it: an OME-TIFF of the
    ``TZCYX`` array with ``PhysicalSize{Z,Y,X}`` in µm (Z = 1 for a 2D image) and the
    channel names."""
    data = _to_tzyx(image, axes)
    if "c" not in axes:  # TZYX → TZCYX with one channel
        data = data[:, :, None]
    n = data.shape[2]
    names = list(channel_names) if len(channel_names) == n else [f"channel {i}"
                                                                  for i in range(n)]
    spacing = {"Z": voxel_um[0] if len(voxel_um) == 3 else 1.0, "Y": voxel_um[-2],
               "X": voxel_um[-1]}
    meta: dict[str, Any] = {"axes": "TZCYX", "Creator": "voxelmill",
                            "Channel": {"Name": names}}
    for ax, size in spacing.items():
        meta[f"PhysicalSize{ax}"] = float(size)
        meta[f"PhysicalSize{ax}Unit"] = "µm"
    return _tif_bytes(np.ascontiguousarray(data), ome=True, software="PartSeg",
                      metadata=meta, photometric="minisblack")


def _label_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """Integer labels as PartSeg keeps them: unsigned, at most 32 bits when they fit."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind not in "iu":
        raise InputError(f"{name}: {array.dtype} values are not integer labels")
    if array.size and int(array.min()) < 0:
        raise InputError(f"{name}: negative label values cannot go into a PartSeg project")
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    raise AssertionError("unreachable")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name=name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_project(path: str | Path, image: np.ndarray, axes: str,
                  voxel_size: tuple[float, ...], unit: str, roi: np.ndarray,
                  channel_names: tuple[str, ...] = (), mask: np.ndarray | None = None,
                  alternative: dict[str, np.ndarray] | None = None,
                  algorithm: dict[str, Any] | None = None) -> Path:
    """Write a PartSeg ROI-analysis project that :func:`read` and PartSeg open.

    Parameters
    ----------
    path : str or Path
        ``.tgz``/``.tar.gz`` (gzip) or ``.tbz2``/``.tar.bz2`` (bzip2). Written whole; the
        caller makes it atomic (``engine.output``).
    image : ndarray
        The image with NGFF ``axes`` (``yx``, ``cyx``, ``zyx``, ``czyx``, with ``t`` first
        optionally), any dtype PartSeg reads (uint8/16, float32 …).
    axes : str
        Axes of ``image``.
    voxel_size : tuple of float
        Spatial voxel size (z, y, x or y, x) in ``unit``; stored in µm.
    unit : str
        Length unit of ``voxel_size`` (nm, micrometer, angstrom …).
    roi : ndarray of int
        The ROI labels, the image's shape without the channel axis (0 = background).
    channel_names : tuple of str
        One per channel ("channel N" when absent).
    mask : ndarray, optional
        Non-zero = inside the mask; stored as uint8 0/1.
    alternative : dict of str to ndarray, optional
        Named alternative label maps (e.g. ``{"Labeling": classes}``), each the ROI's shape.
    algorithm : dict, optional
        ``algorithm.json``: ``{"algorithm_name": …, "values": {…}}`` describing how the ROI
        was made.

    Returns
    -------
    Path
    """
    path = Path(path)
    if not path.name.lower().endswith(SUFFIXES):
        raise OptionError(f"{path}: a PartSeg project is .tgz, .tbz2, .tar.gz or .tar.bz2")
    if set(axes) - set("tczyx") or not axes.endswith("yx") or len(set(axes)) != len(axes):
        raise OptionError(f"axes {axes!r}: expected a subset of tczyx ending in yx")
    spatial = tuple(n for n, a in zip(image.shape, axes, strict=True) if a != "c")
    label_axes = axes.replace("c", "")
    voxel_um = tuple(convert_length(float(v), normalize_unit(unit), "micrometer")
                     for v in voxel_size)
    members: list[tuple[str, bytes]] = []

    def labels(array: np.ndarray, name: str) -> np.ndarray:
        if tuple(array.shape) != spatial:
            raise InputError(f"{name}: shape {tuple(array.shape)} does not fit the image's "
                             f"{spatial}")
        return _to_tzyx(_label_dtype(np.asarray(array), name), label_axes)

    # minisblack: a TZYX stack with 3 or 4 planes must not be stored as RGB
    members.append(("segmentation.tif", _tif_bytes(labels(roi, "ROI"),
                                                   photometric="minisblack")))
    if alternative:
        buff = io.BytesIO()
        np.savez(buff, **{k: labels(v, f"alternative {k!r}") for k, v in alternative.items()})
        members.append(("alternative.npz", buff.getvalue()))
    if mask is not None:
        members.append(("mask.tif", _tif_bytes(labels((np.asarray(mask) > 0).astype(np.uint8),
                                                      "mask"), photometric="minisblack")))
    members.append(("image.tif", image_tif(np.asarray(image), axes, voxel_um,
                                            tuple(channel_names))))
    members.append(("algorithm.json", json.dumps(
        algorithm or {"algorithm_name": "voxelmill", "values": {}}).encode("utf-8")))
    members.append(("metadata.json", json.dumps(
        {"project_version_info": VERSION, "roi_annotations": {}}).encode("utf-8")))
    mode = "w:bz2" if path.name.lower().endswith((".tbz2", ".tar.bz2")) else "w:gz"
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            _add(tar, name, data)
    return path
