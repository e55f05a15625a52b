"""MRC / MRCS / REC tomograms (CCP-EM MRC2014), read memory-mapped, voxel size in Å."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import mrcfile
import numpy as np

from engine.errors import InputError
from engine.io.axes import arrange, stored_axes, usable_sizes, voxel_problem
from engine.io.sources import RawFileSource
from engine.volume import Volume, convert_length

#: dtypes MRC2014 can store; others are written as float32.
MRC_DTYPES = {np.dtype(t) for t in ("int8", "int16", "uint16", "float32", "float16", "uint8")}


def read(path: Path, axes: str | None = None, **_: object) -> Volume:
    """Open an MRC file lazily.

    Parameters
    ----------
    path : Path
        The MRC/MRCS/REC file.
    axes : str, optional
        Names of the three stored axes (nz, ny, nx), e.g. ``cyx`` for a stack of
        channels or ``tyx`` for a series (``--axes``); default ``zyx``.

    Returns
    -------
    Volume
        ``zyx`` (a single image gives ``yx``), voxel size from the header's cell
        dimensions divided by the sampling (``mrcfile``'s ``voxel_size``) in ångström. A
        header voxel size of 0 (unset) is not a recorded size (``voxel_size_problem``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mrc = mrcfile.open(path, mode="r", header_only=True, permissive=False)
        except ValueError as exc:
            raise InputError(f"{path}: not a valid MRC file ({exc})") from None
    with mrc:
        header = mrc.header
        try:
            dtype = mrcfile.utils.data_dtype_from_header(header)
        except ValueError as exc:
            raise InputError(f"{path}: unsupported MRC data mode ({exc})") from None
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        offset = 1024 + int(header.nsymbt)
        vs = mrc.voxel_size
        recorded = [float(v) for v in (vs.z, vs.y, vs.x)]
    if min(nx, ny, nz) <= 0:
        raise InputError(f"{path}: MRC header has invalid dimensions {(nz, ny, nx)}")
    expected = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise InputError(
            f"{path}: truncated MRC file: header says {nz}×{ny}×{nx} {dtype.name} voxels "
            f"({expected} bytes with header) but the file has {size} bytes"
        )
    # an unset header stores 0 for every size: nothing recorded, not an invalid size
    sizes = dict(zip("zyx", [None if all(v == 0 for v in recorded) else v for v in recorded],
                     strict=True))
    shape = (nz, ny, nx)
    if nz == 1 and axes is None:  # a single image
        shape = (ny, nx)
    named = stored_axes(path, axes, "zyx" if len(shape) == 3 else "yx", shape)
    source = RawFileSource(str(path), offset, shape, dtype)
    # the header's sizes belong to the stored positions (z, y, x), whatever they are named
    by_name = dict(zip(named, list(sizes.values())[-len(shape):], strict=True))
    data, named = arrange(source, named, name="mrc")
    spatial = [by_name[a] for a in named if a in "zyx"]
    return Volume(data, named, usable_sizes(spatial), "angstrom", source=str(path),
                  voxel_size_problem=voxel_problem(spatial))


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype MRC stores voxels of ``dtype`` in (its modes; float32 for the others)."""
    dtype = np.dtype(dtype)
    return dtype if dtype in MRC_DTYPES else np.dtype("float32")


def write(volume: Volume, path: Path, slabs: Iterable[np.ndarray]) -> None:
    """Write a ``zyx`` or ``yx`` volume to MRC, streaming slabs; voxel size in Å."""
    if set(volume.axes) - set("zyx"):
        raise InputError(f"{path}: MRC holds a single-channel 2D/3D image, not axes "
                         f"{volume.axes!r}; export one channel with --channel")
    shape = volume.shape
    dtype = np.dtype(volume.dtype)
    out_dtype = stored_dtype(dtype)
    voxel = [convert_length(v, volume.unit, "angstrom") for v in volume.voxel_size]
    if len(voxel) == 2:  # a single image: mrcfile's 2D convention, z sampling left at 1
        voxel = [1.0, *voxel]
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=mrcfile.utils.mode_from_dtype(out_dtype),
                          overwrite=True) as mrc:
        z = 0
        amin, amax, total, count = np.inf, -np.inf, 0.0, 0
        # a 3D volume streams in z-slabs, a 2D image in row slabs
        for slab in slabs:
            if np.iscomplexobj(slab) and out_dtype.kind != "c":
                slab = slab.real  # refused by export unless --allow-lossy: says so
            mrc.data[z:z + slab.shape[0]] = slab.astype(out_dtype, copy=False)
            z += slab.shape[0]
            if slab.size:
                amin, amax = min(amin, float(slab.min())), max(amax, float(slab.max()))
                total += float(slab.sum(dtype=np.float64))
                count += slab.size
        mrc.voxel_size = (voxel[2], voxel[1], voxel[0])
        # header statistics from the streamed slabs (update_header_stats would read all)
        mrc.header.dmin, mrc.header.dmax = amin, amax
        mrc.header.dmean = total / max(count, 1)
        mrc.header.rms = -1
