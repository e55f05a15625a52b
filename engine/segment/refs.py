"""References to the arrays a workflow produces: stored in zarr, or computed on read.

Every step's output is an :class:`ArrayRef`. Steps that look at one voxel at a time
(thresholds, normalization, logical operations) are not stored: they become a
:class:`Pointwise` view that applies a small picklable function to its inputs' regions when
a block task reads them, so ``gaussian → threshold → label`` reads the smoothed image once
and never writes the mask. Everything else is :class:`Stored` in a zarr array.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.blocks import Region
from engine.io.chunkcache import read_chunked
from engine.io.sources import read_region


@dataclass(frozen=True)
class Stored:
    """A zarr array on storage shared by the workers; ``prefix`` fixes leading axes (the
    time point and channel of an image), so the reference has the spatial axes only.

    Reads go through the worker's chunk cache: a read region with a halo shares most of
    its chunks with the neighbouring blocks' reads.
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    prefix: tuple[int, ...] = ()
    extent: Any = field(default=None, compare=False)
    """Count, min and max of the values, when the pass that wrote them took them
    (:func:`engine.stats.value_range`); spares a histogram its min/max pass."""

    def read_region(self, region: Region) -> np.ndarray:
        return read_chunked(self.path, region, self.prefix)


@dataclass(frozen=True)
class Source:
    """The workflow's input read from a file: one channel of the image.

    ``reader`` is an :class:`engine.io.sources.Source` (e.g. a view of the file that
    picks the channel), never a dask array: every block task carries the reference, and a
    dask array's graph grows with the volume. ``chunks`` are the spatial read chunks.
    """

    reader: Any
    chunks: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.reader.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.reader.dtype).newbyteorder("=")

    def read_region(self, region: Region) -> np.ndarray:
        return read_region(self.reader, region)


@dataclass(frozen=True)
class Pointwise:
    """``fn(*inputs)`` evaluated voxel by voxel on read; ``fn`` is a picklable callable."""

    fn: Callable[..., np.ndarray]
    inputs: tuple[Any, ...]
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.inputs[0].shape

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.inputs[0].chunks

    def read_region(self, region: Region) -> np.ndarray:
        return self.fn(*(ref.read_region(region) for ref in self.inputs))


@dataclass(frozen=True)
class Stacked:
    """References of one spatial shape stacked along a new first axis (the channels), each
    cast to ``dtype``; read region by region like the others."""

    inputs: tuple[Any, ...]
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.inputs), *self.inputs[0].shape)

    @property
    def chunks(self) -> tuple[int, ...]:
        return (1, *self.inputs[0].chunks)

    def read_region(self, region: Region) -> np.ndarray:
        picked = self.inputs[region[0]]
        out = np.empty((len(picked), *(r.stop - r.start for r in region[1:])), self.dtype)
        for k, ref in enumerate(picked):
            out[k] = ref.read_region(region[1:])
        return out


ArrayRef = Stored | Source | Pointwise | Stacked


class _Opaque:
    """Hides a reference from dask: dask would otherwise unpack the dataclass, find the
    source's dask array inside and compute it whole as a dependency."""

    __slots__ = ("ref",)

    def __init__(self, ref: ArrayRef) -> None:
        self.ref = ref

    def __dask_tokenize__(self) -> Any:
        from dask.base import tokenize

        return tokenize(self.ref)


def _read_block(box: _Opaque, block_info: dict | None = None) -> np.ndarray:
    region = tuple(slice(a, b) for a, b in block_info[None]["array-location"])
    return box.ref.read_region(region)


def to_dask(ref: ArrayRef, chunks: Sequence[int] | None = None) -> Any:
    """A dask array over ``ref`` (for reductions and pyramids), one task per chunk."""
    import dask.array as da

    chunks = tuple(chunks or ref.chunks)
    return da.map_blocks(_read_block, _Opaque(ref), dtype=ref.dtype,
                         chunks=da.core.normalize_chunks(chunks, ref.shape),
                         meta=np.empty((0,) * len(ref.shape), ref.dtype))
