"""Where to correct next: patch centres ranked by the uncertainty of a prediction.

A candidate patch is a window of ``size`` voxels (per axis) centred on a point of a regular
*candidate lattice* (``stride`` apart, by default half a window). Its score is the mean
binary entropy of the probabilities inside it,

    H(p) = -p log2 p - (1 - p) log2(1 - p),   0 <= H <= 1, highest at p = 0.5,

plus, with a second opinion (a label image), ``weight`` times the fraction of its voxels
where ``p > 0.5`` disagrees with ``labels > 0``. Greedy non-maximum suppression then takes
the best window, drops the candidates that overlap it, and repeats. The chosen centres go
to a CSV (``x,y,z,score`` in voxels, best first) that ``voxelmill patches extract --coords``
reads.

Inputs: the prediction is float in [0, 1] (anything else – NaN included – is refused,
naming the first offending voxel), or ``uint8`` read as ``p = v / 255`` (how 8-bit
probability maps are commonly saved; ``p > 0.5`` is then ``v >= 128``). Other integer
types are refused: a 0/1 label image is no probability map. A mask limits the *centres*
of candidate windows to its nonzero voxels.

Blockwise, exactly
------------------
Each block task reads its write region plus a halo of ``size // 2`` (enough for every
window centred in the write region), evaluates the windows centred on its lattice points
by 1D cumulative sums along each axis, and returns only its best ``K`` candidates;
the client merges them and runs the suppression. Two choices make the result
independent of the block layout, bit for bit:

* Entropy is summed as integers: each voxel's ``H`` is rounded to a multiple of
  ``2**-24`` (:data:`ENTROPY_SCALE`) before the window sums, so a window's sum is the same
  integer whatever block computed it (float running sums would depend on where the block
  starts). Scores are therefore exact to about ``6e-8``.
* ``K = N × M``, where ``M`` is the most lattice points one selected window can suppress
  (itself included). Greedy suppression decides ``N`` selections after looking at no more
  than ``N × M`` candidates of the global ranking (every candidate it looks at is either
  selected or suppressed by one of at most ``N`` selected windows), so the global top
  ``N × M`` – which the per-block top ``K`` contain – gives the same answer as all
  candidates. Ties are broken by the centre's (z, y, x), the same order everywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.errors import InputError, OptionError, VoxelmillError
from engine.output import check_destination, commit, partial_path
from engine.runner import run_blocks
from engine.workerpaths import check_workers_see

#: Entropy per voxel is summed as ``round(H * ENTROPY_SCALE)`` integers (see module doc).
ENTROPY_SCALE = 1 << 24

#: Default block edge (voxels) when the input's chunks give no better idea.
BLOCK_EDGE = 128


# --------------------------------------------------------------------------- pure functions


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits of probabilities.

    Parameters
    ----------
    p : ndarray of float
        Probabilities in [0, 1], any shape.

    Returns
    -------
    ndarray of float64, same shape
        ``-p log2 p - (1 - p) log2(1 - p)``, with ``0 log 0 = 0``: 0 at p = 0 or 1,
        1 at p = 0.5.
    """
    p = np.asarray(p, dtype=np.float64)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
              + np.where(q > 0, q * np.log2(np.where(q > 0, q, 1.0)), 0.0))
    return np.maximum(h, 0.0)


def _quantized_entropy(values: np.ndarray) -> np.ndarray:
    """``round(H(p) * ENTROPY_SCALE)`` as int64; ``uint8`` values are ``p × 255``."""
    if values.dtype == np.uint8:
        table = np.rint(binary_entropy(np.arange(256) / 255.0) * ENTROPY_SCALE)
        return table.astype(np.int64)[values]
    return np.rint(binary_entropy(values) * ENTROPY_SCALE).astype(np.int64)


def _foreground(values: np.ndarray) -> np.ndarray:
    """``p > 0.5`` (for ``uint8``: ``v / 255 > 0.5``, i.e. ``v >= 128``)."""
    return values >= 128 if values.dtype == np.uint8 else values > 0.5


def candidate_lattice(n: int, size: int, stride: int) -> np.ndarray:
    """Window centres along one axis: every ``stride`` from the first valid centre, plus
    the last valid one, so that windows reach both faces.

    A window centred at ``c`` covers ``[c - size // 2, c - size // 2 + size)``; it must lie
    inside ``[0, n)``.

    Returns
    -------
    ndarray of int64, shape (m,)
        Sorted centres; empty when ``n < size``.
    """
    lo, hi = size // 2, n - size + size // 2
    if hi < lo:
        return np.zeros(0, dtype=np.int64)
    points = np.arange(lo, hi + 1, stride, dtype=np.int64)
    return points if points[-1] == hi else np.append(points, np.int64(hi))


def max_neighbours(lattice: np.ndarray, reach: float) -> int:
    """The most points of a 1D lattice within ``|d| < reach`` of one of its points (itself
    included)."""
    if lattice.size == 0:
        return 0
    left = np.searchsorted(lattice, lattice - reach, side="right")
    right = np.searchsorted(lattice, lattice + reach, side="left")
    return int((right - left).max())


def rank_order(zyx: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices sorting candidates best first: score descending, then z, y, x ascending."""
    keys = [zyx[:, a] for a in range(zyx.shape[1] - 1, -1, -1)]
    return np.lexsort((*keys, -scores))


def non_max_suppression(
    zyx: np.ndarray, scores: np.ndarray, n: int, size: Sequence[int],
    min_distance: float | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression of candidate windows.

    Parameters
    ----------
    zyx : ndarray of int, shape (m, ndim)
        Window centres in voxels.
    scores : ndarray of float, shape (m,)
        Higher is better.
    n : int
        How many windows to keep at most.
    size : sequence of int
        Window size per axis. Without ``min_distance`` two windows overlap (and the lower
        ranked is dropped) when ``|d| < size`` on every axis.
    min_distance : float, optional
        Instead: drop a candidate whose centre is closer than this (Euclidean, voxels) to
        a kept one.

    Returns
    -------
    ndarray of int64, shape (k,), k <= n
        Indices into ``zyx`` of the kept windows, best first (order of :func:`rank_order`).
    """
    order = rank_order(zyx, scores)
    size = np.asarray(size, dtype=np.int64)
    kept: list[int] = []
    chosen = np.empty((0, zyx.shape[1]), dtype=np.int64)
    for i in order:
        if len(kept) >= n:
            break
        d = np.abs(chosen - zyx[i])
        if min_distance is None:
            clash = np.all(d < size, axis=1)
        else:
            clash = np.sqrt((d.astype(np.float64) ** 2).sum(axis=1)) < min_distance
        if not clash.any():
            kept.append(int(i))
            chosen = np.vstack([chosen, zyx[i][None]])
    return np.asarray(kept, dtype=np.int64)


def _window_sums(values: np.ndarray, starts: Sequence[np.ndarray], size: Sequence[int]
                 ) -> np.ndarray:
    """Sums of ``values`` over the windows ``[s, s + size)`` (per axis, local starts), on
    the outer product of ``starts``: one cumulative sum per axis, on ever smaller arrays."""
    out = values.astype(np.int64, copy=False)
    for axis, (s, w) in enumerate(zip(starts, size, strict=True)):
        cs = np.cumsum(out, axis=axis)
        pad = [(0, 0)] * cs.ndim
        pad[axis] = (1, 0)
        cs = np.pad(cs, pad)
        out = np.take(cs, s + w, axis=axis) - np.take(cs, s, axis=axis)
    return out


# --------------------------------------------------------------------------- block task


@dataclass(frozen=True)
class SuggestTask:
    """Block task: the best ``k`` candidate windows centred in the block's write region.

    Returns ``(zyx int64 (m, ndim), score float64 (m,), entropy float64 (m,),
    disagreement float64 (m,), candidates int, bad)``, ``m <= k``; ``candidates`` counts
    the block's lattice points (inside the mask) before the cut to ``k``; ``bad`` is
    ``None``, or the first value outside [0, 1] (or NaN) in the block and its voxel
    (z, y, x) – the client refuses the input then.
    """

    prediction: Any
    lattices: tuple[np.ndarray, ...]
    size: tuple[int, ...]
    k: int
    mask: Any = None
    second: Any = None
    weight: float = 1.0
    labels: bool = False
    """The prediction is itself a label set: read as ``p = (labels > 0)`` (entropy 0, so the
    score is the disagreement with ``second``)."""

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        values = self.prediction.read_region(region)
        return (values > 0).astype(np.float32) if self.labels else values

    @staticmethod
    def _first_bad(values: np.ndarray, region: tuple[slice, ...]) -> tuple[float, tuple] | None:
        """The first voxel that is no probability (value, z,y,x), or None."""
        if values.dtype == np.uint8 or values.size == 0:
            return None
        bad = ~((values >= 0) & (values <= 1))  # NaN fails both
        if not bad.any():
            return None
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        return float(values[where]), tuple(s.start + i for s, i in zip(region, where,
                                                                        strict=True))

    def __call__(self, block: Block) -> tuple[np.ndarray, ...]:
        ndim = len(self.size)
        centres = [lat[(lat >= w.start) & (lat < w.stop)]
                   for lat, w in zip(self.lattices, block.write, strict=True)]
        empty = (np.zeros((0, ndim), np.int64), np.zeros(0), np.zeros(0), np.zeros(0), 0)
        if any(c.size == 0 for c in centres):
            # no window is centred here, but every voxel is checked once
            return *empty, self._first_bad(self._read(block.write), block.write)
        values = self._read(block.read)
        bad = self._first_bad(values, block.read)
        if bad is not None:  # reported by the client, without a worker traceback or retries
            return *empty, bad
        starts = [c - self.size[a] // 2 - block.read[a].start for a, c in enumerate(centres)]
        volume = math.prod(self.size)
        entropy = _window_sums(_quantized_entropy(values), starts, self.size) \
            / (ENTROPY_SCALE * volume)
        if self.second is not None:
            labels = self.second.read_region(block.read)
            differ = _foreground(values) != (labels > 0)
            del labels
            disagreement = _window_sums(differ, starts, self.size) / volume
        else:
            disagreement = np.zeros_like(entropy)
        del values
        score = entropy + self.weight * disagreement
        zyx = np.stack([g.ravel() for g in np.meshgrid(*centres, indexing="ij")], axis=1)
        keep = np.ones(len(zyx), dtype=bool)
        if self.mask is not None:
            box = tuple(slice(int(c[0]), int(c[-1]) + 1) for c in centres)
            inside = self.mask.read_region(box) != 0
            keep = inside[np.ix_(*[c - c[0] for c in centres])].ravel()
        zyx, score = zyx[keep], score.ravel()[keep]
        entropy, disagreement = entropy.ravel()[keep], disagreement.ravel()[keep]
        best = rank_order(zyx, score)[: self.k]
        return zyx[best], score[best], entropy[best], disagreement[best], int(keep.sum()), None

    def merge(self, a: tuple, b: tuple) -> tuple:
        """Merge two results (of blocks or merged ones): the top ``k`` of both, the
        candidate count, and the first bad value in block order (``a`` holds the earlier
        blocks). The ranking is a total order, so the top ``k`` of partial top-``k`` lists
        are the top ``k`` of all candidates."""
        zyx, score, entropy, disagreement = (np.concatenate([a[i], b[i]]) for i in range(4))
        best = rank_order(zyx, score)[: self.k]
        return (zyx[best], score[best], entropy[best], disagreement[best], a[4] + b[4],
                a[5] if a[5] is not None else b[5])


# --------------------------------------------------------------------------- plan and run


@dataclass(frozen=True)
class SuggestOptions:
    """Options of :func:`plan_suggestion`.

    Parameters
    ----------
    n : int
        Patches wanted.
    size : int or tuple of int
        Window size in voxels, one value or one per spatial axis (z, y, x).
    stride : int or tuple of int, optional
        Spacing of the candidate lattice (default ``max(size // 2, 1)``).
    min_distance : float, optional
        Suppress candidates whose centre lies closer than this (voxels, Euclidean) to a
        chosen one, instead of suppressing overlapping windows.
    weight : float
        Weight of the disagreement with ``second`` in the score.
    level : int
        Pyramid level of the prediction (and of the mask and second labels).
    block : tuple of int, optional
        Block shape (write region) in voxels; default about 128 per axis, a multiple of
        the storage chunks.
    overwrite : bool
        Replace an existing output file.
    """

    n: int
    size: int | tuple[int, ...] = 160
    stride: int | tuple[int, ...] | None = None
    min_distance: float | None = None
    weight: float = 1.0
    level: int = 0
    block: tuple[int, ...] | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class SuggestPlan:
    """Everything checked and decided before the cluster starts."""

    prediction: Path
    out: Path
    options: SuggestOptions
    shape: tuple[int, ...]
    size: tuple[int, ...]
    lattices: tuple[np.ndarray, ...]
    k: int
    block_shape: tuple[int, ...]
    task: SuggestTask


@dataclass(frozen=True)
class SuggestResult:
    """What :func:`run_suggestion` wrote.

    Attributes
    ----------
    zyx : ndarray of int64, shape (k, ndim)
        Chosen window centres in voxels (z, y, x), best first; ``k <= requested``.
    scores, entropy, disagreement : ndarray of float64, shape (k,)
        Score of each window and its two parts (mean entropy, disagreement fraction).
    requested : int
        Patches asked for.
    candidates : int
        Candidate windows considered (lattice points inside the mask).
    destination : Path
        The CSV file.
    seconds : float
        Time of the block pass.
    """

    zyx: np.ndarray
    scores: np.ndarray
    entropy: np.ndarray
    disagreement: np.ndarray
    requested: int
    candidates: int
    destination: Path
    seconds: float


def _per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    values = (value,) * ndim if isinstance(value, int | np.integer) else tuple(value)
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim:
        raise OptionError(f"{what} {tuple(values)}: give one value or {ndim} (z,y,x)")
    if any(int(v) != v or v < 1 for v in values):
        raise OptionError(f"{what} {tuple(values)}: sizes must be positive whole numbers")
    return tuple(int(v) for v in values)


def _open_ref(path: Path, level: int, what: str) -> tuple[Any, tuple[int, ...], np.dtype,
                                                          tuple[int, ...]]:
    """A picklable reader of the spatial axes of ``path``: (ref, shape, dtype, chunks).

    OME-Zarr levels are read through the workers' chunk cache (halo reads share chunks).
    """
    from engine.io import detect_format, omezarr, open_volume
    from engine.io.sources import reader_of, view
    from engine.segment.refs import Source, Stored
    from engine.volume import select_channel

    if not path.exists():
        raise InputError(f"{path}: no such file or directory ({what})")
    fmt = detect_format(path)
    volume = open_volume(path, level=level) if fmt == "omezarr" else open_volume(path)
    data, axes, prefix = select_channel(volume, None)
    if axes not in ("zyx", "yx"):
        raise InputError(f"{path}: {what} needs a 2D or 3D image, not axes {volume.axes!r}")
    shape = tuple(int(s) for s in data.shape)
    dtype = np.dtype(data.dtype)
    if fmt == "omezarr":
        import zarr

        attrs, _ = omezarr.read_attrs(path)
        level_path = str(path / attrs["multiscales"][0]["datasets"][level]["path"])
        full = zarr.open_array(level_path, mode="r")
        chunks = tuple(int(c) for a, c in zip(volume.axes, full.chunks, strict=True)
                       if a in "zyx")
        return Stored(level_path, shape, chunks, dtype, prefix), shape, dtype, chunks
    chunks = tuple(int(c[0]) for c in data.chunks)
    # the file's reader with the channel (and time point) fixed: block tasks carry it,
    # never the dask array, whose graph grows with the volume
    reader = view(reader_of(volume.data), index=(*prefix, *(None,) * len(axes)))
    return Source(reader, chunks), shape, dtype, chunks


def _is_label_group(path: Path) -> bool:
    """Whether ``path`` is an OME-Zarr label group (``image-label`` metadata)."""
    from engine.io import omezarr

    try:
        attrs, _ = omezarr.read_attrs(path)
    except (VoxelmillError, OSError):  # not an OME-Zarr group
        return False
    return "image-label" in attrs


def plan_suggestion(
    prediction: str | Path, out: str | Path, options: SuggestOptions,
    mask: str | Path | None = None, second: str | Path | None = None,
) -> SuggestPlan:
    """Open and check the inputs, options and destination; raise a ``VoxelmillError``
    naming the problem before any work starts.

    Parameters
    ----------
    prediction : str or Path
        OME-Zarr image of probabilities: float in [0, 1], or uint8 read as probability ×
        255. One channel; 2D (yx) or 3D (zyx). Or an OME-Zarr label group (``image-label``
        metadata): a label set, read as ``p = labels > 0``; it needs ``second``, and the
        windows are then ranked by where the two label sets disagree.
    out : str or Path
        CSV file to write (``x,y,z,score`` in voxels; z = 0 for 2D).
    options : SuggestOptions
    mask : str or Path, optional
        Image of the same shape; only windows centred on a nonzero voxel are candidates.
    second : str or Path, optional
        Integer label image of the same shape (e.g. an OME-Zarr label group): adds
        ``weight ×`` the fraction of voxels where ``p > 0.5`` differs from ``labels > 0``.
    """
    prediction, out = Path(prediction), Path(out)
    if options.n < 1:
        raise OptionError(f"--n {options.n}: ask for at least one patch")
    if not math.isfinite(options.weight) or options.weight < 0:
        raise OptionError(f"--weight {options.weight}: must be a finite number >= 0")
    if options.min_distance is not None and not (
            math.isfinite(options.min_distance) and options.min_distance > 0):
        raise OptionError(f"--min-distance {options.min_distance}: must be a positive number")
    pred_ref, shape, dtype, chunks = _open_ref(prediction, options.level, "PREDICTION")
    label_set = _is_label_group(prediction)
    if label_set:
        if second is None:
            raise OptionError(f"{prediction}: a label set has no uncertainty; give --second "
                              "LABELS to rank windows by where the two label sets disagree")
        if dtype.kind not in "iub":
            raise InputError(f"{prediction}: label group of dtype {dtype}; expected integer "
                             "labels")
    elif dtype != np.uint8 and dtype.kind != "f":
        raise InputError(
            f"{prediction}: dtype {dtype} is not a probability map; expected floats in "
            "[0, 1] (or uint8 0..255 = probability × 255)")
    ndim = len(shape)
    size = _per_axis(options.size, ndim, "--size")
    stride = _per_axis(options.stride if options.stride is not None
                       else tuple(max(s // 2, 1) for s in size), ndim, "--stride")
    for ax, n, s in zip("zyx"[-ndim:], shape, size, strict=True):
        if n < s:
            raise OptionError(f"{prediction}: shape {shape} is smaller than the window "
                              f"--size {size} on axis {ax} ({n} < {s} voxels)")
    refs = {}
    for what, path in (("--mask", mask), ("--second", second)):
        if path is None:
            continue
        ref, other, other_dtype, _ = _open_ref(Path(path), options.level, what)
        if other != shape:
            raise InputError(f"{path}: {what} has shape {other}, the prediction "
                             f"{prediction} has {shape} (level {options.level})")
        if what == "--second" and other_dtype.kind not in "iub":
            raise InputError(f"{path}: --second must be an integer label image, not "
                             f"{other_dtype}")
        refs[what] = ref
    lattices = tuple(candidate_lattice(n, s, st)
                     for n, s, st in zip(shape, size, stride, strict=True))
    reach = size if options.min_distance is None else (options.min_distance,) * ndim
    m = math.prod(max_neighbours(lat, r) for lat, r in zip(lattices, reach, strict=True))
    k = options.n * m
    if options.block is not None:
        block = _per_axis(options.block, ndim, "--block")
    else:
        block = tuple(c * max(1, round(BLOCK_EDGE / c)) for c in chunks)
    block = tuple(min(b, n) for b, n in zip(block, shape, strict=True))
    check_destination(out, options.overwrite, source=prediction, file=True)
    task = SuggestTask(pred_ref, lattices, size, k, refs.get("--mask"), refs.get("--second"),
                       float(options.weight), label_set)
    return SuggestPlan(prediction, out, options, shape, size, lattices, k, block, task)


def run_suggestion(plan: SuggestPlan, client: Any, progress: Any = None) -> SuggestResult:
    """Rank the candidate windows blockwise, suppress overlaps, write the CSV atomically.

    Parameters
    ----------
    plan : SuggestPlan
        From :func:`plan_suggestion`.
    client : distributed.Client
    progress : Progress, optional
    """
    from engine.patches.coords import write_coords

    check_workers_see(client, [plan.prediction])

    t0 = time.monotonic()
    grid = BlockGrid(plan.shape, plan.block_shape, halo=tuple(s // 2 for s in plan.size))
    # streams: the client holds the top K of the blocks finished so far, not every block's
    zyx, score, entropy, disagreement, candidates, bad = run_blocks(
        client, grid, plan.task, name="patches-suggest", progress=progress,
        combine=plan.task.merge).value
    if bad is not None:
        value, at = bad
        raise InputError(
            f"{plan.prediction}: value {value!r} at voxel (z,y,x) {at} is not a probability; "
            "expected floats in [0, 1] (or uint8 0..255 = probability × 255)")
    # the global top K decide the suppression exactly as all candidates would (module doc)
    chosen = non_max_suppression(zyx, score, plan.options.n, plan.size,
                                 plan.options.min_distance)
    zyx, score = zyx[chosen], score[chosen]
    entropy, disagreement = entropy[chosen], disagreement[chosen]
    seconds = time.monotonic() - t0
    # CSV columns are x, y, z: a 2D image's centres get z = 0
    zyx3 = np.concatenate([np.zeros((len(zyx), 3 - len(plan.shape)), np.int64), zyx], axis=1)
    partial = partial_path(plan.out)
    write_coords(partial, zyx3, [float(s) for s in score])
    commit(partial, plan.out)
    return SuggestResult(zyx, score, entropy, disagreement, plan.options.n, candidates,
                         plan.out, seconds)


def suggest_patches(
    prediction: str | Path, out: str | Path, options: SuggestOptions, client: Any,
    mask: str | Path | None = None, second: str | Path | None = None,
    progress: Any = None, report: Callable[[str], None] = lambda _msg: None,
) -> SuggestResult:
    """:func:`plan_suggestion` then :func:`run_suggestion`; ``report`` gets a summary."""
    plan = plan_suggestion(prediction, out, options, mask=mask, second=second)
    result = run_suggestion(plan, client, progress)
    report(f"{len(result.zyx)} of {result.requested} patches from {result.candidates} "
           "candidate windows")
    return result
