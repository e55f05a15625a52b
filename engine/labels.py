"""Instance labels across blocks: connected components that equal the whole-volume result.

The final numbering is scikit-image's and scipy's: labels ordered by the raster position
of their first voxel, for any block layout. No task and no client ever holds the whole
label volume or a table of every component:

1. **local** — each block labels its write region on its own and writes the local labels;
   into a small per-block file it puts each local label's size and first-voxel raster key,
   the block's boundary planes and its *face components* (labels that touch a face shared
   with a neighbour block);
2. **merge** and **resolve** — the face graph (face components joined where they touch
   across a face, edge or corner, as the connectivity says) is joined up a tree of boxes
   of blocks and resolved back down, on the workers (:mod:`engine.facegraph`): every face
   component learns its object's first-voxel key (the smallest of its components') and
   size (their sum);
3. **ranks** — an object's final id is one more than the number of objects whose first
   voxel comes before its own in raster order (an object crossing faces counts once: in
   its first component's block). Counted without sorting any slab (:mod:`engine.ranks`):
   rows of blocks along the last axis, then slabs along axis 0, add up how many first
   voxels lie at each position of a block face, with prefix sums; the client adds a
   number per slab;
4. **relabel** — each block builds its own relabel map (its interior components' ranks
   and its face components' objects' ranks, from the files of the block holding each
   key) and writes the final labels, or keeps the map for a lazy view that applies it on
   read.

No task holds more than a block's keys and a block face of counts for the ranks; the
client holds a number per slab, never a row per object or face component.

Component ids on the way are ``block_id << 32 | local_label`` (uint64).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine.blocks import Block, BlockGrid
from engine.errors import OptionError
from engine.facegraph import FacePairs, FaceTree
from engine.io.chunkfiles import write_region
from engine.io.sources import read_region
from engine.labelfiles import block_file, load_arrays, save_arrays
from engine.objtables import ShardedTable, merge_rows
from engine.output import fresh_scratch, remove_scratch
from engine.ranks import GroupCounts, Ranker, RankGrid
from engine.runner import RunState


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


VALUES_LIMIT = 1024
"""Label images with at most this many ids list them all (with a colour each) in their
``image-label`` metadata."""

#: what the work folder's files mean; part of its run hash, so a folder that an engine with
#: other files left (a run interrupted, then resumed after an upgrade) is started afresh
WORK_FORMAT = 2

#: what the labelling's work folder held before it carried the scratch mark
WORK_LEGACY = ("blocks", "maps")


@dataclass(frozen=True)
class LocalLabels:
    """Pass 1: label a block on its own; keep sizes, first-voxel keys and boundary planes."""

    mask: Any  # dask array, zarr path or view: non-zero = foreground
    work: str
    structure: np.ndarray
    shape: tuple[int, ...]
    grid_shape: tuple[int, ...]

    def __call__(self, block: Block) -> None:
        """Label the block; write the local labels and the block file."""
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
        save_arrays(block_file(self.work, bid), keys=keys, sizes=sizes, face=face, **planes)


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


def _map_file(work: str | Path, bid: int) -> Path:
    """Block ``bid``'s relabel map: local label -> final id (:class:`Relabel`, lazy runs)."""
    return Path(work) / "maps" / f"{bid}.npy"


@dataclass(frozen=True)
class StartingKeys:
    """Pass 3's keys of one block (a :data:`engine.ranks.KeysOf`): the first-voxel keys of
    the objects that start in it — its interior components, and the objects across faces
    whose first component is here (the component's own key is the object's) — sorted, and
    how many of the latter are in the size range. With ``sequential`` only objects in the
    size range get a key (ids without gaps); else every object keeps its place."""

    tree: FaceTree
    min_size: int
    max_size: int | None
    sequential: bool

    def __call__(self, index: tuple[int, ...]) -> tuple[np.ndarray, int]:
        work = Path(self.tree.pairing.work)
        f = load_arrays(block_file(work, int(np.ravel_multi_index(index, self.tree.grid_shape))))
        interior = np.ones(len(f["keys"]), bool)
        face = f["face"].astype(np.int64) - 1
        interior[face] = False
        if self.sequential:
            interior &= _in_range(f["sizes"], self.min_size, self.max_size)
        obj_key, obj_size = self.tree.faces_of(index)
        first = obj_key == f["keys"][face]
        kept = _in_range(obj_size, self.min_size, self.max_size)
        starting = obj_key[first & kept] if self.sequential else obj_key[first]
        keys = np.sort(np.concatenate([f["keys"][interior], starting]))
        return keys, int(np.count_nonzero(first & kept))


def _in_range(sizes: np.ndarray, min_size: int, max_size: int | None) -> np.ndarray:
    keep = sizes >= min_size
    if max_size is not None:
        keep &= sizes <= max_size
    return keep


@dataclass(frozen=True)
class Relabel:
    """Pass 5: the block's relabel map; applied and written, or kept for a lazy view."""

    tree: FaceTree
    out: str | None
    ranks: RankGrid
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
        work = Path(self.tree.pairing.work)
        bid = int(np.ravel_multi_index(block.index, self.tree.grid_shape))
        f = load_arrays(block_file(work, bid))
        ranker, cache = Ranker(self.ranks, self.slab_offsets), {}
        lut = np.zeros(len(f["keys"]) + 1, self.dtype)
        kept = _in_range(f["sizes"], self.min_size, self.max_size)
        local_face = f["face"].astype(np.int64)
        interior = np.ones(len(f["keys"]), bool)
        interior[local_face - 1] = False
        # interior components: the rank of their own key (here); face components: their
        # object's (in the block of its first voxel)
        sel = kept & interior
        lut[1:][sel] = ranker.ranks_in(block.index, f["keys"][sel], cache) + 1
        obj_key, obj_size = self.tree.faces_of(block.index)
        obj_kept = _in_range(obj_size, self.min_size, self.max_size)
        final = np.zeros(len(local_face), self.dtype)
        final[obj_kept] = ranker.ranks(obj_key[obj_kept], cache) + 1
        lut[local_face] = final
        interior_kept = int(np.count_nonzero(sel))
        if write and self.out is None:
            np.save(_map_file(work, bid), lut)
        elif write:
            local = read_region(str(work / "local"), block.write)
            write_region(self.out, block.write, lut[local])
        ids = lut[1:][lut[1:] > 0]  # the block's final ids, for the label image's colours
        return int(lut.max(initial=0)), interior_kept, (np.unique(ids) if ids.size <= VALUES_LIMIT
                                                        else None)


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
        work folder, under ``state.run_hash`` and :data:`WORK_FORMAT`), and a re-run with the
        same hash keeps the work folder and skips them, recovering their results from what
        they stored. The work folder of another hash or format, or of a run without
        ``state``, is started afresh.

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
    run_hash = f"{state.run_hash}-work{WORK_FORMAT}" if state is not None else ""
    resumed = state is not None and (work / "state" / run_hash).is_dir()
    # a folder of that name that the labelling did not make is refused, never deleted
    fresh_scratch(work, keep=resumed, legacy=WORK_LEGACY)
    for sub in ("blocks", "maps"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    marks = None
    if state is not None:  # markers live in the work folder: they go when it goes
        marks = RunState(work / "state", run_hash, state.identity)
        marks.begin()
    try:
        if not (work / "local" / "zarr.json").exists():
            from engine.io.omezarr import compressor

            # read back by the face, relabel and pyramid passes: lz4 decodes in a third of
            # zarr's default zstd's time (and encodes in half)
            zarr.create_array(store=str(work / "local"), shape=shape, chunks=chunks,
                              dtype=np.uint32, fill_value=0, zarr_format=3,
                              compressors=compressor("lz4", 5, 3, 4))
        # the local labels, the face graph's merge up its tree and back down, and the
        # ranks' rows and slabs run as one set of passes: a box merges as soon as its
        # blocks (and the neighbours they pair with) are labelled, a row of blocks counts
        # as soon as its blocks' objects are resolved, a slab as soon as its rows are
        tree = FaceTree(FacePairs(str(work), struct, gshape))
        tree.make_folders()
        rank_grid = RankGrid(shape, grid.block_shape, str(work))
        rank_grid.make_folders()
        keys_of = StartingKeys(tree, min_size, max_size, sequential)

        def group_inputs(group: Block) -> list[tuple[int, ...]]:
            """What a group of the lowest rank level reads: its blocks' face components
            (the level-1 nodes holding them), or the blocks when there is no tree."""
            blocks = rank_grid.blocks(rank_grid.top, group.index)
            if not tree.levels:
                return blocks
            return sorted({tree.position(0, b)[0] for b in blocks})

        def children(group: Block) -> list[tuple[int, ...]]:
            return [(*group.index, j) for j in range(gshape[len(group.index)])]

        first = "label-resolve1" if tree.levels else "label-local"
        rank_passes = []
        for level in range(rank_grid.top, -1, -1):
            task = GroupCounts(rank_grid, level, keys_of)
            needs = ({first: group_inputs} if level == rank_grid.top
                     else {f"label-ranks{level + 1}": children})
            rank_passes.append(Pass(rank_grid.grid(level), task, f"label-ranks{level}",
                                    recover=task.recover if level == 0 else None,
                                    needs=needs, voxels=False))
        reports = run_passes(client, [
            Pass(grid, LocalLabels(mask, str(work), struct, shape, gshape), "label-local"),
            *tree.passes("label-local"), *rank_passes], state=marks, progress=progress)
        ranks = reports[-1].results
        counts = [ranks[(s,)][0] for s in range(gshape[0])]
        n_face_objects = sum(ranks[(s,)][1] for s in range(gshape[0]))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        dtype = np.dtype(np.uint32) if offsets[-1] < 2**32 else np.dtype(np.uint64)
        if not lazy and not (resumed and (out / "zarr.json").exists()):
            zarr.create_array(store=str(out), shape=shape, chunks=chunks, dtype=dtype,
                              fill_value=0, zarr_format=3, overwrite=True)
        relabel = Relabel(tree, None if lazy else str(out), rank_grid,
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
            remove_scratch(work)
        raise
    remove_scratch(work)
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
    scratch = out.parent / f".{out.name}.sizes"  # reduce_objects claims it (fresh_scratch)
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
        remove_scratch(scratch)
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


@dataclass(frozen=True)
class ListIds:
    """Shard ``finish`` of :func:`count_labels`: the shard's table kept as it is, and its
    id count with the ids themselves while there are at most ``limit``."""

    limit: int

    def __call__(self, table: tuple[np.ndarray, ...]
                 ) -> tuple[tuple[np.ndarray, ...], tuple[int, list[int] | None]]:
        ids = table[0]
        return table, (int(ids.size), ids.tolist() if ids.size <= self.limit else None)


def count_labels(client: Any, level0: str | Path, block_shape: Sequence[int],
                 folder: str | Path, *, limit: int = VALUES_LIMIT, progress: Any = None
                 ) -> tuple[int, list[int] | None]:
    """How many distinct non-zero labels a label image holds, and which.

    An object cut by block borders is counted once: the blocks' ``(id, voxel count)``
    tables are merged by id range on the workers (:func:`engine.objtables.reduce_objects`),
    so the client holds a number per shard, whatever the number of labels.

    Parameters
    ----------
    level0 : path
        The label array (integer dtype; 0 is background).
    block_shape : sequence of int
        Blocks read by one task.
    folder : path
        Scratch folder, removed before returning.
    limit : int
        Most ids returned as a list.

    Returns
    -------
    n : int
        Distinct non-zero labels.
    ids : list of int or None
        Those labels in increasing order, or None when there are more than ``limit``.
    """
    import zarr

    from engine.objtables import reduce_objects

    shape = zarr.open_array(str(level0), mode="r").shape
    grid = BlockGrid(shape, [max(b, 1) for b in block_shape])
    folder = Path(folder)
    try:
        _, shards = reduce_objects(client, grid, LabelCounts(str(level0)), ("add",),
                                   ListIds(limit), folder, name="label-count",
                                   progress=progress)
    finally:
        remove_scratch(folder)
    n = sum(count for count, _ in shards)
    if n > limit or any(ids is None for _, ids in shards):
        return n, None
    return n, [i for _, ids in shards for i in ids]  # type: ignore[union-attr]
