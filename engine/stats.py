"""Global statistics of a lazy array, computed by a reduction pass over blocks.

Every statistic here is *global*: block tasks return small partial results (a bincount,
a fixed-bin histogram, a count, min, max and a sum) that are merged on the client as they
arrive (a streaming reduction: the client holds a bounded number of partials, whatever the
block count; see :func:`engine.runner.run_blocks`), so the result does not depend on the
block layout and equals what numpy and scikit-image compute on the whole array in memory.
Nothing is estimated from a single block.

* :func:`histogram` builds a :class:`Histogram` in one pass (integer data of at most
  16 bits: one exact bin per integer value) or two passes (min/max, then fixed bins).
* :func:`threshold_otsu`, :func:`threshold_multiotsu`, :func:`threshold_triangle`,
  :func:`threshold_yen`, :func:`threshold_isodata`, :func:`threshold_mean` and
  :func:`threshold_median` turn a :class:`Histogram` into thresholds with
  scikit-image's algorithms.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.errors import OptionError
from engine.io.sources import read_region

DEFAULT_BINS = 4096
"""Fixed bins of a float (or wide-integer) histogram when ``bins`` is not given."""

MAX_EXACT_BINS = 1 << 16
"""Wider integer data whose range spans at most this many values still gets exact bins."""


# --------------------------------------------------------------------------- Histogram


@dataclass
class Histogram:
    """A global histogram plus exact moments and extrema.

    Attributes
    ----------
    counts : (B,) ndarray of int64
        Voxels per bin.
    edges : (B + 1,) ndarray of float64
        Bin edges; bin ``i`` holds ``edges[i] <= v < edges[i + 1]``, the last bin also
        holds its upper edge (as :func:`numpy.histogram`).
    count : int
        Voxels counted (NaN, ±inf and masked-out voxels excluded); ``counts.sum()``.
    sum, sum_sq : float
        Sum of the values and of their squares (float64; exact for integer data with
        exact bins, else the correctly rounded sum of the float64 block sums).
    min, max : float
        Smallest and largest value (NaN when ``count == 0``).
    m2 : float
        Sum of squared deviations from the mean, merged with Chan's parallel formula;
        gives a ``std`` free of the cancellation of ``sum_sq / n - mean**2``.
    exact : bool
        Every bin holds exactly one value, its centre (integer data with unit bins);
        then :meth:`percentile` equals :func:`numpy.percentile`.
    """

    counts: np.ndarray
    edges: np.ndarray
    count: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    min: float = math.nan
    max: float = math.nan
    m2: float = 0.0
    exact: bool = False
    edge_dtype: str = "float64"

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.edges.shape != (self.counts.size + 1,):
            raise OptionError(
                f"histogram edges of shape {self.edges.shape} do not match "
                f"{self.counts.size} bins"
            )

    @property
    def centers(self) -> np.ndarray:
        """(B,) float64 bin centres (the integer values themselves for exact bins).

        Computed in ``edge_dtype`` (float32 for float32 data, as :func:`numpy.histogram`
        and scikit-image do), so thresholds equal scikit-image's bit for bit."""
        e = self.edges.astype(self.edge_dtype)
        return ((e[:-1] + e[1:]) / 2.0).astype(np.float64)

    @property
    def mean(self) -> float:
        """Mean of the counted values (NaN when empty)."""
        return self.sum / self.count if self.count else math.nan

    @property
    def var(self) -> float:
        """Population variance (``ddof=0``, as :func:`numpy.var`)."""
        return max(self.m2, 0.0) / self.count if self.count else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation (``ddof=0``, as :func:`numpy.std`)."""
        return math.sqrt(self.var) if self.count else math.nan

    def percentile(self, q: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
        """Percentiles of the counted values, numpy's ``"linear"`` method.

        Parameters
        ----------
        q : float or array_like of float
            Percentiles in ``[0, 100]``.

        Returns
        -------
        float or ndarray of float64
            Same shape as ``q``. Exact (equal to :func:`numpy.percentile`) when
            ``exact``; otherwise the order statistics are interpolated linearly within
            their bins, so the error is below one bin width.
        """
        qa = np.asarray(q, dtype=np.float64)
        if np.any((qa < 0) | (qa > 100)) or np.any(np.isnan(qa)):
            raise OptionError(f"percentiles must lie in [0, 100], got {q}")
        if self.count == 0:
            out = np.full(qa.shape, np.nan)
            return out[()] if out.ndim == 0 else out
        virtual = (self.count - 1) * (qa / 100)
        lo = np.floor(virtual)
        gamma = virtual - lo
        lo_rank = lo.astype(np.int64)
        hi_rank = np.minimum(lo_rank + 1, self.count - 1)
        a = self._order_statistic(lo_rank)
        b = self._order_statistic(hi_rank)
        diff = b - a
        out = np.asarray(a + diff * gamma, dtype=np.float64)
        np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
        return out[()] if out.ndim == 0 else out

    def _order_statistic(self, rank: np.ndarray) -> np.ndarray:
        """Value of the ``rank``-th smallest counted voxel (0-based), exact or in-bin."""
        cum = np.cumsum(self.counts)
        b = np.searchsorted(cum, rank, side="right")
        if self.exact:
            return self.centers[b]
        before = np.where(b > 0, cum[np.maximum(b - 1, 0)], 0)
        frac = (rank - before + 0.5) / self.counts[b]
        value = self.edges[b] + frac * (self.edges[b + 1] - self.edges[b])
        return np.clip(value, self.min, self.max)

    def merge(self, other: Histogram) -> Histogram:
        """Combine two histograms of disjoint voxel sets with identical edges.

        Parameters
        ----------
        other : Histogram
            Must have the same ``edges``.

        Returns
        -------
        Histogram
            A new histogram of the union of both voxel sets.
        """
        if self.edges.shape != other.edges.shape or not np.array_equal(self.edges, other.edges):
            raise OptionError("histograms with different bin edges cannot be merged")
        n = self.count + other.count
        m2 = chan_m2(self.count, self.sum, self.m2, other.count, other.sum, other.m2)
        return Histogram(
            counts=self.counts + other.counts,
            edges=self.edges.copy(),
            count=n,
            sum=math.fsum([self.sum, other.sum]),
            sum_sq=math.fsum([self.sum_sq, other.sum_sq]),
            min=float(np.fmin(self.min, other.min)),
            max=float(np.fmax(self.max, other.max)),
            m2=m2,
            exact=self.exact and other.exact,
            edge_dtype=self.edge_dtype,
        )


def chan_m2(na: int, sa: float, m2a: float, nb: int, sb: float, m2b: float) -> float:
    """Chan et al.'s pairwise update of the sum of squared deviations."""
    if na == 0:
        return m2b
    if nb == 0:
        return m2a
    delta = sb / nb - sa / na
    return m2a + m2b + delta * delta * na * nb / (na + nb)


# --------------------------------------------------------------------------- block tasks


FIXED_SHIFT = 1074
"""Float sums are carried exactly as integers in units of ``2**-FIXED_SHIFT`` (the smallest
subnormal), so partial sums merge in any order and round once, like :func:`math.fsum`."""


def to_fixed(x: float) -> int:
    """``x`` exactly, as an integer multiple of ``2**-FIXED_SHIFT``."""
    num, den = float(x).as_integer_ratio()  # den is a power of two <= 2**FIXED_SHIFT
    return num << (FIXED_SHIFT - den.bit_length() + 1)


def from_fixed(n: int) -> float:
    """The float nearest to ``n * 2**-FIXED_SHIFT`` (Python's int division rounds once)."""
    return n / (1 << FIXED_SHIFT)


@dataclass(frozen=True)
class _Partial:
    """What a block task returns: a few numbers and at most one small bin array.

    Sums are exact fixed-point integers (:func:`to_fixed`): merging partials in any order
    gives the correctly rounded total.
    """

    count: int
    min: float
    max: float
    sum_fx: int = 0
    sum_sq_fx: int = 0
    m2: float = 0.0
    offset: int = 0
    counts: np.ndarray | None = field(default=None, compare=False)

    @property
    def sum(self) -> float:
        return from_fixed(self.sum_fx)

    @property
    def sum_sq(self) -> float:
        return from_fixed(self.sum_sq_fx)


def value_range(values: np.ndarray) -> _Partial:
    """Count, min and max of the finite values of an array (a block's extent; NaN and
    ±inf are not counted, as in every statistic here).

    What the first pass of a float :func:`histogram` collects; a block operation that
    computes it on its output (see ``engine.segment.execute``) saves that pass.
    """
    v = finite_values(values.reshape(-1))
    if v.size == 0:
        return _Partial(0, math.nan, math.nan)
    return _Partial(int(v.size), float(v.min()), float(v.max()))


def finite_values(v: np.ndarray) -> np.ndarray:
    """``v`` without its NaN and ±inf (float data; other dtypes as they are). Copies only
    when there is something to drop."""
    if v.dtype.kind != "f":
        return v
    keep = np.isfinite(v)
    return v if keep.all() else v[keep]


def merge_range(a: _Partial | None, b: _Partial | None) -> _Partial | None:
    """The extent of two disjoint voxel sets from their :func:`value_range` results (a
    ``combine`` for :func:`engine.runner.run_blocks`; ``None`` stands for no extent)."""
    if a is None or not a.count:
        return b if b is not None and b.count else a
    if b is None or not b.count:
        return a
    return _Partial(a.count + b.count, min(a.min, b.min), max(a.max, b.max))


def merge_ranges(parts: Sequence[_Partial]) -> _Partial:
    """The extent of the union of blocks from their :func:`value_range` results."""
    out = None
    for p in parts:
        out = merge_range(out, p)
    return out if out is not None and out.count else _Partial(0, math.nan, math.nan)


def merge_partials(a: _Partial, b: _Partial) -> _Partial:
    """Merge two partials of one :class:`_StatsTask` pass (a ``combine`` for
    :func:`engine.runner.run_blocks`): extents, exact sums, Chan's M2, and bin counts
    (bincounts at different offsets are aligned on the union of their ranges)."""
    if not a.count:
        return b
    if not b.count:
        return a
    counts = None
    offset = min(a.offset, b.offset)
    if a.counts is not None and b.counts is not None:
        size = max(a.offset + a.counts.size, b.offset + b.counts.size) - offset
        counts = np.zeros(size, np.int64)
        counts[a.offset - offset: a.offset - offset + a.counts.size] += a.counts
        counts[b.offset - offset: b.offset - offset + b.counts.size] += b.counts
    return _Partial(a.count + b.count, float(np.fmin(a.min, b.min)),
                    float(np.fmax(a.max, b.max)), a.sum_fx + b.sum_fx,
                    a.sum_sq_fx + b.sum_sq_fx,
                    chan_m2(a.count, a.sum, a.m2, b.count, b.sum, b.m2), offset, counts)


@dataclass(frozen=True)
class _StatsTask:
    """Block task: read the write region of ``data`` (and ``mask``), reduce it.

    ``mode`` is ``"bincount"`` (integer data: bincount from the block minimum),
    ``"minmax"`` (count, min, max) or ``"bins"`` (counts over ``edges`` plus sums).
    """

    data: Any
    mask: Any
    mode: str
    nbins: int = 0
    range: tuple[Any, Any] | None = None  # in the data's dtype, as np.histogram gets it
    moments: bool = True

    def values(self, block: Block) -> np.ndarray:
        v = read_region(self.data, block.write)
        if self.mask is not None:
            m = read_region(self.mask, block.write).astype(bool, copy=False)
            v = v[m]
        else:
            v = v.reshape(-1)
        if v.dtype.kind == "f":
            v = finite_values(v)
        elif v.dtype.kind == "b":
            v = v.astype(np.uint8)
        return v

    def __call__(self, block: Block) -> _Partial:
        v = self.values(block)
        if self.mode == "bincount":
            if v.size == 0:
                return _Partial(0, math.nan, math.nan)
            lo = int(v.min())
            counts = np.bincount((v.astype(np.int64) - lo).ravel())
            return _Partial(int(v.size), float(lo), float(lo + counts.size - 1), offset=lo,
                            counts=counts)
        if self.mode == "minmax":
            return value_range(v)
        if v.size == 0:
            return _Partial(0, math.nan, math.nan)
        # "bins": the global range is known already, so the block's own is not taken;
        # the same call as np.histogram on the whole array: identical bin of every value
        counts, _ = np.histogram(v, bins=self.nbins, range=self.range)
        if not self.moments:
            return _Partial(int(v.size), math.nan, math.nan, counts=counts)
        f = v.astype(np.float64)
        s = float(f.sum())
        m2 = float(np.sum((f - s / f.size) ** 2))
        return _Partial(int(v.size), math.nan, math.nan, sum_fx=to_fixed(s),
                        sum_sq_fx=to_fixed(float(np.dot(f, f))), m2=m2, counts=counts)


# --------------------------------------------------------------------------- histogram


def _as_dask(data: Any) -> Any:
    """A dask array, or an array view that reads itself (``read_region``, ``shape``,
    ``dtype``, ``chunks``), which block tasks read without building a dask graph."""
    import dask.array as da

    if hasattr(data, "read_region") and hasattr(data, "chunks"):
        return data

    data = getattr(data, "data", data) if not isinstance(data, np.ndarray | da.Array) else data
    return data if isinstance(data, da.Array) else da.asarray(data)


def _chunks(data: Any) -> tuple[int, ...]:
    return tuple(getattr(data, "chunksize", None) or data.chunks)


def _run(client: Any, grid: BlockGrid, task: Any, name: str,
         combine: Any = merge_partials) -> Any:
    """One streaming reduction pass: the partials of all blocks, merged by ``combine``."""
    from engine.runner import run_blocks

    # a unique pass name: two histograms on one client must never share task keys
    report = run_blocks(client, grid, task, name=f"stats-{name}-{uuid.uuid4().hex[:8]}",
                        combine=combine)
    return report.value if report.value is not None else _Partial(0, math.nan, math.nan)


def _exact_edges(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 2, dtype=np.float64) - 0.5


def _from_exact_counts(counts: np.ndarray, lo: int) -> Histogram:
    """Histogram with exact moments from a global integer bincount starting at ``lo``."""
    counts = np.asarray(counts, dtype=np.int64)
    values = np.arange(lo, lo + counts.size, dtype=np.int64)
    n = int(counts.sum())
    c_obj, v_obj = counts.astype(object), values.astype(object)
    s = int(np.dot(c_obj, v_obj))  # Python integers: no overflow, exact
    s2 = int(np.dot(c_obj, v_obj * v_obj))
    m2 = float((s2 * n - s * s) / n) if n else 0.0  # exact rational, rounded once
    return Histogram(counts, _exact_edges(lo, lo + counts.size - 1), count=n, sum=float(s),
                     sum_sq=float(s2), min=float(lo), max=float(lo + counts.size - 1),
                     m2=m2, exact=True)


def _empty(dtype: np.dtype) -> Histogram:
    return Histogram(np.zeros(1, np.int64), np.array([-0.5, 0.5]), exact=dtype.kind in "biu")


def histogram(
    client: Any,
    data: Any,
    bins: int | None = None,
    *,
    mask: Any = None,
    block_shape: int | Sequence[int] | None = None,
    extent: Any = None,
    moments: bool = True,
) -> Histogram:
    """Global histogram, moments and extrema of a lazy array, by a blockwise reduction.

    Parameters
    ----------
    client : distributed.Client
        Cluster that runs the block tasks.
    data : dask.array.Array or Volume, shape (...)
        Any real dtype (bool, integer, float). NaN and ±inf voxels are ignored (not
        counted, as :func:`numpy.histogram` of the finite values).
    bins : int, optional
        Number of equal-width bins over ``[min, max]`` (as ``np.histogram(x, bins)``).
        By default: integer data gets one exact bin per integer value in ``[min, max]``
        (in one pass for at most 16-bit integers; wider integers whose range spans at
        most ``MAX_EXACT_BINS`` values too, after a min/max pass), other data
        ``DEFAULT_BINS`` bins.
    mask : dask.array.Array of bool, same shape as ``data``, optional
        Only voxels where ``mask`` is true are counted.
    block_shape : int or tuple of int, optional
        Block (read) shape; defaults to the chunk shape of ``data``. The result does not
        depend on it.
    extent : optional
        The count, min and max of ``data`` (:func:`merge_ranges` of :func:`value_range`
        results) when already known: float data then takes one pass instead of two.
        Ignored with a ``mask``.
    moments : bool
        Also sum the moments (``sum``, ``sum_sq``, ``m2``) of float data; without them
        (they cost more than the binning) those fields are NaN.

    Returns
    -------
    Histogram
        ``counts`` (int64) over float64 ``edges``, plus ``count``, ``sum``, ``sum_sq``,
        ``min``, ``max``. ``counts`` equals ``np.histogram(values, hist.edges)[0]`` of
        the counted values for every block layout.
    """
    data = _as_dask(data)
    if data.dtype.kind not in "biuf":
        raise OptionError(f"cannot take a histogram of {data.dtype} data")
    if mask is not None:
        mask = _as_dask(mask)
        if mask.shape != data.shape:
            raise OptionError(f"mask of shape {mask.shape} does not match data of shape "
                              f"{data.shape}")
    if bins is not None and (int(bins) != bins or bins < 1):
        raise OptionError(f"bins must be a positive integer, got {bins}")
    grid = BlockGrid(data.shape, block_shape if block_shape is not None else _chunks(data))
    integer = data.dtype.kind in "biu"

    if integer and bins is None and data.dtype.itemsize <= 2:
        return _from_bincount(_run(client, grid, _StatsTask(data, mask, "bincount"), "bincount"),
                              data.dtype)

    if extent is None or mask is not None:
        extent = _run(client, grid, _StatsTask(data, mask, "minmax"), "minmax")
    if extent.count == 0:
        return _empty(data.dtype)
    lo, hi = extent.min, extent.max  # finite: non-finite voxels are never counted
    if integer and bins is None and hi - lo + 1 <= MAX_EXACT_BINS:
        return _from_bincount(_run(client, grid, _StatsTask(data, mask, "bincount"), "bincount"),
                              data.dtype)
    nbins = int(bins or DEFAULT_BINS)
    # numpy bins float32 data with float32 edges; scikit-image's thresholds inherit them
    native = (data.dtype.type(lo), data.dtype.type(hi))
    edges = np.histogram(np.zeros(0, data.dtype), bins=nbins, range=native)[1]
    part = _run(client, grid, _StatsTask(data, mask, "bins", nbins, native, moments), "bins")
    counts = part.counts if part.count else np.zeros(nbins, np.int64)
    sums = (part.sum, part.sum_sq, part.m2) if moments else (math.nan,) * 3
    return Histogram(counts, edges, count=part.count, sum=sums[0], sum_sq=sums[1],
                     min=float(lo), max=float(hi), m2=sums[2], exact=False,
                     edge_dtype=str(edges.dtype))


def _from_bincount(part: _Partial, dtype: np.dtype) -> Histogram:
    return _from_exact_counts(part.counts, part.offset) if part.count else _empty(dtype)


# --------------------------------------------------------------------------- exact percentiles

SELECT_LIMIT = 1 << 20
"""A bin holding at most this many voxels is collected and sorted; larger ones are refined."""


@dataclass(frozen=True)
class _RangeTask:
    """Block task: voxels below ``lo``, and those in ``[lo, hi)`` (``hi`` included when
    ``closed``) — binned into ``nbins`` equal bins, or returned sorted when ``nbins == 0``."""

    stats: _StatsTask
    lo: float
    hi: float
    closed: bool
    nbins: int

    def __call__(self, block: Block) -> tuple[int, np.ndarray]:
        v = self.stats.values(block)
        below = int(np.count_nonzero(v < self.lo))
        inside = v[(v >= self.lo) & ((v <= self.hi) if self.closed else (v < self.hi))]
        if self.nbins == 0:
            return below, np.sort(inside)
        counts, _ = np.histogram(inside.astype(np.float64), bins=self.nbins,
                                 range=(self.lo, self.hi))
        return below, counts


def merge_selected(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]
                   ) -> tuple[int, np.ndarray]:
    """Merge two :class:`_RangeTask` results that hold sorted values: counts below add, the
    values merge sorted (a selection pass collects at most about ``SELECT_LIMIT`` values)."""
    return a[0] + b[0], np.sort(np.concatenate([a[1], b[1]]), kind="stable")


def merge_binned(a: tuple[int, np.ndarray], b: tuple[int, np.ndarray]
                 ) -> tuple[int, np.ndarray]:
    """Merge two :class:`_RangeTask` results that hold bin counts: both add."""
    return a[0] + b[0], a[1] + b[1]


def _order_statistic(client: Any, grid: BlockGrid, task: _StatsTask, hist: Histogram,
                     rank: int) -> float:
    """The ``rank``-th smallest counted value (0-based), exactly: find its bin, refine the
    bin with further histogram passes until it is small, then collect and sort it."""
    counts, edges = hist.counts, hist.edges
    below, closed = 0, True
    while True:
        cum = np.cumsum(counts)
        b = int(np.searchsorted(cum, rank - below, side="right"))
        lo, hi = float(edges[b]), float(edges[b + 1])
        closed = closed and b == len(counts) - 1  # only the last bin holds its top edge
        below += int(cum[b - 1]) if b > 0 else 0
        nbins = 0 if counts[b] <= SELECT_LIMIT or lo == hi else DEFAULT_BINS
        _, part = _run(client, grid, _RangeTask(task, lo, hi, closed, nbins), "select",
                       merge_binned if nbins else merge_selected)
        if nbins == 0:
            return float(part[rank - below])
        counts = part
        edges = np.histogram(np.zeros(0), bins=nbins, range=(lo, hi))[1]
        if counts.sum() == 0:  # float rounding put the values on an edge: collect them
            nbins = 0


def percentile(client: Any, data: Any, q: float | Sequence[float], *, mask: Any = None,
               hist: Histogram | None = None) -> float | np.ndarray:
    """Exact percentiles of a lazy array (:func:`numpy.percentile`, ``"linear"``).

    Exact for every dtype: the needed order statistics are located with the global
    histogram, then their bins are refined by further passes until few enough voxels
    remain to collect and sort. NaN and ±inf voxels are ignored (as
    :func:`numpy.percentile` of the finite values).

    Parameters
    ----------
    client : distributed.Client
    data : dask.array.Array
    q : float or sequence of float
        Percentiles in ``[0, 100]``.
    mask : dask.array.Array of bool, optional
        Only voxels where ``mask`` is true count.
    hist : Histogram, optional
        A histogram of the same data (saves one pass).
    """
    data = _as_dask(data)
    mask = _as_dask(mask) if mask is not None else None
    hist = hist or histogram(client, data, mask=mask)
    if hist.exact:
        return hist.percentile(q)
    qa = np.asarray(q, dtype=np.float64)
    if np.any((qa < 0) | (qa > 100)) or np.any(np.isnan(qa)):
        raise OptionError(f"percentiles must lie in [0, 100], got {q}")
    if hist.count == 0:
        raise OptionError("cannot take percentiles of an empty array (no voxels counted)")
    grid = BlockGrid(data.shape, _chunks(data))
    task = _StatsTask(data, mask, "bins")
    cache: dict[int, float] = {}

    def stat(rank: int) -> float:
        if rank not in cache:
            cache[rank] = _order_statistic(client, grid, task, hist, rank)
        return cache[rank]

    out = []
    for qi in qa.ravel():
        virtual = (hist.count - 1) * (qi / 100)
        lo = int(math.floor(virtual))
        gamma = virtual - lo
        a, b = stat(lo), stat(min(lo + 1, hist.count - 1))
        diff = b - a
        out.append(b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma)
    res = np.asarray(out, dtype=np.float64).reshape(qa.shape)
    return res[()] if res.ndim == 0 else res


# --------------------------------------------------------------------------- thresholds


def _skimage_hist(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, centers)`` trimmed of empty end bins, as scikit-image's ``hist=``."""
    if hist.count == 0:
        raise OptionError("cannot threshold an empty histogram (no voxels counted)")
    nz = np.flatnonzero(hist.counts)
    sl = slice(nz[0], nz[-1] + 1)
    # centres in the edges' own dtype, not upcast: scikit-image's methods then do their
    # arithmetic in the same precision (float32 for float32 images), and near-tied
    # thresholds of small histograms (one object's voxels) pick the same bin
    e = hist.edges.astype(hist.edge_dtype)
    return hist.counts[sl], ((e[:-1] + e[1:]) / 2.0)[sl]


def threshold_otsu(hist: Histogram) -> float:
    """Otsu's threshold of a global histogram (:func:`skimage.filters.threshold_otsu`).

    Parameters
    ----------
    hist : Histogram
        From :func:`histogram`.

    Returns
    -------
    float
        A bin centre; voxels ``> threshold`` are foreground. For exact integer
        histograms this equals ``skimage.filters.threshold_otsu(image)``.
    """
    from skimage.filters import threshold_otsu as sk_otsu

    return _single_threshold(sk_otsu, hist)


def _single_threshold(method: Any, hist: Histogram) -> float:
    """Run a scikit-image ``hist=`` threshold method; a constant image gives its value."""
    counts, centers = _skimage_hist(hist)
    if counts.size == 1:  # as skimage does for a constant image
        return float(centers[0])
    return float(method(hist=(counts, centers)))


def threshold_multiotsu(hist: Histogram, classes: int = 3) -> np.ndarray:
    """Multi-Otsu thresholds of a global histogram (:func:`skimage.filters.threshold_multiotsu`).

    Parameters
    ----------
    hist : Histogram
        From :func:`histogram`. The cost grows as ``bins ** (classes - 1)``: use
        ``bins=`` (e.g. 256) for data with a wide value range.
    classes : int
        Number of classes; ``classes - 1`` thresholds are returned.

    Returns
    -------
    (classes - 1,) ndarray of float64
        Increasing thresholds (bin centres).
    """
    from skimage.filters import threshold_multiotsu as sk_multiotsu

    counts, centers = _skimage_hist(hist)
    return np.asarray(sk_multiotsu(classes=classes, hist=(counts, centers)), dtype=np.float64)


def threshold_yen(hist: Histogram) -> float:
    """Yen's threshold of a global histogram (:func:`skimage.filters.threshold_yen`)."""
    from skimage.filters import threshold_yen as sk_yen

    return _single_threshold(sk_yen, hist)


def threshold_isodata(hist: Histogram) -> float:
    """ISODATA threshold of a global histogram (:func:`skimage.filters.threshold_isodata`)."""
    from skimage.filters import threshold_isodata as sk_isodata

    return _single_threshold(sk_isodata, hist)


def threshold_triangle(hist: Histogram) -> float:
    """Triangle threshold of a global histogram.

    scikit-image 0.26's :func:`skimage.filters.threshold_triangle` takes no ``hist=``;
    this follows its algorithm step by step on the histogram, so for exact integer
    histograms the result equals ``skimage.filters.threshold_triangle(image)``.

    Parameters
    ----------
    hist : Histogram
        From :func:`histogram`.

    Returns
    -------
    float
        A bin centre; voxels ``> threshold`` are foreground.
    """
    counts, centers = _skimage_hist(hist)
    counts = counts.astype(np.int64)
    nbins = len(counts)
    arg_peak_height = int(np.argmax(counts))
    peak_height = counts[arg_peak_height]
    arg_low_level, arg_high_level = np.flatnonzero(counts)[[0, -1]]
    if arg_low_level == arg_high_level:
        return float(centers[arg_low_level])
    flip = arg_peak_height - arg_low_level < arg_high_level - arg_peak_height
    if flip:
        counts = counts[::-1]
        arg_low_level = nbins - arg_high_level - 1
        arg_peak_height = nbins - arg_peak_height - 1
    width = arg_peak_height - arg_low_level
    x1 = np.arange(width)
    y1 = counts[x1 + arg_low_level]
    norm = np.sqrt(peak_height**2 + width**2)
    peak_height = peak_height / norm
    width = width / norm
    length = peak_height * x1 - width * y1
    arg_level = int(np.argmax(length)) + arg_low_level
    if flip:
        arg_level = nbins - arg_level - 1
    return float(centers[arg_level])


def threshold_mean(hist: Histogram) -> float:
    """Mean of the counted values (:func:`skimage.filters.threshold_mean`), exact moments."""
    if hist.count == 0:
        raise OptionError("cannot threshold an empty histogram (no voxels counted)")
    return hist.mean


def threshold_median(hist: Histogram) -> float:
    """Median of the counted values (exact for integer histograms, else within one bin)."""
    if hist.count == 0:
        raise OptionError("cannot threshold an empty histogram (no voxels counted)")
    return float(hist.percentile(50))


__all__ = [
    "DEFAULT_BINS",
    "Histogram",
    "histogram",
    "percentile",
    "threshold_isodata",
    "threshold_mean",
    "threshold_median",
    "threshold_multiotsu",
    "threshold_otsu",
    "threshold_triangle",
    "threshold_yen",
]


def display_windows(level_path: Path, axes: str, nchan: int
                    ) -> list[tuple[float, float, float, float]]:
    """Display windows per channel from the smallest level (min, max, 0.1 % and 99.9 %).

    NaN and ±inf are ignored (a window over them would be NaN, and a viewer could show
    nothing); a channel with no finite value gets (0, 1, 0, 1)."""
    import zarr

    from engine.io.integrity import read_checked

    arr = zarr.open_array(str(level_path), mode="r")
    data = read_checked(arr, str(level_path), (slice(None),) * arr.ndim)
    if "c" in axes:
        data = np.moveaxis(data, axes.index("c"), 0)
    else:
        data = data[None]
    out = []
    for ch in data[:nchan]:
        v = ch.astype(np.float64).ravel()
        v = v[np.isfinite(v)]
        lo, hi = np.percentile(v, [0.1, 99.9]) if v.size else (0.0, 1.0)
        if ch.dtype.kind in "iu":  # integer data: the type's range, as viewers expect
            info = np.iinfo(ch.dtype)
            out.append((float(info.min), float(info.max), float(lo), float(hi)))
        else:
            out.append((float(v.min()), float(v.max()), float(lo), float(hi)) if v.size
                       else (0.0, 1.0, 0.0, 1.0))
    return out
