"""Raster-order ranks of keys spread over a grid of blocks, in memory bounded by a block.

A labelling numbers its objects 1, 2, … in the raster (C) order of their first voxel, as
scikit-image does: an object's id is one more than the number of objects whose first
voxel (its *key*: the voxel's raveled index in the volume) comes earlier. Every key lies
in one block. Split by the first axis on which another key's position ``p'`` differs from
a key's position ``p``::

    rank(p) = Σ_d #{p' : p'[:d] == p[:d] and p'[d] < p[d]}

The d-th term counts keys of the blocks that share ``p``'s block indices on the axes
before ``d``: those of the blocks before ``p``'s along axis ``d`` (any position on ``d``)
and those of the blocks level with it on ``d`` in planes before ``p[d]``. For a *level-d
group* — the blocks sharing their indices on axes ``0 .. d`` (a slab of blocks for
``d = 0``, a row of blocks along the last axis for ``d = ndim - 2``) — it is enough to know
how many keys lie at each local position on axes ``0 .. d`` (``M_d``: at most a block's
face of counts). So, bottom up, in one pass per level:

- a level-``d`` group adds its children's counts (blocks along the last axis for the
  lowest level, level ``d + 1`` groups above), giving each child the sum of those before it
  (its *prefix*, written to the child's file), and keeps the exclusive cumulative sum of
  ``M_d`` along axis ``d`` (its *cum*) and ``M_d`` summed over axis ``d`` for its parent;
- a slab (level 0) returns its number of keys; the client's running sum over slabs is
  each slab's *offset*.

Then ``rank(p) = offset[b_0] + Σ_{d < ndim-1} cum_d[p_{≤d}] + Σ_{d ≥ 1} prefix_d[p_{<d}]``
plus the keys of ``p``'s own block in its row (same position on every axis but the last)
before it. No task holds more than a block's keys or a block face of counts, whatever
the volume's cross-section; the client holds a number per slab.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.labelfiles import load_arrays, save_arrays

#: ``keys_of(block index) -> (sorted uint64 keys, count)``: the keys that lie in the block
#: and a count to add up (e.g. of objects crossing faces)
KeysOf = Callable[[tuple[int, ...]], tuple[np.ndarray, int]]


@dataclass(frozen=True)
class RankGrid:
    """The groups of blocks of a volume ``shape`` in ``block_shape`` blocks, and their files
    under ``work/ranks``.

    Level ``d`` (``0 .. top``, ``top = max(ndim - 2, 0)``) has a group per combination of
    block indices on axes ``0 .. d``; in one dimension the groups of level 0 are blocks.
    """

    shape: tuple[int, ...]
    block_shape: tuple[int, ...]
    work: str

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @cached_property
    def grid_shape(self) -> tuple[int, ...]:
        return BlockGrid(self.shape, self.block_shape).grid_shape

    @property
    def top(self) -> int:
        """The level whose groups read the blocks (rows along the last axis)."""
        return max(self.ndim - 2, 0)

    def grid(self, level: int) -> BlockGrid:
        return BlockGrid(self.grid_shape[:level + 1], 1)

    def extent(self, index: Sequence[int]) -> tuple[int, ...]:
        """Edge of the blocks of ``index`` (block indices on the first axes) on those axes."""
        return tuple(min(b, s - i * b) for i, b, s in zip(index, self.block_shape, self.shape,
                                                          strict=False))

    def blocks(self, level: int, index: Sequence[int]) -> list[tuple[int, ...]]:
        """The blocks of group ``index`` of ``level``, in raster order."""
        rest = itertools.product(*map(range, self.grid_shape[len(index):]))
        return [(*index, *r) for r in rest]

    def _flat(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.grid_shape[:len(index)]))

    def group_file(self, level: int, index: Sequence[int]) -> Path:
        return Path(self.work) / "ranks" / str(level) / f"{self._flat(index)}.bin"

    def prefix_file(self, level: int, index: Sequence[int]) -> Path:
        return Path(self.work) / "ranks" / str(level) / f"{self._flat(index)}.pre"

    def block_keys_file(self, index: Sequence[int]) -> Path:
        return Path(self.work) / "ranks" / "blocks" / f"{self._flat(index)}.bin"

    def make_folders(self) -> None:
        for sub in ("blocks", *map(str, range(self.top + 1))):
            (Path(self.work) / "ranks" / sub).mkdir(parents=True, exist_ok=True)


def _counts_at(keys: np.ndarray, shape: tuple[int, ...], origin: Sequence[int],
               extent: tuple[int, ...]) -> np.ndarray:
    """How many of ``keys`` lie at each local position on the first ``len(extent)`` axes."""
    pos = np.unravel_index(keys, shape)[:len(extent)]
    local = tuple(p - o for p, o in zip(pos, origin, strict=False))
    flat = np.ravel_multi_index(local, extent) if len(keys) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=math.prod(extent)).reshape(extent).astype(np.int64)


@dataclass(frozen=True)
class GroupCounts:
    """Pass of one level: a group's counts from its children's, each child's prefix.

    At the top level the children are the group's blocks (``keys_of`` gives their keys,
    saved sorted for :class:`Ranker`); above, the groups of the level below. Returns the
    number of keys and the sum of ``keys_of``'s counts at level 0, else ``None``.
    """

    grid: RankGrid
    level: int
    keys_of: KeysOf

    def __call__(self, group: Block) -> tuple[int, int] | None:
        g, d, index = self.grid, self.level, group.index
        extent = g.extent(index)  # axes 0 .. d
        origin = tuple(i * b for i, b in zip(index, g.block_shape, strict=False))
        running = np.zeros(extent, np.int64)
        counted = 0
        if d == g.top:
            for block in g.blocks(d, index):
                keys, n = self.keys_of(block)
                counted += n
                if g.ndim == 1:  # the group is this one block
                    save_arrays(g.block_keys_file(block), keys=keys,
                                prefix=np.zeros((), np.int64))
                    running = np.array(len(keys), np.int64)
                    continue
                save_arrays(g.block_keys_file(block), keys=keys, prefix=running)
                running = running + _counts_at(keys, g.shape, origin, extent)
        else:
            for j in range(g.grid_shape[d + 1]):
                child = (*index, j)
                f = load_arrays(g.group_file(d + 1, child))
                save_arrays(g.prefix_file(d + 1, child), prefix=running)
                running = running + f["n"]
                counted += int(f["counted"])
        if g.ndim == 1:
            cum, n = np.zeros((), np.int64), running
        else:
            cum = np.cumsum(running, axis=d) - running  # keys in earlier planes of axis d
            n = running.sum(axis=d)
        save_arrays(g.group_file(d, index), cum=cum, n=n,
                    counted=np.array(counted, np.int64))
        return (int(n), counted) if d == 0 else None

    def recover(self, group: Block) -> tuple[int, int] | None:
        """The result of a group finished by an earlier run, from its file."""
        if self.level != 0:
            return None
        f = load_arrays(self.grid.group_file(0, group.index))
        return int(f["n"]), int(f["counted"])


@dataclass(frozen=True)
class Ranker:
    """Ranks of keys once every level's pass has run (``offsets``: keys before each slab)."""

    grid: RankGrid
    offsets: tuple[int, ...]

    def ranks(self, keys: np.ndarray, cache: dict | None = None) -> np.ndarray:
        """The rank (int64, from 0) of each of ``keys`` (uint64) among all the keys; each
        key must be one that its block's ``keys_of`` gave. ``cache`` keeps the files read,
        for a task that asks several times."""
        g = self.grid
        cache = {} if cache is None else cache
        keys = np.asarray(keys, np.uint64)
        out = np.zeros(len(keys), np.int64)
        if not len(keys):
            return out
        pos = np.unravel_index(keys, g.shape)
        bidx = np.stack([p // b for p, b in zip(pos, g.block_shape, strict=True)])
        flat = np.ravel_multi_index(tuple(bidx), g.grid_shape)
        for f in np.unique(flat):
            sel = np.flatnonzero(flat == f)
            block = tuple(int(i) for i in np.unravel_index(int(f), g.grid_shape))
            local = tuple(p[sel] - i * b for p, i, b in zip(pos, block, g.block_shape,
                                                            strict=True))
            out[sel] = self._in_block(block, keys[sel], local, cache)
        return out

    def ranks_in(self, block: tuple[int, ...], keys: np.ndarray,
                 cache: dict | None = None) -> np.ndarray:
        """:meth:`ranks` of keys that all lie in ``block`` (no grouping by block)."""
        g = self.grid
        keys = np.asarray(keys, np.uint64)
        pos = np.unravel_index(keys, g.shape)
        local = tuple(p - i * b for p, i, b in zip(pos, block, g.block_shape, strict=True))
        return self._in_block(tuple(block), keys, local, {} if cache is None else cache)

    def _load(self, kind: str, level: int, index: tuple[int, ...],
              cache: dict) -> dict[str, np.ndarray]:
        key = (kind, level, index)  # a path is built (and the file read) once per task
        if key not in cache:
            g = self.grid
            path = (g.group_file(level, index) if kind == "group" else
                    g.prefix_file(level, index) if kind == "prefix" else
                    g.block_keys_file(index))
            cache[key] = load_arrays(path)
        return cache[key]

    def _in_block(self, block: tuple[int, ...], keys: np.ndarray,
                  local: tuple[np.ndarray, ...], cache: dict) -> np.ndarray:
        n = self.grid.ndim
        r = np.full(len(keys), self.offsets[block[0]], np.int64)
        for d in range(n - 1):
            r += self._load("group", d, block[:d + 1], cache)["cum"][local[:d + 1]]
        for d in range(1, n - 1):
            r += self._load("prefix", d, block[:d + 1], cache)["prefix"][local[:d]]
        own = self._load("block", n - 1, block, cache)
        if n > 1:
            r += own["prefix"][local[:n - 1]]
        # the block's own keys in the same row, before each (a row's keys are consecutive)
        row_start = keys - local[-1].astype(np.uint64)
        return r + (np.searchsorted(own["keys"], keys) - np.searchsorted(own["keys"], row_start))
