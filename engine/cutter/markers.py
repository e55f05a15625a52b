"""One marker per cell: blob detection on the nucleus channel, or centroids of nucleus labels.

**Blobs.** The nucleus channel is normalized with its global percentiles (1–99.8 %, one
reduction pass, :mod:`engine.learn.normalize`), so intensities are about 0 (background) to
1 (bright nuclei), then filtered with the scale-normalized negative Laplacian of Gaussian
``R = -σ² LoG(I, σ)`` (:func:`engine.segment.filters.spot_response`: scipy's
``gaussian_laplace``, mode ``reflect``, truncate 4). A disk of diameter ``D`` responds most
at ``σ = D / (2√2)``. A pixel ``p`` is a marker when

* ``R(p) > threshold``,
* ``R(p) ≥ R(q)`` for every ``q`` with ``max(|Δy|, |Δx|) ≤ min_distance`` inside the image
  (a maximum filter of size ``2 min_distance + 1``; non-maximum suppression), and
* no such ``q`` with ``R(q) = R(p)`` comes before ``p`` in raster order (plateaus give one
  marker per window, deterministically).

Each rule looks at ``p``'s window only, so a block with a halo of the LoG's support plus
``min_distance`` decides its pixels exactly as the whole image does (:func:`find_blobs` is
the whole-array function; on images without ties it equals
``skimage.feature.peak_local_max(R, min_distance, threshold_abs, exclude_border=False)``).

**Centroids.** Of an existing label image (e.g. nuclei from ``voxelmill segment``): per-label
pixel counts and coordinate sums, a sharded table merged on the workers
(:mod:`engine.objtables`); the marker is the centroid rounded half up, its id the label's id
(for non-convex objects the centroid may lie outside).

Ids of blob markers are 1..n in raster order of their pixel, over the whole slide: each
block saves its markers' raster keys, rows of blocks count them (:mod:`engine.ranks`), and
each block writes its own markers with their ranks. No process holds the list of markers:
the point image is written block by block, the CSV a row of blocks (or a shard of
centroids) at a time.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine import __version__
from engine.blocks import Block, BlockGrid, pad_read
from engine.cutter.common import (
    LISTED,
    SlideImage,
    check_marker_ids,
    open_slide,
    write_labels,
)
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.chunkfiles import write_region
from engine.learn.normalize import ChannelStats
from engine.output import check_destination, check_output_name, output_run
from engine.ranks import GroupCounts, Ranker, RankGrid
from engine.segment.filters import LOG_TRUNCATE, gaussian_radius, spot_response
from engine.segment.refs import Stored

DEFAULT_DIAMETER = 16.0


def sigma_for(diameter: float) -> float:
    """LoG scale that responds most to a disk of ``diameter`` pixels (2D: r = σ√2)."""
    return float(diameter) / (2 * math.sqrt(2))


def blob_response(image: np.ndarray, sigma: float, offset: float = 0.0, scale: float = 1.0
                  ) -> np.ndarray:
    """``-σ² LoG((image - offset) / scale)``, float64, same shape."""
    return spot_response((np.asarray(image, np.float64) - offset) / scale, sigma)


def _peaks(resp: np.ndarray, valid: np.ndarray, threshold: float, min_distance: int
           ) -> np.ndarray:
    """Marker pixels ``(K, 2)`` of ``resp`` by the module's rules; ``valid`` marks the
    pixels inside the image (the rest are never markers nor compared with)."""
    d = int(min_distance)
    r = np.where(valid, resp, -np.inf)
    mx = ndi.maximum_filter(r, size=2 * d + 1, mode="constant", cval=-np.inf)
    cand = np.argwhere(valid & (r >= mx) & (r > threshold))
    keep = np.ones(len(cand), bool)
    h, w = r.shape
    for k, (y, x) in enumerate(cand):
        y0, x0 = max(y - d, 0), max(x - d, 0)
        win = r[y0:min(y + d + 1, h), x0:min(x + d + 1, w)]
        ties = np.argwhere(win == r[y, x]) + (y0, x0)
        # an equal value earlier in raster order within the window wins
        if len(ties) > 1 and (ties[:, 0] * w + ties[:, 1]).min() < y * w + x:
            keep[k] = False
    return cand[keep]


def find_blobs(image: np.ndarray, sigma: float, threshold: float, min_distance: int,
               offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Whole-array blob markers: ``(K, 2)`` int64 ``(y, x)`` in raster order.

    Parameters
    ----------
    image : ndarray, shape (Y, X)
        The nucleus channel (any real dtype).
    sigma : float
        LoG scale in pixels.
    threshold : float
        Minimum response, in units of the normalized image.
    min_distance : int
        Half-width of the non-maximum suppression window (pixels, Chebyshev).
    offset, scale : float
        Normalization ``(image - offset) / scale``.
    """
    resp = blob_response(image, sigma, offset, scale)
    return _peaks(resp, np.ones(resp.shape, bool), threshold, min_distance).astype(np.int64)


@dataclass(frozen=True)
class BlobTask:
    """Block task: the blob markers whose pixel lies in the block's write region."""

    ref: Stored
    sigma: float
    threshold: float
    min_distance: int
    offset: float
    scale: float

    def halo(self) -> int:
        return gaussian_radius(self.sigma, LOG_TRUNCATE) + int(self.min_distance)

    def __call__(self, block: Block) -> np.ndarray:
        data = pad_read(self.ref.read_region(block.read), block, "symmetric")
        resp = blob_response(data, self.sigma, self.offset, self.scale)
        valid = np.zeros(resp.shape, bool)  # the padding is beyond the image: never compared
        valid[tuple(slice(a, n - b) for (a, b), n in zip(block.pad, resp.shape,
                                                         strict=True))] = True
        peaks = _peaks(resp, valid, self.threshold, self.min_distance)
        crop = block.crop
        inside = ((peaks[:, 0] >= crop[0].start) & (peaks[:, 0] < crop[0].stop)
                  & (peaks[:, 1] >= crop[1].start) & (peaks[:, 1] < crop[1].stop))
        origin = np.array([w.start - c.start for w, c in zip(block.write, crop, strict=True)])
        return (peaks[inside] + origin).astype(np.int64)


@dataclass(frozen=True)
class CentroidTask:
    """Block task: per-label pixel counts and coordinate sums of the write region."""

    ref: Stored

    def __call__(self, block: Block) -> np.ndarray:
        data = np.asarray(self.ref.read_region(block.write))
        ys, xs = np.nonzero(data)
        if not len(ys):
            return np.zeros((0, 4), np.int64)
        ids, inv = np.unique(data[ys, xs], return_inverse=True)
        n = np.bincount(inv)
        sy = np.bincount(inv, weights=ys + block.write[0].start)
        sx = np.bincount(inv, weights=xs + block.write[1].start)
        # exact integer sums (coordinates < 2^26, pixels per block < 2^26)
        return np.column_stack([ids.astype(np.int64), n, np.rint(sy), np.rint(sx)]
                               ).astype(np.int64)


def combine_centroids(parts: list[np.ndarray]) -> np.ndarray:
    """``(N, 3)`` rows ``(id, y, x)``: centroids (rounded half up) of the summed parts."""
    rows = np.concatenate([p for p in parts if len(p)] or [np.zeros((0, 4), np.int64)])
    if not len(rows):
        return np.zeros((0, 3), np.int64)
    ids, inv = np.unique(rows[:, 0], return_inverse=True)
    n = np.bincount(inv, weights=rows[:, 1])
    cy = np.bincount(inv, weights=rows[:, 2]) / n
    cx = np.bincount(inv, weights=rows[:, 3]) / n
    return np.column_stack([ids, np.floor(cy + 0.5), np.floor(cx + 0.5)]).astype(np.int64)


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class MarkerOptions:
    """Options of ``voxelmill cutter markers``."""

    name: str
    channel: str | None = None
    sigma: float | None = None
    diameter: float | None = None
    threshold: float = 0.1
    min_distance: int | None = None
    from_labels: str | None = None
    csv: Path | None = None
    block: tuple[int, ...] | None = None
    overwrite: bool = False

    @property
    def scale_sigma(self) -> float:
        if self.sigma is not None:
            return float(self.sigma)
        return sigma_for(self.diameter or DEFAULT_DIAMETER)

    @property
    def window(self) -> int:
        if self.min_distance is not None:
            return int(self.min_distance)
        return max(1, round(self.scale_sigma * math.sqrt(2)))  # the blob's radius


@dataclass
class MarkerPlan:
    image: SlideImage
    options: MarkerOptions
    source: Stored
    block: tuple[int, int]
    identity: dict[str, Any]

    @property
    def destination(self) -> Path:
        return self.image.source / "labels" / self.options.name


@dataclass
class MarkerResult:
    destination: Path
    n_markers: int
    csv: Path | None
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)


def plan_markers(src: str | Path, options: MarkerOptions) -> MarkerPlan:
    """Check everything before compute; raise a ``VoxelmillError`` naming the problem."""
    from engine.blocks import check_block, default_block

    image = open_slide(src)
    check_output_name(options.name, "markers")
    if options.sigma is not None and options.diameter is not None:
        raise OptionError("give --sigma or --diameter, not both")
    for value, what in ((options.sigma, "--sigma"), (options.diameter, "--diameter")):
        if value is not None and not value > 0:
            raise OptionError(f"{what} {value}: must be > 0")
    if options.min_distance is not None and options.min_distance < 1:
        raise OptionError(f"--min-distance {options.min_distance}: must be ≥ 1")
    if options.from_labels is not None:
        if options.from_labels == options.name:
            raise OptionError("--from-labels and --name must differ")
        source = image.label(options.from_labels, "--from-labels")
    else:
        if options.channel is None and "c" in image.volume.axes:
            raise OptionError(f"{image.source}: has several channels "
                              f"({', '.join(image.volume.channel_names)}); give the nucleus "
                              "channel with --channel")
        source = image.channel(options.channel)
    block = tuple(options.block) if options.block else default_block(image.chunks, image.shape)
    check_block(block, image.chunks, image.shape)
    block = tuple(min(b, s) for b, s in zip(block, image.shape, strict=True))
    check_destination(image.source / "labels" / options.name, options.overwrite)
    if options.csv is not None:
        check_destination(Path(options.csv), options.overwrite, file=True)
    identity = {"op": "cutter-markers", "version": __version__, "source": source.path,
                "prefix": source.prefix, "from_labels": options.from_labels,
                "sigma": options.scale_sigma, "threshold": options.threshold,
                "min_distance": options.window, "block": block}
    return MarkerPlan(image, options, source, block, identity)  # type: ignore[arg-type]


def _normalization(plan: MarkerPlan, client: Any) -> ChannelStats:
    from engine.learn.normalize import Normalization, compute_stats

    return compute_stats([plan.source], Normalization(), client)


# --------------------------------------------------------------------------- blockwise


def _block_file(folder: str | Path, index: tuple[int, ...], kind: str) -> Path:
    return Path(folder) / f"{kind}-{index[0]}_{index[1]}.npy"


@dataclass(frozen=True)
class SaveBlobs:
    """Block task: the block's blob markers (:class:`BlobTask`) saved as their sorted
    raster keys ``y · width + x`` (uint64); returns how many."""

    blobs: BlobTask
    shape: tuple[int, int]
    folder: str

    def __call__(self, block: Block) -> int:
        yx = self.blobs(block)
        keys = np.sort(np.ravel_multi_index((yx[:, 0], yx[:, 1]), self.shape)
                       ).astype(np.uint64)
        np.save(_block_file(self.folder, block.index, "keys"), keys)
        return len(keys)


@dataclass(frozen=True)
class SavedKeys:
    """``keys_of`` of the blobs' ranks (:class:`engine.ranks.GroupCounts`): a block's keys."""

    folder: str

    def __call__(self, index: tuple[int, ...]) -> tuple[np.ndarray, int]:
        return np.load(_block_file(self.folder, index, "keys")), 0


@dataclass(frozen=True)
class BlobRows:
    """A block's blob markers as rows ``(id, y, x)``: ids 1..n in raster order over the
    slide, from the ranks of their keys (slab ``offsets`` from the client)."""

    folder: str
    shape: tuple[int, int]
    ranks: RankGrid
    offsets: tuple[int, ...]

    def __call__(self, block: Block) -> np.ndarray:
        keys = np.load(_block_file(self.folder, block.index, "keys"))
        ids = Ranker(self.ranks, self.offsets).ranks_in(block.index, keys) + 1
        y, x = np.unravel_index(keys, self.shape)
        return np.column_stack([ids, y, x]).astype(np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class CentroidSums:
    """``partial`` of the centroids' sharded table: :class:`CentroidTask` as a table
    ``(ids, pixels, sum y, sum x)``."""

    ref: Stored

    def __call__(self, block: Block) -> tuple[np.ndarray, ...]:
        t = CentroidTask(self.ref)(block)
        return (t[:, 0].astype(np.uint64), *(t[:, i] for i in range(1, 4)))


@dataclass(frozen=True)
class CentroidBuckets:
    """Shard ``finish`` of the centroids: each object's centroid (rounded half up), kept as
    the table ``(ids, y, x)`` and saved in parts by the block of the grid holding it (a
    file per block and shard); returns the shard's count, its ids while few (else None)
    and its largest id."""

    folder: str
    block: tuple[int, int]
    limit: int

    def __call__(self, table: tuple[np.ndarray, ...]
                 ) -> tuple[tuple[np.ndarray, ...], tuple[int, list[int] | None, int]]:
        ids, n, sy, sx = table
        # ids past int64 would wrap here: refused after the merge (check_marker_ids)
        rows = combine_centroids([np.column_stack([ids.astype(np.int64), n, sy, sx])])
        bucket = [rows[:, 1] // self.block[0], rows[:, 2] // self.block[1]]
        for by, bx in {*zip(bucket[0].tolist(), bucket[1].tolist(), strict=True)}:
            part = rows[(bucket[0] == by) & (bucket[1] == bx)]
            np.save(Path(self.folder) / f"centroids-{by}_{bx}-{part[0, 0]}.npy", part)
        kept = (ids, rows[:, 1], rows[:, 2])
        return kept, (len(rows), ids.tolist() if len(rows) <= self.limit else None,
                      int(ids[-1]) if len(ids) else 0)


@dataclass(frozen=True)
class CentroidRows:
    """A block's centroid markers: the parts the shards saved for it, ``(id, y, x)``."""

    folder: str

    def __call__(self, block: Block) -> np.ndarray:
        parts = sorted(Path(self.folder).glob(
            f"centroids-{block.index[0]}_{block.index[1]}-*.npy"))
        return np.concatenate([np.zeros((0, 3), np.int64), *map(np.load, parts)])


@dataclass(frozen=True)
class WritePoints:
    """Block task: the block's markers (``rows_of(block)``) written as the point label
    image's pixels, and with ``folder`` saved there as rows for the CSV; returns how many."""

    rows_of: Callable[[Block], np.ndarray]
    out: str
    folder: str | None = None

    def __call__(self, block: Block) -> int:
        rows = self.rows_of(block)
        tile = np.zeros([w.stop - w.start for w in block.write], np.uint32)
        tile[rows[:, 1] - block.write[0].start, rows[:, 2] - block.write[1].start] = rows[:, 0]
        write_region(self.out, block.write, tile)
        if self.folder is not None:
            np.save(_block_file(self.folder, block.index, "rows"), rows)
        return len(rows)


def detect(plan: MarkerPlan, client: Any, work: Path, points: str,
           progress: Callable[[], Any] | None = None) -> tuple[int, Iterator[np.ndarray],
                                                                list[int] | None]:
    """Find the markers blockwise and write them into the point image ``points`` (uint32,
    level 0); no process holds the whole list.

    Returns the number of markers, the rows ``(id, y, x)`` in id order as an iterator of
    pieces (for the CSV: a row of blocks, or a shard, at a time) and the ids while at most
    :data:`engine.cutter.common.LISTED` (else None).
    """
    from engine.objtables import reduce_objects
    from engine.runner import Pass, run_blocks, run_passes

    opts = plan.options
    prog = progress() if progress else None
    shape, folder = plan.image.shape, str(work)
    grid = BlockGrid(shape, plan.block)
    if opts.from_labels is not None:
        table, shards = reduce_objects(
            client, grid, CentroidSums(plan.source), ("add", "add", "add"),
            CentroidBuckets(folder, plan.block, LISTED), work / "centroids",
            name="centroids", progress=prog, columns=3)
        check_marker_ids(max(top for *_, top in shards), f"--from-labels {opts.from_labels}")
        # the CSV comes from the shards (in id order), not from the blocks
        run_blocks(client, grid, WritePoints(CentroidRows(folder), points),
                   name="write-markers", progress=prog)
        n = sum(count for count, *_ in shards)
        listed = None if n > LISTED or any(i is None for _, i, _ in shards) else \
            [i for _, ids, _ in shards for i in ids]  # type: ignore[union-attr]
        pieces = (np.column_stack([t[0].astype(np.int64), t[1], t[2]]) for t in table.shards())
        return n, pieces, listed
    stats = _normalization(plan, client)
    blobs = BlobTask(plan.source, opts.scale_sigma, float(opts.threshold), opts.window,
                     stats.offset[0], stats.scale[0])
    ranks = RankGrid(shape, grid.block_shape, folder)
    ranks.make_folders()
    rows_of_slab = ranks.grid(0)
    _, counted = run_passes(client, [
        Pass(BlockGrid(shape, plan.block, halo=blobs.halo()), SaveBlobs(blobs, shape, folder),
             "blobs"),
        Pass(rows_of_slab, GroupCounts(ranks, 0, SavedKeys(folder)), "blob-ranks",
             needs={"blobs": lambda slab: ranks.blocks(0, slab.index)}, voxels=False)],
        progress=prog)
    counts = [counted.results[(s,)][0] for s in range(ranks.grid_shape[0])]
    offsets = tuple(int(o) for o in np.cumsum([0, *counts[:-1]]))
    n = int(sum(counts))
    run_blocks(client, grid, WritePoints(BlobRows(folder, shape, ranks, offsets), points,
                                         folder), name="write-markers", progress=prog)

    def by_rows_of_blocks() -> Iterator[np.ndarray]:
        # ids are raster ranks: a row of blocks holds a contiguous run of them
        for by in range(grid.grid_shape[0]):
            rows = np.concatenate([np.load(_block_file(folder, (by, bx), "rows"))
                                   for bx in range(grid.grid_shape[1])])
            yield rows[np.argsort(rows[:, 0], kind="stable")]

    return n, by_rows_of_blocks(), list(range(1, n + 1)) if n <= LISTED else None


def write_csv(pieces: Iterable[np.ndarray], path: Path) -> None:
    """Write the rows ``(id, y, x)`` of ``pieces`` (in order) as the CSV file ``path``."""
    with open(path, "w") as fh:
        fh.write("id,y,x\n")
        for rows in pieces:
            np.savetxt(fh, np.asarray(rows, np.int64).reshape(-1, 3), fmt="%d", delimiter=",")


def run_markers(plan: MarkerPlan, client: Any, progress: Callable[[], Any] | None = None,
                report: Callable[[str], None] = print) -> MarkerResult:
    """Detect the markers, write the point label image with its pyramid (and the CSV)."""
    import zarr

    image, dst = plan.image, plan.destination
    with output_run("cutter-markers", [dst], identity=plan.identity, report=report,
                    client=client, inputs=[image.source]) as run:
        points = str(run.work / "points")
        zarr.create_array(store=points, shape=image.shape, chunks=image.chunks,
                          dtype=np.uint32, fill_value=0, zarr_format=3, overwrite=True)
        n, pieces, listed = detect(plan, client, run.work, points, progress)
        if not n:
            raise InputError(f"{image.source}: no markers found (threshold "
                             f"{plan.options.threshold}); lower --threshold or check "
                             "--channel / --diameter")
        write_labels(image, client, points, run.partial(), plan.options.name,
                     None if listed is None else [0, *listed], progress)
        csv = None if plan.options.csv is None else Path(plan.options.csv)
        tmp = None
        if csv is not None:  # a name of its own beside the CSV: never a file of the user's
            fd, name = tempfile.mkstemp(prefix=f".{csv.name}.", suffix=".tmp", dir=csv.parent)
            os.close(fd)
            tmp = Path(name)
        try:
            if tmp is not None:  # from the work folder, which the commit removes
                write_csv(pieces, tmp)
                os.chmod(tmp, 0o644)  # as an open() file, not mkstemp's 0600
            run.commit()
            if tmp is not None:
                tmp.replace(csv)  # type: ignore[arg-type]
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        omezarr.add_label_names(image.source, [plan.options.name], image.ngff)
        return MarkerResult(dst, n, csv, run.record.seconds, run.record.collector.stages)
