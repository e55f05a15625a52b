"""Picklable, lazily-reading array sources and their conversion to dask arrays.

A source is a small object with ``shape``, ``dtype`` and ``__getitem__(tuple of slices)``
that opens its file on the worker that reads it. It pickles as a path and a few numbers,
never as data, so a graph built on it can be shipped to any worker.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize


def normalize_key(key: Any, shape: Sequence[int]) -> tuple[slice, ...]:
    """Turn an index (slices, ints, Ellipsis) into one slice per axis."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, int | np.integer):
            k = int(k) + (n if k < 0 else 0)
            out.append(slice(k, k + 1))
        else:
            start, stop, step = k.indices(n)
            if step != 1:
                raise IndexError("sources only support contiguous slices")
            out.append(slice(start, max(start, stop)))
    return tuple(out)


class Source:
    """Base of the lazy sources: subclasses give ``shape``, ``dtype`` and ``__getitem__``."""

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class RawFileSource(Source):
    """C-ordered raw voxels at a byte offset in a file (MRC, raw NRRD, .nii, .npy, .npz).

    Each read maps the file read-only, copies the region and unmaps it, so a worker's
    resident memory holds only the regions it is working on.
    """

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        key = normalize_key(key, self.shape)
        mm = np.memmap(self.path, mode="r", dtype=self.dtype, offset=self.offset, shape=self.shape)
        try:
            return np.array(mm[key], dtype=self.dtype.newbyteorder("="))
        finally:
            del mm


_local = threading.local()


def _thread_cache() -> dict:
    if not hasattr(_local, "cache"):
        _local.cache = {}
    return _local.cache


@dataclass(frozen=True)
class ZarrSource(Source):
    """A zarr array (an OME-Zarr level, or a TIFF through tifffile's zarr store)."""

    path: str
    kind: str = "zarr"  # "zarr" or "tiff"
    series: int = 0
    level: int = 0
    shape: tuple[int, ...] = ()
    dtype: np.dtype = np.dtype("u1")

    def open(self) -> Any:
        import zarr

        cache = _thread_cache()
        key = (self.kind, self.path, self.series, self.level)
        arr = cache.get(key)
        if arr is None:
            if self.kind == "tiff":
                import tifffile

                store = tifffile.imread(
                    self.path, aszarr=True, series=self.series, level=self.level
                )
                arr = zarr.open_array(store, mode="r")
            else:
                arr = zarr.open_array(self.path, mode="r")
            cache[key] = arr
        return arr

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.open()[normalize_key(key, self.shape)])


@dataclass(frozen=True)
class InMemorySource(Source):
    """Small arrays unpacked from archives (PartSeg projects, compressed .npz)."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[normalize_key(key, self.shape)]


def default_chunks(shape: Sequence[int], axes: str, itemsize: int) -> tuple[int, ...]:
    """Read chunks for a source: whole planes in y/x up to ~64 MiB, a few planes in z."""
    target = 64 * 2**20
    out = []
    for ax, n in zip(axes, shape, strict=True):
        out.append(1 if ax in "tc" else n)
    # shrink z first, then y, so one read chunk stays under the target
    for ax in "zyx":
        if ax not in axes:
            continue
        i = axes.index(ax)
        while np.prod(out) * itemsize > target and out[i] > 1:
            out[i] = max(1, out[i] // 2)
    return tuple(int(c) for c in out)


def to_dask(
    source: Any, axes: str, chunks: Sequence[int] | None = None, name: str = "src"
) -> da.Array:
    """Wrap a source in a dask array without reading it."""
    chunks = tuple(chunks) if chunks else default_chunks(source.shape, axes, source.dtype.itemsize)
    return da.from_array(
        source, chunks=chunks, asarray=False, fancy=False, lock=False,
        meta=np.empty((0,) * len(source.shape), dtype=source.dtype.newbyteorder("=")),
        name=f"{name}-{tokenize(source)}",
    )


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies an input for resume hashes: path, size and modification time."""
    p, inner = Path(path), ""
    if not p.exists() and ":" in p.name:  # "file.h5:dataset"
        base, _, inner = str(path).rpartition(":")
        p = Path(base)
    st = p.stat()
    return {"path": str(p.resolve()), "inner": inner, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}
