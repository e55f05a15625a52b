"""The face graph of blockwise labelling, joined on the workers in a tree of boxes.

Labelling a block on its own leaves *face components*: local labels that touch a face
shared with a neighbour block. Those that touch across a face are one object; an object's
first-voxel key is the smallest of its components' and its size their sum. This module
finds, for every face component, its object's key and size, without any process holding
the whole graph:

- the edges: :class:`FacePairs` pairs a block's high-side boundary planes with its
  neighbours' facing planes (as far as the structure reaches);
- **merge**, up a tree of boxes of blocks (level ``L`` node = a box of ``2^L`` blocks per
  axis, its children the 2 × 2 × 2 boxes of level ``L − 1``; level 1's children are
  blocks): a node joins its children's *open* components (those that touch the box's
  surface) by the pairs that cross between its children (connected components of a
  sparse graph); what touches the node's own surface stays open, with the pairs that
  leave the box, for its parent; what does not is closed: its key and size are final;
- **resolve**, down the tree: a node's open components take their key and size from the
  parent's resolved table, its closed ones keep theirs; level 1 writes one row per face
  component of its blocks (:meth:`FaceTree.faces_of`).

A node holds its children's open components and the pairs crossing its box, so its
memory follows the surface of its box (the root's: the volume's mid-planes), not the
number of objects; the client holds none of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.labelfiles import SHIFT, block_file, load_arrays, save_arrays
from engine.runner import Pass

#: block files a task has read, by block index (:meth:`FacePairs.block`): each read once
FilesRead = dict[tuple[int, ...], Mapping[str, np.ndarray]]


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
    """Pairs of component ids that touch across a block's high-side faces.

    Every cross-block neighbour pair (p, q) crosses a block border along some axis k; with
    p on the lower side, p lies on its block's high-k plane and q on the next layer, which
    is made of the low-k planes of up to 3^(ndim-1) neighbour blocks: of those, only the
    ones the structure reaches (face neighbours only: the block straight across).
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

    @property
    def crossed(self) -> tuple[bool, ...]:
        """Per axis: whether objects join across block faces along it (not along axis 0
        of a slice-wise structure)."""
        return tuple(bool(r) for r in self._reached)

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

    def reads(self, index: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The blocks whose files :meth:`pairs` of block ``index`` reads: its own and the
        next layer's across each high-side face."""
        return [index, *(nb for k in range(len(self.grid_shape))
                         for _, nb in self._across(index, k))]

    def block(self, index: tuple[int, ...], files: FilesRead) -> Mapping[str, np.ndarray]:
        """The file of block ``index``, read once into ``files`` (the block files a task
        has read, by block index: a level-1 box reads each of its blocks' files for
        their faces and as the neighbour of up to seven others)."""
        if index not in files:
            files[index] = load_arrays(block_file(
                self.work, int(np.ravel_multi_index(index, self.grid_shape))))
        return files[index]

    def pairs(self, index: tuple[int, ...], files: FilesRead | None = None) -> np.ndarray:
        """The pairs ``(n, 2)`` of component ids (uint64) that touch across the high-side
        faces of block ``index``, each once (block files read through ``files``)."""
        ndim = len(self.grid_shape)
        files = {} if files is None else files
        own = self.block(index, files)
        pairs = []
        for k in range(ndim):
            if index[k] == self.grid_shape[k] - 1 or not self._reached[k]:
                continue  # the last layer, or an axis no offset crosses (slice-wise)
            p = self._ids(index, own[f"hi{k}"])
            inplane = [j for j in range(ndim) if j != k]
            # the next layer, one voxel wider on each in-plane side
            layer = np.zeros([p.shape[i] + 2 for i in range(ndim - 1)], np.uint64)
            for delta, nb in self._across(index, k):
                plane = self.block(nb, files)[f"lo{k}"]
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


def block_table(pairing: FacePairs, index: tuple[int, ...], files: FilesRead
                ) -> dict[str, np.ndarray]:
    """Block ``index`` as a leaf of the merge tree: its face components (each open, in the
    order of the block file's ``face``), their keys and sizes, those on a face the
    structure crosses (``bcomp``, sorted ids; ``bclass``, their rows; ``btouch``, bit
    ``2k`` for the low-``k`` plane, ``2k + 1`` the high one) and its pairs (block files
    read through ``files``, see :meth:`FacePairs.block`)."""
    bid = int(np.ravel_multi_index(index, pairing.grid_shape))
    f = pairing.block(index, files)
    face = f["face"].astype(np.int64)
    touch = np.zeros(len(face), np.uint8)
    for k, crossed in enumerate(pairing.crossed):
        for bit, side in ((2 * k, "lo"), (2 * k + 1, "hi")):
            plane = f.get(f"{side}{k}")
            if crossed and plane is not None:
                present = np.zeros(len(f["keys"]) + 1, bool)
                present[plane.ravel()] = True
                touch |= present[face].astype(np.uint8) << np.uint8(bit)
    on = np.flatnonzero(touch)
    ids = (np.uint64(bid) << SHIFT) | face.astype(np.uint64)
    return {"key": f["keys"][face - 1], "size": f["sizes"][face - 1],
            "open": np.arange(len(face)), "bcomp": ids[on], "bclass": on,
            "btouch": touch[on], "xpairs": pairing.pairs(index, files)}


def _block_index(ids: np.ndarray, grid_shape: Sequence[int], k: int) -> np.ndarray:
    """Index along axis ``k`` of the blocks of component ids (one axis at a time: the
    root's pairs are millions, and every axis of both ends at once was six int64 arrays
    of them)."""
    stride = int(np.prod(grid_shape[k + 1:], dtype=np.int64))
    return ((ids >> SHIFT) // np.uint64(stride) % np.uint64(grid_shape[k])).astype(np.int64)


def _find(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, ids)
    if np.any(pos >= len(sorted_ids)) or np.any(sorted_ids[np.minimum(
            pos, len(sorted_ids) - 1)] != ids):
        raise RuntimeError("a paired face component is missing from its box's surface")
    return pos


def merge_boxes(children: Sequence[Mapping[str, np.ndarray]], lo: Sequence[int],
                hi: Sequence[int], grid_shape: Sequence[int], crossed: Sequence[bool]
                ) -> dict[str, np.ndarray]:
    """Join the open components of the boxes ``children`` into the box of blocks
    ``[lo, hi)`` by the pairs between them.

    Each child gives ``key``, ``size`` (uint64, int64: per component), ``open`` (sorted
    rows of the components it passes up), ``bcomp`` (sorted uint64 face-component ids on
    its surface), ``bclass`` (their component rows), ``btouch`` (uint8: the planes each
    touches, see :func:`block_table`) and ``xpairs`` (uint64 ``(n, 2)``: pairs with an
    end outside it). Returns the node's table, the same fields (``open`` left out: the
    rows of its ``bclass``) plus ``parent_of`` (node component of each child's open
    component, children concatenated) and ``offsets`` (int64: where each child's start).
    """
    keys, sizes, comps, rows, touches, pairs, offsets = [], [], [], [], [], [], [0]
    for child in children:
        up = child["open"]
        keys.append(child["key"][up])
        sizes.append(child["size"][up])
        comps.append(child["bcomp"])
        rows.append(offsets[-1] + np.searchsorted(up, child["bclass"]))
        touches.append(child["btouch"])
        pairs.append(child["xpairs"].reshape(-1, 2))
        offsets.append(offsets[-1] + len(up))
    n = offsets[-1]
    key, size = np.concatenate(keys), np.concatenate(sizes)
    comp, row, touch = np.concatenate(comps), np.concatenate(rows), np.concatenate(touches)
    order = np.argsort(comp, kind="stable")
    comp, row, touch = comp[order], row[order], touch[order]
    every = np.concatenate(pairs)
    del keys, sizes, comps, rows, touches, pairs, order
    inside = np.ones(len(every), bool)
    for end in (0, 1):
        for k, (a, b) in enumerate(zip(lo, hi, strict=True)):
            idx = _block_index(every[:, end], grid_shape, k)
            inside &= (idx >= a) & (idx < b)
    internal = every[inside]
    a, b = row[_find(comp, internal[:, 0])], row[_find(comp, internal[:, 1])]
    del internal
    if n:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
        count, parent_of = connected_components(graph, directed=False)
    else:
        count, parent_of = 0, np.zeros(0, np.int64)
    parent_of = parent_of.astype(np.int64)
    node_key = np.full(count, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(node_key, parent_of, key)
    node_size = np.zeros(count, np.int64)
    np.add.at(node_size, parent_of, size)
    # still open: on a plane of the node's surface that the structure crosses
    on = np.zeros(len(comp), bool)
    for k, crosses in enumerate(crossed):
        if crosses:
            where = _block_index(comp, grid_shape, k)
            on |= ((touch >> np.uint8(2 * k)) & 1).astype(bool) & (where == lo[k])
            on |= ((touch >> np.uint8(2 * k + 1)) & 1).astype(bool) & (where == hi[k] - 1)
    return {"key": node_key, "size": node_size, "bcomp": comp[on],
            "bclass": parent_of[row[on]], "btouch": touch[on], "xpairs": every[~inside],
            "parent_of": parent_of, "offsets": np.array(offsets, np.int64)}


@dataclass(frozen=True)
class FaceTree:
    """The merge tree over a grid of blocks: its levels, nodes, files and passes.

    Level ``L`` (1 .. :attr:`levels`) has a node per box of ``2^L`` blocks per axis,
    indexed ``block index >> L``; the top level is one node. Files live under
    ``work/tree/L/``: the merged node (``N.bin``) and its resolved rows (``N.res``, written
    by its parent; level 0: the blocks' face components).
    """

    pairing: FacePairs

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return self.pairing.grid_shape

    @cached_property
    def levels(self) -> int:
        """Levels of merging: 0 for a single block (no faces)."""
        return max((int(g - 1).bit_length() for g in self.grid_shape), default=0)

    def shape(self, level: int) -> tuple[int, ...]:
        """Nodes per axis at ``level`` (level 0: the blocks)."""
        return tuple((g + (1 << level) - 1) >> level for g in self.grid_shape)

    def grid(self, level: int) -> BlockGrid:
        return BlockGrid(self.shape(level), 1)

    def box(self, level: int, index: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The blocks ``[lo, hi)`` of node ``index``."""
        lo = tuple(i << level for i in index)
        hi = tuple(min((i + 1) << level, g) for i, g in zip(index, self.grid_shape,
                                                              strict=True))
        return lo, hi

    def children(self, level: int, index: Sequence[int]) -> list[tuple[int, ...]]:
        """Indices at ``level - 1`` of the children of node ``index``, in C order."""
        below = self.shape(level - 1)
        return list(itertools.product(*(range(2 * i, min(2 * i + 2, n))
                                         for i, n in zip(index, below, strict=True))))

    def position(self, level: int, index: Sequence[int]) -> tuple[tuple[int, ...], int]:
        """Parent (at ``level + 1``) of node or block ``index`` at ``level``, and the
        child's position among the parent's children."""
        parent = tuple(i >> 1 for i in index)
        below = self.shape(level)
        dims = tuple(min(2 * p + 2, n) - 2 * p for p, n in zip(parent, below, strict=True))
        pos = int(np.ravel_multi_index(tuple(i - 2 * p for i, p in zip(index, parent,
                                                                     strict=True)), dims))
        return parent, pos

    def _file(self, level: int, index: Sequence[int], suffix: str) -> Path:
        flat = int(np.ravel_multi_index(tuple(index), self.shape(level)))
        return Path(self.pairing.work) / "tree" / str(level) / f"{flat}.{suffix}"

    def node_file(self, level: int, index: Sequence[int]) -> Path:
        return self._file(level, index, "bin")

    def resolved_file(self, level: int, index: Sequence[int]) -> Path:
        return self._file(level, index, "res")

    def make_folders(self) -> None:
        for level in range(self.levels + 1):
            (Path(self.pairing.work) / "tree" / str(level)).mkdir(parents=True, exist_ok=True)

    def faces_of(self, index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Object key (uint64) and size (int64) of each face component of block ``index``,
        in the order of its file's ``face`` (once the resolve passes have run)."""
        if self.levels == 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        r = load_arrays(self.resolved_file(0, index))
        return r["key"], r["size"]

    def _block_reads(self, node: Block) -> list[tuple[int, ...]]:
        lo, hi = self.box(1, node.index)
        return list(dict.fromkeys(nb for index in itertools.product(*map(range, lo, hi))
                                  for nb in self.pairing.reads(index)))

    def _children_of(self, level: int, node: Block) -> list[tuple[int, ...]]:
        return self.children(level, node.index)

    def _parent_of(self, level: int, node: Block) -> list[tuple[int, ...]]:
        return [self.position(level, node.index)[0]]

    def passes(self, local: str) -> list[Pass]:
        """The merge passes up the tree, then the resolve passes down (level 1 last); the
        first merge level waits on the blocks of pass ``local`` that it pairs."""
        out = []
        for level in range(1, self.levels + 1):
            needs = ({local: self._block_reads} if level == 1 else
                     {f"label-merge{level - 1}": partial(self._children_of, level)})
            out.append(Pass(self.grid(level), MergeNode(self, level), f"label-merge{level}",
                            needs=needs, voxels=False))
        for level in range(self.levels, 0, -1):
            needs = ({f"label-merge{level}": lambda node: [node.index]}
                     if level == self.levels else
                     {f"label-resolve{level + 1}": partial(self._parent_of, level)})
            out.append(Pass(self.grid(level), ResolveNode(self, level),
                            f"label-resolve{level}", needs=needs, voxels=False))
        return out


@dataclass(frozen=True)
class MergeNode:
    """Merge pass of one level: a node's table from its children's (level 1: blocks')."""

    tree: FaceTree
    level: int

    def __call__(self, node: Block) -> None:
        tree = self.tree
        kids = tree.children(self.level, node.index)
        if self.level == 1:
            files: FilesRead = {}
            children = [block_table(tree.pairing, k, files) for k in kids]
        else:
            children = []
            for k in kids:
                child = dict(load_arrays(tree.node_file(self.level - 1, k)))
                child["open"] = np.unique(child["bclass"])
                children.append(child)
        lo, hi = tree.box(self.level, node.index)
        save_arrays(tree.node_file(self.level, node.index),
                    **merge_boxes(children, lo, hi, tree.grid_shape, tree.pairing.crossed))


@dataclass(frozen=True)
class ResolveNode:
    """Resolve pass of one level: a node's components' object keys and sizes, its open
    ones from the rows its parent wrote for it. Each node writes every child's rows in a
    file of the child's own (:meth:`FaceTree.resolved_file` at the child's level): the
    object key and size of each of the child's open components (level 1: of each face
    component of the block), so a task reads what concerns it and nothing else."""

    tree: FaceTree
    level: int

    def __call__(self, node: Block) -> None:
        tree, level = self.tree, self.level
        f = load_arrays(tree.node_file(level, node.index))
        key, size = f["key"].copy(), f["size"].copy()
        if level < tree.levels:
            up = np.unique(f["bclass"])
            mine = load_arrays(tree.resolved_file(level, node.index))
            key[up], size[up] = mine["key"], mine["size"]
        offsets, parent_of = f["offsets"], f["parent_of"]
        for pos, child in enumerate(tree.children(level, node.index)):
            rows = parent_of[offsets[pos]:offsets[pos + 1]]
            save_arrays(tree.resolved_file(level - 1, child), key=key[rows], size=size[rows])
