"""The sums of tiles that straddle blocks, handed by the block that ran them to later blocks.

Every tile of the global grid runs in one block, its *owner*: the block whose write region
holds the tile's start (:meth:`engine.predict.tiling.TileGrid.owned`). The owner blends it
into its *reach* (its write region and a band of less than a tile on the high side of each
axis, :meth:`~engine.predict.tiling.TileGrid.reach`). What falls in the band belongs to the
later blocks there (faces, edges and the corner; more than one per axis when blocks are
smaller than a tile): the owner saves one *piece* per such block, its weighted sums and
summed weights stacked as float32 ``(K + 1, *piece)``, in
``<folder>/<consumer key>/<producer key>.npy``, before its task returns, so its done-marker
implies its pieces exist and a resumed run finds them.

A block starts only when every block that left it a piece has finished
(:meth:`Spill.producers`, the runner's ``after``); it adds those pieces first, in their
producers' grid order, then blends its own tiles: the same additions in the same order
however the run went, so a resumed run is bit-identical to an uninterrupted one. Once a
block is done, its folder is garbage (:meth:`Spill.remove`, called by the client after the
block's done-marker is written). Live scratch is the pieces of blocks whose producers are
done and they are not: the wavefront, about one plane of blocks, each holding at most
``(K + 1) × 4`` bytes per voxel of a band of ``tile − 1`` voxels on its low faces.
"""

from __future__ import annotations

import bisect
import itertools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid, Region
from engine.predict.tiling import TileGrid

Index = tuple[int, ...]


def _key(index: Index) -> str:
    return ".".join(map(str, index))


@dataclass(frozen=True)
class Spill:
    """Who hands sums to whom in one block layout, and where the pieces are kept.

    Built by :meth:`plan`; picklable and small (a few numbers per block row of each axis),
    so block tasks carry it.

    Attributes
    ----------
    folder : str
        Scratch folder of the pieces (inside the partial output).
    edges : tuple of tuple of int
        Per axis, the block boundaries ``0, b, 2b, …, n``.
    owns : tuple of tuple of bool
        Per axis and block row, whether a tile of the grid starts in it.
    reach : tuple of tuple of int
        Per axis and block row, where the blended part of its tiles ends
        (:meth:`TileGrid.reach_stop`).
    lower, upper : tuple of tuple of tuple of int
        Per axis and block row, the rows (itself included) whose blocks can hand it sums,
        and those it can hand sums to.
    """

    folder: str
    edges: tuple[tuple[int, ...], ...]
    owns: tuple[tuple[bool, ...], ...]
    reach: tuple[tuple[int, ...], ...]
    lower: tuple[tuple[tuple[int, ...], ...], ...]
    upper: tuple[tuple[tuple[int, ...], ...], ...]

    @classmethod
    def plan(cls, folder: str | os.PathLike[str], grid: TileGrid, blocks: BlockGrid) -> Spill:
        """The hand-over of the tile grid ``grid`` over the layout ``blocks``."""
        axes = [_axis(grid, a, n, b) for a, (n, b) in
                enumerate(zip(blocks.shape, blocks.block_shape, strict=True))]
        edges, owns, reach, lower, upper = (tuple(x) for x in zip(*axes, strict=True))
        return cls(str(folder), edges, owns, reach, lower, upper)

    def write(self, index: Index) -> Region:
        """The write region of block ``index``."""
        return tuple(slice(e[i], e[i + 1]) for e, i in zip(self.edges, index, strict=True))

    def reach_of(self, index: Index) -> Region:
        """The box block ``index`` blends its tiles into."""
        return tuple(slice(e[i], r[i]) for e, r, i in zip(self.edges, self.reach, index,
                                                          strict=True))

    def runs_tiles(self, index: Index) -> bool:
        return all(o[i] for o, i in zip(self.owns, index, strict=True))

    def producers(self, block: Block | Index) -> list[Index]:
        """The blocks (earlier in the grid's order) that leave ``block`` a piece, in grid
        order: what it waits for."""
        index = block.index if isinstance(block, Block) else tuple(block)
        return [p for p in itertools.product(*(low[i] for low, i in zip(self.lower, index,
                                                                          strict=True)))
                if p != index]

    def consumers(self, index: Index) -> list[Index]:
        """The later blocks ``index`` leaves a piece for, in grid order."""
        if not self.runs_tiles(index):
            return []
        return [c for c in itertools.product(*(up[i] for up, i in zip(self.upper, index,
                                                                       strict=True)))
                if c != index]

    def path(self, consumer: Index, producer: Index) -> Path:
        return Path(self.folder) / _key(consumer) / f"{_key(producer)}.npy"

    def handover(self, index: Index) -> BlockHandover:
        """The :class:`engine.predict.block.Handover` of block ``index``."""
        return BlockHandover(self, tuple(index))

    def remove(self, block: Block | Index) -> None:
        """Delete the pieces left for ``block`` (call once it is done)."""
        index = block.index if isinstance(block, Block) else tuple(block)
        shutil.rmtree(Path(self.folder) / _key(index), ignore_errors=True)


def _axis(grid: TileGrid, axis: int, n: int, b: int) -> tuple[Any, ...]:
    """One axis of :meth:`Spill.plan`: block edges, rows owning tiles, reaches, lower and
    upper rows."""
    e = (*range(0, n, b), n)
    starts = grid.starts()[axis]
    rows = range(len(e) - 1)
    owns = tuple(bisect.bisect_left(starts, e[j]) < bisect.bisect_left(starts, e[j + 1])
                 for j in rows)
    reach = tuple(grid.reach_stop(axis, e[j], e[j + 1], starts) for j in rows)
    t = grid.tile[axis]
    lower = []
    for i in rows:
        near = []
        for j in range(i, -1, -1):  # a reach ends less than a tile past its row
            if j < i and e[j + 1] + t <= e[i]:
                break
            if owns[j] and (j == i or reach[j] > e[i]):
                near.append(j)
        lower.append(tuple(reversed(near)))
    upper = []
    for j in rows:
        up = []
        for i in range(j, len(e) - 1):
            if e[i] >= reach[j]:
                break
            up.append(i)
        upper.append(tuple(up))
    return e, owns, reach, tuple(lower), tuple(upper)


def _intersect(a: Region, b: Region) -> Region:
    return tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in
                 zip(a, b, strict=True))


@dataclass(frozen=True)
class BlockHandover:
    """One block's side of a :class:`Spill` (see :class:`engine.predict.block.Handover`)."""

    spill: Spill
    index: Index

    def incoming(self) -> list[tuple[Region, np.ndarray]]:
        """Every piece left for this block, in its producers' grid order."""
        mine = self.spill.write(self.index)
        out = []
        for producer in self.spill.producers(self.index):
            path = self.spill.path(self.index, producer)
            where = _intersect(self.spill.reach_of(producer), mine)
            try:
                data = np.load(path)
            except FileNotFoundError:
                raise RuntimeError(
                    f"{path}: the sums block {producer} left for block {self.index} are "
                    "missing (the scratch folder was changed); remove the partial output "
                    "to start the prediction afresh") from None
            if data.shape[1:] != tuple(s.stop - s.start for s in where):
                raise RuntimeError(f"{path}: shape {data.shape}, expected sums over {where}")
            out.append((where, data))
        return out

    def pieces(self, reach: Region) -> list[Region]:
        """``reach`` cut by the later blocks it covers."""
        return [_intersect(reach, self.spill.write(c)) for c in self.spill.consumers(self.index)]

    def save(self, piece: Region, sums: np.ndarray) -> None:
        """Store ``sums`` for the block ``piece`` lies in (written whole, then renamed)."""
        consumer = tuple(bisect.bisect_right(e, p.start) - 1
                         for e, p in zip(self.spill.edges, piece, strict=True))
        path = self.spill.path(consumer, self.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(sums, dtype=np.float32))
        os.replace(tmp, path)

