"""Picklable, lazily-reading array sources and their conversion to dask arrays.

A source is a small object with ``shape``, ``dtype`` and ``read(tuple of slices)``
that opens its file on the worker that reads it. It pickles as a path and a few numbers,
never as data, so a graph built on it can be shipped to any worker.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from engine.errors import InputError
from engine.io.opened import open_array


def split_key(key: Any, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[Any, ...]]:
    """Split an index into contiguous slices to read and what to apply to the result.

    Integers drop their axis, steps and integer lists pick from the contiguous span; the
    second element applies that to the region read with the first.
    """
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    read, post = [], []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, int | np.integer):
            k = int(k) + (n if k < 0 else 0)
            read.append(slice(k, k + 1))
            post.append(0)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            lo, hi = (start, max(start, stop)) if step > 0 else (stop + 1, start + 1)
            read.append(slice(lo, max(lo, hi)))
            post.append(slice(None) if step == 1 else slice(None, None, step))
        else:  # an integer array on this axis
            idx = np.asarray(k)
            idx = np.where(idx < 0, idx + n, idx)
            lo = int(idx.min()) if idx.size else 0
            read.append(slice(lo, int(idx.max()) + 1 if idx.size else 0))
            post.append(idx - lo)
    return tuple(read), tuple(post)


class Source:
    """Base of the lazy sources: subclasses give ``shape``, ``dtype`` and ``read``.

    ``read`` receives one contiguous slice per axis; ``__getitem__`` adds numpy's
    semantics (integers drop axes, steps, integer lists) on top, as dask expects.
    """

    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, region: tuple[slice, ...]) -> np.ndarray:
        """``read`` under the name block tasks use (:func:`read_region`)."""
        return self.read(region)

    def __getitem__(self, key: Any) -> np.ndarray:
        region, post = split_key(key, self.shape)
        out = self.read(region)
        if sum(isinstance(p, np.ndarray) for p in post) > 1:
            raise IndexError("sources support one integer-array index at most")
        if any(not isinstance(p, slice) or p != slice(None) for p in post):
            out = out[post]
        return out


@dataclass(frozen=True)
class RawFileSource(Source):
    """C-ordered raw voxels at a byte offset in a file (MRC, raw NRRD, .nii, .npy, .npz).

    A read fetches the rows of the region with ``pread`` (whole rows, one contiguous run
    per plane) instead of mapping the file: mapped pages would count in the worker's
    resident memory and each row would fault a page of its own.
    """

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        out_shape = tuple(k.stop - k.start for k in key)
        native = self.dtype.newbyteorder("=")
        out = np.empty(out_shape, dtype=self.dtype)
        if out.size == 0:
            return out.astype(native)
        lead, (ys, xs) = key[:-2], key[-2:]
        ny, nx = self.shape[-2:]
        full_rows = xs.start == 0 and xs.stop == nx
        rows = None if full_rows else np.empty((ys.stop - ys.start, nx), dtype=self.dtype)
        item = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, idx in enumerate(itertools.product(*(range(k.start, k.stop) for k in lead))):
                plane = int(np.ravel_multi_index(idx, self.shape[:-2])) if lead else 0
                start = self.offset + ((plane * ny + ys.start) * nx) * item
                target = out.reshape((-1, *out_shape[-2:]))[i] if full_rows else rows
                got = os.preadv(fd, [memoryview(target).cast("B")], start)
                if got != target.nbytes:
                    raise InputError(f"{self.path}: file ends before the voxels it declares "
                                     "(truncated?)")
                if not full_rows:
                    out.reshape((-1, *out_shape[-2:]))[i] = rows[:, xs.start:xs.stop]
        finally:
            os.close(fd)
        return out.astype(native, copy=False)


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

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        if self.kind == "tiff":
            return np.asarray(self.open()[key])
        from engine.io.integrity import read_checked

        # every OME-Zarr read goes through the one check: a missing or corrupt chunk stops
        # the command with a message naming the array, the chunk and its file
        return read_checked(self.open(), self.path, key)


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

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        return self.array[key]


@dataclass(frozen=True)
class View(Source):
    """``base`` with some axes fixed at one index (dropped), the others reordered, and its
    values cast (and scaled: ``cast(v) * slope + inter``, NIfTI's ``scl_slope``/``scl_inter``).

    What the readers make of a stored array (NGFF axis order, a channel chosen, singleton
    axes dropped) as one picklable source, instead of dask operations on the stored
    array's dask array: a block task then carries the file's path and a few numbers, never
    a graph that grows with the volume. Build it with :func:`view`.
    """

    base: Source
    index: tuple[int | None, ...]  # per base axis: the index it is fixed at, None = kept
    order: tuple[int, ...]  # output axis i is kept axis order[i]
    shape: tuple[int, ...]
    dtype: np.dtype
    scaling: tuple[float, float] | None = None

    def read(self, key: tuple[slice, ...]) -> np.ndarray:
        kept = [k for k, i in enumerate(self.index) if i is None]
        inner = [slice(0, 0)] * len(kept)
        for out_axis, k in enumerate(self.order):
            inner[k] = key[out_axis]
        it = iter(inner)
        base_key = tuple(next(it) if i is None else slice(i, i + 1) for i in self.index)
        raw = self.base.read(base_key)
        raw = raw.reshape([n for n, i in zip(raw.shape, self.index, strict=True) if i is None])
        out = raw.transpose(self.order) if self.order != tuple(range(len(kept))) else raw
        out = out.astype(self.dtype, copy=False)
        if self.scaling is not None:  # as dask computed it: same dtype, same operations
            slope, inter = self.scaling
            out = out * self.dtype.type(slope) + self.dtype.type(inter)
        return out


def view(base: Source, *, index: Sequence[int | None] | None = None,
         order: Sequence[int] | None = None, dtype: Any = None,
         scaling: tuple[float, float] | None = None) -> Source:
    """``base`` seen through :class:`View` (``base`` itself when nothing changes).

    Parameters
    ----------
    base : Source
    index : sequence of int or None, optional
        One entry per axis of ``base``: an index fixes (and drops) the axis, None keeps it.
    order : sequence of int, optional
        Permutation of the kept axes (as ``numpy.transpose``).
    dtype : dtype, optional
        Values cast to it (default: ``base``'s, in native byte order).
    scaling : (slope, intercept), optional
        Applied after the cast, in ``dtype``.
    """
    index = tuple(index) if index is not None else (None,) * base.ndim
    if len(index) != base.ndim:
        raise ValueError(f"view: {len(index)} index entries for {base.ndim} axes")
    kept = [n for n, i in zip(base.shape, index, strict=True) if i is None]
    order = tuple(order) if order is not None else tuple(range(len(kept)))
    if sorted(order) != list(range(len(kept))):
        raise ValueError(f"view: {order} is not a permutation of {len(kept)} axes")
    native = np.dtype(base.dtype).newbyteorder("=")
    dtype = np.dtype(dtype).newbyteorder("=") if dtype is not None else native
    if (all(i is None for i in index) and order == tuple(range(len(kept)))
            and dtype == np.dtype(base.dtype) and scaling is None):
        return base
    if isinstance(base, View) and base.scaling is None and scaling is None \
            and base.dtype == np.dtype(base.base.dtype).newbyteorder("="):
        # a view of a view: one view of the first base, so reads stay one call deep
        inner_kept = [k for k, i in enumerate(base.index) if i is None]
        merged = list(base.index)
        through = [inner_kept[base.order[j]] for j in range(len(base.order))]
        for j, i in enumerate(index):
            if i is not None:
                merged[through[j]] = i
        remaining = [through[j] for j, i in enumerate(index) if i is None]
        still = [k for k, i in enumerate(merged) if i is None]
        return view(base.base, index=merged, order=[still.index(remaining[o]) for o in order],
                    dtype=dtype)
    return View(base, index, order, tuple(kept[o] for o in order), dtype, scaling)


def reader_of(array: Any) -> Any:
    """What a block task should carry to read ``array`` region by region: the array itself
    when it is a reader already (a :class:`Source`, a view with ``read_region``, a zarr
    path), else the :class:`Source` behind a dask array made by :func:`to_dask`.

    Raises
    ------
    TypeError
        For any other dask array: its graph, which grows with the volume, would travel with
        every task (derive a :class:`View` of the source instead).
    """
    if isinstance(array, str | Source) or hasattr(array, "read_region"):
        return array
    source = source_of(array)
    if source is None:
        raise TypeError(f"no picklable region reader for {type(array).__name__} "
                        f"{getattr(array, 'name', '')}: block tasks must not carry a dask graph")
    return source


def zarr_source(path: str | Path) -> ZarrSource:
    """A zarr array (opened read-only on the worker) as a :class:`ZarrSource`: read through
    :func:`engine.io.integrity.read_checked`."""
    import zarr

    arr = zarr.open_array(str(path), mode="r")
    return ZarrSource(str(path), shape=tuple(arr.shape), dtype=np.dtype(arr.dtype))


def read_region(source: Any, region: tuple[slice, ...]) -> np.ndarray:
    """Read a region on a worker: ``source`` is a zarr array path, a (lazy) dask array, or
    an object with its own ``read_region(region)`` (a derived view, e.g. a pointwise step).

    Block tasks call this; a dask array is computed in the task's own thread (the
    synchronous scheduler), never as a nested graph on the cluster.
    """
    if hasattr(source, "read_region"):
        return source.read_region(region)
    if isinstance(source, str):
        from engine.io.integrity import read_checked

        return read_checked(open_array(source), source, region)
    return np.asarray(source[region].compute(scheduler="sync"))


def source_of(array: Any) -> Source | None:
    """The :class:`Source` that a dask array made by :func:`to_dask` reads, or None.

    Only an array exactly as :func:`to_dask` returned it qualifies (not sliced, cast,
    stacked or otherwise derived), so reading ``source[key]`` gives what computing
    ``array[key]`` gives, without building a dask graph per read.
    """
    graph = getattr(array, "dask", None)
    layers = getattr(graph, "layers", None)
    if layers is None or len(layers) != 2 or set(layers) != {array.name,
                                                             f"original-{array.name}"}:
        return None
    original = layers[f"original-{array.name}"]
    source = original.get(f"original-{array.name}") if hasattr(original, "get") else None
    if not isinstance(source, Source) or tuple(source.shape) != tuple(array.shape) \
            or np.dtype(source.dtype).newbyteorder("=") != array.dtype:
        return None
    return source


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
    """Wrap a source in a dask array without reading it (a source of another byte order
    in a :class:`View` in native order: the array's dtype says what reads return)."""
    chunks = tuple(chunks) if chunks else default_chunks(source.shape, axes, source.dtype.itemsize)
    source = view(source)
    return da.from_array(
        # fancy=True lets dask fuse a block's slice into the chunk read, so a task reads
        # only its region instead of whole read chunks
        source, chunks=chunks, asarray=False, fancy=True, lock=False,
        # the sized dtype ('<u8'), not numpy's equal C-named twin ('Q', ulonglong, as tifffile
        # reads 64-bit TIFFs), which zarr does not know
        meta=np.empty((0,) * len(source.shape),
                      dtype=np.dtype(source.dtype.str).newbyteorder("=")),
        name=f"{name}-{tokenize(source)}",
    )


#: suffixes of HDF5 files, whose datasets a path selects as ``file.h5:dataset``.
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


def split_path(path: str | Path) -> tuple[Path, str | None]:
    """``file.h5:dataset`` → (``file.h5``, ``dataset``); any other path → (path, None).

    A path that exists as given is a path. Otherwise the first colon after which the part
    before is an existing HDF5 file splits it, so a dataset name may hold colons itself
    (``stack.h5:a:b`` is dataset ``a:b`` of ``stack.h5``).
    """
    p, spec = Path(path), str(path)
    if p.exists():
        return p, None
    for i, ch in enumerate(spec):
        if ch == ":":
            base = Path(spec[:i])
            if base.name.lower().endswith(HDF5_SUFFIXES) and base.is_file():
                return base, spec[i + 1:]
    return p, None


def zarr_dask(path: str | Path) -> da.Array:
    """A zarr array of an input, lazily, in its own chunks, read through the integrity check
    (:func:`engine.io.integrity.read_checked`) instead of ``dask.array.from_zarr``, which
    reads a missing chunk as zeros and a corrupt one as a decoder's traceback."""
    import zarr

    chunks = zarr.open_array(str(path), mode="r").chunks
    return to_dask(zarr_source(path), "", chunks=chunks, name="zarr")


#: Files up to this size are identified by a hash of all their bytes (reading 256 MiB
#: costs a fraction of a second, little beside converting it); larger ones by samples.
CONTENT_HASH_BYTES = 256 * 2**20
#: Number and size of the pieces hashed from a larger file: its head, its tail and evenly
#: spaced pieces between them (4 MiB read in all, whatever the file's size).
SAMPLES, SAMPLE_BYTES = 64, 64 * 2**10


def content_digest(path: Path, size: int, limit: int | None = None) -> str:
    """A SHA-256 of the file's bytes: all of them when ``size <= limit``, else of
    :data:`SAMPLES` pieces of :data:`SAMPLE_BYTES` at fixed offsets (head, tail and evenly
    between); ``limit`` defaults to :data:`CONTENT_HASH_BYTES`. Prefixed ``"sha256:"`` or
    ``"sampled-sha256:"``."""
    limit = CONTENT_HASH_BYTES if limit is None else limit
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= limit:
            for piece in iter(lambda: f.read(2**20), b""):
                h.update(piece)
            return f"sha256:{h.hexdigest()}"
        last = max(size - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            f.seek(last * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return f"sampled-sha256:{h.hexdigest()}"


def file_identity(path: str | Path) -> dict[str, Any]:
    """What identifies an input for resume hashes.

    Path, size, modification time, inode and status-change time (``ctime``, which no one
    can set back: a file rewritten with its mtime restored still gets a new ctime), and a
    content digest (:func:`content_digest`: every byte of a file up to
    :data:`CONTENT_HASH_BYTES`, samples of a larger one). For a folder (a stack of TIFF
    slices, a zarr group) one digest over the files directly in it, in name order: their
    stat records, and their bytes when they total at most :data:`CONTENT_HASH_BYTES`. A
    changed identity makes a re-run start afresh instead of resuming into a mix.
    """
    p, inner = split_path(path)
    st = p.stat()
    ident: dict[str, Any] = {"path": str(p.resolve()), "inner": inner or "", "size": st.st_size,
                             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                             "inode": st.st_ino}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        keys = [_stat_key(f) for f in files]
        # a small folder is hashed whole; a large one (thousands of slices) by its files'
        # stat records only, whose ctimes still change when any file is rewritten
        whole = sum(k[0] for k in keys) <= CONTENT_HASH_BYTES
        h = hashlib.sha256()
        for f, key in zip(files, keys, strict=True):
            h.update(repr((f.name, key)).encode())
            if whole:
                h.update(content_digest(f, key[0]).encode())
        ident["files"] = len(files)
        ident["content"] = f"{'sha256' if whole else 'stat-sha256'}:{h.hexdigest()}"
    else:
        ident["content"] = content_digest(p, st.st_size)
    return ident


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
