"""Opening what the cutter commands read: a 2D OME-Zarr image, its channels, label images
and marker lists.

Markers are stored as a *point label image* ``IMAGE/labels/NAME``: each marker is one pixel
holding its id (uint32, ids unique over the slide), 0 elsewhere; ``--csv`` also writes them
as ``id,y,x`` rows. Commands that take ``--markers`` accept either such a label name or a
CSV file (``y,x`` or ``id,y,x`` columns, with or without header; ids 1..n in row order when
absent).
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.sources import zarr_source
from engine.labels import concatenate_tables
from engine.output import fresh_scratch, write_multiscale
from engine.pyramid import plan_levels
from engine.segment.refs import Stored
from engine.volume import select_channel

#: label images with at most this many cells or markers list their ids in the
#: ``image-label`` metadata
LISTED = 10000

#: the largest marker id: point images and the cells' labels are uint32
MAX_MARKER_ID = 2**32 - 1


@dataclass
class SlideImage:
    """A 2D OME-Zarr image opened for the cutter commands (level 0 only)."""

    source: Path
    attrs: dict[str, Any]
    ngff: str
    volume: Any
    level0: str
    axes: str
    shape: tuple[int, int]
    chunks: tuple[int, int]
    dtype: np.dtype

    def channel(self, channel: str | int | None) -> Stored:
        """One channel (by index or name) as a reference of the spatial axes."""
        _, _, prefix = select_channel(self.volume, channel)
        return Stored(self.level0, self.shape, self.chunks, self.dtype, prefix)

    @property
    def voxel_size(self) -> tuple[float, ...]:
        return tuple(self.volume.voxel_size)

    @property
    def unit(self) -> str:
        return self.volume.unit

    @property
    def n_levels(self) -> int:
        return len(self.attrs["multiscales"][0]["datasets"])

    def label(self, name: str, what: str) -> Stored:
        """Level 0 of ``IMAGE/labels/NAME``; refused when absent or of another shape."""
        import zarr

        path = self.source / "labels" / name / "0"
        if not path.exists():
            have = ", ".join(omezarr.label_names(self.source)) or "none"
            raise InputError(f"{what} {name!r}: no label image {self.source / 'labels' / name} "
                             f"(labels: {have})")
        arr = zarr.open_array(str(path), mode="r")
        if tuple(arr.shape) != self.shape:
            raise InputError(f"{what} {name!r}: shape {tuple(arr.shape)} differs from the "
                             f"image's {self.shape}")
        return Stored(str(path), self.shape, tuple(int(c) for c in arr.chunks),
                      np.dtype(arr.dtype))


def open_slide(src: str | Path) -> SlideImage:
    """Open a 2D (optionally multichannel) OME-Zarr image; 3D is refused: cellcutter's
    network and crops are 2D."""
    import zarr

    src = Path(src)
    attrs, ngff = omezarr.read_image_attrs(src)
    volume = omezarr.read(src)
    if "t" in volume.axes and volume.data.shape[volume.axes.index("t")] != 1:
        raise InputError(f"{src}: has several time points; the cutter needs one 2D image")
    axes = volume.spatial_axes
    if axes != "yx":
        raise InputError(f"{src}: a {len(axes)}D image (axes {axes}); the cutter segments 2D "
                         "slides (y, x) only")
    level0 = str(omezarr.dataset_path(src, attrs["multiscales"][0]["datasets"][0]))
    arr = zarr.open_array(level0, mode="r")
    shape = tuple(int(volume.data.shape[volume.axes.index(a)]) for a in axes)
    chunks = tuple(int(c) for a, c in zip(volume.axes, arr.chunks, strict=True) if a in "yx")
    return SlideImage(src, attrs, ngff, volume, level0, axes, shape, chunks,  # type: ignore[arg-type]
                      np.dtype(arr.dtype))


# --------------------------------------------------------------------------- marker lists


@dataclass(frozen=True)
class PointsTask:
    """Block task: the nonzero pixels of a block of a point label image, ``(ids, y, x)``."""

    ref: Stored

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data = self.ref.read_region(block.write)
        ys, xs = np.nonzero(data)
        return (data[ys, xs].astype(np.int64), ys + block.write[0].start,
                xs + block.write[1].start)


def read_point_labels(client: Any, ref: Stored, name: str) -> np.ndarray:
    """Markers of a point label image, blockwise: ``(N, 3)`` int64 rows ``(id, y, x)`` sorted
    by id. Every id must be a single pixel."""
    from engine.runner import run_blocks

    block = tuple(max(c, min(s, 2048 // c * c or c)) for c, s in zip(ref.chunks, ref.shape,
                                                                      strict=True))
    grid = BlockGrid(ref.shape, block, chunks=ref.chunks)
    # streams: the blocks' points are concatenated as they arrive, no result per block kept
    rows = np.stack(run_blocks(client, grid, PointsTask(ref), name="read-markers",
                               combine=concatenate_tables).value, axis=1).astype(np.int64)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    ids, counts = np.unique(rows[:, 0], return_counts=True)
    if len(ids) and counts.max() > 1:
        bad = int(ids[counts.argmax()])
        raise InputError(f"markers {name!r}: id {bad} covers {int(counts.max())} pixels; give "
                         "a point image (one pixel per marker) from 'voxelmill cutter markers'")
    return rows


def read_csv_markers(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Markers from a CSV file: ``y,x`` or ``id,y,x`` per row (a header row is skipped);
    ``(N, 3)`` int64 rows ``(id, y, x)`` sorted by id."""
    rows: list[list[float]] = []
    try:
        with open(path, newline="") as fh:
            for i, row in enumerate(csv.reader(fh)):
                row = [c.strip() for c in row if c.strip()]
                if not row:
                    continue
                try:
                    rows.append([float(c) for c in row])
                except ValueError:
                    if i == 0:
                        continue  # header
                    raise InputError(f"{path}: line {i + 1}: expected numbers, got {row}"
                                     ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if not rows:
        return np.zeros((0, 3), np.int64)
    widths = {len(r) for r in rows}
    if widths not in ({2}, {3}):
        raise InputError(f"{path}: expected 2 (y,x) or 3 (id,y,x) columns on every row")
    arr = np.asarray(rows)
    if arr.shape[1] == 2:
        arr = np.column_stack([np.arange(1, len(arr) + 1), arr])
    out = np.floor(arr + 0.5).astype(np.int64)
    if (out[:, 0] < 1).any() or len(np.unique(out[:, 0])) != len(out):
        raise InputError(f"{path}: marker ids must be unique and ≥ 1")
    inside = ((out[:, 1] >= 0) & (out[:, 1] < shape[0]) & (out[:, 2] >= 0)
              & (out[:, 2] < shape[1]))
    if not inside.all():
        k = int(np.argmin(inside))
        raise InputError(f"{path}: marker {out[k, 0]} at ({out[k, 1]}, {out[k, 2]}) lies "
                         f"outside the image {shape}")
    return out[np.argsort(out[:, 0], kind="stable")]


@dataclass(frozen=True)
class MarkerIndex:
    """Markers saved for block tasks, bucketed by the block of a grid holding their pixel:
    a task reads the buckets its crops can reach, never the whole list (a scan of every
    marker by every block costs markers × blocks), and no process needs the whole list to
    write it (:class:`PointBuckets` writes each bucket from its block).

    Bucket ``(i, j)`` is the file ``folder/i_j.npy``: ``(K, 3)`` int64 rows ``(id, y, x)``
    sorted by id; no file for an empty bucket.
    """

    folder: str
    grid_block: tuple[int, int]
    grid_shape: tuple[int, int]

    @classmethod
    def create(cls, folder: str | Path, shape: tuple[int, int],
               grid_block: tuple[int, int]) -> MarkerIndex:
        """An empty index of ``shape`` in buckets of ``grid_block`` (its folder made anew)."""
        fresh_scratch(Path(folder))
        return cls(str(folder), tuple(grid_block),  # type: ignore[arg-type]
                   BlockGrid(shape, grid_block).grid_shape)

    def bucket_file(self, index: tuple[int, ...]) -> Path:
        return Path(self.folder) / f"{index[0]}_{index[1]}.npy"

    def save(self, index: tuple[int, ...], rows: np.ndarray) -> None:
        """Save bucket ``index``'s rows (any order; none: no file)."""
        rows = np.asarray(rows, np.int64).reshape(-1, 3)
        if len(rows):
            np.save(self.bucket_file(index), rows[np.argsort(rows[:, 0], kind="stable")])

    def write(self, rows: np.ndarray) -> None:
        """Save ``rows`` (``(N, 3)`` id, y, x inside the image) into their buckets."""
        rows = np.asarray(rows, np.int64).reshape(-1, 3)
        bucket = ((rows[:, 1] // self.grid_block[0]) * self.grid_shape[1]
                  + rows[:, 2] // self.grid_block[1])
        order = np.argsort(bucket, kind="stable")
        rows, bucket = rows[order], bucket[order]
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        for part, b in zip(np.split(rows, cuts), bucket[np.r_[0, cuts]] if len(rows) else [],
                           strict=True):
            self.save(divmod(int(b), self.grid_shape[1]), part)

    def near(self, region: tuple[slice, slice], crop: int) -> np.ndarray:
        """Rows ``(id, y, x)``, sorted by id, of the markers whose crop (``crop × crop``
        with the marker at ``(crop/2, crop/2)``: :func:`engine.cutter.crops.crop_box`)
        intersects ``region``."""
        h = crop // 2
        # a crop [y - h, y - h + crop) meets [start, stop) for y in (start + h - crop, stop + h)
        lo = [max(r.start + h - crop + 1, 0) // b for r, b in zip(region, self.grid_block,
                                                                   strict=True)]
        hi = [min((r.stop + h - 1) // b, g - 1) for r, b, g in
              zip(region, self.grid_block, self.grid_shape, strict=True)]
        parts = [np.zeros((0, 3), np.int64)]
        for index in itertools.product(range(lo[0], hi[0] + 1), range(lo[1], hi[1] + 1)):
            if self.bucket_file(index).exists():
                parts.append(np.load(self.bucket_file(index)))
        near = np.concatenate(parts)
        y, x = near[:, 1], near[:, 2]
        hit = ((y - h < region[0].stop) & (y - h + crop > region[0].start)
               & (x - h < region[1].stop) & (x - h + crop > region[1].start))
        near = near[hit]
        return near[np.argsort(near[:, 0], kind="stable")]


@dataclass(frozen=True)
class PointBuckets:
    """Block task of :func:`index_markers` over the index's grid: the markers of a point
    label image in the block, those in the foreground mask saved as the block's bucket;
    returns the table ``(ids, pixels, pixels in the mask)`` of every id in the block (ids
    sorted uint64) for the sharded check that each id is one pixel."""

    points: Stored
    mask: Stored
    index: MarkerIndex

    def __call__(self, block: Block) -> tuple[np.ndarray, ...]:
        data = np.asarray(self.points.read_region(block.write))
        ys, xs = np.nonzero(data)
        ids = data[ys, xs].astype(np.int64)
        inside = np.asarray(self.mask.read_region(block.write))[ys, xs] > 0
        y0, x0 = block.write[0].start, block.write[1].start
        self.index.save(block.index, np.column_stack([ids, ys + y0, xs + x0])[inside])
        table, counts = np.unique(ids.astype(np.uint64), return_counts=True)
        kept = np.bincount(np.searchsorted(table, ids[inside].astype(np.uint64)),
                           minlength=table.size)
        return table, counts.astype(np.int64), kept.astype(np.int64)


@dataclass(frozen=True)
class PointsSummary:
    """Shard ``finish`` of :func:`index_markers`: ``(ids, markers in the mask, the id
    covering the most pixels, its pixels, the largest id)``."""

    def __call__(self, table: tuple[np.ndarray, ...]
                 ) -> tuple[tuple[np.ndarray, ...], tuple[int, int, int, int, int]]:
        ids, counts, kept = table
        if not ids.size:
            return table, (0, 0, 0, 0, 0)
        worst = int(np.argmax(counts))
        return table, (int(ids.size), int(np.count_nonzero(kept)), int(ids[worst]),
                       int(counts[worst]), int(ids[-1]))


def check_marker_ids(largest: int, what: str) -> None:
    """Refuse marker ids that the cells' labels (uint32) cannot hold."""
    if largest > MAX_MARKER_ID:
        raise InputError(f"{what}: marker id {largest} does not fit the uint32 labels the "
                         f"cutter writes (ids up to {MAX_MARKER_ID}); renumber the markers")


def index_markers(client: Any, image: SlideImage, source: Stored | Path, spec: str,
                  mask: Stored, grid_block: tuple[int, int], folder: Path) -> tuple[MarkerIndex,
                                                                                    int]:
    """The markers of ``--markers`` that lie in the foreground ``mask``, bucketed for block
    tasks (:class:`MarkerIndex` in ``folder``), and how many they are.

    A point label image is read blockwise: each block saves its own bucket, and the check
    that every id is one pixel is a sharded per-id table (:mod:`engine.objtables`), so no
    process holds the whole list. A CSV file is read here, whole (it is one).
    """
    from engine.objtables import reduce_objects

    index = MarkerIndex.create(folder / "buckets", image.shape, grid_block)
    if isinstance(source, Path):
        rows = read_csv_markers(source, image.shape)
        if not len(rows):
            raise InputError(f"--markers {spec}: no markers")
        check_marker_ids(int(rows[:, 0].max()), f"--markers {spec}")
        rows = rows[in_mask(mask, rows)]
        index.write(rows)
        return index, len(rows)
    grid = BlockGrid(image.shape, grid_block)
    _, shards = reduce_objects(client, grid, PointBuckets(source, mask, index),
                               ("add", "add"), PointsSummary(), folder / "ids",
                               name="read-markers")
    n = sum(s[0] for s in shards)
    if not n:
        raise InputError(f"--markers {spec}: no markers")
    _, _, bad, pixels, _ = max(shards, key=lambda s: s[3])
    if pixels > 1:
        raise InputError(f"markers {spec!r}: id {bad} covers {pixels} pixels; give a point "
                         "image (one pixel per marker) from 'voxelmill cutter markers'")
    check_marker_ids(max(s[4] for s in shards), f"--markers {spec}")
    return index, sum(s[1] for s in shards)


def write_labels(image: SlideImage, client: Any, path: str, group: Path, name: str,
                 values: list[int] | None, progress: Callable[[], Any] | None) -> None:
    """Copy the level-0 label array ``path`` into ``group`` with the slide's pyramid (mode
    downsampling) and its ``image-label`` metadata (``values``: the ids to colour, or None)."""
    levels = plan_levels(image.shape, image.axes, image.voxel_size, image.chunks,
                         max_levels=image.n_levels)
    write_multiscale(client, zarr_source(path), group, name, image.axes, image.unit,
                     image.chunks, levels, image.ngff, "mode", progress)
    omezarr.write_group_attrs(group, {"image-label": omezarr.image_label(values, image.ngff)},
                              image.ngff)


def check_markers_source(image: SlideImage, spec: str) -> Stored | Path:
    """What ``--markers`` names: a CSV file, else a label image of ``image``."""
    if spec.lower().endswith(".csv"):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--markers {spec}: no such file")
        return path
    if not spec:
        raise OptionError("--markers: give a label name or a CSV file")
    return image.label(spec, "--markers")


def load_markers(client: Any, image: SlideImage, source: Stored | Path, spec: str
                 ) -> np.ndarray:
    """``(N, 3)`` rows ``(id, y, x)``; refuses an empty list."""
    rows = (read_csv_markers(source, image.shape) if isinstance(source, Path)
            else read_point_labels(client, source, spec))
    if not len(rows):
        raise InputError(f"--markers {spec}: no markers")
    return rows


def in_mask(mask: Stored, rows: np.ndarray) -> np.ndarray:
    """Whether each marker (rows ``(id, y, x)``) lies in the foreground (label > 0); each
    storage chunk holding markers is read once."""
    keep = np.zeros(len(rows), bool)
    if not len(rows):
        return keep
    cy, cx = rows[:, 1] // mask.chunks[0], rows[:, 2] // mask.chunks[1]
    for key in np.unique(np.column_stack([cy, cx]), axis=0):
        sel = (cy == key[0]) & (cx == key[1])
        y0, x0 = int(key[0]) * mask.chunks[0], int(key[1]) * mask.chunks[1]
        region = (slice(y0, min(y0 + mask.chunks[0], mask.shape[0])),
                  slice(x0, min(x0 + mask.chunks[1], mask.shape[1])))
        data = np.asarray(mask.read_region(region))
        keep[sel] = data[rows[sel, 1] - y0, rows[sel, 2] - x0] > 0
    return keep
