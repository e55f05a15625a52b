"""Per-object statistics of the masked-object threshold, in bounded memory.

The Allen segmenter's masked-object step thresholds each object at the Otsu value of its
own voxels. Its tables have one row per object (extrema) or per (object, bin)
(histograms), so they are :mod:`engine.objtables` tables: sharded by id on disk, merged
per shard on the workers, read back by binary search — never held whole by the client
or by one task, whatever the object count.

A histogram row is keyed ``object id << bits | bin``: the bins of one object are
consecutive keys, and shards are cut at whole objects (``align = 2**bits``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import stats
from engine.blocks import Region
from engine.errors import OptionError
from engine.objtables import ShardedTable, Table
from engine.segment.blockops import BlockReduce

FLOAT_BINS = 256
"""Bins of a float object's histogram over its own [min, max] (scikit-image's Otsu)."""


def finite(v: np.ndarray) -> np.ndarray | bool:
    """Where ``v`` is finite (float data), else True everywhere."""
    return np.isfinite(v) if v.dtype.kind == "f" else True


def histogram_bits(dtype: np.dtype, widest: int) -> int:
    """Bits of the bin part of a histogram key: 8 for 256 float bins, else enough for the
    widest integer object's ``max - min + 1`` values."""
    bins = FLOAT_BINS if np.dtype(dtype).kind == "f" else int(widest)
    return max(1, (bins - 1).bit_length())


def check_key_space(name: str, top_id: int, bits: int) -> None:
    """Refuse a key that cannot hold ``top_id << bits``."""
    if top_id.bit_length() + bits > 64:
        raise OptionError(f"step {name!r}: objects up to id {top_id} with values spanning "
                          f"2^{bits} do not fit per-object histograms; reduce the image's "
                          "value range (e.g. a normalize step) first")


@dataclass(frozen=True)
class ObjectExtrema(BlockReduce):
    """Per object of a label image: min and max of the image inside it, as a table
    ``(ids, lo, hi)`` (ids sorted uint64; lo and hi in the image's dtype)."""

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    def partial(self, crop: Region, image: np.ndarray, objects: np.ndarray) -> Table:
        lab = objects[crop].ravel()
        val = image[crop].ravel()
        inside = (lab != 0) & finite(val)  # NaN and ±inf are not counted
        lab, val = lab[inside].astype(np.uint64), val[inside]
        if lab.size == 0:
            return np.zeros(0, np.uint64), np.zeros(0, val.dtype), np.zeros(0, val.dtype)
        order = np.argsort(lab, kind="stable")
        lab, val = lab[order], val[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        return (lab[starts], np.minimum.reduceat(val, starts),
                np.maximum.reduceat(val, starts))

    def merge(self, a: Table, b: Table) -> Table:
        from engine.labels import merge_by_id

        return merge_by_id(a, b, (np.minimum, np.maximum))


@dataclass(frozen=True)
class ExtremaSummary:
    """Shard ``finish`` of the extrema: the table as it is, summarised as (objects,
    largest id, widest integer range ``max - min + 1``)."""

    def __call__(self, table: Table) -> tuple[Table, tuple[int, int, int]]:
        ids, lo, hi = table
        if ids.size == 0:
            return table, (0, 0, 1)
        widest = (int((hi.astype(np.float64) - lo.astype(np.float64)).max()) + 1
                  if lo.dtype.kind in "iub" else FLOAT_BINS)
        return table, (int(ids.size), int(ids[-1]), widest)


@dataclass(frozen=True)
class ObjectHistograms(BlockReduce):
    """Per object: the histogram scikit-image's ``threshold_otsu`` builds of its voxels,
    as a table ``(keys, counts)`` with ``key = id << bits | bin`` (zero bins left out).

    Float data: 256 bins over the object's own ``[min, max]`` in the data's dtype (as
    ``np.histogram`` on the object's values); integer data: one bin per value from the
    object's minimum. ``extrema`` is the :class:`ObjectExtrema` table.
    """

    extrema: ShardedTable
    bits: int

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    def partial(self, crop: Region, image: np.ndarray, objects: np.ndarray) -> Table:
        lab = objects[crop].ravel()
        val = image[crop].ravel()
        inside = (lab != 0) & finite(val)  # as ObjectExtrema: NaN and ±inf not counted
        lab, val = lab[inside].astype(np.uint64), val[inside]
        if lab.size == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        # one sort groups each object's voxels: O(voxels log voxels), not objects × voxels
        order = np.argsort(lab, kind="stable")
        lab, val = lab[order], val[order]
        starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
        ends = np.r_[starts[1:], lab.size]
        ids = lab[starts]
        _, rows = self.extrema.lookup(ids)
        lows, highs = rows[2].astype(val.dtype), rows[3].astype(val.dtype)
        keys, counts = [], []
        for i, a, b, lo, hi in zip(ids.tolist(), starts.tolist(), ends.tolist(), lows, highs,
                                   strict=True):
            v = val[a:b]
            if v.dtype.kind in "iub":
                hist = np.bincount(v.astype(np.int64) - int(lo), minlength=int(hi) - int(lo) + 1)
            else:
                hist = np.histogram(v, bins=FLOAT_BINS, range=(lo, hi))[0]
            nz = np.flatnonzero(hist)
            keys.append((np.uint64(i) << np.uint64(self.bits)) | nz.astype(np.uint64))
            counts.append(hist[nz].astype(np.int64))
        return np.concatenate(keys), np.concatenate(counts)  # ids ascending: keys sorted

    def merge(self, a: Table, b: Table) -> Table:
        from engine.labels import merge_by_id

        return merge_by_id(a, b, (np.add,))


def object_histogram(keys: np.ndarray, counts: np.ndarray, bits: int, lo: float, hi: float,
                     dtype: np.dtype) -> stats.Histogram:
    """One object's histogram from its rows of an :class:`ObjectHistograms` table."""
    dtype = np.dtype(dtype)
    bins = keys & np.uint64((1 << bits) - 1)
    if dtype.kind == "f":
        dense = np.zeros(FLOAT_BINS, np.int64)
        dense[bins.astype(np.int64)] = counts
        edges = np.histogram(np.zeros(0, dtype), bins=FLOAT_BINS,
                             range=(dtype.type(lo), dtype.type(hi)))[1]
        return stats.Histogram(dense, edges, count=int(dense.sum()),
                               edge_dtype=str(edges.dtype))
    dense = np.zeros(int(hi) - int(lo) + 1, np.int64)
    dense[bins.astype(np.int64)] = counts
    edges = np.arange(int(lo), int(hi) + 2, dtype=np.float64) - 0.5
    return stats.Histogram(dense, edges, count=int(dense.sum()), exact=True)


@dataclass(frozen=True)
class ObjectOtsu:
    """Shard ``finish`` of the histograms: each object's threshold, Otsu of its voxels
    times ``local_adjust`` in the image's precision (as Allen's code computes it), as a
    table ``(ids, thresholds)``; summary: the number of objects."""

    extrema: ShardedTable
    bits: int
    dtype: str
    local_adjust: float

    def __call__(self, table: Table) -> tuple[Table, int]:
        keys, counts = table
        dtype = np.dtype(self.dtype)
        ids = keys >> np.uint64(self.bits)
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else \
            np.zeros(0, np.int64)
        ends = np.r_[starts[1:], ids.size].astype(np.int64)
        objects = ids[starts]
        _, rows = self.extrema.lookup(objects)
        out = np.zeros(objects.size, np.float64 if dtype.kind != "f" else dtype)
        for k, (a, b, lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(),
                                               rows[2].astype(dtype), rows[3].astype(dtype),
                                               strict=True)):
            if lo == hi:  # scikit-image returns the value of a constant image
                out[k] = (dtype.type(lo) * self.local_adjust if dtype.kind == "f"
                          else float(lo) * self.local_adjust)
                continue
            otsu = stats.threshold_otsu(object_histogram(keys[a:b], counts[a:b], self.bits,
                                                         lo, hi, dtype))
            out[k] = (dtype.type(otsu) * self.local_adjust if dtype.kind == "f"
                      else otsu * self.local_adjust)
        return (objects, out), int(objects.size)
