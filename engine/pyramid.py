"""Multiscale levels built blockwise: mean for images, mode for labels.

Each level halves the finer spatial axes of the previous one. For strongly anisotropic
voxels (e.g. z three times coarser than x/y) only the finer axes are halved until the
voxel is close to isotropic, then all spatial axes. Levels are added until the smallest
fits in one chunk.

Downsampling is local (factor-2 windows starting at even offsets, edge-replicated at an
odd end), so a block aligned to ``chunk × factor`` gives exactly the whole-array result.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from engine.blocks import Block, BlockGrid, blocks_reading
from engine.io.chunkfiles import write_chunks
from engine.io.integrity import unit_shape
from engine.io.opened import open_array
from engine.io.sources import read_region, reader_of

#: an axis is "finer" when its voxel is smaller than the coarsest one by more than this.
ANISOTROPY = 1.5


@dataclass(frozen=True)
class Level:
    """One pyramid level.

    Attributes
    ----------
    shape : tuple of int
        Array shape of the level.
    factors : tuple of int
        Downsampling factor from the previous level, per axis (all 1 for level 0).
    scale : tuple of float
        NGFF scale per axis (voxel size on spatial axes, 1 on t and c).
    translation : tuple of float
        NGFF translation: physical position of voxel 0's centre relative to level 0's.
    """

    shape: tuple[int, ...]
    factors: tuple[int, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def level_factors(shape: Sequence[int], axes: str, scale: Sequence[float]) -> tuple[int, ...]:
    """Factors for the next level: halve the finer spatial axes, or all when near isotropic."""
    spatial = [i for i, a in enumerate(axes) if a in "zyx" and shape[i] > 1]
    if not spatial:
        return (1,) * len(axes)
    coarsest = max(scale[i] for i in spatial)
    finer = [i for i in spatial if scale[i] * ANISOTROPY < coarsest]
    chosen = finer or spatial
    return tuple(2 if i in chosen else 1 for i in range(len(axes)))


def plan_levels(
    shape: Sequence[int], axes: str, scale: Sequence[float], chunks: Sequence[int],
    max_levels: int | None = None,
) -> list[Level]:
    """Levels until every spatial axis of the smallest fits in one chunk.

    Parameters
    ----------
    shape, chunks : tuple of int
        Level-0 shape and the chunk shape used on every level (clipped to the level).
    axes : str
        NGFF axes, e.g. ``"zyx"`` or ``"cyx"``.
    scale : tuple of float
        Level-0 NGFF scale per axis.
    max_levels : int, optional
        Upper bound on the number of levels (including level 0).
    """
    levels = [Level(tuple(shape), (1,) * len(shape), tuple(scale), (0.0,) * len(shape))]
    while max_levels is None or len(levels) < max_levels:
        last = levels[-1]
        if all(last.shape[i] <= chunks[i] for i, a in enumerate(axes) if a in "zyx"):
            break
        f = level_factors(last.shape, axes, last.scale)
        if all(x == 1 for x in f):
            break
        new_shape = tuple(-(-s // k) for s, k in zip(last.shape, f, strict=True))
        new_scale = tuple(s * k for s, k in zip(last.scale, f, strict=True))
        translation = tuple(
            (ns - s0) / 2 if a in "zyx" else 0.0
            for a, ns, s0 in zip(axes, new_scale, scale, strict=True)
        )
        levels.append(Level(new_shape, f, new_scale, translation))
    return levels


#: bytes of input (counted in the sums' dtype) :func:`downsample_mean` adds up at once
MEAN_SLAB_BYTES = 4 * 2**20


def _pad_to_windows(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Edge-replicate odd ends so every axis is a multiple of its factor."""
    pad = [(0, -s % f) for s, f in zip(data.shape, factors, strict=True)]
    return np.pad(data, pad, mode="edge") if any(p[1] for p in pad) else data


def _blocks_view(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Edge-pad to a multiple of ``factors`` and view as (out..., window...)."""
    data = _pad_to_windows(data, factors)
    shape = []
    for s, f in zip(data.shape, factors, strict=True):
        shape += [s // f, f]
    view = data.reshape(shape)
    n = data.ndim
    return view.transpose([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])


def _window_sums(data: np.ndarray, factors: Sequence[int], acc_dtype: type) -> np.ndarray:
    """Sums over ``factors`` windows of ``data`` (a multiple of them), added axis by axis
    in a fixed order."""
    acc = data
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        parts = [acc[(slice(None),) * axis + (slice(k, None, f),)] for k in range(f)]
        total = np.add(parts[0], parts[1], dtype=acc_dtype)
        for part in parts[2:]:
            total += part
        acc = total
    return acc


def downsample_mean(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Mean over ``factors`` windows, same dtype (integers rounded half to even).

    Window members are added axis by axis in a fixed order (elementwise adds, float32 for
    float32 data, float64 otherwise), so the result does not depend on how the volume was
    cut into blocks; numpy's own reductions may sum in a layout-dependent order.

    Parameters
    ----------
    data : ndarray
        Any shape; axes of odd length are edge-replicated at their end.
    factors : tuple of int
        Window per axis (1 = keep).
    """
    if all(f == 1 for f in factors):
        return data
    data = _pad_to_windows(data, factors)
    acc_dtype = np.float32 if data.dtype == np.float32 else np.float64
    acc = np.empty([s // f for s, f in zip(data.shape, factors, strict=True)], acc_dtype)
    # slab by slab along the first axis (each output voxel's adds are the same): summed
    # whole, a 256³ float32 block's first partial sums were a 32 MiB array, which glibc
    # maps fresh from the kernel (zeroed pages) for every block
    per_plane = max(1, data[:factors[0]].nbytes * np.dtype(acc_dtype).itemsize
                    // data.dtype.itemsize)
    step = max(1, MEAN_SLAB_BYTES // per_plane)
    for o in range(0, acc.shape[0], step):
        acc[o:o + step] = _window_sums(data[o * factors[0]:(o + step) * factors[0]], factors,
                                       acc_dtype)
    acc *= acc_dtype(1.0 / int(np.prod(factors)))
    if data.dtype.kind in "iub":
        np.rint(acc, out=acc)
        if data.dtype.kind != "b":
            info = np.iinfo(data.dtype)
            np.clip(acc, info.min, info.max, out=acc)
    return acc.astype(data.dtype, copy=False)


def downsample_mode(data: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Most frequent value in each ``factors`` window (labels); ties go to the first seen."""
    if all(f == 1 for f in factors):
        return data
    view = _blocks_view(data, factors)
    k = int(np.prod(factors))
    flat = view.reshape(view.shape[: data.ndim] + (k,))
    counts = np.zeros(flat.shape, dtype=np.uint8)
    for i in range(k):
        counts[..., i] = (flat == flat[..., i : i + 1]).sum(axis=-1)
    pick = counts.argmax(axis=-1)
    return np.take_along_axis(flat, pick[..., None], axis=-1)[..., 0]


#: fewest blocks of a pass fusing several levels (more with more threads)
MIN_PASS_BLOCKS = 8

DOWNSAMPLERS = {"mean": downsample_mean, "mode": downsample_mode}


@dataclass(frozen=True)
class Pass:
    """One blockwise pass: read ``source`` level, write ``levels`` (fused in one task).

    ``source`` is -1 when the pass reads the input volume and writes level 0 itself.
    ``block_shape`` is in the source level's voxels.
    """

    source: int
    levels: tuple[int, ...]
    block_shape: tuple[int, ...]


def _block_for(
    levels: Sequence[Level], chunks: Sequence[int], base: int, m: int
) -> tuple[int, ...]:
    """One level-(base+m) chunk expressed in level-``base`` voxels, clipped to the level."""
    out = []
    for i, c in enumerate(chunks):
        factor = int(np.prod([lv.factors[i] for lv in levels[base + 1: base + m + 1]]))
        out.append(min(c * factor, levels[base].shape[i]))
    return tuple(out)


def plan_passes(levels: Sequence[Level], chunks: Sequence[int], itemsize: int,
                budget_bytes: int = 64 * 2**20, min_blocks: int = MIN_PASS_BLOCKS,
                start: int = 0) -> list[Pass]:
    """Group levels into passes whose blocks stay within ``budget_bytes``.

    A pass reading level L and writing L+1..L+m uses blocks of one level-(L+m) chunk
    mapped back to level L, so each task writes whole chunks on every level it touches.
    At least one level is fused per pass, whatever the budget; more only while the pass
    keeps ``min_blocks`` blocks to spread over the workers. With ``start`` > 0 the levels up
    to ``start`` exist already and the first pass reads level ``start``.
    """

    def n_blocks(block: tuple[int, ...], shape: tuple[int, ...]) -> int:
        return int(np.prod([-(-s // b) for s, b in zip(shape, block, strict=True)]))

    passes: list[Pass] = []
    # the first pass reads the input and writes level 0 itself, unless levels exist already
    src, base = (-1, 0) if start == 0 else (start, start)
    if base >= len(levels) - 1 and src != -1:
        return passes
    while True:
        remaining = len(levels) - 1 - base
        m = min(1, remaining)
        while m < remaining:
            grown = _block_for(levels, chunks, base, m + 1)
            if np.prod(grown) * itemsize > budget_bytes or \
                    n_blocks(grown, levels[base].shape) < min_blocks:
                break
            m += 1
        written = tuple(range(base if src == -1 else base + 1, base + m + 1))
        passes.append(Pass(src, written, _block_for(levels, chunks, base, m)))
        src = base = base + m
        if base >= len(levels) - 1:
            return passes


# ----------------------------------------------------------------------- blockwise building

class MisalignedWrite(RuntimeError):
    """A block write that would share a storage unit (chunk or shard) with another block."""


def write_chunkwise(array, region: tuple[slice, ...], data: np.ndarray,
                    whole: bool = False) -> None:
    """Write ``data`` at ``region`` one storage unit (shard, else chunk) at a time.

    Handing zarr contiguous chunk-sized pieces avoids its fill-and-copy of a region that
    spans many chunks, which doubled a block's memory. With ``whole`` the region goes to
    zarr in one call instead, which encodes its chunks concurrently (for slabs small
    enough that a copy does not matter).

    Raises
    ------
    MisalignedWrite
        When ``region`` covers part of a storage unit: another task may write the rest of
        it at the same time, and one of the two read-modify-write cycles would be lost
        (with zarr v3 sharding, a whole shard's worth of chunks).
    """
    unit = unit_shape(array)
    for ax, (r, u, n) in enumerate(zip(region, unit, array.shape, strict=True)):
        if r.start % u or (r.stop % u and r.stop != n):
            raise MisalignedWrite(
                f"refusing to write region {[(s.start, s.stop) for s in region]} of "
                f"{getattr(array, 'path', array)}: axis {ax} is not aligned to its storage "
                f"unit {tuple(unit)} (a block layout must be a multiple of the shard, else "
                "chunk, shape)")
    if whole:
        array[region] = data
        return
    if write_chunks(array, region, data):  # a plain local array: its chunk files
        return
    starts = [range(r.start, r.stop, u) for r, u in zip(region, unit, strict=True)]
    for origin in itertools.product(*starts):
        dst = tuple(slice(o, min(o + u, r.stop)) for o, u, r in
                    zip(origin, unit, region, strict=True))
        src = tuple(slice(d.start - r.start, d.stop - r.start) for d, r in
                    zip(dst, region, strict=True))
        array[dst] = np.ascontiguousarray(data[src])


def write_levels(paths: Sequence[str], region: tuple[slice, ...], data: np.ndarray,
                 factors: Sequence[Sequence[int]], method: str, write_first: bool = True,
                 whole: bool = False) -> None:
    """Write ``data``, the voxels of ``region`` of the array ``paths[0]``, and its
    downsampled levels ``paths[1:]`` (``factors[i]`` from each level to the next).

    ``region`` must cover whole storage units on every level it reaches (a block aligned to
    ``chunk × factor``, or reaching the end of each axis): then the levels equal the
    whole-array result. With ``write_first=False``, ``paths[0]`` is not written (the data
    is already there). ``whole``: see :func:`write_chunkwise`.
    """
    import zarr

    # images store every chunk (the fill-value scan costs more than it saves); labels
    # skip empty chunks, which are common there
    config = {"write_empty_chunks": method != "mode"}

    def open_level(path: str) -> zarr.Array:
        return open_array(path, "r+", config)

    if write_first:
        write_chunkwise(open_level(paths[0]), region, data, whole)
    origin = [s.start for s in region]
    down = DOWNSAMPLERS[method]
    for path, f in zip(paths[1:], factors, strict=True):
        data = down(data, f)
        origin = [o // k for o, k in zip(origin, f, strict=True)]
        region = tuple(slice(o, o + n) for o, n in zip(origin, data.shape, strict=True))
        write_chunkwise(open_level(path), region, data, whole)


def levels_within(levels: Sequence[Level], chunks: Sequence[int],
                  block: Sequence[int]) -> int:
    """How many levels after level 0 a block of ``block`` voxels (level 0) can write from
    its own data: those whose chunks map to a whole number of them per block (or whose
    block covers the whole axis)."""
    count = 0
    factor = [1] * len(chunks)
    for lv in levels[1:]:
        factor = [f * k for f, k in zip(factor, lv.factors, strict=True)]
        if not all(b % (c * f) == 0 or b >= n for b, c, f, n in
                   zip(block, chunks, factor, levels[0].shape, strict=True)):
            break
        count += 1
    return count


@dataclass(frozen=True)
class PyramidTask:
    """Block task of one pass: read a block, write it (pass 0) and its downsampled levels.

    ``source`` is a region reader of the input (first pass: a
    :class:`~engine.io.sources.Source` or a view with ``read_region``, whose pickle does
    not grow with the volume) or the path of the level the pass reads; ``paths`` are the
    level arrays written, in order; ``factors`` the downsampling steps between them.
    """

    source: object
    paths: tuple[str, ...]
    write_source: bool
    factors: tuple[tuple[int, ...], ...]
    method: str

    def __call__(self, block) -> None:  # block: engine.blocks.Block
        data = read_region(self.source, block.write)
        if self.write_source:
            write_levels(self.paths, block.write, data, self.factors, self.method)
        else:  # the block's voxels are on the level read, one level up from the first path
            write_levels(("", *self.paths), block.write, data, self.factors, self.method,
                         write_first=False)


def build_pyramid(client, data, group, levels, chunks, *, method: str = "mean", state=None,
                  progress=None, budget_bytes: int = 64 * 2**20, name: str = "pyramid",
                  start: int = 0):
    """Write ``data`` and its pyramid into the arrays ``group/0``, ``group/1`` ... blockwise.

    Parameters
    ----------
    client : distributed.Client
    data : reader
        Level-0 voxels: a :class:`~engine.io.sources.Source`, an object with
        ``read_region(region)`` and ``dtype``, or a dask array made by
        :func:`engine.io.sources.to_dask` (its source is taken); read block by block on
        the workers. Every task carries it, so it must not be a dask graph (one grows
        with the volume: :func:`engine.io.sources.reader_of` refuses it).
    group : Path
        Multiscale group whose level arrays already exist with ``chunks``.
    levels : list of Level
        From :func:`plan_levels`.
    method : {"mean", "mode"}
        Mean for intensities, mode for labels.
    state : RunState, optional
        Done-markers for resume.
    progress : callable, optional
        Factory returning a fresh ``Progress`` per pass.
    start : int
        Levels ``0..start`` are written already (``data`` is then unused): build the rest
        from level ``start``.

    Returns
    -------
    list of RunReport
        One per pass.
    """
    from engine.runner import Pass as RunnerPass
    from engine.runner import cluster_threads, run_passes

    itemsize = np.dtype(data.dtype).itemsize if data is not None else 1
    data = reader_of(data) if data is not None and start == 0 else None
    specs: list[RunnerPass] = []
    prev = 0  # the level the previous pass's grid covers
    # four blocks per thread at least: a pass of 8 blocks fused over three levels left
    # 8 of 16 threads idle (the runner's done-markers follow the block shape, so a
    # resume on another cluster redoes such a pass rather than mixing layouts)
    min_blocks = max(MIN_PASS_BLOCKS, 4 * cluster_threads(client) if client else 0)
    for i, p in enumerate(plan_passes(levels, chunks, itemsize, budget_bytes, min_blocks,
                                      start=start)):
        src_level = max(p.source, 0)
        source = data if p.source == -1 else str(group / str(p.source))
        first_written = p.levels[0] if p.source == -1 else p.levels[0] - 1
        factors = tuple(levels[j].factors for j in p.levels if j != 0)
        task = PyramidTask(
            source, tuple(str(group / str(j)) for j in p.levels), p.source == -1, factors, method,
        )
        grid = BlockGrid(levels[src_level].shape, p.block_shape,
                         chunks=[min(c, s) for c, s in zip(chunks, levels[first_written].shape,
                                                            strict=True)])
        # a block reading level L waits only for the blocks of the pass writing L that
        # wrote its region, not for that whole pass
        needs = {specs[-1].name: _WrittenBy(specs[-1].grid, _factor(levels, prev, src_level))
                 } if specs else {}
        specs.append(RunnerPass(grid, task, f"{name}-pass{i}", needs=needs))
        prev = src_level
    return run_passes(client, specs, state=state, progress=progress() if progress else None)


def _factor(levels: Sequence[Level], coarse_from: int, level: int) -> tuple[int, ...]:
    """Voxels of level ``coarse_from`` per voxel of ``level`` (a later one), per axis."""
    out = np.ones(len(levels[0].shape), dtype=np.int64)
    for lv in levels[coarse_from + 1: level + 1]:
        out *= lv.factors
    return tuple(int(f) for f in out)


@dataclass(frozen=True)
class _WrittenBy:
    """The blocks of the pass that reads level ``k`` (``grid``, in level-k voxels) which
    wrote the level-``k + …`` region a block of the next pass reads (``factor`` level-k
    voxels per voxel read)."""

    grid: BlockGrid
    factor: tuple[int, ...]

    def __call__(self, block: Block) -> Iterator[tuple[int, ...]]:
        return blocks_reading(self.grid, tuple(
            slice(w.start * f, w.stop * f) for w, f in zip(block.write, self.factor,
                                                            strict=True)))
