"""``voxelmill predict``: tiled inference over a whole OME-Zarr image, blockwise on the cluster.

Everything is checked before any compute (the image, the model and its metadata, the
channels, the voxel size, the tile, the destination). Normalization is global: the
checkpoint's mode with the statistics of this whole volume (one reduction pass), or the
statistics stored in the checkpoint (``norm="checkpoint"``) — never per block.

The model may also be a bioimage.io package (:mod:`engine.zoo.package`): it runs through
the same engine with its declared tile constraints, its halo as the minimum overlap of the
blended tiles, its preprocessing as global normalization (fixed statistics, or this whole
volume's) and its postprocessing as the activation; its own code runs only with
``trust_code``.

The blocks go to the GPU workers (several in flight on each) or, without any, to every
worker (:func:`engine.predict.task.device_dispatch`); each block task streams its block
through the model its worker process loaded once (:mod:`engine.predict.task`,
:mod:`engine.predict.block`) and writes the probabilities, the labels and the pyramid levels
that fit in the block straight into the output groups; the coarser levels are built from
the finest level the blocks did not write (resumable passes). Outputs, built in hidden
``.partial`` groups and renamed into place when complete::

    SRC/predictions/NAME    probabilities (uint8 0–255 or float16; c axis = model outputs),
                            NGFF image with a pyramid (mean)
    SRC/labels/NAME         binary foreground (uint8), a class map (class models) or, with
                            ``instances``, connected components labelled across blocks

Interrupted runs resume from their finished blocks (done-markers keyed by the model, the
image, the options and the layout).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__, events
from engine.blocks import BlockGrid, every_axis, stable_hash
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.budget import check_held, check_output_size
from engine.io.sources import file_identity, zarr_source
from engine.learn.normalize import ChannelStats, Normalization, compute_stats
from engine.output import (
    check_destination,
    check_output_name,
    create_multiscale,
    output_run,
    partial_path,
    write_multiscale,
)
from engine.predict.spill import Spill
from engine.predict.task import (
    OutputArrays,
    PredictTask,
    VolumeSource,
    device_dispatch,
    merge_reports,
    throughput,
)
from engine.predict.tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, TileGrid, blend_weights
from engine.pyramid import Level, build_pyramid, levels_within, plan_levels
from engine.runner import RunState, run_blocks
from engine.segment.refs import Stored
from engine.volume import convert_length

PROBABILITY_DTYPES = ("uint8", "float16")
NORM_SOURCES = ("volume", "checkpoint")
#: training and data voxel sizes further apart than this factor are refused
VOXEL_TOLERANCE = 1.5


@dataclass(frozen=True)
class PredictOptions:
    """Options of ``voxelmill predict`` (see its ``--help``)."""

    model: Path
    name: str
    tile: tuple[int, ...] | None = None
    overlap: float = DEFAULT_OVERLAP
    blend: str = DEFAULT_BLEND
    tta: bool = False
    batch: int | None = None  # tiles per call; None: from free device memory (GPU), 4 (CPU)
    threshold: float = 0.5
    instances: bool = False
    device: str = "auto"
    probabilities: str = "uint8"
    norm: str = "volume"
    block: tuple[int, ...] | None = None
    overwrite: bool = False
    trust_code: bool = False  # a bioimage.io package may run its own architecture code


@dataclass
class PredictPlan:
    source: Path
    options: PredictOptions
    meta: dict[str, Any]
    level0: str
    channels: tuple[int, ...]
    has_channel_axis: bool
    axes: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    block: tuple[int, ...]
    grid: TileGrid
    voxel_size: tuple[float, ...]
    unit: str
    ngff: str
    levels: list[Level]
    state: RunState

    @property
    def labels_destination(self) -> Path:
        return self.source / "labels" / self.options.name

    @property
    def probabilities_destination(self) -> Path:
        return self.source / "predictions" / self.options.name

    @property
    def out_channels(self) -> int:
        return int(self.meta["arch"]["out_channels"])


@dataclass
class PredictResult:
    labels: Path
    probabilities: Path
    n_objects: int | None
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)  # "stage-end" events


def _channels(meta: dict[str, Any], names: Sequence[str], n_channels: int | None,
              src: Path) -> tuple[int, ...]:
    wanted = list(meta["input"]["channels"])
    if n_channels is None:  # no channel axis: a single-channel image
        if len(wanted) != 1:
            raise InputError(f"{src}: has one channel, the model needs {len(wanted)} "
                             f"({', '.join(wanted)})")
        return (0,)
    if all(c in names for c in wanted):
        return tuple(list(names).index(c) for c in wanted)
    if n_channels == len(wanted):  # other names, same count: by position
        return tuple(range(n_channels))
    raise InputError(f"{src}: has {n_channels} channel(s) ({', '.join(names)}), the model "
                     f"needs {len(wanted)} ({', '.join(wanted)})")


def _check_voxel_size(meta: dict[str, Any], voxel: Sequence[float], unit: str,
                      src: Path) -> None:
    trained = meta.get("voxel_size")
    if not trained or len(trained) != len(voxel):
        return
    t = [convert_length(v, meta.get("unit", unit), unit) for v in trained]
    ratios = [v / w for v, w in zip(voxel, t, strict=True)]
    if any(r > VOXEL_TOLERANCE or r < 1 / VOXEL_TOLERANCE for r in ratios):
        raise InputError(
            f"{src}: voxel size {tuple(round(v, 4) for v in voxel)} {unit} is far from the "
            f"training voxel size {tuple(round(v, 4) for v in t)} {unit}; resample the image "
            "(voxelmill convert --voxel-size only relabels it) or train at this resolution")


def _package_tile(zoo: dict[str, Any], tile: tuple[int, ...], overlap: float, model: Path
                  ) -> tuple[tuple[int, ...], float]:
    """A bioimage.io package's tile constraints: a fixed tile, at least the minimum, and
    tiles overlapping by at least twice the output halo (the halo of each tile is left out
    of the blend, see :meth:`engine.predict.tiling.TileGrid.kept`)."""
    fixed, low, halo = zoo.get("fixed_shape"), zoo["min_shape"], zoo["halo"]
    if fixed and tuple(tile) != tuple(fixed):
        raise OptionError(f"--tile {tuple(tile)}: {model} takes tiles of {tuple(fixed)} only")
    if any(t < m for t, m in zip(tile, low, strict=True)):
        raise OptionError(f"--tile {tuple(tile)}: {model} needs tiles of at least "
                          f"{tuple(low)}")
    need = max(2 * h / t for h, t in zip(halo, tile, strict=True))
    if need >= 1:
        raise OptionError(f"--tile {tuple(tile)}: {model} has an output halo of {tuple(halo)}"
                          "; tiles must be more than twice as large")
    return tuple(tile), max(overlap, need)


def plan_prediction(src: str | Path, options: PredictOptions) -> PredictPlan:
    """Open and check everything; raise a ``VoxelmillError`` naming the problem."""
    import zarr

    from engine.blocks import check_block, default_block
    from engine.cutter.train import KIND as CUTTER_KIND
    from engine.learn.model import load_model
    from engine.zoo.package import is_package, load_package, rdf_file

    src = Path(src)
    attrs, ngff = omezarr.read_image_attrs(src)
    check_output_name(options.name, "membranes_unet")
    for value, choices, what in ((options.probabilities, PROBABILITY_DTYPES, "--probabilities"),
                                 (options.norm, NORM_SOURCES, "--norm")):
        if value not in choices:
            raise OptionError(f"{what} {value!r}: expected {' or '.join(choices)}")
    if not 0 < options.threshold < 1:
        raise OptionError(f"--threshold {options.threshold}: must be between 0 and 1")
    if options.batch is not None and options.batch < 1:
        raise OptionError(f"--batch {options.batch}: must be ≥ 1")
    if is_package(options.model):  # refuses packages it cannot run, or only with their code
        _, meta = load_package(options.model, "cpu", options.trust_code)
    else:
        _, meta = load_model(options.model)  # refuses foreign files and pickled code
    if meta.get("target", {}).get("kind") == CUTTER_KIND:
        raise InputError(f"{options.model}: a cellcutter model predicts one cell per marker; "
                         "run 'voxelmill cutter predict' with its markers and mask")
    volume = omezarr.read(src)
    if "t" in volume.axes and volume.shape[0] != 1:
        raise InputError(f"{src}: has several time points; predict needs one")
    axes = volume.spatial_axes
    dims = int(meta["arch"]["spatial_dims"])
    if len(axes) != dims:
        raise InputError(f"{src}: a {len(axes)}D image ({axes}), the model is {dims}D")
    has_c = "c" in volume.axes
    n_channels = volume.data.shape[volume.axes.index("c")] if has_c else None
    channels = _channels(meta, volume.channel_names, n_channels, src)
    _check_voxel_size(meta, volume.voxel_size, volume.unit, src)
    ms = attrs["multiscales"][0]
    level0 = str(omezarr.dataset_path(src, ms["datasets"][0]))
    arr = zarr.open_array(level0, mode="r")
    shape = tuple(int(volume.data.shape[volume.axes.index(a)]) for a in axes)
    chunks = tuple(int(c) for a, c in zip(volume.axes, arr.chunks, strict=True) if a in "zyx")
    tile = every_axis(options.tile or meta["patch_shape"], dims, "--tile")
    overlap = options.overlap
    if "zoo" in meta:
        tile, overlap = _package_tile(meta["zoo"], tile, overlap, options.model)
    grid = TileGrid.make(shape, tile, overlap, meta["divisor"],
                         meta["zoo"]["halo"] if "zoo" in meta else ())
    if "zoo" in meta and any(t < m for t, m in zip(grid.tile, meta["zoo"]["min_shape"],
                                                   strict=True)):
        raise InputError(f"{src}: shape {shape} is smaller than the smallest tile of "
                         f"{options.model} ({tuple(meta['zoo']['min_shape'])})")
    blend_weights(grid.tile, options.blend)  # checks the name
    # blocks of whole chunks, at least four tiles wide (each tile runs in one block, the
    # sums of those across a block edge are handed on: bands of < a tile per block face)
    if options.block:
        block = every_axis(options.block, dims, "--block")
        check_block(block, chunks, shape)
    else:
        block = tuple(max(b, c * -(-4 * t // c)) for b, c, t in
                      zip(default_block(chunks, shape), chunks, grid.tile, strict=True))
    block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    levels = plan_levels(shape, axes, tuple(volume.voxel_size), chunks,
                         max_levels=len(ms["datasets"]))
    _check_budgets(src, options, levels, block, len(channels), int(meta["arch"]["out_channels"]))
    check_destination(src / "labels" / options.name, options.overwrite)
    check_destination(src / "predictions" / options.name, options.overwrite)
    identity = {"op": "predict", "version": __version__, "input": file_identity(
        Path(level0) / "zarr.json") if (Path(level0) / "zarr.json").exists() else level0,
        "model": file_identity(rdf_file(options.model) if Path(options.model).is_dir()
                               else options.model), "options": {
            k: str(v) for k, v in options.__dict__.items() if k not in ("overwrite", "device")},
        "block": block, "grid": [grid.tile, grid.stride], "channels": channels,
        "tiles": "owned"}  # each tile in one block: no resuming a run that ran them twice
    state = RunState(partial_path(src / "labels" / options.name) / ".voxelmill",
                     stable_hash(identity), identity)
    return PredictPlan(src, options, meta, level0, channels, has_c, axes, shape, chunks, block,
                       grid, tuple(volume.voxel_size), volume.unit, ngff, levels, state)


def _stats(plan: PredictPlan, client: Any) -> ChannelStats:
    meta = plan.meta
    if plan.options.norm == "checkpoint" or meta["input"].get("fixed"):
        stored = meta["input"].get("stats") or []
        if not stored:
            raise InputError(f"{plan.options.model}: the checkpoint stores no normalization "
                             "statistics; use --norm volume")
        return ChannelStats.from_dict(stored[0])
    norm = Normalization.from_dict(meta["input"]["normalization"])
    import zarr

    arr = zarr.open_array(plan.level0, mode="r")
    prefix = (0,) if arr.ndim > len(plan.axes) + (1 if plan.has_channel_axis else 0) else ()
    # one stored reference per channel: the blockwise statistics' tasks carry it (a dask
    # array's graph would grow with the volume)
    data = [Stored(plan.level0, plan.shape, plan.chunks, np.dtype(arr.dtype),
                   (*prefix, c) if plan.has_channel_axis else prefix)
            for c in (plan.channels if plan.has_channel_axis else (0,))]
    stats = compute_stats(data, norm, client)
    eps = float(meta["input"].get("eps", 0.0))  # bioimage.io: (x - m) / (s + eps)
    return ChannelStats(stats.offset, tuple(s + eps for s in stats.scale)) if eps else stats


def _output_names(meta: dict[str, Any], k: int, name: str) -> list[str]:
    kind = meta["target"]["kind"]
    if kind == "classes" or "zoo" in meta:  # a package names its output channels
        return list(meta["target"]["classes"])[:k]
    return ["foreground", "boundary"][:k] if kind == "boundary" else [name]


def _grid_tiles(plan: PredictPlan) -> int:
    return int(np.prod([len(s) for s in plan.grid.starts()]))


def _check_budgets(src: Path, options: PredictOptions, levels: Sequence[Level],
                   block: Sequence[int], n_in: int, k: int) -> None:
    """Refuse outputs that cannot fit the free disk (``k`` probability channels of
    ``--probabilities`` and uint8 labels, every level; uint32 instances beside them) and a
    block a worker cannot hold (its float32 inputs, scores and blending weights)."""
    voxels = sum(math.prod(lv.shape) for lv in levels)
    per_voxel = k * np.dtype(options.probabilities).itemsize + 1 + 8 * options.instances
    check_output_size(src / "predictions" / options.name, voxels * per_voxel,
                      f"--probabilities {options.probabilities} × {k} model output"
                      f"{'s' if k != 1 else ''}{' --instances' if options.instances else ''}")
    check_held(math.prod(block) * (n_in + k + 1) * 4, f"--block {','.join(map(str, block))}",
               "a worker holds a whole block's float32 inputs, scores and weights")


def _create_outputs(plan: PredictPlan, group: Path, name: str, axes: str, chunks: tuple[int, ...],
                    levels: list[Level], method: str, dtype: str) -> list[str]:
    """The level arrays of an output group: created, or those of the run being resumed."""
    if (group / "0").exists():
        return [str(group / str(i)) for i in range(len(levels))]
    return create_multiscale(group, name, axes, plan.unit, chunks, levels, plan.ngff, method,
                             dtype)


def run_prediction(plan: PredictPlan, client: Any, progress: Callable[[], Any] | None = None,
                   report: Callable[[str], None] = print) -> PredictResult:
    """Predict the planned image blockwise and write probabilities and labels."""
    opts = plan.options
    with output_run("predict", [plan.labels_destination, plan.probabilities_destination],
                    state=plan.state, report=report, what="prediction",
                    client=client, inputs=[plan.source, plan.options.model]) as run:
        labels_partial = run.partial(plan.labels_destination)
        probs_partial = run.partial(plan.probabilities_destination)
        k = plan.out_channels
        prob_levels = plan_levels((k, *plan.shape), "c" + plan.axes, (1.0, *plan.voxel_size),
                                  (1, *plan.chunks), max_levels=len(plan.levels))
        prob_paths = _create_outputs(plan, probs_partial, opts.name, "c" + plan.axes,
                                     (1, *plan.chunks), prob_levels, "mean", opts.probabilities)
        # the levels a block writes from its own data (blocks aligned to 2^L chunks)
        within = levels_within(plan.levels, plan.chunks, plan.block)
        if opts.instances:  # the labels are labelled into instances after the pass
            label_paths = [str(run.work / "labels")]
            if not Path(label_paths[0]).exists():
                zarr_array(label_paths[0], plan.shape, plan.chunks)
        else:
            label_paths = _create_outputs(plan, labels_partial, opts.name, plan.axes,
                                          plan.chunks, plan.levels, "mode", "uint8")
        stats = _stats(plan, client)
        arr_ndim = len(plan.axes) + int(plan.has_channel_axis)
        import zarr

        prefix = (0,) if zarr.open_array(plan.level0, mode="r").ndim > arr_ndim else ()
        outputs = OutputArrays(tuple(prob_paths[:within + 1]),
                               tuple(label_paths[:1 if opts.instances else within + 1]),
                               tuple(lv.factors for lv in plan.levels[1:within + 1]))
        grid = BlockGrid(plan.shape, plan.block, chunks=plan.chunks)
        # each tile runs in the block holding its start; the sums it leaves in later blocks
        # wait in the scratch folder until those are done (engine/predict/spill.py)
        spill = Spill.plan(run.work / "spill", plan.grid, grid)
        task = PredictTask(str(Path(opts.model).resolve()), opts.device,
                           VolumeSource(plan.level0, plan.channels, plan.has_channel_axis,
                                        prefix),
                           plan.grid, opts.blend, opts.batch, opts.tta, stats.offset,
                           stats.scale, outputs, opts.probabilities, opts.threshold,
                           plan.meta["target"]["kind"], plan.chunks[0], opts.trust_code,
                           spill)
        gpus, resources, in_flight = device_dispatch(client)
        report(f"predicting {len(grid)} blocks of {plan.block} with tiles {plan.grid.tile} "
               f"(stride {plan.grid.stride}) on "
               f"{'the GPU workers ' + ', '.join(gpus) if gpus else 'every worker'}")
        t_pass = time.monotonic()
        blocks = run_blocks(client, grid, task, name="predict", state=plan.state,
                            progress=progress() if progress else None, resources=resources,
                            max_in_flight=in_flight, after=spill.producers,
                            on_done=spill.remove, combine=merge_reports)
        stats_report = throughput(blocks.value, time.monotonic() - t_pass, _grid_tiles(plan))
        stats_report["skipped_blocks"] = blocks.skipped
        stats_report["levels_in_blocks"] = within + 1
        for note in stats_report["notes"]:
            report(note)
        events.emit("device-report", stage="predict", **{
            key: stats_report[key] for key in ("voxels_per_s", "device_busy", "model_s",
                                               "input_wait_s", "output_wait_s", "read_s",
                                               "write_s", "handover_s", "tiles",
                                               "workers")})
        # the coarser levels: resumable passes from the finest level no block wrote whole
        build_pyramid(client, zarr_source(prob_paths[within]), probs_partial, prob_levels,
                      (1, *plan.chunks), method="mean", state=plan.state, progress=progress,
                      name=f"{opts.name}-pyramid", start=within)
        omezarr.write_group_attrs(probs_partial, {"omero": omezarr.omero(
            _output_names(plan.meta, k, opts.name),
            [(0.0, 255.0 if opts.probabilities == "uint8" else 1.0, 0.0,
              255.0 if opts.probabilities == "uint8" else 1.0)] * k)}, plan.ngff)
        n_objects = None
        values: list[int] | None = list(range(len(plan.meta["target"].get("classes", [0, 1]))
                                              if plan.meta["target"]["kind"] == "classes"
                                              else 2))
        if opts.instances:
            from engine.labels import label as label_components

            # the uint8 labels' path as the mask (non-zero = foreground), and the view as
            # a reference: block tasks carry both whole (a dask array's graph grows with
            # the block count)
            result = label_components(client, label_paths[0], str(run.work / "instances"),
                                      connectivity=1, lazy=True)
            label_data = result.source if result.source is not None else zarr_source(
                result.path)
            n_objects, values = result.n_objects, result.values
            write_multiscale(client, label_data, labels_partial, opts.name, plan.axes,
                             plan.unit, plan.chunks, plan.levels, plan.ngff, "mode", progress)
        else:
            build_pyramid(client, zarr_source(label_paths[within]), labels_partial,
                          plan.levels, plan.chunks, method="mode", state=plan.state,
                          progress=progress, name=f"{opts.name}-labels-pyramid", start=within)
        omezarr.write_group_attrs(labels_partial, {"image-label": omezarr.image_label(
            values, plan.ngff)}, plan.ngff)
        run.commit([plan.probabilities_destination, plan.labels_destination])
    omezarr.add_label_names(plan.source, [opts.name], plan.ngff)
    return PredictResult(plan.labels_destination, plan.probabilities_destination, n_objects,
                         run.record.seconds, stats_report, run.record.collector.stages)


def zarr_array(path: str, shape: tuple[int, ...], chunks: tuple[int, ...]) -> None:
    """An empty uint8 zarr array (level 0 of labels to be labelled later)."""
    import zarr

    zarr.open_array(path, mode="a", shape=shape, chunks=chunks, dtype=np.uint8, zarr_format=3)


def predict(src: str | Path, options: PredictOptions, client: Any,
            progress: Callable[[], Any] | None = None,
            report: Callable[[str], None] = print) -> PredictResult:
    """Plan and run a prediction."""
    return run_prediction(plan_prediction(src, options), client, progress, report)
