"""``voxelmill cutter predict``: each marker's mask, assembled into instance labels blockwise.

Each block task predicts the crop of every marker whose crop intersects its write region
(the markers within ``crop/2`` of it: the read region is the write region plus a ``crop/2``
halo, grown to whole crops), with the model its worker process loaded once
(:func:`engine.predict.workers.worker_model`), and gives each pixel of its write region to
the marker with the highest probability, if that probability is > ``threshold`` (0.5) and
the pixel is in the foreground mask; equal probabilities go to the lower id. Markers whose
pixel lies outside the mask are dropped (as in training): they mark no cell. A crop's
probabilities depend on the crop alone (the network runs on fixed-size batches padded
with empty crops, and its instance normalization is per crop), so every block computes
the same numbers for a marker and the labels do not depend on the block layout; they equal
:func:`assemble_whole`, the whole-image assembly without blocks.

Outputs (hidden ``.partial`` groups, renamed into place when complete; locked; provenance)::

    IMAGE/labels/NAME          instance labels (uint32): the marker ids
    IMAGE/labels/NAME_borders  uint8, 1 on a labelled pixel whose 4-neighbour (inside the
                               image) has another value, background included:
                               skimage.segmentation.find_boundaries(mode="inner",
                               connectivity=1); a second pass with a 1-pixel halo

``run_watershed`` is the classic baseline of the same inputs: the seeded watershed block
operation of ``voxelmill segment`` (:class:`engine.segment.watershed.SeededWatershed`) from
the same markers, inside the same mask, over one channel as the landscape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.blocks import Block, BlockGrid, every_axis, stable_hash
from engine.cutter.common import (
    LISTED,
    MarkerIndex,
    SlideImage,
    check_markers_source,
    index_markers,
    open_slide,
    write_labels,
)
from engine.cutter.crops import crop_box, network_inputs, read_channels, read_mask
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.budget import check_output_size
from engine.io.chunkfiles import write_region
from engine.io.sources import file_identity
from engine.labels import count_labels
from engine.learn.normalize import ChannelStats
from engine.output import (
    check_destination,
    check_output_name,
    output_run,
    partial_path,
)
from engine.predict.task import device_dispatch
from engine.runner import RunState, run_blocks
from engine.segment.refs import Stored


@dataclass(frozen=True)
class CutterPredictOptions:
    """Options of ``voxelmill cutter predict``."""

    model: Path
    markers: str
    mask: str
    name: str
    threshold: float = 0.5
    batch: int = 16
    device: str = "auto"
    block: tuple[int, ...] | None = None
    overwrite: bool = False


@dataclass
class CutterPredictPlan:
    image: SlideImage
    options: CutterPredictOptions
    meta: dict[str, Any]
    refs: list[Stored]
    mask: Stored
    markers_source: Stored | Path
    crop: int
    block: tuple[int, int]
    state: RunState

    @property
    def destination(self) -> Path:
        return self.image.source / "labels" / self.options.name

    @property
    def borders_destination(self) -> Path:
        return self.image.source / "labels" / f"{self.options.name}_borders"


@dataclass
class CutterPredictResult:
    labels: Path
    borders: Path
    markers: int
    n_objects: int
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)


def model_channels(image: SlideImage, meta: dict[str, Any]) -> list[Stored]:
    """The image channels the cutter model was trained on: by name, else by position."""
    wanted = list(meta["input"]["channels"])
    names = list(image.volume.channel_names)
    if "c" not in image.volume.axes:
        if len(wanted) != 1:
            raise InputError(f"{image.source}: has one channel, the model needs "
                             f"{len(wanted)} ({', '.join(wanted)})")
        return [image.channel(None)]
    if all(c in names for c in wanted):
        return [image.channel(c) for c in wanted]
    n = image.volume.data.shape[image.volume.axes.index("c")]
    raise InputError(f"{image.source}: has channels ({', '.join(names) or n}); the model "
                     f"needs {', '.join(wanted)}")


def load_cutter_meta(path: Path) -> dict[str, Any]:
    """The metadata of a cutter checkpoint; other models are refused."""
    from engine.learn.model import load_model

    _, meta = load_model(path)
    if meta.get("target", {}).get("kind") != "cutter":
        raise InputError(f"model {path}: not a cutter model (target "
                         f"{meta.get('target', {}).get('kind')!r}); train one with "
                         "'voxelmill cutter train'")
    return meta


def plan_cutter_prediction(src: str | Path, options: CutterPredictOptions) -> CutterPredictPlan:
    """Check everything before compute; raise a ``VoxelmillError`` naming the problem."""
    from engine.blocks import check_block

    image = open_slide(src)
    check_output_name(options.name, "cells")
    if not 0 < options.threshold < 1:
        raise OptionError(f"--threshold {options.threshold}: must be between 0 and 1")
    if options.batch < 1:
        raise OptionError(f"--batch {options.batch}: must be ≥ 1")
    meta = load_cutter_meta(Path(options.model))
    crop = int(meta["crop"])
    refs = model_channels(image, meta)
    mask = image.label(options.mask, "--mask")
    markers = check_markers_source(image, options.markers)
    if options.block:
        block = every_axis(options.block, 2, "--block")
        check_block(block, image.chunks, image.shape)
    else:  # blocks at least four crops wide: the halo's crops are predicted twice
        block = tuple(c * max(1, -(-4 * crop // c)) for c in image.chunks)
    block = tuple(min(b, s) for b, s in zip(block, image.shape, strict=True))
    for dst in (image.source / "labels" / options.name,
                image.source / "labels" / f"{options.name}_borders"):
        check_destination(dst, options.overwrite)
    # two uint32 label images (cells, borders), each with a pyramid (at most 1/3 more in 2D)
    check_output_size(image.source / "labels" / options.name,
                      math.prod(image.shape) * 4 * 2 * 4 // 3,
                      f"--markers {options.markers} ({'×'.join(map(str, image.shape))})")
    identity = {"op": "cutter-predict", "version": __version__,
                "input": file_identity(Path(image.level0) / "zarr.json")
                if (Path(image.level0) / "zarr.json").exists() else image.level0,
                "model": file_identity(Path(options.model)), "markers": options.markers,
                "mask": options.mask, "threshold": options.threshold, "block": block,
                "batch": options.batch}
    state = RunState(partial_path(image.source / "labels" / options.name) / ".voxelmill",
                     stable_hash(identity), identity)
    return CutterPredictPlan(image, options, meta, refs, mask, markers, crop,
                             block, state)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- computing


def predict_crops(model: Any, device: Any, inputs: np.ndarray, batch: int) -> np.ndarray:
    """Sigmoid probabilities ``(N, c, c)`` float32 of ``(N, C+1, c, c)`` inputs, in batches
    of exactly ``batch`` crops (the last padded with zeros), so that a crop's numbers never
    depend on which other crops share its batch."""
    import torch

    n = len(inputs)
    out = np.empty((n, *inputs.shape[2:]), np.float32)
    with torch.inference_mode():
        for s in range(0, n, batch):
            chunk = inputs[s:s + batch]
            if len(chunk) < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]),
                                                        np.float32)])
            y = torch.sigmoid(model(torch.from_numpy(chunk).to(device)).float())
            out[s:s + batch] = y[:min(batch, n - s), 0].cpu().numpy()
    return out


def assign(probs: np.ndarray, rows: np.ndarray, region: Sequence[slice], crop: int,
           mask: np.ndarray, threshold: float) -> np.ndarray:
    """Labels of ``region``: each pixel to the marker (rows sorted by id) with the highest
    probability, ties to the lower id, if above ``threshold`` and in ``mask``; uint32."""
    shape = tuple(r.stop - r.start for r in region)
    best = np.zeros(shape, np.float32)
    owner = np.zeros(shape, np.uint32)
    for (mid, y, x), p in zip(rows, probs, strict=True):
        box = crop_box(y, x, crop)
        lo = [max(b.start, r.start) for b, r in zip(box, region, strict=True)]
        hi = [min(b.stop, r.stop) for b, r in zip(box, region, strict=True)]
        if hi[0] <= lo[0] or hi[1] <= lo[1]:
            continue
        dst = (slice(lo[0] - region[0].start, hi[0] - region[0].start),
               slice(lo[1] - region[1].start, hi[1] - region[1].start))
        src = p[lo[0] - box[0].start:hi[0] - box[0].start,
                lo[1] - box[1].start:hi[1] - box[1].start]
        better = src > best[dst]  # strict: an equal later (higher) id does not take over
        best[dst][better] = src[better]
        owner[dst][better] = mid
    return np.where((best > threshold) & mask, owner, 0).astype(np.uint32)


def marker_inputs(refs: Sequence[Stored], stats: ChannelStats, rows: np.ndarray, crop: int,
                  shape: Sequence[int]) -> np.ndarray:
    """Network inputs of ``rows``' crops, read as one box around them."""
    if not len(rows):
        return np.zeros((0, len(refs) + 1, crop, crop), np.float32)
    h = crop // 2
    lo = rows[:, 1:].min(0) - h
    hi = rows[:, 1:].max(0) - h + crop
    box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))
    area = read_channels(refs, stats, box, shape)
    return network_inputs(area, rows[:, 1:] - h - lo, crop)


def assemble_whole(model: Any, device: Any, refs: Sequence[Stored], stats: ChannelStats,
                   mask: np.ndarray, rows: np.ndarray, crop: int, threshold: float = 0.5,
                   batch: int = 16) -> np.ndarray:
    """The whole-image assembly, without blocks (a reference): every marker's crop
    predicted once, the probabilities of all markers stacked over the image, the argmax
    over markers (first = lowest id on ties) kept where > ``threshold`` and in ``mask``."""
    shape = mask.shape
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    probs = predict_crops(model, device, marker_inputs(refs, stats, rows, crop, shape), batch)
    stack = np.full((len(rows), *shape), -1.0, np.float32)
    for k, ((_, y, x), p) in enumerate(zip(rows, probs, strict=True)):
        box = crop_box(y, x, crop)
        inner = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in
                      zip(box, shape, strict=True))
        stack[(k, *inner)] = p[tuple(slice(i.start - b.start, i.stop - b.start)
                                     for i, b in zip(inner, box, strict=True))]
    k = stack.argmax(0)
    best = np.take_along_axis(stack, k[None], 0)[0]
    ids = rows[:, 0].astype(np.uint32)[k]
    return np.where((best > threshold) & mask, ids, 0).astype(np.uint32)


@dataclass
class CutterTask:
    """One block: predict the crops of the markers near it, assign its pixels, write."""

    model: str
    device: str
    refs: tuple[Stored, ...]
    mask: Stored
    stats: ChannelStats
    markers: MarkerIndex
    shape: tuple[int, int]
    crop: int
    threshold: float
    batch: int
    out: str

    def __call__(self, block: Block) -> None:
        from engine.predict.workers import device_lock, use_worker_threads, worker_model

        model, _, dev = worker_model(self.model, self.device)
        if dev.type == "cpu":
            use_worker_threads()
        rows = self.markers.near(block.write, self.crop)  # type: ignore[arg-type]
        # reading and writing overlap other blocks of this worker; the device takes one
        # block at a time (engine.predict.task.device_dispatch puts several on a worker)
        inputs = marker_inputs(self.refs, self.stats, rows, self.crop, self.shape)
        with device_lock(dev):
            probs = predict_crops(model, dev, inputs, self.batch)
        mask = read_mask(self.mask, block.write, self.shape)
        labels = assign(probs, rows, block.write, self.crop, mask, self.threshold)
        write_region(self.out, block.write, labels)


def inner_borders(labels: np.ndarray) -> np.ndarray:
    """``find_boundaries(labels, connectivity=1, mode="inner")`` of a padded read region
    (edge-padded: the image border is no boundary); uint8."""
    out = np.zeros(labels.shape, bool)
    for axis in range(labels.ndim):
        diff = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return (out & (labels > 0)).astype(np.uint8)


@dataclass(frozen=True)
class BordersTask:
    """Block task: the inner borders of the stored labels (halo 1)."""

    labels: str
    out: str

    def __call__(self, block: Block) -> None:
        from engine.blocks import pad_read
        from engine.io.chunkcache import read_chunked

        data = pad_read(read_chunked(self.labels, block.read), block, "edge")
        write_region(self.out, block.write, inner_borders(data)[block.crop])


# --------------------------------------------------------------------------- the command


def run_cutter_prediction(plan: CutterPredictPlan, client: Any,
                          progress: Callable[[], Any] | None = None,
                          report: Callable[[str], None] = print) -> CutterPredictResult:
    """Predict blockwise and write the instance labels and their borders."""
    import zarr

    from engine.cutter.train import channel_stats

    opts = plan.options
    image = plan.image
    with output_run("cutter-predict", [plan.destination, plan.borders_destination],
                    state=plan.state, report=report, what="prediction",
                    client=client, inputs=[image.source, plan.options.model]) as run:
        partial = run.partial(plan.destination)
        borders_partial = run.partial(plan.borders_destination)
        work = run.work
        # a marker outside the mask is no cell
        markers, n_markers = index_markers(client, image, plan.markers_source, opts.markers,
                                           plan.mask, plan.block, work / "markers")
        stats = channel_stats(image, plan.refs, client)
        labels_path, borders_path = str(work / "labels"), str(work / "borders")
        zarr.open_array(labels_path, mode="a", shape=image.shape, chunks=image.chunks,
                        dtype=np.uint32, fill_value=0, zarr_format=3)
        zarr.create_array(store=borders_path, shape=image.shape, chunks=image.chunks,
                          dtype=np.uint8, fill_value=0, zarr_format=3, overwrite=True)
        gpus, resources, in_flight = device_dispatch(client)
        grid = BlockGrid(image.shape, plan.block, chunks=image.chunks)
        report(f"predicting {n_markers} markers' crops ({plan.crop}×{plan.crop}) in "
               f"{len(grid)} blocks of {plan.block} on "
               f"{'the GPU workers ' + ', '.join(gpus) if gpus else 'every worker'}")
        task = CutterTask(str(Path(opts.model).resolve()), opts.device, tuple(plan.refs),
                          plan.mask, stats, markers, image.shape,
                          plan.crop, opts.threshold, opts.batch, labels_path)
        run_blocks(client, grid, task, name="cutter-predict", state=plan.state,
                   progress=progress() if progress else None, resources=resources,
                   max_in_flight=in_flight)
        # counted from what is stored, so a resumed run counts the blocks it skipped
        n_cells, ids = count_labels(client, labels_path, plan.block, work / "count",
                                    limit=LISTED, progress=progress() if progress else None)
        run_blocks(client, BlockGrid(image.shape, plan.block, halo=1, chunks=image.chunks),
                   BordersTask(labels_path, borders_path), name="cutter-borders",
                   progress=progress() if progress else None)
        write_labels(image, client, labels_path, partial, opts.name,
                      None if ids is None else [0, *ids], progress)
        write_labels(image, client, borders_path, borders_partial,
                      f"{opts.name}_borders", [0, 1], progress)
        run.commit()
    omezarr.add_label_names(image.source, [opts.name, f"{opts.name}_borders"], image.ngff)
    return CutterPredictResult(plan.destination, plan.borders_destination, n_markers,
                               n_cells, run.record.seconds,
                               run.record.collector.stages)


# --------------------------------------------------------------------------- the baseline


@dataclass(frozen=True)
class WatershedOptions:
    """Options of ``voxelmill cutter watershed`` (the classic baseline)."""

    markers: str
    mask: str
    channel: str | None
    name: str
    halo: int = 32
    compactness: float = 0.0
    invert: bool = False
    block: tuple[int, ...] | None = None
    overwrite: bool = False


def run_watershed(src: str | Path, options: WatershedOptions, client: Any,
                  progress: Callable[[], Any] | None = None,
                  report: Callable[[str], None] = print) -> tuple[Path, int, float]:
    """Seeded watershed of ``--channel`` (bright = boundary; ``invert`` for dark
    boundaries) from the point markers, inside the mask, blockwise with ``halo``: the
    ``watershed`` step of ``voxelmill segment`` fed with the cutter's inputs. Returns the
    destination, the object count and the seconds."""
    from engine.blocks import check_block, default_block
    from engine.output import output_run
    from engine.segment import pointwise as pw
    from engine.segment.execute import Context, run_op
    from engine.segment.refs import Pointwise
    from engine.segment.watershed import SeededWatershed

    image = open_slide(src)
    check_output_name(options.name, "cells_ws")
    channel = image.channel(options.channel)
    markers = image.label(options.markers, "--markers")
    mask = image.label(options.mask, "--mask")
    # the cells carry the markers' ids: 64-bit markers give 64-bit cells (ids past
    # 2³²−1 would wrap in uint32), narrower ones the cutter's uint32
    op = SeededWatershed(compactness=options.compactness, halo_size=options.halo,
                         masked=True,
                         labels_dtype="uint64" if markers.dtype.itemsize > 4 else "uint32")
    block = tuple(options.block) if options.block else default_block(image.chunks, image.shape)
    check_block(block, image.chunks, image.shape)
    block = tuple(min(b, s) for b, s in zip(block, image.shape, strict=True))
    dst = image.source / "labels" / options.name
    check_destination(dst, options.overwrite)
    landscape: Any = Pointwise(pw.Negate(), (channel,), np.dtype(np.float32)) \
        if options.invert else channel
    identity = {"op": "cutter-watershed", "version": __version__, **{
        k: str(v) for k, v in options.__dict__.items() if k != "overwrite"}}
    with output_run("cutter-watershed", [dst], identity=identity, report=report,
                    client=client, inputs=[image.source]) as run:
        t0 = time.monotonic()
        ctx = Context(client, run.work, block, progress, report)
        out = run_op(ctx, "watershed", op, [landscape, markers, mask])
        n, ids = count_labels(client, out.path, block, run.work / "count", limit=LISTED,
                              progress=progress() if progress else None)
        write_labels(image, client, out.path, run.partial(), options.name,
                      None if ids is None else [0, *ids], progress)
        run.commit()
        omezarr.add_label_names(image.source, [options.name], image.ngff)
        return dst, n, time.monotonic() - t0
