"""Patch files: small 3D images or labels in NIfTI, NRRD, MRC, TIFF or OME-Zarr.

Correction patches travel between voxelmill and annotation tools (MITK, napari, IMOD,
Amira), so each one is a single file in a format those tools open, with the voxel size
(and, where the format has one, the physical origin) in its header. Reading and writing
go through :mod:`engine.io`, so headers record voxel sizes exactly as everywhere else:

========  ==========================  =============================================
format    voxel size as written       origin kept as
========  ==========================  =============================================
nii.gz    pixdim in micrometres       qform/sform offset (x, y, z), micrometres
nrrd      space directions, `unit`    ``space origin`` (x, y, z), `unit`
mrc       cell / sampling, ångström   header ``origin`` (x, y, z), ångström
tif       OME PhysicalSize, µm        not kept (OME-TIFF has no image origin)
zarr      NGFF ``scale``, `unit`      NGFF ``translation`` (single-level image)
========  ==========================  =============================================

The origin is the physical position of the centre of voxel ``(0, 0, 0)``, axis-aligned,
in the frame of NIfTI (RAS): an NRRD in a left-posterior-superior space (what ITK tools
such as MITK save) has its x and y origin negated on reading, and MRC follows MRC2014 /
ChimeraX (origin = position of the first voxel, not IMOD's negated sub-area start).
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import mrcfile
import nibabel as nib
import nrrd
import numpy as np
import tifffile

from engine.errors import DestinationError, InputError, OptionError, VoxelmillError
from engine.io import omezarr, open_volume, writer_for
from engine.io.layouts import (
    patch_format,
    patch_name_suffix,
    patch_stem,
)
from engine.output import commit
from engine.volume import Volume, check_voxel_size, convert_length, normalize_unit

#: formats whose files keep an origin (see the module docstring).
ORIGIN_FORMATS: tuple[str, ...] = ("nii.gz", "nrrd", "mrc", "zarr")

#: NRRD ``space`` values whose x (and y) axes point the other way than NIfTI's RAS.
_NRRD_FLIPS = {"left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
               "left-posterior-superior-time": (-1, -1, 1), "lpst": (-1, -1, 1),
               "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
               "left-anterior-superior-time": (-1, 1, 1), "last": (-1, 1, 1)}

#: chunk edge of zarr patches: one chunk for the usual 160³ patches would be 16 MiB floats.
_ZARR_CHUNK = 128





@dataclass(frozen=True)
class PatchFile:
    """A patch read from a file.

    Parameters
    ----------
    data : numpy.ndarray
        The voxels, shape ``(z, y, x)``, dtype as stored.
    voxel_size : tuple of 3 float
        Voxel size ``(z, y, x)`` in ``unit``.
    unit : str
        NGFF length unit of ``voxel_size`` and ``origin``.
    origin : tuple of 3 float or None
        Physical position ``(z, y, x)`` of voxel ``(0, 0, 0)`` in ``unit``, None for
        formats without an origin (TIFF) or a NIfTI file without a qform/sform.
    path : Path
        The file read.
    """

    data: np.ndarray
    voxel_size: tuple[float, float, float]
    unit: str
    origin: tuple[float, float, float] | None
    path: Path


def _f32(values: Sequence[float]) -> tuple[float, ...]:
    """Float32 header fields as the shortest decimals that round to them (0.1, not 0.100000001)."""
    return tuple(float(str(np.float32(v))) for v in values)


def _nifti_origin(path: Path) -> tuple[float, float, float] | None:
    header = nib.load(str(path)).header
    if int(header["sform_code"]) > 0:
        affine = header.get_sform()
    elif int(header["qform_code"]) > 0:
        affine = header.get_qform()
    else:  # no coordinate system at all: nibabel's fallback affine is not an origin
        return None
    return _f32(affine[2::-1, 3])


def _nrrd_origin(path: Path) -> tuple[float, float, float] | None:
    header = nrrd.read_header(str(path))
    origin = header.get("space origin")
    if origin is None:
        return None
    xyz = np.asarray(origin, dtype=float)
    if xyz.shape != (3,) or not np.all(np.isfinite(xyz)):
        return None
    flips = _NRRD_FLIPS.get(str(header.get("space", "")).strip().lower(), (1, 1, 1))
    xyz = xyz * np.asarray(flips, dtype=float) + 0.0  # + 0.0 turns -0.0 into 0.0
    return tuple(float(v) for v in xyz[::-1])


def _mrc_origin(path: Path) -> tuple[float, float, float]:
    with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
        o = mrc.header.origin
        return _f32((float(o.z), float(o.y), float(o.x)))


def _zarr_origin(path: Path) -> tuple[float, float, float]:
    attrs, _ = omezarr.read_attrs(path)
    ms = attrs["multiscales"][0]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms["axes"]]
    for t in ms["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "translation":
            pos = dict(zip(axes, t["translation"], strict=True))
            return tuple(float(pos[a]) for a in "zyx")
    return (0.0, 0.0, 0.0)  # NGFF: no translation means the origin is at 0


def _read_origin(path: Path, fmt: str) -> tuple[float, float, float] | None:
    if fmt == "nii.gz":
        return _nifti_origin(path)
    if fmt == "nrrd":
        return _nrrd_origin(path)
    if fmt == "mrc":
        return _mrc_origin(path)
    if fmt == "zarr":
        return _zarr_origin(path)
    return None


@dataclass(frozen=True)
class PatchHeader:
    """What a patch file's header says, without its voxels (see :class:`PatchFile`).

    Parameters
    ----------
    shape : tuple of 3 int
        ``(z, y, x)``.
    dtype : numpy.dtype
        Voxel type as :func:`read_patch` returns it.
    voxel_size, unit, origin, path
        As in :class:`PatchFile`.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float]
    unit: str
    origin: tuple[float, float, float] | None
    path: Path


def _open(path: str | Path) -> tuple[Volume, PatchHeader, str]:
    """The lazy volume, header and format of patch ``path`` (InputError naming it)."""
    p = Path(path)
    try:
        fmt = patch_format(p)
    except OptionError as exc:
        raise InputError(str(exc)) from None
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    vol = open_volume(p)
    if vol.axes != "zyx":
        raise InputError(f"{p}: a patch must be a 3D (z, y, x) image, not axes {vol.axes!r} "
                         f"of shape {vol.shape}")
    try:
        origin = _read_origin(p, fmt)
    except Exception as exc:  # a library's parse error: name the file and the problem
        raise InputError(f"{p}: cannot read the {fmt} header: "
                         f"{type(exc).__name__}: {exc}") from None
    header = PatchHeader(vol.shape, np.dtype(vol.dtype), tuple(vol.voxel_size),
                         vol.unit, origin, p)
    return vol, header, fmt


def read_patch_header(path: str | Path) -> PatchHeader:
    """Shape, dtype, voxel size, unit and origin of a patch, without reading its voxels.

    Raises
    ------
    InputError
        As :func:`read_patch`.
    """
    return _open(path)[1]


def read_patch(path: str | Path) -> PatchFile:
    """Read a 3D patch and its voxel size, unit and origin.

    Parameters
    ----------
    path : str or Path
        A ``.nii.gz``/``.nii``, ``.nrrd``, ``.mrc``, ``.tif``/``.tiff`` file or a
        single-level ``.zarr`` OME-Zarr image. Opened read-only.

    Returns
    -------
    PatchFile
        ``data`` of shape ``(z, y, x)`` in the stored dtype (NIfTI scaling applied),
        voxel size and unit as the header records them (see :mod:`engine.io`), origin
        as described in the module docstring.

    Raises
    ------
    InputError
        Naming the file when it is missing, not a patch format, unreadable, or not a 3D
        single-channel image.
    """
    vol, header, fmt = _open(path)
    try:
        data = np.asarray(vol.data.compute(scheduler="synchronous"))
    except VoxelmillError:
        raise
    except Exception as exc:  # a library's decoding error: name the file and the problem
        raise InputError(f"{header.path}: cannot read the {fmt} voxels: "
                         f"{type(exc).__name__}: {exc}") from None
    return PatchFile(data, header.voxel_size, header.unit, header.origin, header.path)


def unit_recorded(path: str | Path) -> bool:
    """Whether the header of patch ``path`` names its length unit.

    Files that do not (a NIfTI with ``xyzt_units`` unknown, an NRRD without ``space
    units``, a TIFF without physical sizes) get a default unit on reading, which may not
    be the one their numbers were meant in; ITK-based tools (MITK, SimpleITK) write such
    files in millimetres.
    """
    p = Path(path)
    fmt = patch_format(p)
    try:
        if fmt == "nii.gz":
            return nib.load(str(p)).header.get_xyzt_units()[0] not in (None, "unknown")
        if fmt == "nrrd":
            header = nrrd.read_header(str(p))
            names = [str(u).strip() for u in header.get("space units", header.get("units", []))]
            return any(names)
        if fmt == "tif":
            with tifffile.TiffFile(p) as tif:
                if tif.is_ome:
                    root = ET.fromstring(tif.ome_metadata or "<x/>")
                    return any(e.get("PhysicalSizeX") for e in root.iter())
                unit = str((tif.imagej_metadata or {}).get("unit", "")).strip().lower()
                if unit:
                    return unit not in ("pixel", "pixels")
                res = tif.pages.first.tags.get("ResolutionUnit")
                return res is not None and int(res.value) == 3
        if fmt == "zarr":
            attrs, _ = omezarr.read_attrs(p)
            return any(isinstance(a, dict) and a.get("unit")
                       for a in attrs["multiscales"][0]["axes"])
    except VoxelmillError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: cannot read the header ({type(exc).__name__}: {exc})") from None
    return True  # MRC: always ångström


# ---------------------------------------------------------------------------------- writing

def _set_nifti_origin(path: Path, origin_zyx: Sequence[float], unit: str) -> None:
    """Put the origin into the qform and sform offsets (micrometres, as the writer's pixdim)."""
    img = nib.load(str(path), mmap=False)
    data = np.asanyarray(img.dataobj)  # read into memory (mmap=False): the file is rewritten
    affine = img.affine.copy()
    affine[:3, 3] = [convert_length(v, unit, "micrometer") for v in reversed(origin_zyx)]
    header = img.header.copy()
    header.set_qform(affine, code="aligned")
    header.set_sform(affine, code="aligned")
    nib.save(nib.Nifti1Image(data, affine, header), str(path))


def _set_nrrd_origin(path: Path, origin_zyx: Sequence[float]) -> None:
    """Rewrite the ``space origin`` line (in the unit of ``space units``, as the writer's)."""
    raw = path.read_bytes()
    end = raw.index(b"\n\n") + 1
    lines = raw[:end].decode("ascii").splitlines()
    vector = "(" + ",".join(repr(float(v)) for v in reversed(origin_zyx)) + ")"
    lines = [f"space origin: {vector}" if ln.startswith("space origin:") else ln for ln in lines]
    path.write_bytes(("\n".join(lines) + "\n").encode("ascii") + raw[end:])


def _set_mrc_origin(path: Path, origin_zyx: Sequence[float], unit: str) -> None:
    z, y, x = (convert_length(v, unit, "angstrom") for v in origin_zyx)
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = x, y, z


def _write_zarr(path: Path, data: np.ndarray, voxel_size: tuple[float, ...], unit: str,
                origin: tuple[float, ...] | None, name: str) -> None:
    """A single-level OME-Zarr 0.5 image; the origin is the level's translation."""
    path.mkdir(parents=True)
    chunks = tuple(min(s, _ZARR_CHUNK) for s in data.shape)
    arr = omezarr.create_level(path, "0", data.shape, chunks, data.dtype, "zyx", "0.5")
    arr[...] = data
    level = omezarr.LevelMeta("0", voxel_size, origin or (0.0, 0.0, 0.0))
    omezarr.write_group_attrs(path, {"multiscales": [
        omezarr.multiscales("zyx", unit, [level], name, "0.5", "none")]}, "0.5")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_patch(path: str | Path, data: np.ndarray, voxel_size: Sequence[float],
                unit: str = "angstrom", origin: Sequence[float] | None = None) -> Path:
    """Write a 3D patch with its voxel size (and origin, where the format keeps one).

    Parameters
    ----------
    path : str or Path
        Destination; the format follows the suffix (see :func:`patch_format`). Parent
        folders are created; an existing file is replaced only once the new one is
        complete (it is written to a hidden sibling, then renamed).
    data : numpy.ndarray
        Voxels of shape ``(z, y, x)``. Written in their dtype where the format holds it
        (NIfTI/NRRD: bool → uint8, float16 → float32; MRC: types other than int8, int16,
        uint16, uint8 (stored as uint16), float16, float32 → float32).
    voxel_size : sequence of 3 float
        Voxel size ``(z, y, x)`` in ``unit``.
    unit : str
        Length unit of ``voxel_size`` and ``origin`` (any alias ``normalize_unit`` knows).
    origin : sequence of 3 float, optional
        Physical position ``(z, y, x)`` of voxel ``(0, 0, 0)`` in ``unit``. Kept by
        NIfTI, NRRD, MRC and OME-Zarr; TIFF drops it.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OptionError
        For an unknown suffix, data that is not 3D, or an invalid voxel size, unit or
        origin.
    DestinationError
        When the parent folder cannot be created.
    """
    p = Path(path)
    fmt = patch_format(p)
    arr = np.asarray(data)
    if arr.ndim != 3 or 0 in arr.shape:
        raise OptionError(f"{p}: a patch is a 3D (z, y, x) array, not shape {arr.shape}")
    voxel = tuple(float(v) for v in voxel_size)
    if len(voxel) != 3:
        raise OptionError(f"{p}: voxel size {voxel} must have 3 values (z, y, x)")
    check_voxel_size(voxel, str(p))
    unit = normalize_unit(unit)
    org = None
    if origin is not None:
        org = tuple(float(v) for v in origin)
        if len(org) != 3 or not all(np.isfinite(org)):
            raise OptionError(f"{p}: origin {org} must be 3 finite numbers (z, y, x)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"{p.parent}: cannot create folder ({exc.strerror})") from None
    suffix = patch_name_suffix(p) or ""
    # hidden sibling with the same suffix: writers pick gzip etc. from the file name
    partial = p.parent / f".{p.name[: len(p.name) - len(suffix)]}.partial{suffix}"
    _remove(partial)
    try:
        if fmt == "zarr":
            _write_zarr(partial, arr, voxel, unit, org, patch_stem(p))
        else:
            vol = Volume(da.from_array(arr, chunks=arr.shape), "zyx", voxel, unit, source=str(p))
            writer_for(p).write(vol, partial, [arr])
            if org is not None and fmt == "nii.gz":
                _set_nifti_origin(partial, org, unit)
            elif org is not None and fmt == "nrrd":
                _set_nrrd_origin(partial, org)
            elif org is not None and fmt == "mrc":
                _set_mrc_origin(partial, org, unit)
        commit(partial, p)
    except BaseException:
        _remove(partial)
        raise
    return p
