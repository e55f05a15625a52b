"""Instance labels across blocks: connected components that equal the whole-volume result.

Three blockwise passes and one small reduction on the client:

1. each block labels its write region on its own (``scipy.ndimage.label``) and stores the
   local labels; it returns, per local label, the global raster index of its first voxel;
2. each block reads its local labels with a one-voxel halo and returns the pairs of
   (block, local label) ids that touch across its faces, edges and corners;
3. the client merges those pairs (connected components of the graph of
   ``block_id << 32 | local_label`` uint64 ids), numbers every merged component by the
   raster position of its first voxel — the order ``scipy.ndimage.label`` uses on the
   whole array — and writes one relabel map per block;
4. each block maps its local labels to the final ids and writes them.

So the labels are identical (not just equivalent) to ``scipy.ndimage.label`` on the whole
array, for any block layout. The client holds one 8-byte key per component (plus the
cross-block pairs), never voxels; the maps live on disk, one file per block.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine.blocks import Block, BlockGrid
from engine.errors import OptionError
from engine.io.sources import read_region

SHIFT = np.uint64(32)  # component id = block_id << 32 | local label


def structure(ndim: int, connectivity: int) -> np.ndarray:
    """Neighbourhood of ``connectivity`` (1 = faces ... ndim = faces, edges and corners)."""
    if not 1 <= connectivity <= ndim:
        raise OptionError(f"connectivity {connectivity}: must be between 1 and {ndim}")
    return ndi.generate_binary_structure(ndim, connectivity)


@dataclass(frozen=True)
class LocalLabels:
    """Pass 1: label a block on its own; return first-voxel keys of its local labels."""

    mask: Any  # dask array (bool) or zarr path
    out: str
    structure: np.ndarray
    shape: tuple[int, ...]

    def __call__(self, block: Block) -> np.ndarray:
        import zarr

        local, n = ndi.label(read_region(self.mask, block.write) > 0, structure=self.structure)
        zarr.open_array(self.out, mode="r+")[block.write] = local.astype(np.uint32)
        values, first = np.unique(local.ravel(), return_index=True)
        first = first[values > 0]
        coords = np.unravel_index(first, local.shape)
        glob = tuple(c + s.start for c, s in zip(coords, block.write, strict=True))
        return np.ravel_multi_index(glob, self.shape).astype(np.uint64)  # key per label 1..n


@dataclass(frozen=True)
class FacePairs:
    """Pass 2: pairs of component ids that touch across the block's boundary."""

    local: str
    structure: np.ndarray
    grid_shape: tuple[int, ...]
    block_shape: tuple[int, ...]

    def __call__(self, block: Block) -> np.ndarray:
        lab = read_region(self.local, block.read)
        origin = np.array([s.start for s in block.read])
        own_lo = np.array([w.start for w in block.write]) - origin
        own_hi = np.array([w.stop for w in block.write]) - origin
        bshape = np.array(self.block_shape)
        centre = np.array(self.structure.shape) // 2
        pairs = []
        for d in np.argwhere(self.structure) - centre:
            if tuple(d) <= (0,) * len(d):  # each neighbour relation once (lexicographic >)
                continue
            # p inside the own write region, q = p + d inside the read region
            lo = np.maximum(own_lo, -d)
            hi = np.minimum(own_hi, np.array(lab.shape) - d)
            if np.any(hi <= lo):
                continue
            p = lab[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            q = lab[tuple(slice(a + k, b + k) for a, b, k in zip(lo, hi, d, strict=True))]
            # q must lie outside the own block: along some axis, p + d leaves it
            outside = np.zeros(p.shape, bool)
            for axis, (a, b, k) in enumerate(zip(lo, hi, d, strict=True)):
                if k:
                    pos = np.arange(a, b) + k
                    leaves = (pos < own_lo[axis]) | (pos >= own_hi[axis])
                    shape = [1] * len(d)
                    shape[axis] = len(pos)
                    outside |= leaves.reshape(shape)
            both = (p > 0) & (q > 0) & outside
            if not both.any():
                continue
            where = np.nonzero(both)
            qglob = np.stack(where, axis=1) + lo + d + origin
            qblock = np.ravel_multi_index(tuple((qglob // bshape).T), self.grid_shape)
            pblock = np.ravel_multi_index(block.index, self.grid_shape)
            a = (np.uint64(pblock) << SHIFT) | p[where].astype(np.uint64)
            b = (qblock.astype(np.uint64) << SHIFT) | q[where].astype(np.uint64)
            pairs.append(np.stack([a, b], axis=1))
        if not pairs:
            return np.zeros((0, 2), np.uint64)
        return np.unique(np.concatenate(pairs), axis=0)


@dataclass(frozen=True)
class Relabel:
    """Pass 4: map local labels to final ids with the block's relabel map."""

    local: str
    out: str
    maps: str
    grid_shape: tuple[int, ...]

    def __call__(self, block: Block) -> None:
        import zarr

        bid = int(np.ravel_multi_index(block.index, self.grid_shape))
        lut = np.load(Path(self.maps) / f"{bid}.npy")
        local = read_region(self.local, block.write)
        zarr.open_array(self.out, mode="r+")[block.write] = lut[local]


def _merge(ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Merged-component index of every id (sorted uint64) after joining ``pairs``.

    A sparse graph's connected components (scipy's union-find, vectorized): the nodes are
    the component ids, the edges the cross-block pairs.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    a = np.searchsorted(ids, pairs[:, 0]) if len(pairs) else np.zeros(0, np.int64)
    b = np.searchsorted(ids, pairs[:, 1]) if len(pairs) else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclass
class LabelResult:
    """Where the labels are: ``path`` (materialized), or ``view`` (lazy) over the local
    labels and relabel maps kept in ``work``."""

    path: Path | None
    n_labels: int
    dtype: np.dtype
    view: Any = None
    work: Path | None = None


def _apply_map(local: np.ndarray, maps: str, grid_shape: tuple[int, ...],
               block_info: dict | None = None) -> np.ndarray:
    index = tuple(block_info[0]["chunk-location"])
    bid = int(np.ravel_multi_index(index, grid_shape))
    return np.load(Path(maps) / f"{bid}.npy")[local]


def relabel_view(work: Path, grid_shape: tuple[int, ...], block_shape: tuple[int, ...],
                 dtype: np.dtype) -> Any:
    """A lazy dask array of the final labels: local labels mapped on read, block by block."""
    import dask.array as da
    import zarr

    local = zarr.open_array(str(work / "local"), mode="r")
    data = da.from_zarr(local, chunks=block_shape)
    return data.map_blocks(_apply_map, str(work / "maps"), tuple(grid_shape), dtype=dtype)


def label(client: Any, mask: Any, out: str | Path, *, connectivity: int = 1,
          block_shape: tuple[int, ...] | None = None, chunks: tuple[int, ...] | None = None,
          progress: Any = None, lazy: bool = False) -> LabelResult:
    """Connected components of ``mask``, blockwise, identical to ``scipy.ndimage.label``.

    Parameters
    ----------
    client : distributed.Client
    mask : dask.array.Array
        Foreground (non-zero = foreground), any shape (2D or 3D usual).
    out : path
        Zarr array to create for the labels (its parent folder must exist).
    connectivity : int
        1 = face neighbours ... ``mask.ndim`` = faces, edges and corners (as
        ``scipy.ndimage.generate_binary_structure``).
    block_shape, chunks : tuple of int, optional
        Write regions and the output's chunks (default: the mask's first chunk shape).
    lazy : bool
        Skip the relabel pass: keep the local labels and maps in ``out``'s sibling work
        folder and return a lazy ``view`` that applies the maps on read.

    Returns
    -------
    LabelResult
        Path, number of labels, and dtype (uint32, or uint64 past 2³²−1 labels).
    """
    import zarr

    from engine.runner import run_blocks

    out = Path(out)
    shape = tuple(int(s) for s in mask.shape)
    chunks = tuple(chunks or (c[0] for c in mask.chunks))
    block_shape = tuple(block_shape or chunks)
    struct = structure(len(shape), connectivity)
    grid = BlockGrid(shape, block_shape, halo=1, chunks=chunks)
    work = out.parent / f".{out.name}.labels-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "maps").mkdir(parents=True)
    try:
        local = str(work / "local")
        zarr.create_array(store=local, shape=shape, chunks=chunks, dtype=np.uint32,
                          fill_value=0, zarr_format=3)
        keys = run_blocks(client, grid, LocalLabels(mask, local, struct, shape),
                          name="label-local", progress=progress).results
        pairs_by_block = run_blocks(
            client, grid, FacePairs(local, struct, grid.grid_shape, grid.block_shape),
            name="label-faces", progress=progress).results

        # every component id, sorted; its first-voxel key
        ids, comp_keys = [], []
        for index, k in keys.items():
            bid = np.uint64(np.ravel_multi_index(index, grid.grid_shape))
            ids.append((bid << SHIFT) | np.arange(1, len(k) + 1, dtype=np.uint64))
            comp_keys.append(k)
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint64)
        all_keys = np.concatenate(comp_keys) if comp_keys else np.zeros(0, np.uint64)
        order = np.argsort(all_ids)
        all_ids, all_keys = all_ids[order], all_keys[order]
        pairs = [p for p in pairs_by_block.values() if len(p)]
        merged = _merge(all_ids, np.concatenate(pairs) if pairs else np.zeros((0, 2), np.uint64))
        n = int(merged.max()) + 1 if len(merged) else 0
        # a merged component's key: the smallest first-voxel key of its parts; final ids
        # follow the keys' order (raster order of first voxels, as on the whole array)
        merged_key = np.full(n, np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(merged_key, merged, all_keys)
        final_of_merged = np.empty(n, np.uint64)
        final_of_merged[np.argsort(merged_key)] = np.arange(1, n + 1, dtype=np.uint64)
        final = final_of_merged[merged]
        dtype = np.dtype(np.uint32) if n < 2**32 else np.dtype(np.uint64)
        block_of = all_ids >> SHIFT
        for index in keys:
            bid = int(np.ravel_multi_index(index, grid.grid_shape))
            lo, hi = np.searchsorted(block_of, [bid, bid + 1])
            np.save(work / "maps" / f"{bid}.npy",
                    np.concatenate([[0], final[lo:hi]]).astype(dtype))
        if lazy:
            return LabelResult(None, n, dtype, relabel_view(work, grid.grid_shape,
                                                            grid.block_shape, dtype), work)
        zarr.create_array(store=str(out), shape=shape, chunks=chunks, dtype=dtype,
                          fill_value=0, zarr_format=3, overwrite=True)
        run_blocks(client, grid, Relabel(local, str(out), str(work / "maps"),
                                         grid.grid_shape), name="label-relabel",
                   progress=progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return LabelResult(out, n, dtype)


@dataclass(frozen=True)
class LabelCounts:
    """Block task: voxel count per label id in the block (sparse: ids and counts)."""

    path: str

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        ids, counts = np.unique(read_region(self.path, block.write), return_counts=True)
        return ids.astype(np.uint64), counts.astype(np.int64)


def label_sizes(client: Any, labels: str | Path, block_shape: tuple[int, ...] | None = None,
                progress: Any = None) -> dict[int, int]:
    """Voxel count of every label of a label array, by one reduction pass (0 excluded)."""
    import zarr

    from engine.runner import run_blocks

    arr = zarr.open_array(str(labels), mode="r")
    grid = BlockGrid(arr.shape, block_shape or arr.chunks)
    report = run_blocks(client, grid, LabelCounts(str(labels)), name="label-sizes",
                        progress=progress)
    sizes: dict[int, int] = {}
    for ids, counts in report.results.values():
        for i, c in zip(ids.tolist(), counts.tolist(), strict=True):
            if i:
                sizes[i] = sizes.get(i, 0) + c
    return sizes


@dataclass(frozen=True)
class ApplyLut:
    """Block task: map a label block through a lookup table stored on disk."""

    src: str
    out: str
    lut: str

    def __call__(self, block: Block) -> None:
        import zarr

        lut = np.load(self.lut, mmap_mode="r")
        zarr.open_array(self.out, mode="r+")[block.write] = lut[read_region(self.src, block.write)]


def filter_sizes(client: Any, labels: str | Path, out: str | Path, *, min_size: int = 0,
                 max_size: int | None = None, progress: Any = None) -> dict[int, int]:
    """Remove objects whose *global* size is outside ``[min_size, max_size]`` voxels.

    Sizes are counted over the whole volume first, so an object cut by block borders is
    judged by its full size. Kept objects keep their ids (as
    ``skimage.morphology.remove_small_objects``); removed ones become 0.

    Returns
    -------
    dict
        The sizes of the kept labels.
    """
    import zarr

    from engine.runner import run_blocks

    if min_size < 0 or (max_size is not None and max_size < min_size):
        raise OptionError(f"size range [{min_size}, {max_size}] is empty or negative")
    sizes = label_sizes(client, labels, progress=progress)
    arr = zarr.open_array(str(labels), mode="r")
    top = max(sizes, default=0)
    lut = np.zeros(top + 1, dtype=arr.dtype)
    keep = {i: s for i, s in sizes.items()
            if s >= min_size and (max_size is None or s <= max_size)}
    lut[list(keep)] = list(keep)
    out = Path(out)
    lut_path = out.parent / f".{out.name}.lut.npy"
    np.save(lut_path, lut)
    try:
        zarr.create_array(store=str(out), shape=arr.shape, chunks=arr.chunks, dtype=arr.dtype,
                          fill_value=0, zarr_format=3, overwrite=True)
        run_blocks(client, BlockGrid(arr.shape, arr.chunks),
                   ApplyLut(str(labels), str(out), str(lut_path)), name="size-filter",
                   progress=progress)
    finally:
        lut_path.unlink(missing_ok=True)
    return keep
