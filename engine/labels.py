"""Instance labels across blocks: connected components that equal the whole-volume result.

The final numbering is scikit-image's and scipy's: labels ordered by the raster position
of their first voxel, for any block layout. No task and no client ever holds the whole
label volume or a table of every component:

1. **local** — each block labels its write region on its own and writes the local labels;
   into a small per-block file it puts each local label's size and first-voxel raster key,
   and the block's boundary planes. It returns only its *face components* (labels that
   touch a face shared with a neighbour block), with their keys and sizes;
2. **faces** — each block pairs its high-side boundary planes with the neighbours' facing
   planes (faces, edges and corners, as the connectivity says) and returns the pairs of
   face components that touch;
3. the client joins the pairs (union-find over the face graph only: connected components
   of a sparse graph whose nodes are face components), keeps the smallest first-voxel key
   and the summed size of every merged object, and decides the size filter;
4. **ranks** — one task per slab of blocks along axis 0 (first-voxel keys of different
   slabs never interleave) sorts the keys of the slab's objects; the rank of a key in its
   slab plus the number of objects in earlier slabs is its final id;
5. **relabel** — each block builds its own relabel map (interior components from its slab's
   sorted keys, face components from their rows of the face map) and writes the final labels,
   or keeps the map for a lazy view that applies it on read.

Component ids on the way are ``block_id << 32 | local_label`` (uint64).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine.blocks import Block, BlockGrid
from engine.errors import OptionError
from engine.io.chunkfiles import write_region
from engine.io.sources import read_region
from engine.objtables import ShardedTable, merge_rows
from engine.runner import RunState

SHIFT = np.uint64(32)  # component id = block_id << 32 | local label


def structure(ndim: int, connectivity: int | None = 1, slice_wise: bool = False) -> np.ndarray:
    """Neighbourhood of ``connectivity`` (1 = faces ... ndim = faces, edges and corners;
    ``None`` = ndim, scikit-image's default). ``slice_wise`` drops the links along axis 0,
    so every plane of a 3D volume is labelled on its own."""
    connectivity = ndim if connectivity is None else connectivity
    if not 1 <= connectivity <= ndim:
        raise OptionError(f"connectivity {connectivity}: must be between 1 and {ndim}")
    struct = ndi.generate_binary_structure(ndim, connectivity)
    if slice_wise and ndim >= 3:
        struct[0] = struct[2] = False
    return struct


def _first_voxels(flat: np.ndarray, n: int) -> np.ndarray:
    """Flat index of the first voxel of labels 1..n of a raster-labelled array."""
    if n == 0:
        return np.zeros(0, np.int64)
    # scipy numbers labels in order of first appearance, so the running maximum steps
    # through 1..n, reaching j at label j's first voxel; verified (a voxel found holds its
    # label, and the running maximum was below it before) instead of trusted
    running = np.maximum.accumulate(flat)
    first = np.searchsorted(running, np.arange(1, n + 1, dtype=running.dtype))
    if first[-1] < len(flat) and np.array_equal(flat[first],
                                                np.arange(1, n + 1, dtype=flat.dtype)):
        return first
    values, index = np.unique(flat, return_index=True)
    return index[values > 0]


def _block_file(work: str, bid: int) -> Path:
    return Path(work) / "blocks" / f"{bid}.bin"


def _save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Small arrays in one flat file: a JSON line of names, dtypes and shapes, then their
    bytes, each padded to 8. For a 64³ block's files ``np.savez`` took ~2× longer to
    write and, through its zip directory and per-member headers, 4–10× longer to read
    (0.14–0.36 ms against 0.03): a face task reads up to 20 of them."""
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()])
    head = header.encode() + b"\n"
    with open(path, "wb") as f:
        f.write(head + b" " * (-len(head) % 8))
        for a in arrays.values():
            data = np.ascontiguousarray(a).tobytes()
            f.write(data + b"\0" * (-len(data) % 8))


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a :func:`_save_arrays` file (read-only views of one read)."""
    raw = path.read_bytes()
    end = raw.index(b"\n") + 1
    pos = end + (-end % 8)
    out = {}
    for name, dtype, shape in json.loads(raw[:end]):
        dt, count = np.dtype(dtype), math.prod(shape)
        out[name] = np.frombuffer(raw, dt, count=count, offset=pos).reshape(shape)
        pos += -(-count * dt.itemsize // 8) * 8
    return out


VALUES_LIMIT = 1024
"""Label images with at most this many ids list them all (with a colour each) in their
``image-label`` metadata."""


@dataclass(frozen=True)
class LocalLabels:
    """Pass 1: label a block on its own; keep sizes, first-voxel keys and boundary planes."""

    mask: Any  # dask array, zarr path or view: non-zero = foreground
    work: str
    structure: np.ndarray
    shape: tuple[int, ...]
    grid_shape: tuple[int, ...]

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Label the block; return its face components: their global ids (block id and
        local label, see :data:`SHIFT`), first-voxel keys and sizes."""
        m = read_region(self.mask, block.write)
        local, n = ndi.label(m if m.dtype == bool else m != 0, structure=self.structure)
        local = local.astype(np.uint32, copy=False)
        # a work array read back whole: skip zarr's scan of each chunk for the fill value
        write_region(Path(self.work) / "local", block.write, local,
                     {"write_empty_chunks": True})
        sizes = np.bincount(local.ravel(), minlength=n + 1)[1:].astype(np.int64)
        coords = np.unravel_index(_first_voxels(local.ravel(), n), local.shape)
        glob = tuple(c + s.start for c, s in zip(coords, block.write, strict=True))
        keys = np.ravel_multi_index(glob, self.shape).astype(np.uint64)
        planes: dict[str, np.ndarray] = {}
        for k in range(local.ndim):
            if block.index[k] > 0:
                planes[f"lo{k}"] = np.take(local, 0, axis=k)
            if block.index[k] < self.grid_shape[k] - 1:
                planes[f"hi{k}"] = np.take(local, -1, axis=k)
        face = np.unique(np.concatenate([p.ravel() for p in planes.values()])) if planes \
            else np.zeros(0, np.uint32)
        face = face[face > 0]
        bid = int(np.ravel_multi_index(block.index, self.grid_shape))
        _save_arrays(_block_file(self.work, bid), keys=keys, sizes=sizes, face=face, **planes)
        return _face_table(bid, face, keys, sizes)


def _face_table(bid: int, face: np.ndarray, keys: np.ndarray, sizes: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return ((np.uint64(bid) << SHIFT) | face.astype(np.uint64), keys[face - 1],
            sizes[face - 1])


@dataclass(frozen=True)
class SavedFaces:
    """Recovers a finished :class:`LocalLabels` block's result from its block file."""

    work: str
    grid_shape: tuple[int, ...]

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bid = int(np.ravel_multi_index(block.index, self.grid_shape))
        f = _load_arrays(_block_file(self.work, bid))
        return _face_table(bid, f["face"], f["keys"], f["sizes"])


def concatenate_tables(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Concatenate two tables (sequences of columns) column by column (a ``combine`` for
    the runner). A table given as a list (what this returns: the fold's partials) is
    consumed, each column released once joined: joining the fold's last two partials
    holds one column more than the result, not a second copy of every column."""
    if len(a) != len(b):
        raise ValueError(f"tables of {len(a)} and {len(b)} columns")
    out = []
    for i in range(len(a)):
        out.append(np.concatenate([a[i], b[i]]))
        for table in (a, b):
            if isinstance(table, list):
                table[i] = None
    return out


def concatenate_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stack two tables of rows (a ``combine`` for the runner)."""
    return np.concatenate([a, b])


def merge_relabelled(a: tuple[int, int, np.ndarray | None],
                     b: tuple[int, int, np.ndarray | None]) -> tuple[int, int, np.ndarray | None]:
    """Merge two :class:`Relabel` results: largest id, interior objects kept, and the ids
    present (None once more than :data:`VALUES_LIMIT`, then the list is not wanted)."""
    ids = None if a[2] is None or b[2] is None else np.union1d(a[2], b[2])
    return (max(a[0], b[0]), a[1] + b[1],
            ids if ids is not None and ids.size <= VALUES_LIMIT else None)


def _unique_rows(pairs: np.ndarray) -> np.ndarray:
    if len(pairs) < 2:
        return pairs
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    keep = np.ones(len(pairs), bool)
    keep[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[keep]


@dataclass(frozen=True)
class FacePairs:
    """Pass 2: pairs of component ids that touch across the block's high-side faces.

    Every cross-block neighbour pair (p, q) crosses a block border along some axis k; with
    p on the lower side, p lies on its block's high-k plane and q on the next layer, which
    is made of the low-k planes of up to 3^(ndim-1) neighbour blocks: of those, only the
    ones the structure reaches (face neighbours only: the block straight across).

    Nothing is stored: a resumed run recomputes a finished block's pairs from the block
    files (under a millisecond for a 64³ block; a pairs file per block cost ~3 ms to
    create while a worker's writes kept the file system's journal busy).
    """

    work: str
    structure: np.ndarray
    grid_shape: tuple[int, ...]

    @cached_property
    def _offsets(self) -> np.ndarray:
        """The structure's neighbour offsets from its centre: int, ``(n, ndim)``."""
        return np.argwhere(self.structure) - np.array(self.structure.shape) // 2

    @cached_property
    def _reached(self) -> tuple[frozenset[tuple[int, ...]], ...]:
        """Per axis ``k``, the in-plane steps ``delta`` of the next layer's blocks that the
        structure reaches across the high-``k`` face: an offset one step up ``k`` with
        in-plane part ``e`` reads the neighbour at ``delta`` when every non-zero step of
        ``delta`` equals ``e``'s (a corner block only through a diagonal offset)."""
        out = []
        for k in range(len(self.grid_shape)):
            parts = [[int(d[j]) for j in range(len(d)) if j != k] for d in self._offsets
                     if d[k] == 1]
            out.append(frozenset(delta for e in parts
                                 for delta in itertools.product(*(sorted({0, ej})
                                                                  for ej in e))))
        return tuple(out)

    def _ids(self, index: tuple[int, ...], plane: np.ndarray) -> np.ndarray:
        bid = np.uint64(np.ravel_multi_index(index, self.grid_shape))
        return np.where(plane > 0, (bid << SHIFT) | plane.astype(np.uint64), np.uint64(0))

    def _across(self, index: tuple[int, ...], k: int
                ) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
        """``(in-plane offsets, block index)`` of the next layer's blocks across the
        high-``k`` face of block ``index`` that the structure reaches: one step up axis
        ``k``, at most one step either way on the others, inside the grid (none past the
        grid's last layer); in-plane offsets in lexicographic order."""
        ndim = len(self.grid_shape)
        if index[k] == self.grid_shape[k] - 1:
            return
        inplane = [j for j in range(ndim) if j != k]
        for delta in sorted(self._reached[k]):
            nb = list(index)
            nb[k] += 1
            for j, dj in zip(inplane, delta, strict=True):
                nb[j] += dj
            if all(0 <= i < n for i, n in zip(nb, self.grid_shape, strict=True)):
                yield delta, tuple(nb)

    def reads(self, block: Block) -> list[tuple[int, ...]]:
        """The blocks whose :class:`LocalLabels` files the task of ``block`` reads: its
        own and the next layer's across each high-side face."""
        return [block.index, *(nb for k in range(len(self.grid_shape))
                               for _, nb in self._across(block.index, k))]

    def __call__(self, block: Block) -> np.ndarray:
        ndim = len(self.grid_shape)
        bid = int(np.ravel_multi_index(block.index, self.grid_shape))
        files = {block.index: _load_arrays(_block_file(self.work, bid))}
        own = files[block.index]
        pairs = []
        for k in range(ndim):
            if block.index[k] == self.grid_shape[k] - 1 or not self._reached[k]:
                continue  # the last layer, or an axis no offset crosses (slice-wise)
            p = self._ids(block.index, own[f"hi{k}"])
            inplane = [j for j in range(ndim) if j != k]
            # the next layer, one voxel wider on each in-plane side
            layer = np.zeros([p.shape[i] + 2 for i in range(ndim - 1)], np.uint64)
            for delta, nb in self._across(block.index, k):
                if nb not in files:  # a corner neighbour is across two or three faces
                    files[nb] = _load_arrays(_block_file(self.work, int(
                        np.ravel_multi_index(nb, self.grid_shape))))
                plane = files[nb][f"lo{k}"]
                # place the neighbour's plane (or the one row/voxel of it next to us)
                dst, src = [], []
                for i, dj in enumerate(delta):
                    size = p.shape[i]
                    if dj == 0:
                        dst.append(slice(1, size + 1))
                        src.append(slice(0, size))
                    elif dj < 0:
                        dst.append(slice(0, 1))
                        src.append(slice(plane.shape[i] - 1, plane.shape[i]))
                    else:
                        dst.append(slice(size + 1, size + 2))
                        src.append(slice(0, 1))
                layer[tuple(dst)] = self._ids(nb, plane[tuple(src)])
            for d in self._offsets:
                if d[k] != 1:
                    continue
                e = [d[j] for j in inplane]
                q = layer[tuple(slice(1 + ej, 1 + ej + n) for ej, n in zip(e, p.shape,
                                                                              strict=True))]
                both = (p > 0) & (q > 0)
                if both.any():
                    a, b = p[both], q[both]
                    # a pair mostly repeats the one before it (runs of the same two objects
                    # along the face): drop the repeats before the sort of _unique_rows
                    new = np.ones(len(a), bool)
                    np.not_equal(a[1:], a[:-1], out=new[1:])
                    new[1:] |= b[1:] != b[:-1]
                    pairs.append(np.stack([a[new], b[new]], axis=1))
        return (_unique_rows(np.concatenate(pairs)) if pairs
                else np.zeros((0, 2), np.uint64))


def _map_file(work: str | Path, bid: int) -> Path:
    """Block ``bid``'s relabel map: local label -> final id (:class:`Relabel`, lazy runs)."""
    return Path(work) / "maps" / f"{bid}.npy"


def _face_map_file(work: str | Path) -> Path:
    """Every face component's final id: row 0 its id (sorted), row 1 the final id."""
    return Path(work) / "maps" / "faces.npy"


#: face components whose final ids are looked up and written at once
FACE_MAP_ROWS = 1 << 20


def _save_face_map(path: Path, face_ids: np.ndarray, group_final: np.ndarray,
                   group: np.ndarray) -> None:
    """Write the face map (``.npy`` of uint64, ``(2, n)``): row 0 ``face_ids``, row 1
    ``group_final[group]``, the second row a slice at a time (``np.stack`` of the two held
    three more arrays of every face component on the client)."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": np.dtype(np.uint64).str, "fortran_order": False,
                 "shape": (2, len(face_ids))})
        face_ids.astype(np.uint64, copy=False).tofile(fh)
        for i in range(0, len(group), FACE_MAP_ROWS):
            group_final[group[i:i + FACE_MAP_ROWS]].astype(np.uint64, copy=False).tofile(fh)


@dataclass(frozen=True)
class SlabRanks:
    """Pass 4: sort the first-voxel keys of one slab of blocks (same index on axis 0)."""

    work: str
    grid_shape: tuple[int, ...]
    min_size: int
    max_size: int | None
    sequential: bool

    def __call__(self, slab: Block) -> tuple[int, np.ndarray]:
        s = slab.index[0]
        work = Path(self.work)
        keys = [np.load(work / "slabs" / f"reps-{s}.npy")]
        for rest in itertools.product(*(range(n) for n in self.grid_shape[1:])):
            bid = int(np.ravel_multi_index((s, *rest), self.grid_shape))
            f = _load_arrays(_block_file(self.work, bid))
            interior = np.ones(len(f["keys"]), bool)
            interior[f["face"].astype(np.int64) - 1] = False
            if self.sequential:
                interior &= _in_range(f["sizes"], self.min_size, self.max_size)
            keys.append(f["keys"][interior])
        sorted_keys = np.sort(np.concatenate(keys))
        np.save(work / "slabs" / f"{s}.npy", sorted_keys)
        return len(sorted_keys), np.searchsorted(sorted_keys, keys[0])

    def recover(self, slab: Block) -> tuple[int, np.ndarray]:
        """The result of a slab finished by an earlier run, from its saved keys."""
        work = Path(self.work)
        sorted_keys = np.load(work / "slabs" / f"{slab.index[0]}.npy")
        reps = np.load(work / "slabs" / f"reps-{slab.index[0]}.npy")
        return len(sorted_keys), np.searchsorted(sorted_keys, reps)


def _in_range(sizes: np.ndarray, min_size: int, max_size: int | None) -> np.ndarray:
    keep = sizes >= min_size
    if max_size is not None:
        keep &= sizes <= max_size
    return keep


@dataclass(frozen=True)
class Relabel:
    """Pass 5: the block's relabel map; applied and written, or kept for a lazy view."""

    work: str
    out: str | None
    grid_shape: tuple[int, ...]
    slab_offsets: tuple[int, ...]
    min_size: int
    max_size: int | None
    dtype: str

    def __call__(self, block: Block) -> tuple[int, int, np.ndarray | None]:
        return self._run(block, write=True)

    def recover(self, block: Block) -> tuple[int, int, np.ndarray | None]:
        """The result of a block finished by an earlier run: its map again, not written."""
        return self._run(block, write=False)

    def _run(self, block: Block, write: bool) -> tuple[int, int, np.ndarray | None]:
        work = Path(self.work)
        bid = int(np.ravel_multi_index(block.index, self.grid_shape))
        f = _load_arrays(_block_file(self.work, bid))
        slab_keys = np.load(work / "slabs" / f"{block.index[0]}.npy", mmap_mode="r")
        rank = np.searchsorted(slab_keys, f["keys"])
        lut = np.zeros(len(f["keys"]) + 1, self.dtype)
        kept = _in_range(f["sizes"], self.min_size, self.max_size)
        lut[1:][kept] = self.slab_offsets[block.index[0]] + rank[kept] + 1
        # the block's rows of the face map (ids sorted: the block's ids are one run)
        faces = np.load(_face_map_file(work), mmap_mode="r")
        lo, hi = np.searchsorted(faces[0], [np.uint64(bid) << SHIFT,
                                            np.uint64(bid + 1) << SHIFT])
        local_face = (faces[0, lo:hi] & np.uint64(0xFFFFFFFF)).astype(np.int64)
        lut[local_face] = faces[1, lo:hi]
        interior_kept = int(kept.sum()) - int(kept[local_face - 1].sum())
        if write and self.out is None:
            np.save(_map_file(work, bid), lut)
        elif write:
            local = read_region(str(work / "local"), block.write)
            write_region(self.out, block.write, lut[local])
        ids = lut[1:][lut[1:] > 0]  # the block's final ids, for the label image's colours
        return int(lut.max(initial=0)), interior_kept, (np.unique(ids) if ids.size <= VALUES_LIMIT
                                                        else None)


def _merge(ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Merged-component index of every id (sorted uint64) after joining ``pairs``.

    A sparse graph's connected components (scipy's union-find, vectorized): the nodes are
    the face components, the edges the cross-block pairs.
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
    """Where the labels are: ``path`` (materialized), or ``source`` (lazy: a
    :class:`RelabelView` over the local labels and relabel maps kept in ``work``, what
    block tasks read). ``n_labels`` is the largest id, ``n_objects`` the number of
    objects (they differ when a size filter keeps ids); ``values`` the sorted ids present,
    when there are at most :data:`VALUES_LIMIT`."""

    path: Path | None
    n_labels: int
    dtype: np.dtype
    work: Path | None = None
    n_objects: int = 0
    values: list[int] | None = None
    source: RelabelView | None = None

    @property
    def view(self) -> Any:
        """The lazy labels as a dask array (``None`` when materialized), built when asked:
        its graph holds a task per block, which a pass reading ``source`` never needs."""
        if self.source is None:
            return None
        return relabel_view(Path(self.source.work), self.source.grid_shape,
                            self.source.chunks, self.source.dtype)


@dataclass(frozen=True)
class RelabelView:
    """The final labels of a lazy labelling, read region by region on a worker: the
    local labels (uint32) mapped through each label block's relabel map.

    A block task that reads it carries paths and shapes only; a dask array over the same
    labels carries a task per label block, so a pass over ``n`` blocks would ship (and
    the scheduler unpickle) O(n²) graph entries.
    """

    work: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # the label blocks (relabel maps are per block)
    grid_shape: tuple[int, ...]
    dtype: np.dtype

    def read_region(self, region: tuple[slice, ...]) -> np.ndarray:
        """Labels of ``region`` (slices with explicit bounds), in :attr:`dtype`."""
        local = read_region(str(Path(self.work) / "local"), region)
        spans = [range(r.start // c, -(-r.stop // c)) for r, c in
                 zip(region, self.chunks, strict=True)]
        if all(len(s) == 1 for s in spans):  # inside one label block: one map, no copy
            bid = int(np.ravel_multi_index([s[0] for s in spans], self.grid_shape))
            return np.load(_map_file(self.work, bid))[local]
        out = np.zeros(local.shape, self.dtype)
        for index in itertools.product(*spans):
            part = tuple(slice(max(r.start, i * c) - r.start, min(r.stop, (i + 1) * c) - r.start)
                         for r, i, c in zip(region, index, self.chunks, strict=True))
            bid = int(np.ravel_multi_index(index, self.grid_shape))
            out[part] = np.load(_map_file(self.work, bid))[local[part]]
        return out


def _apply_map(local: np.ndarray, work: str, grid_shape: tuple[int, ...],
               block_info: dict | None = None) -> np.ndarray:
    index = tuple(block_info[0]["chunk-location"])
    bid = int(np.ravel_multi_index(index, grid_shape))
    return np.load(_map_file(work, bid))[local]


def relabel_view(work: Path, grid_shape: tuple[int, ...], block_shape: tuple[int, ...],
                 dtype: np.dtype) -> Any:
    """A lazy dask array of the final labels: local labels mapped on read, block by block."""
    import dask.array as da
    import zarr

    local = zarr.open_array(str(work / "local"), mode="r")
    data = da.from_zarr(local, chunks=block_shape)
    return data.map_blocks(_apply_map, str(work), tuple(grid_shape), dtype=dtype)


def _shape_and_chunks(mask: Any) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    if isinstance(mask, str | Path):
        import zarr

        arr = zarr.open_array(str(mask), mode="r")
        return tuple(arr.shape), tuple(arr.chunks)
    chunks = getattr(mask, "chunks", None)
    if chunks is not None and chunks and isinstance(chunks[0], tuple):  # dask
        chunks = tuple(c[0] for c in chunks)
    return tuple(int(s) for s in mask.shape), chunks


def label(client: Any, mask: Any, out: str | Path, *, connectivity: int | None = 1,
          slice_wise: bool = False, min_size: int = 0, max_size: int | None = None,
          sequential: bool = False, block_shape: tuple[int, ...] | None = None,
          chunks: tuple[int, ...] | None = None, progress: Any = None,
          lazy: bool = False, state: RunState | None = None) -> LabelResult:
    """Connected components of ``mask``, blockwise, identical to the whole-array result.

    Parameters
    ----------
    client : distributed.Client
    mask : dask.array.Array, zarr path or view with ``read_region``
        Foreground (non-zero = foreground), any shape (2D or 3D usual).
    out : path
        Zarr array to create for the labels (its parent folder must exist).
    connectivity : int or None
        1 = face neighbours ... ``mask.ndim`` = faces, edges and corners (as
        ``scipy.ndimage.generate_binary_structure``); None = ``mask.ndim``.
    slice_wise : bool
        Label every plane along axis 0 on its own (no links between planes).
    min_size, max_size : int
        Size filter by the *global* size of each object, in voxels (closed interval).
    sequential : bool
        With a size filter: number the kept objects 1..n (as labelling the filtered
        mask); otherwise kept objects keep their ids (as
        ``skimage.morphology.remove_small_objects`` on the labels).
    block_shape, chunks : tuple of int, optional
        Write regions and the output's chunks (default: the mask's chunk shape).
    lazy : bool
        Skip writing: keep the local labels and maps in ``out``'s sibling work folder and
        return a lazy ``view`` (a dask array) and ``source`` (a :class:`RelabelView`,
        what block tasks should read) that apply the maps on read.
    state : RunState, optional
        Makes the labelling resumable: every pass records its finished blocks (in the
        work folder, under ``state.run_hash``), and a re-run with the same hash keeps the
        work folder and skips them, recovering their results from what they stored. The
        work folder of another hash, or of a run without ``state``, is started afresh.

    Returns
    -------
    LabelResult
        Path, number of labels (the largest id), and dtype (uint32, or uint64 past
        2³²−1 labels). Without a size filter the labels equal
        ``skimage.measure.label(mask, connectivity=connectivity)``.
    """
    import zarr

    from engine.runner import Pass, run_blocks, run_passes

    if min_size < 0 or (max_size is not None and max_size < min_size):
        raise OptionError(f"size range [{min_size}, {max_size}] is empty or negative")
    out = Path(out)
    shape, mask_chunks = _shape_and_chunks(mask)
    chunks = tuple(chunks or mask_chunks or block_shape or shape)
    block_shape = tuple(block_shape or chunks)
    struct = structure(len(shape), connectivity, slice_wise)
    grid = BlockGrid(shape, block_shape, halo=0, chunks=chunks)
    gshape = grid.grid_shape
    work = out.parent / f".{out.name}.labels-work"
    resumed = state is not None and (work / "state" / state.run_hash).is_dir()
    if not resumed:
        shutil.rmtree(work, ignore_errors=True)
    for sub in ("blocks", "maps", "slabs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    marks = None
    if state is not None:  # markers live in the work folder: they go when it goes
        marks = RunState(work / "state", state.run_hash, state.identity)
        marks.begin()
    try:
        if not (work / "local" / "zarr.json").exists():
            from engine.io.omezarr import compressor

            # read back by the face, relabel and pyramid passes: lz4 decodes in a third of
            # zarr's default zstd's time (and encodes in half)
            zarr.create_array(store=str(work / "local"), shape=shape, chunks=chunks,
                              dtype=np.uint32, fill_value=0, zarr_format=3,
                              compressors=compressor("lz4", 5, 3, 4))
        # both passes stream: the client holds the face tables, never a result per block;
        # and run together: a block's faces are paired as soon as it and the neighbours
        # it pairs with are labelled
        pairing = FacePairs(str(work), struct, gshape)
        local, faces = run_passes(client, [
            Pass(grid, LocalLabels(mask, str(work), struct, shape, gshape), "label-local",
                 combine=concatenate_tables, recover=SavedFaces(str(work), gshape)),
            Pass(grid, pairing, "label-faces", combine=concatenate_rows,
                 recover=pairing,
                 needs={"label-local": pairing.reads})], state=marks, progress=progress)
        face_ids, face_keys, face_sizes = local.value
        pairs = faces.value
        del local, faces  # the reports would keep the tables to the end

        # the face graph: nodes are face components only. The fold joins the blocks'
        # tables in grid order and a block's ids are sorted, so they come sorted: no
        # argsort and permuted copies (a third of the client's peak at 10⁷ objects)
        if np.any(face_ids[1:] <= face_ids[:-1]):
            order = np.argsort(face_ids)
            face_ids, face_keys, face_sizes = face_ids[order], face_keys[order], \
                face_sizes[order]
            del order
        group = _merge(face_ids, pairs)
        del pairs
        ngroups = int(group.max()) + 1 if len(group) else 0
        group_key = np.full(ngroups, np.iinfo(np.uint64).max, np.uint64)
        np.minimum.at(group_key, group, face_keys)
        group_size = np.zeros(ngroups, np.int64)
        np.add.at(group_size, group, face_sizes)
        group_kept = _in_range(group_size, min_size, max_size)

        # final ids: rank of each object's first-voxel key, slab by slab
        counted = group_kept if sequential else np.ones(ngroups, bool)
        plane = int(np.prod(shape[1:]))
        group_slab = (group_key // np.uint64(plane)).astype(np.int64) // grid.block_shape[0]
        for s in range(gshape[0]):
            np.save(work / "slabs" / f"reps-{s}.npy",
                    np.sort(group_key[counted & (group_slab == s)]))
        slabs = BlockGrid((shape[0],), (grid.block_shape[0],))
        slab_ranks = SlabRanks(str(work), gshape, min_size, max_size, sequential)
        ranks = run_blocks(client, slabs, slab_ranks, name="label-ranks", progress=progress,
                           state=marks, recover=slab_ranks.recover).results
        counts = [ranks[(s,)][0] for s in range(gshape[0])]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        group_final = np.zeros(ngroups, np.uint64)
        for s in range(gshape[0]):
            sel = np.flatnonzero(counted & (group_slab == s))
            sel = sel[np.argsort(group_key[sel])]
            group_final[sel] = offsets[s] + ranks[(s,)][1] + 1
        group_final[~group_kept] = 0
        dtype = np.dtype(np.uint32) if offsets[-1] < 2**32 else np.dtype(np.uint64)
        # one file, which each relabel task reads its rows of: a file per block was a
        # loop over the grid on the client between two passes
        _save_face_map(_face_map_file(work), face_ids, group_final, group)
        n_face_objects = int(group_kept.sum())
        # the face graph's tables (a few arrays per face component) are all in the maps
        # now: not held through the relabel pass
        del face_ids, face_keys, face_sizes, group, group_key, group_size, group_kept, \
            counted, group_slab, group_final
        if not lazy and not (resumed and (out / "zarr.json").exists()):
            zarr.create_array(store=str(out), shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=0, zarr_format=3, overwrite=True)
        relabel = Relabel(str(work), None if lazy else str(out), gshape,
                          tuple(int(o) for o in offsets), min_size, max_size, dtype.str)
        n, interior, block_ids = run_blocks(
            client, grid, relabel, name="label-relabel", progress=progress,
            combine=merge_relabelled, state=marks, recover=relabel.recover).value
        n_objects = interior + n_face_objects
        values = ([int(v) for v in block_ids] if block_ids is not None
                  and n_objects <= VALUES_LIMIT else None)
        if lazy:
            return LabelResult(None, n, dtype, work, n_objects, values,
                               RelabelView(str(work), shape, grid.block_shape, gshape, dtype))
    except BaseException:
        if state is None:  # a resumable run keeps its finished blocks
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return LabelResult(out, n, dtype, n_objects=n_objects, values=values)


def merge_by_id(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...],
                reducers: Sequence[np.ufunc]) -> tuple[np.ndarray, ...]:
    """Merge two per-object tables ``(ids, *columns)``, ids sorted and unique in each.

    The result is one table with sorted unique ids; the columns of an id present in both
    are combined by its ufunc in ``reducers`` (``np.add`` for counts, ``np.minimum``,
    ``np.maximum`` for extrema). Arrays, not Python objects per id: a table of 10⁷ objects
    is a few hundred MB at most, and merging is a sort.
    """
    if a[0].size == 0 or b[0].size == 0:  # nothing to combine: keep the other as it is
        return tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))
    return merge_rows((a, b), reducers)


@dataclass(frozen=True, eq=False)  # equality is the Mapping's: by items
class ObjectSizes(Mapping):
    """Voxel count of every object, as two arrays: ``ids`` (sorted uint64) and
    ``counts`` (int64). Read-only mapping ``id -> count`` (a lookup is a binary search),
    so it compares equal to the dict of the same sizes."""

    ids: np.ndarray
    counts: np.ndarray

    def __getitem__(self, key: int) -> int:
        k = int(np.searchsorted(self.ids, key))
        if k == self.ids.size or self.ids[k] != key:
            raise KeyError(key)
        return int(self.counts[k])

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids.tolist())

    def __len__(self) -> int:
        return int(self.ids.size)


@dataclass(frozen=True)
class LabelCounts:
    """Block task: voxel count per label id in the block (sparse: ids and counts, 0
    excluded)."""

    path: str

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        ids, counts = np.unique(read_region(self.path, block.write), return_counts=True)
        keep = ids != 0
        ids = ids[keep].astype(np.uint64)  # negative ids wrap: sort again
        order = np.argsort(ids, kind="stable")
        return ids[order], counts[keep][order].astype(np.int64)


def merge_counts(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sparse ``(ids, counts)`` tables (a ``combine`` for the runner)."""
    return merge_by_id(a, b, (np.add,))


def label_sizes(client: Any, labels: str | Path, block_shape: tuple[int, ...] | None = None,
                progress: Any = None) -> ObjectSizes:
    """Voxel count of every label of a label array, by one streaming reduction pass (0
    excluded): the client holds the merged table and the partials in flight, never one
    table per block."""
    import zarr

    from engine.runner import run_blocks

    arr = zarr.open_array(str(labels), mode="r")
    grid = BlockGrid(arr.shape, block_shape or arr.chunks)
    empty = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
    report = run_blocks(client, grid, LabelCounts(str(labels)), name="label-sizes",
                        progress=progress, combine=merge_counts, initial=empty)
    return ObjectSizes(*report.value)


@dataclass(frozen=True)
class KeepSizes:
    """Shard ``finish`` of :func:`filter_sizes`: the ids whose global size is in range,
    and how many there are."""

    min_size: int
    max_size: int | None

    def __call__(self, table: tuple[np.ndarray, ...]) -> tuple[tuple[np.ndarray, ...], int]:
        ids, counts = table
        keep = _in_range(counts, self.min_size, self.max_size)
        return (ids[keep], counts[keep]), int(keep.sum())


@dataclass(frozen=True)
class ApplyKept:
    """Block task: keep the labels found in ``kept`` (a sharded table of ids), zero the
    rest; with ``offsets`` (kept ids before each shard) number them 1..n in id order."""

    src: str
    out: str
    kept: ShardedTable
    offsets: tuple[int, ...] | None

    def __call__(self, block: Block) -> None:
        data = read_region(self.src, block.write)
        ids, inverse = np.unique(data, return_inverse=True)
        found, rows = self.kept.lookup(ids.astype(np.uint64))
        new = np.zeros(ids.size, data.dtype)
        new[found] = (ids[found] if self.offsets is None
                      else np.asarray(self.offsets, np.int64)[rows[0]] + rows[1] + 1)
        write_region(self.out, block.write, new[inverse].reshape(data.shape))


def filter_sizes(client: Any, labels: str | Path, out: str | Path, *, min_size: int = 0,
                 max_size: int | None = None, relabel: bool = False,
                 progress: Any = None) -> int:
    """Remove objects whose *global* size is outside ``[min_size, max_size]`` voxels.

    Sizes are counted over the whole volume first, so an object cut by block borders is
    judged by its full size. Kept objects keep their ids (as
    ``skimage.morphology.remove_small_objects``), or with ``relabel`` are numbered 1..n in
    the order of their ids (as ``skimage.segmentation.relabel_sequential``); removed ones
    become 0. The sizes are a sharded table (:mod:`engine.objtables`): memory bounded per
    task and on the client, whatever the number of objects or the largest id.

    Returns
    -------
    int
        The number of kept labels.
    """
    import zarr

    from engine.objtables import reduce_objects
    from engine.runner import run_blocks

    if min_size < 0 or (max_size is not None and max_size < min_size):
        raise OptionError(f"size range [{min_size}, {max_size}] is empty or negative")
    arr = zarr.open_array(str(labels), mode="r")
    grid = BlockGrid(arr.shape, arr.chunks)
    out = Path(out)
    scratch = out.parent / f".{out.name}.sizes"
    try:
        kept, counts = reduce_objects(
            client, grid, LabelCounts(str(labels)), ("add",), KeepSizes(min_size, max_size),
            scratch, name="label-sizes", progress=progress)
        offsets = tuple(int(o) for o in np.cumsum([0, *counts[:-1]])) if relabel else None
        zarr.create_array(store=str(out), shape=arr.shape, chunks=arr.chunks, dtype=arr.dtype,
                          fill_value=0, zarr_format=3, overwrite=True)
        run_blocks(client, grid, ApplyKept(str(labels), str(out), kept, offsets),
                   name="size-filter", progress=progress)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return int(sum(counts))


@dataclass(frozen=True)
class UniqueValues:
    """Block task: the distinct values of a block, or None when there are more than
    ``limit`` of them."""

    path: str
    limit: int

    def __call__(self, block: Any) -> frozenset[int] | None:
        data = read_region(self.path, block.write)
        top = int(data.max(initial=0))
        # counting is linear where np.unique sorts; worth it while the count table is small
        values = (np.flatnonzero(np.bincount(data.ravel(), minlength=1))
                  if data.dtype.kind in "ub" and top < 4 * data.size else np.unique(data))
        return frozenset(map(int, values.tolist())) if values.size <= self.limit else None


def label_values(client: Any, level0: Path, block_shape: Sequence[int],
                 limit: int = VALUES_LIMIT) -> list[int] | None:
    """All label values of a label image, by a streaming blockwise reduction; None past
    ``limit`` (so the client never holds more than ``limit`` values per partial)."""
    import zarr

    from engine.runner import run_blocks

    def merge(a: frozenset[int] | None, b: frozenset[int] | None) -> frozenset[int] | None:
        union = None if a is None or b is None else a | b
        return union if union is not None and len(union) <= limit else None

    shape = zarr.open_array(str(level0), mode="r").shape
    grid = BlockGrid(shape, [max(b, 1) for b in block_shape])
    report = run_blocks(client, grid, UniqueValues(str(level0), limit), name="label-values",
                        combine=merge, initial=frozenset())
    return None if report.value is None else sorted(report.value)
