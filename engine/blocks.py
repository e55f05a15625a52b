"""The block grid: chunk-aligned write regions, halo read regions and edge padding.

Vocabulary (shared by every block operation):

* **write region** – the voxels a block produces; write regions tile the volume without
  overlap and are aligned to the storage chunks, so two tasks never write one chunk.
* **read region** – the write region grown by the operation's halo and clipped to the
  volume; what a worker reads.
* **padding** – the part of the halo that falls outside the volume; filled the way the
  whole-volume method pads (reflect, nearest, constant ...), then cropped away.

Block shapes given by the user are checked here (:func:`check_block`), and a default one
is derived from the storage chunks (:func:`default_block`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import OptionError

Region = tuple[slice, ...]

#: The most voxels a block's read region (write region plus halo) may hold: a worker
#: holds it whole, so a larger one comes from a parameter typed wrong (``sigma: 1e9``),
#: refused before anything runs rather than failing in every worker (2³¹ float32 voxels
#: are 8 GiB).
MAX_READ_VOXELS = 2**31


@dataclass(frozen=True)
class Block:
    """One block of a grid.

    Attributes
    ----------
    index : tuple of int
        Position of the block in the grid.
    write : tuple of slice
        Write region, in voxel coordinates of the whole volume.
    read : tuple of slice
        Read region: ``write`` grown by the halo, clipped to the volume.
    pad : tuple of (int, int)
        Voxels of halo beyond the volume edge, before and after, per axis.
    """

    index: tuple[int, ...]
    write: Region
    read: Region
    pad: tuple[tuple[int, int], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.write)

    @property
    def write_size(self) -> int:
        """Voxels in the write region."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def crop(self) -> Region:
        """Slices that cut the write region out of the padded read region."""
        return tuple(
            slice(w.start - r.start + p[0], w.start - r.start + p[0] + (w.stop - w.start))
            for w, r, p in zip(self.write, self.read, self.pad, strict=True)
        )

    @property
    def key(self) -> str:
        return ".".join(str(i) for i in self.index)


def _as_tuple(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int | np.integer):
        return (int(value),) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise OptionError(f"{what} {tuple(value)} has {len(out)} values for {ndim} axes")
    return out


class BlockGrid:
    """A regular grid of blocks over an array shape.

    Parameters
    ----------
    shape : tuple of int
        Shape of the volume, in voxels.
    block_shape : int or tuple of int
        Shape of a write region. The last block along an axis may be shorter.
    halo : int or tuple of int, optional
        Voxels added on each side of the write region to form the read region.
    chunks : tuple of int, optional
        Storage chunk (or shard) shape of the output; ``block_shape`` must be a multiple
        of it, so that no chunk is written by two blocks.
    """

    def __init__(
        self,
        shape: Sequence[int],
        block_shape: int | Sequence[int],
        halo: int | Sequence[int] = 0,
        chunks: Sequence[int] | None = None,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        ndim = len(self.shape)
        self.block_shape = tuple(
            min(b, s) if s > 0 else b
            for b, s in zip(_as_tuple(block_shape, ndim, "block shape"), self.shape, strict=True)
        )
        self.halo = _as_tuple(halo, ndim, "halo")
        if any(b <= 0 for b in self.block_shape) or any(h < 0 for h in self.halo):
            raise OptionError(f"invalid block shape {self.block_shape} or halo {self.halo}")
        read = math.prod(b + 2 * h for b, h in zip(self.block_shape, self.halo, strict=True))
        if read > MAX_READ_VOXELS:  # checked here, before any worker tries to allocate it
            raise OptionError(
                f"a block's read region ({self.block_shape} plus a halo of {self.halo} voxels "
                f"per side) holds {read:.3g} voxels, more than {MAX_READ_VOXELS:.3g}: a "
                "parameter that sets the halo (a sigma, radius or iteration count) is too large")
        if chunks is not None:
            chunks = _as_tuple(chunks, ndim, "chunk shape")
            for ax, (b, c, s) in enumerate(zip(self.block_shape, chunks, self.shape, strict=True)):
                if b % c and b != s:
                    raise OptionError(
                        f"block shape {self.block_shape} is not aligned to the storage chunks "
                        f"{chunks} on axis {ax}: concurrent writes would race on shared chunks"
                    )
        self.chunks = chunks
        self.grid_shape = tuple(
            -(-s // b) if s else 0 for s, b in zip(self.shape, self.block_shape, strict=True)
        )

    def __len__(self) -> int:
        return int(np.prod(self.grid_shape))

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(n) for n in self.grid_shape)):
            yield self.block(index)

    def block(self, index: Sequence[int]) -> Block:
        write, read, pad = [], [], []
        for i, s, b, h in zip(index, self.shape, self.block_shape, self.halo, strict=True):
            start, stop = i * b, min((i + 1) * b, s)
            write.append(slice(start, stop))
            read.append(slice(max(start - h, 0), min(stop + h, s)))
            pad.append((max(h - start, 0), max(stop + h - s, 0)))
        return Block(tuple(int(i) for i in index), tuple(write), tuple(read), tuple(pad))

    def describe(self) -> dict[str, Any]:
        return {"shape": self.shape, "block_shape": self.block_shape, "halo": self.halo}

    def layout_hash(self, **identity: Any) -> str:
        """Hash of the layout plus whatever identifies the run (operation, parameters, input).

        Two runs share done-markers only when this hash is equal.
        """
        return stable_hash({"grid": self.describe(), **identity})


def stable_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able data (run identities, layouts)."""
    payload = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def pad_read(data: np.ndarray, block: Block, mode: str = "reflect", **kwargs: Any) -> np.ndarray:
    """Pad a read region at the volume edges as the whole-volume method would.

    ``mode`` follows :func:`numpy.pad` (``"reflect"``, ``"symmetric"``, ``"edge"``,
    ``"constant"`` ...); scipy.ndimage's ``"mirror"`` is numpy's ``"reflect"`` and
    ``"nearest"`` is numpy's ``"edge"``.
    """
    if not any(p != (0, 0) for p in block.pad):
        return data
    mode = {"mirror": "reflect", "nearest": "edge", "wrap": "wrap"}.get(mode, mode)
    return np.pad(data, block.pad, mode=mode, **kwargs)


BLOCK_VOXELS = 1 << 21
"""Default voxels per block (128³ in 3D): big enough to amortize task overhead, small
enough that a filter's float64 temporaries stay well under a worker's memory."""


def default_block(chunks: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """Blocks of about :data:`BLOCK_VOXELS`, whole multiples of the storage chunks."""
    edge = BLOCK_VOXELS ** (1 / len(chunks))
    return tuple(min(c * max(1, round(edge / c)), s)
                 for c, s in zip(chunks, shape, strict=True))


def check_block(block: Sequence[int], chunks: Sequence[int], shape: Sequence[int]) -> None:
    """Refuse a ``--block`` shape that is not one positive multiple of the chunks per axis
    (a block may end at the volume's edge), so no two blocks write one chunk.

    Raises
    ------
    OptionError
        Saying which ``--block`` would do (each size rounded up to a multiple of the
        chunks) and, when a size is below the chunk, how to re-convert the image with
        smaller ``--chunks``.
    """
    if len(block) != len(chunks):
        raise OptionError(f"--block {','.join(map(str, block))}: give {len(chunks)} values, "
                          f"e.g. --block {','.join(map(str, chunks))}")
    if all(b > 0 and (b % c == 0 or b >= s) for b, c, s in zip(block, chunks, shape,
                                                                  strict=True)):
        return
    fixed = [min(max(c, -(-b // c) * c), max(s, c)) for b, c, s in zip(block, chunks, shape,
                                                                        strict=True)]
    message = (f"--block {','.join(map(str, block))}: each size must be a multiple of the "
               f"chunk shape {','.join(map(str, chunks))}; use --block "
               f"{','.join(map(str, fixed))} or a multiple")
    if any(0 < b < c for b, c in zip(block, chunks, strict=True)):
        smaller = ",".join(str(min(b, c)) if b > 0 else str(c)
                           for b, c in zip(block, chunks, strict=True))
        message += (f", or for smaller blocks re-convert with `voxelmill convert SRC OUT "
                    f"--chunks {smaller}`")
    raise OptionError(message)


def every_axis(values: Sequence[int] | int, n: int, what: str) -> tuple[int, ...]:
    """A shape option for ``n`` axes: one value for all of them, or one per axis.

    Raises
    ------
    OptionError
        Naming the option ``what`` for any other count.
    """
    if isinstance(values, int):
        return (values,) * n
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise OptionError(f"{what} {values}: give 1 or {n} values")
    return values


def blocks_reading(grid: BlockGrid, region: Region) -> Iterator[tuple[int, ...]]:
    """Indices of the blocks of ``grid`` whose write regions intersect ``region``.

    Parameters
    ----------
    grid : BlockGrid
        The grid whose blocks wrote what ``region`` covers.
    region : tuple of slice
        Voxel coordinates of ``grid``'s volume, with explicit bounds (clipped to it here).

    Yields
    ------
    tuple of int
        Block indices in the grid's order (none for an empty region).
    """
    spans = []
    for r, b, s in zip(region, grid.block_shape, grid.shape, strict=True):
        start, stop = max(r.start, 0), min(r.stop, s)
        if start >= stop:
            return
        spans.append(range(start // b, (stop - 1) // b + 1))
    yield from itertools.product(*spans)
