"""A per-process cache of decoded zarr chunks, for reads with halos.

A block read with a halo touches up to 3^ndim storage chunks, and its neighbours touch the
same ones: without a cache every chunk of a 3D volume is decompressed up to 27 times per
pass; random training crops overlap the same way. Workers keep recently decoded chunks
(least recently used first out, bounded in bytes); an entry is keyed by the array's path
and the identity of its metadata file, so an array written anew at the same path is never
served stale.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.io.chunkfiles import ChunkFiles, chunk_overlap, chunk_region
from engine.io.integrity import read_checked
from engine.io.opened import forget, open_array
from engine.io.sources import Source, ZarrSource

DEFAULT_MIB = 512
"""Cache size per process unless ``VOXELMILL_CHUNK_CACHE_MIB`` says otherwise (0 = off)."""
CACHE_ENV = "VOXELMILL_CHUNK_CACHE_MIB"
MEMORY_SHARE = 4
"""A worker's cache takes at most 1/MEMORY_SHARE of its memory limit by default."""
DIRECT_BYTES = 2**20
"""Chunks at least this large are decoded one by one straight into their cache entry."""

_lock = threading.Lock()
_entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
_state = {"bytes": 0}


def _limit() -> int:
    return int(float(os.environ.get(CACHE_ENV, DEFAULT_MIB)) * 2**20)


def cache_mib_for(memory_limit: int | None) -> float:
    """The cache size (MiB) for a worker process of ``memory_limit`` bytes (``None``: no
    limit): :data:`DEFAULT_MIB`, at most a :data:`MEMORY_SHARE`-th of the limit.

    With a worker per core on a machine of little memory per core (16 cores, 16 GiB: 1 GiB
    per worker) a full default cache would be half a worker's limit, memory dask counts as
    unmanaged and pauses the worker for."""
    if not memory_limit:
        return float(DEFAULT_MIB)
    return min(float(DEFAULT_MIB), round(memory_limit / MEMORY_SHARE / 2**20, 1))


def _identity(path: str) -> tuple:
    for meta in ("zarr.json", ".zarray"):
        p = Path(path) / meta
        if p.exists():
            st = p.stat()
            return path, st.st_ino, st.st_mtime_ns
    return path, 0, 0


def _get(key: tuple) -> np.ndarray | None:
    with _lock:
        value = _entries.get(key)
        if value is not None:
            _entries.move_to_end(key)
        return value


def _put(key: tuple, value: np.ndarray, limit: int) -> None:
    if value.nbytes > limit:
        return
    with _lock:
        if key in _entries:
            return
        _entries[key] = value
        _state["bytes"] += value.nbytes
        while _state["bytes"] > limit and _entries:
            _, old = _entries.popitem(last=False)
            _state["bytes"] -= old.nbytes


def cached_bytes() -> int:
    """Bytes of decoded chunks this process holds."""
    with _lock:
        return _state["bytes"]


def clear() -> None:
    """Drop every cached chunk of this process (and the arrays this thread opened)."""
    with _lock:
        _entries.clear()
        _state["bytes"] = 0
    forget()


def read_source(source: Source, region: Sequence[slice], prefix: tuple[int, ...] = ()
                ) -> np.ndarray:
    """``source[prefix + region]``, without a dask graph: through the chunk cache for a
    zarr array that fits in half of it, else read directly.

    A miss costs about twice a direct read (whole chunks decoded and copied into the
    cache), so only arrays whose chunks come back often enough are cached: random crops
    of a larger one would mostly miss.

    Parameters
    ----------
    source : Source
        A lazy source (:mod:`engine.io.sources`).
    region : tuple of slice
        Region of the trailing axes, steps of 1.
    prefix : tuple of int
        Fixed indices of leading axes (a time point, a channel); they are dropped.
    """
    if isinstance(source, ZarrSource) and source.kind == "zarr":
        size = math.prod(source.shape[len(prefix):]) * np.dtype(source.dtype).itemsize
        if size <= _limit() // 2:
            return read_chunked(source.path, region, prefix)
        return read_checked(open_array(source.path), source.path,
                            tuple(prefix) + tuple(region))
    return np.asarray(source[tuple(prefix) + tuple(region)])


def _read_chunks(arr: Any, path: str, prefix: tuple[int, ...],
                 indices: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], np.ndarray]:
    """Whole chunks ``indices`` of the trailing axes, each an array of its own (a cached
    chunk never holds a larger read alive).

    A chunk of a plain local array (:mod:`engine.io.chunkfiles`), or a large one, is
    decoded straight into its array, one read each: reading them as one box and copying
    each out would touch every byte twice more, in memory that is fresh while a worker's
    cache fills. Small chunks of other arrays are read as their bounding box in one zarr
    call (chunks between them are decoded too) and copied out: there a zarr call, a round
    trip to zarr's loop, costs more than the copy."""
    chunks, shape = arr.chunks[len(prefix):], arr.shape[len(prefix):]
    if (ChunkFiles.of(arr) is not None or len(indices) == 1
            or math.prod(chunks) * arr.dtype.itemsize >= DIRECT_BYTES):
        out = {}
        for index in indices:
            sel = chunk_region(index, chunks, shape)
            out[index] = read_checked(arr, path, prefix + sel, out=np.empty(
                tuple(s.stop - s.start for s in sel), arr.dtype))
        return out
    first = [min(i[a] for i in indices) for a in range(len(chunks))]
    last = [max(i[a] for i in indices) for a in range(len(chunks))]
    box = tuple(slice(f * c, min((g + 1) * c, n)) for f, g, c, n in
                zip(first, last, chunks, shape, strict=True))
    data = read_checked(arr, path, prefix + box)
    # each chunk lies whole in the box: its overlap with the box is the chunk, cut at the end
    return {index: data[chunk_overlap(box, index, chunks)[0]].copy() for index in indices}


def _boxes(indices: Sequence[tuple[int, ...]]) -> list[list[tuple[int, ...]]]:
    """``indices`` (chunk indices, distinct) grouped into boxes that hold no other chunk:
    all of them when they fill their bounding box, else runs along the last axis. A zarr
    call is a round trip to zarr's loop, but a chunk decoded for nothing (a cached one
    inside the bounding box of the missing ones) costs a whole decode."""
    if not indices:
        return []
    first = [min(i[a] for i in indices) for a in range(len(indices[0]))]
    last = [max(i[a] for i in indices) for a in range(len(indices[0]))]
    if math.prod(b - a + 1 for a, b in zip(first, last, strict=True)) == len(indices):
        return [list(indices)]
    runs: list[list[tuple[int, ...]]] = []
    for index in sorted(indices):
        prev = runs[-1][-1] if runs else None
        if prev is not None and prev[:-1] == index[:-1] and prev[-1] + 1 == index[-1]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def read_chunked(path: str, region: Sequence[slice], prefix: tuple[int, ...] = ()) -> np.ndarray:
    """``zarr.open_array(path)[prefix + region]``, assembled from cached whole chunks.

    Parameters
    ----------
    path : str
        A zarr array.
    region : tuple of slice
        Region of the trailing axes (those after ``prefix``), steps of 1.
    prefix : tuple of int
        Fixed indices of leading axes (a time point, a channel).
    """
    ident = _identity(path)
    arr = open_array(path)
    limit = _limit()
    region = tuple(slice(*s.indices(n)[:2]) for s, n in zip(region, arr.shape[len(prefix):],
                                                            strict=True))
    chunks = arr.chunks[len(prefix):]
    aligned = all(s.start % c == 0 and (s.stop % c == 0 or s.stop == n)
                  for s, c, n in zip(region, chunks, arr.shape[len(prefix):], strict=True))
    if limit <= 0 or aligned:  # whole chunks (a read without halo): nobody else reads them
        return read_checked(arr, path, prefix + region)
    out = np.empty(tuple(s.stop - s.start for s in region), dtype=arr.dtype)
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(region, chunks, strict=True)]
    got = {index: _get((ident, prefix, index)) for index in itertools.product(*ranges)}
    missing = [index for index, chunk in got.items() if chunk is None]
    for box in _boxes(missing):
        got.update(_read_chunks(arr, path, prefix, box))
        for index in box:
            _put((ident, prefix, index), got[index], limit)
    for index, chunk in got.items():
        dst, src = chunk_overlap(region, index, chunks)
        out[dst] = chunk[src]
    return out
