"""HDF5 datasets (ilastik, PlantSeg, BigDataViewer-style ``raw``/``label``), read per region.

Voxel size comes from the ``element_size_um`` attribute (ilastik/PlantSeg, micrometres),
else ``resolution`` or ``spacing`` (assumed micrometres), else none is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from engine.errors import InputError
from engine.io.axes import AXES_BY_NDIM as AXES
from engine.io.axes import arrange, stored_axes, usable_sizes, voxel_problem
from engine.io.budget import check_memory, declared_bytes
from engine.io.sources import Source, default_chunks
from engine.volume import Volume

#: attributes that hold a voxel size, in the order they are tried.
VOXEL_ATTRS = ("element_size_um", "resolution", "spacing")


@dataclass(frozen=True)
class HDF5Source(Source):
    """One HDF5 dataset; each read opens the file read-only, so it pickles as a path.

    Opening per read keeps no handle across tasks (h5py handles do not pickle and
    serialize all access behind one lock); the cost is small next to a chunk read.
    """

    path: str
    dataset: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        try:
            with h5py.File(self.path, "r") as f:
                return np.asarray(f[self.dataset][key], dtype=self.dtype)
        except (OSError, KeyError) as exc:
            raise InputError(f"{self.path}: cannot read dataset {self.dataset!r} ({exc})"
                             ) from None


def datasets(f: h5py.File) -> list[str]:
    """Paths of all datasets in a file, in the file's order."""
    out: list[str] = []
    f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
    return out


def default_dataset(names: list[str]) -> str | None:
    """The dataset read when none is named: the only one, else ``raw`` (or the one
    dataset named ``raw`` inside a group, e.g. CREMI's ``volumes/raw``); None when
    ambiguous."""
    raws = [n for n in names if n.rsplit("/", 1)[-1] == "raw"]
    if len(names) == 1:
        return names[0]
    if "raw" in names:
        return "raw"
    return raws[0] if len(raws) == 1 else None


def dataset_table(path: Path) -> list[dict[str, Any]]:
    """Every dataset of an HDF5 file, in the file's order: ``name``, ``shape``, ``dtype``,
    ``chunks`` (``None`` when stored contiguously)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        return [{"name": n, "shape": [int(s) for s in f[n].shape], "dtype": str(f[n].dtype),
                 "chunks": list(f[n].chunks) if f[n].chunks else None} for n in datasets(f)]


def _voxel_size(ds: h5py.Dataset, n_spatial: int) -> list[float | None]:
    """The spatial sizes the first voxel-size attribute records, in stored order (a
    channel/time entry may precede them: the last ``n_spatial`` are taken); ``None``s
    when no attribute holds enough values."""
    for name in VOXEL_ATTRS:
        if name in ds.attrs:
            try:
                values = np.atleast_1d(np.asarray(ds.attrs[name], dtype=float)).ravel()
            except (TypeError, ValueError):
                continue
            if values.size >= n_spatial:
                return [float(v) for v in values[values.size - n_spatial:]]
    return [None] * n_spatial


def _chunks(ds: h5py.Dataset, axes: str) -> tuple[int, ...]:
    """Default read chunks rounded up to whole storage chunks, so no chunk is read twice."""
    chunks = default_chunks(ds.shape, axes, ds.dtype.itemsize)
    if ds.chunks is None:
        return chunks
    return tuple(min(n, -(-c // s) * s) for c, s, n in zip(chunks, ds.chunks, ds.shape,
                                                           strict=True))


def read(path: Path, dataset: str | None = None, axes: str | None = None,
         **_: object) -> Volume:
    """Open one dataset of an HDF5 file lazily.

    Parameters
    ----------
    path : Path
        The ``.h5``/``.hdf5`` file.
    dataset : str, optional
        Dataset path inside the file. By default the only dataset, or ``raw`` when there
        are several (or the one dataset named ``raw`` inside a group).
    axes : str, optional
        One letter of ``tczyx`` per stored dimension (``--axes``, e.g. ``zcyx``).

    Returns
    -------
    Volume
        By default ``yx``, ``zyx``, ``czyx`` or ``tczyx`` by the number of dimensions;
        with ``axes``, those axes in NGFF order. No voxel-size attribute (or an invalid
        one) is reported in ``voxel_size_problem``.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        names = datasets(f)
        if dataset is None:
            dataset = default_dataset(names)
            if dataset is None:
                listed = ", ".join(names) or "none"
                raise InputError(f"{path}: choose a dataset with {path}:<dataset>; "
                                 f"the file holds: {listed}")
        dataset = dataset.strip("/")
        if dataset not in names:
            listed = ", ".join(names) or "none"
            raise InputError(f"{path}: no dataset {dataset!r}; the file holds: {listed}")
        ds = f[dataset]
        if axes is None and ds.ndim not in AXES:
            raise InputError(f"{path}: dataset {dataset!r} has {ds.ndim} dimensions "
                             f"{ds.shape}; voxelmill reads 2 to 5")
        if ds.dtype.kind not in "biuf":
            raise InputError(f"{path}: dataset {dataset!r} holds {ds.dtype} values, "
                             "not an image")
        if ds.chunks is not None:  # h5py decompresses whole storage chunks
            check_memory(path, ds.chunks, ds.dtype,
                         f"dataset {dataset!r}: one storage chunk is read whole")
        elif ds.compression is None and ds.id.get_offset() is not None and \
                (ds.id.get_offset() + declared_bytes(ds.shape, ds.dtype)
                 > path.stat().st_size):
            raise InputError(f"{path}: dataset {dataset!r} declares {ds.shape} {ds.dtype} "
                             "beyond the end of the file (truncated?)")
        named = stored_axes(f"{path}:{dataset}", axes, AXES.get(ds.ndim), ds.shape)
        spatial_stored = [a for a in named if a in "zyx"]
        by_name = dict(zip(spatial_stored, _voxel_size(ds, len(spatial_stored)), strict=True))
        source = HDF5Source(str(path), dataset, tuple(int(s) for s in ds.shape),
                            np.dtype(ds.dtype).newbyteorder("="))
        chunks = _chunks(ds, named)
    data, named = arrange(source, named, chunks, name="hdf5")
    recorded = [by_name[a] for a in named if a in "zyx"]
    return Volume(data, named, usable_sizes(recorded), "micrometer", source=f"{path}:{dataset}",
                  voxel_size_problem=voxel_problem(recorded))
