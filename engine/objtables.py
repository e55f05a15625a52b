"""Per-object tables in bounded memory: sharded by id range over files, merged on workers.

A per-object reduction (voxel counts per label, extrema per object …) has one row per
object. The runner's streaming fold would hold the whole table on the client: at 10⁷
objects that is hundreds of MB on one machine. Here instead:

1. **partials** — every block task computes its own table ``(ids, *columns)`` (ids sorted,
   unique, uint64) and saves it beside the run; only ``(rows, min id, max id)`` reaches
   the client, folded as a streaming reduction;
2. **shards** — the id range is cut into as many contiguous shards as keep one shard's
   rows (summed over every block) within :func:`table_budget`; one task per shard merges
   the rows of its range from every partial (``merge_by_id``'s rule: a ufunc per column),
   applies ``finish`` and saves the result as ``.npy`` columns;
3. **lookups** — block tasks read the result through :class:`ShardedTable`, which maps
   the shard files and binary-searches them: a block reads the pages of the ids it holds.

The client holds O(shards) numbers whatever the object count.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.output import fresh_scratch

DEFAULT_BUDGET_MIB = 256
Table = tuple[np.ndarray, ...]
"""``(ids, *columns)``: ids sorted, unique, uint64; columns of the same length."""


def table_budget() -> int:
    """Bytes one shard's rows may take (``VOXELMILL_TABLE_BUDGET_MIB``, default 256 MiB)."""
    return int(float(os.environ.get("VOXELMILL_TABLE_BUDGET_MIB", DEFAULT_BUDGET_MIB)) * 2**20)


def _row_bytes(table: Table) -> int:
    return sum(c.dtype.itemsize for c in table)


@dataclass(frozen=True)
class SavePartial:
    """Block task: ``partial(block)`` (a table), saved as ``parts/<block key>.npz``;
    returns ``(rows, min id, max id, bytes per row)``."""

    partial: Callable[[Block], Table]
    folder: str

    def __call__(self, block: Block) -> tuple[int, int, int, int]:
        table = self.partial(block)
        if table[0].size == 0:
            return 0, 0, 0, 0
        np.savez(Path(self.folder) / "parts" / f"{block.key}.npz",
                 **{f"c{i}": c for i, c in enumerate(table)})
        return int(table[0].size), int(table[0][0]), int(table[0][-1]), _row_bytes(table)


def merge_summaries(a: tuple[int, int, int, int], b: tuple[int, int, int, int]
                    ) -> tuple[int, int, int, int]:
    """Combine two ``(rows, min id, max id, bytes per row)`` summaries (empty: rows 0)."""
    if a[0] == 0:
        return b
    if b[0] == 0:
        return a
    return a[0] + b[0], min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def shard_starts(lo: int, hi: int, rows: int, row_bytes: int, budget: int,
                 align: int = 1) -> tuple[int, ...]:
    """First id of each shard: ``[lo, hi]`` cut into equal ranges, as many as keep the
    expected rows of one shard (``rows`` spread evenly over the range) within ``budget``
    bytes, counting the merge's working copies (×3). Starts are multiples of ``align``
    (keys that share ``key // align`` stay in one shard)."""
    lo -= lo % align
    shards = max(1, -(-3 * rows * max(row_bytes, 1) // max(budget, 1)))
    shards = min(shards, -(-(hi - lo + 1) // align))
    width = -(-(hi - lo + 1) // shards)
    width += -width % align
    return tuple(lo + s * width for s in range(shards) if lo + s * width <= hi)


def merge_rows(tables: Sequence[Table], reducers: Sequence[np.ufunc]) -> Table:
    """One table from many (each ``(ids, *columns)``), ids sorted and unique: the rows of
    an id are combined by its column's ufunc (``np.add`` for counts, ``np.minimum`` …)."""
    ids = np.concatenate([t[0] for t in tables])
    cols = [np.concatenate([t[i + 1] for t in tables]) for i in range(len(reducers))]
    if ids.size == 0:
        return (ids, *cols)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    return (ids[starts], *(u.reduceat(c[order], starts)
                           for u, c in zip(reducers, cols, strict=True)))


@dataclass(frozen=True)
class MergeShard:
    """Task of one shard (a block of the 1-D shard grid): merge the rows of its id range
    from every partial, ``finish(table) -> (table to keep, summary)``, and save the kept
    table as ``shard-<s>.<column>.npy``. Returns the summary."""

    folder: str
    starts: tuple[int, ...]
    reducers: tuple[str, ...]
    finish: Callable[[Table], tuple[Table, Any]]

    def __call__(self, block: Block) -> Any:
        s = block.index[0]
        lo = np.uint64(self.starts[s])
        last = s + 1 == len(self.starts)
        hi = None if last else np.uint64(self.starts[s + 1])
        pieces = []
        for part in sorted((Path(self.folder) / "parts").iterdir()):
            with np.load(part) as z:
                cols = [z[f"c{i}"] for i in range(len(self.reducers) + 1)]
            a = int(np.searchsorted(cols[0], lo))
            b = cols[0].size if hi is None else int(np.searchsorted(cols[0], hi))
            if b > a:
                pieces.append(tuple(c[a:b] for c in cols))
        if not pieces:
            pieces = [(np.zeros(0, np.uint64),
                       *(np.zeros(0) for _ in self.reducers))]
        merged = merge_rows(pieces, [getattr(np, r) for r in self.reducers])
        kept, summary = self.finish(merged)
        for i, c in enumerate(kept):
            np.save(Path(self.folder) / f"shard-{s}.c{i}.npy", np.ascontiguousarray(c))
        return summary


@dataclass(frozen=True)
class ShardedTable:
    """Read side of a sharded table: picklable (paths and shard starts), read on workers."""

    folder: str
    starts: tuple[int, ...]
    columns: int

    @classmethod
    def write(cls, folder: str | Path, table: Table) -> ShardedTable:
        """A one-shard table of ``table`` (ids sorted, unique) saved in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(table):
            np.save(folder / f"shard-0.c{i}.npy", np.ascontiguousarray(c))
        return cls(str(folder), (0,), len(table))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """For unique uint64 ``ids`` (any order): which are in the table, and the position of
        each found one within its shard and its shard's columns.

        Returns
        -------
        found : ndarray of bool, shape (n,)
        rows : list of ndarray
            ``[shard index (int64), position in the shard (int64), column 1, …]`` of the
            found ids, in the order of ``ids[found]``.
        """
        ids = np.asarray(ids, np.uint64)
        found = np.zeros(ids.size, bool)
        shard = np.searchsorted(np.asarray(self.starts, np.uint64), ids, side="right") - 1
        where: list[np.ndarray] = []  # positions in ids of the found ones, shard by shard
        out: list[list[np.ndarray]] = [[] for _ in range(self.columns + 1)]
        for s in np.unique(shard[shard >= 0]).tolist():
            sel = np.flatnonzero(shard == s)
            keys = np.load(Path(self.folder) / f"shard-{s}.c0.npy", mmap_mode="r")
            pos = np.searchsorted(keys, ids[sel])
            hit = pos < keys.size
            hit[hit] = keys[pos[hit]] == ids[sel][hit]
            found[sel[hit]] = True
            where.append(sel[hit])
            out[0].append(np.full(int(hit.sum()), s, np.int64))
            out[1].append(pos[hit].astype(np.int64))
            for i in range(1, self.columns):
                col = np.load(Path(self.folder) / f"shard-{s}.c{i}.npy", mmap_mode="r")
                out[i + 1].append(np.asarray(col[pos[hit]]))
        if not where:
            return found, [np.zeros(0, np.int64) for _ in out]
        order = np.argsort(np.concatenate(where), kind="stable")  # back to the order of ids
        return found, [np.concatenate(c)[order] for c in out]

    def shards(self) -> Iterator[Table]:
        """Every shard's table ``(ids, *columns)``, in id order, one loaded at a time."""
        for s in range(len(self.starts)):
            yield tuple(np.load(Path(self.folder) / f"shard-{s}.c{i}.npy")
                        for i in range(self.columns))


def reduce_objects(client: Any, grid: BlockGrid, partial: Callable[[Block], Table],
                   reducers: Sequence[str], finish: Callable[[Table], tuple[Table, Any]],
                   folder: str | Path, *, name: str, progress: Any = None,
                   budget: int | None = None, align: int = 1, columns: int | None = None
                   ) -> tuple[ShardedTable, list[Any]]:
    """Per-object table of ``partial`` over every block of ``grid``, sharded on disk.

    Parameters
    ----------
    client : distributed.Client
    grid : BlockGrid
    partial : callable
        Picklable ``partial(block) -> (ids, *columns)`` (ids sorted unique uint64).
    reducers : sequence of str
        NumPy ufunc per column (``"add"``, ``"minimum"``, ``"maximum"``).
    finish : callable
        Picklable ``finish(table) -> (kept table, summary)`` run per shard on the merged
        rows; the kept table is what :class:`ShardedTable` reads.
    folder : path
        Scratch folder (:func:`engine.output.fresh_scratch`: an earlier run's is
        replaced, a folder voxelmill did not make is refused; its ``parts`` are removed
        once merged).
    budget : int, optional
        Bytes of rows per shard (default :func:`table_budget`).
    align : int
        Shards start at multiples of it (see :func:`shard_starts`), so rows whose ids
        share ``id // align`` (e.g. the bins of one object, keyed ``object << bits |
        bin``) meet in one shard. ``finish`` then keeps a table keyed by ``id // align``.
    columns : int, optional
        Columns of the table ``finish`` keeps, ids included (default: the partials',
        ``len(reducers) + 1``).

    Returns
    -------
    table : ShardedTable
    summaries : list
        ``finish``'s summary of every shard, in id order.
    """
    from engine.runner import run_blocks

    folder = Path(folder)
    fresh_scratch(folder, legacy=("parts", "shard-0.c0.npy"))
    (folder / "parts").mkdir()
    rows, lo, hi, row_bytes = run_blocks(
        client, grid, SavePartial(partial, str(folder)), name=f"{name}-partials",
        progress=progress, combine=merge_summaries,
        initial=(0, 0, 0, 0)).value
    starts = (shard_starts(lo, hi, rows, row_bytes, budget or table_budget(), align)
              if rows else (0,))
    shards = BlockGrid((len(starts),), (1,))
    report = run_blocks(client, shards, MergeShard(str(folder), starts, tuple(reducers),
                                                   finish),
                        name=f"{name}-shards", progress=progress, voxels=False)
    shutil.rmtree(folder / "parts", ignore_errors=True)
    return (ShardedTable(str(folder), tuple(s // align for s in starts),
                         columns or len(reducers) + 1),
            [report.results[(s,)] for s in range(len(starts))])
