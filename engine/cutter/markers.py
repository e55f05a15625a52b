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
pixel counts and coordinate sums reduced over blocks; the marker is the centroid rounded
half up, its id the label's id (for non-convex objects the centroid may lie outside).

Ids of blob markers are 1..n in raster order of their pixel, over the whole slide.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from engine import __version__
from engine.blocks import Block, BlockGrid, pad_read
from engine.cutter.common import SlideImage, open_slide
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.sources import zarr_source
from engine.labels import concatenate_rows, merge_by_id
from engine.learn.normalize import ChannelStats
from engine.output import check_destination, check_output_name, output_run, write_multiscale
from engine.pyramid import plan_levels
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


def merge_centroid_sums(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge two :class:`CentroidTask` tables ``(id, n, sum y, sum x)`` (ids sorted and
    unique in each) into one, summing the rows of an id in both (a ``combine`` for the
    runner: the client holds one row per marker, never one table per block)."""
    merged = merge_by_id(tuple(a.T), tuple(b.T), (np.add, np.add, np.add))
    return np.column_stack(merged).astype(np.int64).reshape(-1, 4)


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
    markers: np.ndarray  # (N, 3) id, y, x
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


def detect(plan: MarkerPlan, client: Any, progress: Callable[[], Any] | None = None
           ) -> np.ndarray:
    """The markers, ``(N, 3)`` rows ``(id, y, x)``, blockwise on the cluster."""
    from engine.runner import run_blocks

    opts = plan.options
    prog = progress() if progress else None
    if opts.from_labels is not None:
        grid = BlockGrid(plan.image.shape, plan.block)
        run = run_blocks(client, grid, CentroidTask(plan.source), name="centroids",
                         progress=prog, combine=merge_centroid_sums)
        return combine_centroids([run.value])
    stats = _normalization(plan, client)
    task = BlobTask(plan.source, opts.scale_sigma, float(opts.threshold), opts.window,
                    stats.offset[0], stats.scale[0])
    grid = BlockGrid(plan.image.shape, plan.block, halo=task.halo())
    yx = run_blocks(client, grid, task, name="blobs", progress=prog,
                    combine=concatenate_rows).value.reshape(-1, 2)
    yx = yx[np.lexsort((yx[:, 1], yx[:, 0]))]  # raster order over the slide: ids 1..n
    return np.column_stack([np.arange(1, len(yx) + 1), yx]).astype(np.int64)


def write_point_labels(image: SlideImage, rows: np.ndarray, group: Path, name: str,
                       client: Any, progress: Callable[[], Any] | None = None) -> None:
    """Write ``rows`` (id, y, x) as a point label image (uint32) with a pyramid into
    ``group``; the level-0 points are set on a sparse work array (only touched chunks are
    stored), then copied with the pyramid."""
    import zarr

    work = group / ".work"
    work.mkdir(parents=True, exist_ok=True)
    points = zarr.create_array(store=str(work / "points"), shape=image.shape,
                               chunks=image.chunks, dtype=np.uint32, fill_value=0,
                               zarr_format=3, overwrite=True)
    if len(rows):
        points.vindex[rows[:, 1], rows[:, 2]] = rows[:, 0].astype(np.uint32)
    levels = plan_levels(image.shape, image.axes, image.voxel_size, image.chunks,
                         max_levels=image.n_levels)
    write_multiscale(client, zarr_source(work / "points"), group, name, image.axes,
                     image.unit, image.chunks, levels, image.ngff, "mode", progress)
    values = [0, *(int(v) for v in rows[:, 0])] if len(rows) <= 10000 else None
    omezarr.write_group_attrs(group, {"image-label": omezarr.image_label(values, image.ngff)},
                              image.ngff)
    shutil.rmtree(work)


def write_csv(rows: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write("id,y,x\n")
        for i, y, x in rows:
            fh.write(f"{int(i)},{int(y)},{int(x)}\n")
    tmp.replace(path)


def run_markers(plan: MarkerPlan, client: Any, progress: Callable[[], Any] | None = None,
                report: Callable[[str], None] = print) -> MarkerResult:
    """Detect the markers and write the point label image (and the CSV)."""
    dst = plan.destination
    with output_run("cutter-markers", [dst], identity=plan.identity, report=report,
                    work=False, client=client) as run:
        rows = detect(plan, client, progress)
        if not len(rows):
            raise InputError(f"{plan.image.source}: no markers found (threshold "
                             f"{plan.options.threshold}); lower --threshold or check "
                             "--channel / --diameter")
        write_point_labels(plan.image, rows, run.partial(), plan.options.name, client,
                           progress)
        run.commit()
        omezarr.add_label_names(plan.image.source, [plan.options.name], plan.image.ngff)
        if plan.options.csv is not None:
            write_csv(rows, Path(plan.options.csv))
        return MarkerResult(dst, rows, plan.options.csv, run.record.seconds,
                            run.record.collector.stages)
