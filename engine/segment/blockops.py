"""The contract between an algorithm and the block machinery.

A *block operation* is a plain NumPy computation plus the halo it declares: it receives the
read region of each input, already padded at the volume edges with ``pad_mode`` (so every
input has the write-region shape grown by ``halo`` on each side) and returns an array of that
same padded shape; the caller crops the write region out of it. Because the halo covers
the operation's whole support, the cropped result equals the operation on the whole array
with the same boundary mode. Algorithms never see blocks, clients or storage.

A *block reduction* computes a small partial result on the write region of a block (the
crop of the padded read region); ``combine`` merges the partials of all blocks into the
global value (a minimum, a histogram ...).

Both are frozen dataclasses; the fields that are step parameters are declared with
:func:`engine.segment.params.param` and checked when the operation is built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.blocks import BlockGrid, Region, pad_read
from engine.segment.params import check_declared

SCIPY_TO_NUMPY_PAD = {
    "reflect": "symmetric",  # scipy's reflect repeats the edge voxel (d c b a | a b c d)
    "mirror": "reflect",  # scipy's mirror does not (d c b | a b c d)
    "nearest": "edge",
    "constant": "constant",
    "wrap": "wrap",
    "grid-wrap": "wrap",
    "grid-constant": "constant",
    "grid-mirror": "symmetric",
}
"""scipy.ndimage boundary modes in :func:`numpy.pad`'s vocabulary."""


def numpy_pad_mode(scipy_mode: str) -> str:
    """The :func:`numpy.pad` mode that extends an array the way ``scipy_mode`` does."""
    return SCIPY_TO_NUMPY_PAD[scipy_mode]


@dataclass(frozen=True)
class BlockOp:
    """Base class of block operations (subclasses are frozen dataclasses: picklable).

    Attributes
    ----------
    pad_mode : str
        :func:`numpy.pad` mode used beyond the volume edges (``"edge"``, ``"symmetric"``,
        ``"reflect"``, ``"constant"`` ...), the boundary mode of the whole-array method.
    pad_modes : tuple of str
        One mode per input, for ops whose inputs need different edge padding (an image
        padded ``"edge"`` beside markers padded ``"constant"`` 0); empty (the default):
        every input uses ``pad_mode``. See :func:`input_pad_modes`.
    """

    def __post_init__(self) -> None:
        # the declared step parameters, checked and normalized (lists to tuples ...)
        check_declared(self)

    @property
    def pad_mode(self) -> str:
        return "edge"

    @property
    def pad_modes(self) -> tuple[str, ...]:
        return ()

    @property
    def dtype(self) -> np.dtype:
        """dtype of the output."""
        return np.dtype(np.float32)

    def halo(self, ndim: int) -> tuple[int, ...]:
        """Voxels of context needed on each side, per axis, for an exact result."""
        raise NotImplementedError

    def __call__(self, *images: np.ndarray) -> np.ndarray:
        """Compute on padded read regions; return an array of the same (padded) shape."""
        raise NotImplementedError

    def interior(self, crop: tuple[slice, ...], *images: np.ndarray) -> np.ndarray:
        """The result on the write region only: ``self(*images)[crop]``, ``crop`` the write
        region within the padded read regions. An op that can skip part of its halo's
        work (a separable filter) computes less here, with the same values."""
        return self(*images)[crop]


@dataclass(frozen=True)
class BlockReduce:
    """Base class of block reductions: ``partial`` per block, ``merge`` of two partials,
    ``finish`` of the merged partial. Edge padding and declared parameters as
    :class:`BlockOp`.

    ``merge`` makes the reduction stream (partials are folded as blocks finish, see
    :func:`engine.runner.run_blocks`): it must be associative and give a partial of the
    same kind; the fold's tree is fixed, so float merges are deterministic too.
    """

    def __post_init__(self) -> None:
        check_declared(self)

    @property
    def pad_mode(self) -> str:
        return "edge"

    @property
    def pad_modes(self) -> tuple[str, ...]:
        return ()

    def halo(self, ndim: int) -> tuple[int, ...]:
        raise NotImplementedError

    def partial(self, crop: Region, *images: np.ndarray) -> Any:
        """Partial result of the write region ``images[k][crop]`` (inputs are padded)."""
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        """One partial of the union of the voxels of partials ``a`` and ``b``."""
        raise NotImplementedError

    def finish(self, merged: Any) -> Any:
        """The reduction's result from the partial of all blocks."""
        return merged

    def combine(self, partials: Sequence[Any]) -> Any:
        """The result of a sequence of partials (at least one), merged left to right."""
        return self.finish(functools.reduce(self.merge, partials))


def input_pad_modes(op: BlockOp | BlockReduce, n: int) -> tuple[str, ...]:
    """The :func:`numpy.pad` mode of each of the ``n`` inputs of ``op``: its ``pad_modes``
    when it names them, else ``pad_mode`` for every input."""
    return tuple(op.pad_modes) or (op.pad_mode,) * n


def apply_blockwise(op: BlockOp, images: Sequence[np.ndarray] | np.ndarray,
                    block_shape: Sequence[int]) -> np.ndarray:
    """Run ``op`` block by block over in-memory arrays, in this process.

    The reference harness for tests (and for small arrays): it tiles the arrays with a
    :class:`~engine.blocks.BlockGrid`, reads each read region, pads it at the volume edges
    with the op's mode for each input (:func:`input_pad_modes`), applies ``op`` and crops
    the write region, exactly as the distributed runner does.
    """
    images = [images] if isinstance(images, np.ndarray) else list(images)
    shape = images[0].shape
    grid = BlockGrid(shape, block_shape, halo=op.halo(len(shape)))
    out = np.empty(shape, dtype=op.dtype)
    modes = input_pad_modes(op, len(images))
    for block in grid:
        padded = [pad_read(np.asarray(im[block.read]), block, mode)
                  for im, mode in zip(images, modes, strict=True)]
        out[block.write] = op.interior(block.crop, *padded)
    return out


def reduce_blockwise(op: BlockReduce, images: Sequence[np.ndarray] | np.ndarray,
                     block_shape: Sequence[int]) -> Any:
    """Run a :class:`BlockReduce` block by block over in-memory arrays (test harness)."""
    images = [images] if isinstance(images, np.ndarray) else list(images)
    grid = BlockGrid(images[0].shape, block_shape, halo=op.halo(images[0].ndim))
    parts = []
    modes = input_pad_modes(op, len(images))
    for block in grid:
        padded = [pad_read(np.asarray(im[block.read]), block, mode)
                  for im, mode in zip(images, modes, strict=True)]
        parts.append(op.partial(block.crop, *padded))
    return op.combine(parts)
