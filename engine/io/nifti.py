"""NIfTI-1/2 (``.nii`` memory-mapped, ``.nii.gz`` read per z-slab), voxel size from pixdim.

NIfTI stores voxels x fastest (Fortran order over x, y, z, t, c), which is numpy C order
over (c, t, z, y, x): the bytes of a C-ordered ``zyx`` slab are exactly NIfTI's layout,
so reading and writing never transpose in memory.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from engine.errors import InputError
from engine.io.axes import usable_sizes, voxel_problem
from engine.io.budget import check_deflate
from engine.io.sources import RawFileSource, Source, default_chunks, to_dask, view
from engine.volume import Volume, convert_length

#: NIfTI ``xyzt_units`` spatial names → NGFF units; "unknown" is millimetres by the spec.
UNITS = {"meter": "meter", "mm": "millimeter", "micron": "micrometer", "unknown": "millimeter"}

#: dtypes written as they are; others are converted (bool → uint8, float16 → float32).
WRITE_DTYPES = {np.dtype(t) for t in ("u1", "i1", "i2", "u2", "i4", "u4", "i8", "u8",
                                      "f4", "f8")}

#: NIfTI dims beyond x, y, z: 4 is time, 5 is the vector/channel dimension.
DIM_NAMES = "xyztc"

HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte extension flag (no extensions)


@dataclass(frozen=True)
class NiftiProxySource(Source):
    """Voxels of a (gzipped) NIfTI file read through nibabel, in C order.

    Each read opens the file and slices an unscaled ``ArrayProxy`` (scaling is applied by
    dask, as for ``.nii``); a gzip stream is decompressed from its start up to the slab,
    which is why ``.nii.gz`` volumes are chunked in whole z-slabs.
    """

    path: str
    shape: tuple[int, ...]  # C order, i.e. the NIfTI shape reversed
    dtype: np.dtype
    offset: int

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        spec = (tuple(reversed(self.shape)), self.dtype, self.offset, 1.0, 0.0)
        try:
            proxy = nib.arrayproxy.ArrayProxy(self.path, spec, order="F")
            block = np.asarray(proxy[tuple(reversed(key))])
        except (OSError, EOFError, ValueError) as exc:
            raise InputError(f"{self.path}: cannot read the NIfTI voxels ({exc}); "
                             "the file may be truncated or corrupt") from None
        return np.ascontiguousarray(block.T, dtype=self.dtype.newbyteorder("="))


def _scaling(proxy: Any) -> tuple[float, float] | None:
    """``(slope, inter)`` when the file's header asks for scaling, else ``None``.

    Taken from nibabel's proxy because a loaded image's header copy has them reset. As
    the NIfTI standard (and nibabel) say, a slope of 0 or NaN means no scaling at all.
    """
    slope, inter = float(proxy.slope), float(proxy.inter)
    if not np.isfinite(slope) or slope == 0:
        return None
    inter = inter if np.isfinite(inter) else 0.0
    if slope == 1 and inter == 0:
        return None
    return slope, inter


def _slab_chunks(c_shape: tuple[int, ...], c_axes: str, itemsize: int) -> tuple[int, ...]:
    """Whole y-x planes, as many z-planes as fit in ~64 MiB, one t/c index per chunk."""
    plane = c_shape[-1] * c_shape[-2] * itemsize
    out = []
    for ax, n in zip(c_axes, c_shape, strict=True):
        if ax == "z":
            out.append(max(1, min(n, (64 * 2**20) // max(plane, 1))))
        elif ax in "tc":
            out.append(1)
        else:
            out.append(n)
    return tuple(out)


def read(path: Path, **_: object) -> Volume:
    """Open a NIfTI-1/2 image lazily.

    Parameters
    ----------
    path : Path
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    Volume
        ``zyx`` (``yx`` when z has one plane), with ``t`` for a 4th and ``c`` for a 5th
        NIfTI dimension larger than one; voxel size from pixdim (z, y, x), unit from
        ``xyzt_units`` (millimetre when unknown, as the standard says). Scaled data
        (``scl_slope``/``scl_inter``) come out as floats.
    """
    path = Path(path)
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError,
            EOFError, ValueError) as exc:
        raise InputError(f"{path}: not a valid NIfTI file ({exc})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{path}: not a NIfTI-1/2 image but {type(img).__name__}")
    header = img.header
    dtype = np.dtype(header.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "uif":
        raise InputError(f"{path}: NIfTI data type {dtype} (RGB or complex) is not supported")
    shape = tuple(int(s) for s in header.get_data_shape())
    if not 2 <= len(shape) <= 7 or min(shape) <= 0:
        raise InputError(f"{path}: unsupported NIfTI dimensions {shape}")
    if any(s > 1 for s in shape[5:]):
        raise InputError(f"{path}: NIfTI dimensions 6 and 7 ({shape}) are not supported")
    shape = shape[:5]
    # the loaded image's header copy has vox_offset reset; the proxy keeps the file's
    offset = int(img.dataobj.offset)
    c_shape = tuple(reversed(shape))
    c_axes = DIM_NAMES[: len(shape)][::-1]  # e.g. "tzyx"

    if path.name.lower().endswith(".gz"):
        # a gzip stream has no random access: each chunk decompresses up to its slab;
        # truncation shows only when that slab is read (as an InputError then); a header
        # declaring more than the stream can hold is refused now
        check_deflate(path, c_shape, dtype, path.stat().st_size)
        source: Any = NiftiProxySource(str(path), c_shape, dtype, offset)
        chunks = _slab_chunks(c_shape, c_axes, dtype.itemsize)
    else:
        nbytes = offset + int(np.prod(c_shape)) * dtype.itemsize
        size = path.stat().st_size
        if size < nbytes:
            raise InputError(f"{path}: truncated NIfTI file: header says {shape} {dtype.name} "
                             f"voxels from byte {offset} ({nbytes} bytes) but the file has "
                             f"{size} bytes")
        source = RawFileSource(str(path), offset, c_shape, dtype)
        chunks = default_chunks(c_shape, c_axes, dtype.itemsize)

    # one view of the file's voxels (no dask operations: a block task carries the view):
    # singleton time/channel dims dropped, and z for a 2D image
    index = [0 if ax in "ctz" and n == 1 else None for ax, n in zip(c_axes, c_shape,
                                                                     strict=True)]
    chunks = [c for c, i in zip(chunks, index, strict=True) if i is None]
    c_axes = "".join(a for a, i in zip(c_axes, index, strict=True) if i is None)
    order = list(range(len(c_axes)))
    if c_axes.startswith("ct"):  # NIfTI puts channels outside time; NGFF wants t first
        order[:2] = [1, 0]
        c_axes = "tc" + c_axes[2:]
    scaling = _scaling(img.dataobj)
    # scl_slope/scl_inter applied per read: float32 for types float32 holds exactly (up to
    # 16-bit integers, float32), float64 for wider ones
    out = np.result_type(dtype.newbyteorder("="), np.float32) if scaling is not None else None
    data = to_dask(view(source, index=index, order=order, dtype=out, scaling=scaling), c_axes,
                   chunks=[chunks[i] for i in order], name="nifti")

    # pixdim is float32: take the shortest decimal that rounds to it (0.001, not 0.0010000000475)
    zooms = [float(str(np.float32(z))) for z in header.get_zooms()[:3]]
    zooms += [1.0] * (3 - len(zooms))
    recorded = list(reversed(zooms))
    if "z" not in c_axes:
        recorded = recorded[1:]
    unit = UNITS.get(header.get_xyzt_units()[0] or "unknown", "millimeter")
    # a pixdim of 0 or NaN is no size: reported (convert refuses it unless told), not used
    return Volume(data, c_axes, usable_sizes(recorded), unit, source=str(path),
                  voxel_size_problem=voxel_problem(recorded))


def _dims(volume: Volume, path: Path) -> tuple[int, ...]:
    """NIfTI dims (x first) whose Fortran layout equals the volume's C layout."""
    spatial = volume.spatial_axes
    extra = volume.axes[: len(volume.axes) - len(spatial)]
    if spatial not in ("yx", "zyx") or extra not in ("", "c", "t"):
        raise InputError(f"{path}: NIfTI export takes a 2D/3D image with at most one channel "
                         f"or time axis, not axes {volume.axes!r}")
    shape = volume.shape
    xyz = tuple(reversed(shape[len(extra):]))
    xyz = xyz + (1,) * (3 - len(xyz))
    if extra == "t":
        return (*xyz, shape[0])
    if extra == "c":
        return (*xyz, 1, shape[0])  # dim 5 is the vector dimension; dim 4 (time) is 1
    return xyz


def header_for(volume: Volume, path: Path) -> tuple[nib.Nifti1Header, np.dtype]:
    """The NIfTI-1 header (little-endian, micrometres) and the dtype to write voxels in."""
    dtype = np.dtype(volume.dtype).newbyteorder("=")
    if dtype == np.bool_:
        dtype = np.dtype("u1")
    elif dtype == np.float16:
        dtype = np.dtype("f4")
    if dtype not in WRITE_DTYPES:
        raise InputError(f"{path}: NIfTI export cannot hold {volume.dtype} voxels")
    dims = _dims(volume, path)
    # microscopy sizes read best in micrometres; xyzt_units records the choice
    um = [convert_length(v, volume.unit, "micrometer") for v in reversed(volume.voxel_size)]
    um = um + [1.0] * (3 - len(um))
    header = nib.Nifti1Header(endianness="<")
    header.set_data_dtype(dtype)
    header.set_data_shape(dims)
    affine = np.diag([*um, 1.0])
    header.set_qform(affine, code="aligned")
    header.set_sform(affine, code="aligned")
    header.set_zooms(tuple(um) + (1.0,) * (len(dims) - 3))
    header.set_xyzt_units(xyz="micron", t="sec")
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["vox_offset"] = HEADER_BYTES
    return header, dtype.newbyteorder("<")


def write(volume: Volume, path: Path, slabs: Iterable[np.ndarray]) -> None:
    """Write a volume as NIfTI-1 (gzipped for ``.nii.gz``), streaming slabs.

    Parameters
    ----------
    volume : Volume
        ``yx``/``zyx`` with at most one leading ``c`` (NIfTI dim 5) or ``t`` (dim 4) axis.
    path : Path
        Destination ``.nii`` or ``.nii.gz``.
    slabs : iterable of numpy.ndarray
        Consecutive pieces of ``volume.data`` along axis 0.
    """
    path = Path(path)
    header, out_dtype = header_for(volume, path)
    shape = volume.shape
    block = header.binaryblock + b"\x00" * (HEADER_BYTES - len(header.binaryblock))
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    kwargs = {"compresslevel": 4} if opener is gzip.open else {}  # speed over a few % size
    expected, written = int(np.prod(shape)), 0
    with opener(path, "wb", **kwargs) as fh:
        fh.write(block)
        for slab in slabs:
            piece = np.ascontiguousarray(np.asarray(slab).reshape((-1, *shape[1:])),
                                         dtype=out_dtype)
            fh.write(memoryview(piece).cast("B"))
            written += piece.size
    if written != expected:
        raise ValueError(f"{path}: slabs held {written} voxels, the volume has {expected}")
