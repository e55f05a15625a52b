"""One global tile grid and the blending weights of its tiles.

Vocabulary (shared with :mod:`engine.blocks`): a *tile* is one network input; tiles lie on a
single grid over the whole volume (starts ``0, stride, 2·stride, …`` per axis, the last one
flush with the end; a volume smaller than a tile gets one tile, padded). A block's *write
region* receives the blended prediction of every tile that overlaps it; its *read region*
is the union of those tiles. Because the grid is global, and every voxel sums the same
tiles with the same weights, the blockwise result equals one sliding window over the whole
volume, whatever the block layout.

*Ownership* (``voxelmill predict``): every tile belongs to the one block whose write region
holds its start (its first voxel), so a layout runs each tile of the grid once. The owner
blends the tile into its *reach* (:meth:`TileGrid.reach`): its write region extended on the
high side of every axis as far as its tiles go; what falls beyond the write region is
handed to the later blocks it covers (:mod:`engine.predict.spill`).

Blending: each tile's output is multiplied by a weight map — a Gaussian centred on the
tile with ``sigma = tile / 8`` per axis (as nnU-Net and MONAI), floored at 1e-3 of its peak
so that every voxel gets weight, or constant 1 — summed, and divided by the summed weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.blocks import Region
from engine.errors import OptionError

BLENDS = ("gaussian", "constant")
#: the tile overlap and blending of ``voxelmill predict`` by default, which validation during
#: training uses too (:mod:`engine.learn.validation`)
DEFAULT_OVERLAP = 0.25
DEFAULT_BLEND = "gaussian"


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Starts of the tiles along one axis of length ``n``: every ``stride``, the last one
    flush with the end (one tile at 0 when ``n <= tile``)."""
    if n <= tile:
        return [0]
    count = math.ceil((n - tile) / stride) + 1
    return sorted({min(i * stride, n - tile) for i in range(count)})


@dataclass(frozen=True)
class TileGrid:
    """The global tile grid of a volume.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape of the volume.
    tile : tuple of int
        Tile shape, each axis divisible as the model needs; an axis longer than the volume
        is the volume's length rounded up to ``divisor`` (the tile is padded).
    stride : tuple of int
        Distance between tile starts (``tile - overlap``).
    trim : tuple of int
        Per axis, the voxels of each tile face that do not count (a model's output halo),
        except on faces at the volume's border; empty: none. The stride must leave the
        trimmed tiles overlapping (``stride <= tile - 2 * trim``).
    """

    shape: tuple[int, ...]
    tile: tuple[int, ...]
    stride: tuple[int, ...]
    trim: tuple[int, ...] = ()

    @classmethod
    def make(cls, shape: Sequence[int], tile: Sequence[int], overlap: float,
             divisor: Sequence[int], trim: Sequence[int] = ()) -> TileGrid:
        """A grid with tiles of ``tile`` voxels (shrunk to the volume, rounded up to the
        divisor) overlapping by the fraction ``overlap``, and at least ``2 * trim``."""
        if not 0 <= overlap < 1:
            raise OptionError(f"--overlap {overlap}: must be in [0, 1)")
        tiles, strides = [], []
        for n, t, d in zip(shape, tile, divisor, strict=True):
            if t % d:
                raise OptionError(f"--tile {tuple(tile)}: every axis must be divisible by the "
                                  f"model's {tuple(divisor)}; e.g. {max(d, t // d * d)}")
            t = min(t, math.ceil(n / d) * d)
            tiles.append(t)
            strides.append(max(1, t - int(round(t * overlap))))
        if trim:
            strides = [max(1, min(s, t - 2 * h)) for s, t, h in zip(strides, tiles, trim,
                                                                     strict=True)]
        return cls(tuple(int(s) for s in shape), tuple(tiles), tuple(strides),
                   tuple(int(h) for h in trim))

    def kept(self, start: Sequence[int]) -> Region:
        """The part of the tile at ``start`` that is blended (volume coordinates): the
        tile less :attr:`trim` on every face not at the volume's border."""
        out = []
        for a, (s, t, n) in enumerate(zip(start, self.tile, self.shape, strict=True)):
            h = self.trim[a] if self.trim else 0
            out.append(slice(s + h if s > 0 else s, s + t - h if s + t < n else s + t))
        return tuple(out)

    def starts(self) -> list[list[int]]:
        return [tile_starts(n, t, s) for n, t, s in
                zip(self.shape, self.tile, self.stride, strict=True)]

    def tiles_for(self, region: Region) -> list[tuple[int, ...]]:
        """Starts of the tiles that overlap ``region``, in the grid's (C) order."""
        per_axis = []
        for starts, t, r in zip(self.starts(), self.tile, region, strict=True):
            per_axis.append([s for s in starts if s < r.stop and s + t > r.start])
        return [tuple(p) for p in itertools.product(*per_axis)]

    def owned(self, region: Region) -> list[tuple[int, ...]]:
        """Starts of the tiles whose first voxel lies in ``region``, in the grid's (C) order:
        over the blocks of any layout, every tile of the grid exactly once."""
        per_axis = [[s for s in starts if r.start <= s < r.stop]
                    for starts, r in zip(self.starts(), region, strict=True)]
        return [tuple(p) for p in itertools.product(*per_axis)]

    def reach_stop(self, axis: int, start: int, stop: int, starts: Sequence[int] | None = None
                   ) -> int:
        """Along ``axis``, where the blended part of the tiles starting in ``[start, stop)``
        ends (at least ``stop``, at most the volume's end); ``starts``: this axis's
        :meth:`starts`, when the caller has them."""
        n, t = self.shape[axis], self.tile[axis]
        h = self.trim[axis] if self.trim else 0
        mine = [s for s in (self.starts()[axis] if starts is None else starts)
                if start <= s < stop]
        if not mine:
            return stop
        last = mine[-1]  # kept stops grow with the start
        return min(n, max(stop, last + t - h if last + t < n else last + t))

    def reach(self, region: Region) -> Region:
        """The box the tiles :meth:`owned` by ``region`` blend into: ``region`` extended on
        the high side of each axis to where their kept parts (:meth:`kept`) end, within the
        volume. It is at most ``tile - 1`` voxels longer than ``region`` per axis."""
        starts = self.starts()
        return tuple(slice(r.start, self.reach_stop(a, r.start, r.stop, starts[a]))
                     for a, r in enumerate(region))

    def read_region(self, region: Region) -> Region:
        """The union of the tiles overlapping ``region`` (may extend past the volume)."""
        tiles = self.tiles_for(region)
        return tuple(slice(min(t[a] for t in tiles), max(t[a] for t in tiles) + self.tile[a])
                     for a in range(len(self.shape)))

    def halo(self) -> tuple[int, ...]:
        """The most a read region extends beyond its write region, per axis."""
        return tuple(t - 1 for t in self.tile)


def blend_weights(tile: Sequence[int], blend: str = "gaussian") -> np.ndarray:
    """Weight map of one tile, float32 of shape ``tile``."""
    if blend not in BLENDS:
        raise OptionError(f"--blend {blend!r}: expected {' or '.join(BLENDS)}")
    if blend == "constant":
        return np.ones(tuple(tile), np.float32)
    w = np.ones((), np.float64)
    for t in tile:
        x = np.arange(t, dtype=np.float64) - (t - 1) / 2
        sigma = max(t / 8, 1e-6)
        w = np.multiply.outer(w, np.exp(-0.5 * (x / sigma) ** 2))
    w /= w.max()
    return np.maximum(w, 1e-3).astype(np.float32)
