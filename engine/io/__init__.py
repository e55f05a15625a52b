"""Readers and writers per format, and ``open_volume(path)`` that returns a lazy ``Volume``.

Each format module offers ``read(path, **options) -> Volume`` and, where voxelmill can
export to it, ``write(volume, path, slabs)`` that writes ``volume`` from an iterable of
consecutive numpy slabs along axis 0 (so a writer never needs the whole volume).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InputError, OptionError
from engine.io import readguard
from engine.io.axes import AXES_FORMATS
from engine.io.sources import split_path
from engine.volume import Volume

#: suffix → format module (longest suffix wins).
READ_SUFFIXES = {
    ".mrc": "mrc", ".mrcs": "mrc", ".rec": "mrc", ".map": "mrc", ".st": "mrc", ".ali": "mrc",
    ".tif": "tiff", ".tiff": "tiff", ".ome.tif": "tiff", ".ome.tiff": "tiff", ".btf": "tiff",
    ".tf8": "tiff",
    ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".nii": "nifti", ".nii.gz": "nifti",
    ".npy": "npy", ".npz": "npy",
    ".tgz": "partseg", ".tbz2": "partseg", ".tar.gz": "partseg", ".tar.bz2": "partseg",
    ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5",
    ".zarr": "omezarr", ".ome.zarr": "omezarr",
}
WRITE_SUFFIXES = {
    ".mrc": "mrc", ".mrcs": "mrc", ".rec": "mrc", ".map": "mrc",
    ".tif": "tiff", ".tiff": "tiff", ".ome.tif": "tiff", ".ome.tiff": "tiff",
    ".nrrd": "nrrd", ".nii": "nifti", ".nii.gz": "nifti",
}


def _suffix_format(path: Path, table: dict[str, str]) -> str | None:
    name = path.name.lower()
    for suffix in sorted(table, key=len, reverse=True):
        if name.endswith(suffix):
            return table[suffix]
    return None


def detect_format(path: str | Path) -> str:
    """Name of the format module that reads ``path``, or an ``InputError``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or directory")
    if p.is_dir():
        from engine.io.zarrarray import is_array

        if is_array(p):
            return "zarrarray"
        if (p / "zarr.json").exists() or (p / ".zgroup").exists() or (p / ".zattrs").exists():
            return "omezarr"
        if any(f.suffix.lower() in (".tif", ".tiff") for f in p.iterdir()):
            return "folder"
        raise InputError(
            f"{p}: a directory that is neither a zarr array, an OME-Zarr group nor a folder "
            "of TIFF slices"
        )
    fmt = _suffix_format(p, READ_SUFFIXES)
    if fmt is None:
        supported = ", ".join(sorted(set(READ_SUFFIXES)))
        raise InputError(f"{p}: unknown or unsupported format; supported: {supported}, "
                         "or a folder of TIFF slices")
    return fmt


def format_module(fmt: str) -> Any:
    return importlib.import_module(f"engine.io.{fmt}")


def open_volume(path: str | Path, axes: str | None = None, **options: Any) -> Volume:
    """Open any supported image lazily.

    Parameters
    ----------
    path : str or Path
        MRC/MRCS/REC, TIFF/BigTIFF/OME-TIFF, a folder of 2D TIFF slices, NRRD, NIfTI,
        NPY/NPZ, HDF5 (``file.h5`` or ``file.h5:dataset``), a PartSeg project
        (.tgz/.tbz2), an OME-Zarr image or a plain zarr array.
    axes : str, optional
        What each stored axis is, one letter of ``tczyx`` per dimension (``--axes``), for
        the formats that do not record it (:data:`engine.io.axes.AXES_FORMATS`).
    **options
        Format-specific options (e.g. ``level`` for OME-Zarr).

    Returns
    -------
    Volume
        Axes in NGFF order, voxel size and unit from the file header
        (``voxel_size_problem`` says when the header records none).
    """
    p, dataset = split_path(path)
    fmt = "hdf5" if dataset is not None else detect_format(p)
    if axes is not None:
        if fmt not in AXES_FORMATS:
            raise OptionError(f"--axes {axes}: {p} is {fmt}, which records its axes; --axes "
                              "applies to " + ", ".join(AXES_FORMATS))
        options["axes"] = axes
    if dataset is not None:
        options["dataset"] = dataset
    readguard.hold(p)  # before its header is read: a later replacement is then detected
    try:
        return format_module(fmt).read(p, **options)
    except (InputError, OptionError):
        raise
    except PermissionError as exc:
        raise InputError(f"{p}: cannot be read ({exc.strerror})") from None
    except Exception as exc:  # a library's parse error: name the file and the problem
        raise InputError(f"{p}: cannot be read as {fmt}: {type(exc).__name__}: {exc}") from None


def writer_for(path: str | Path) -> Any:
    """The format module that exports to ``path`` (by its suffix)."""
    fmt = _suffix_format(Path(path), WRITE_SUFFIXES)
    if fmt is None:
        raise OptionError(
            f"{path}: cannot export to this format; use one of "
            + ", ".join(sorted(WRITE_SUFFIXES))
        )
    return format_module(fmt)


SLAB_BYTES = 256 * 2**20


def slab_bounds(data: Any, max_bytes: int = SLAB_BYTES) -> list[int]:
    """Slab borders along axis 0: the array's chunks, split further when a chunk-thick
    slab would exceed ``max_bytes`` (a full-width slab of a huge volume must fit in memory).
    """
    plane = int(np.prod(data.shape[1:])) * data.dtype.itemsize
    step_cap = max(1, max_bytes // max(plane, 1))
    bounds = [0]
    for c in data.chunks[0]:
        start = bounds[-1]
        bounds += list(range(start + min(c, step_cap), start + c, min(c, step_cap)))
        bounds.append(start + c)
    return bounds


def iter_slabs(data: Any, client: Any = None, depth: int = 2,
               max_bytes: int = SLAB_BYTES) -> Iterator[np.ndarray]:
    """Yield consecutive slabs of a dask array along axis 0 (see :func:`slab_bounds`).

    With a client, up to ``depth`` slabs are computed ahead on the cluster while the
    caller writes the current one.
    """
    bounds = slab_bounds(data, max_bytes)
    pieces = [data[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if client is None:
        for piece in pieces:
            yield np.asarray(piece.compute(scheduler="threads"))
        return
    queue: list[Any] = []
    for piece in pieces:
        queue.append(client.compute(piece))
        if len(queue) > depth:
            yield np.asarray(queue.pop(0).result())
    for fut in queue:
        yield np.asarray(fut.result())
