"""``voxelmill predict``: tiled inference over a whole OME-Zarr image, blockwise on the cluster.

Everything is checked before any compute (the image, the model and its metadata, the
channels, the voxel size, the tile, the destination). Normalization is global: the
checkpoint's mode with the statistics of this whole volume (one reduction pass), or the
statistics stored in the checkpoint (``norm="checkpoint"``) — never per block.

Each block task (asking for ``GPU=1`` when the cluster has GPU workers) takes the model
its worker process has loaded once (:mod:`engine.predict.workers`), predicts the tiles of
the global grid that overlap its write region in batches, blends them
(:mod:`engine.predict.tiling`) and writes the probabilities and the label of its write
region. Outputs, built in hidden ``.partial`` groups and renamed into place when complete::

    SRC/predictions/NAME    probabilities (uint8 0–255 or float16; c axis = model outputs),
                            NGFF image with a pyramid (mean)
    SRC/labels/NAME         binary foreground (uint8), a class map (class models) or, with
                            ``instances``, connected components labelled across blocks

Interrupted runs resume from their finished blocks (done-markers keyed by the model, the
image, the options and the layout).
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__, provenance
from engine.blocks import Block, BlockGrid, stable_hash
from engine.cluster import gpu_workers
from engine.errors import InputError, OptionError, VoxelmillError
from engine.io import omezarr
from engine.io.sources import file_identity
from engine.learn.normalize import ChannelStats, Normalization, apply_stats, compute_stats
from engine.output import (
    check_destination,
    check_output_name,
    commit_recorded,
    partial_path,
    write_multiscale,
)
from engine.predict.tiling import TileGrid, blend_weights, predict_region
from engine.pyramid import Level, plan_levels
from engine.runlock import output_lock
from engine.runner import RunState, run_blocks
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
    overlap: float = 0.25
    blend: str = "gaussian"
    tta: bool = False
    batch: int = 4
    threshold: float = 0.5
    instances: bool = False
    device: str = "auto"
    probabilities: str = "uint8"
    norm: str = "volume"
    block: tuple[int, ...] | None = None
    overwrite: bool = False


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


def _ints(values: Sequence[int] | int, n: int, what: str) -> tuple[int, ...]:
    if isinstance(values, int):
        return (values,) * n
    values = tuple(int(v) for v in values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise OptionError(f"{what} {values}: give 1 or {n} values")
    return values


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


def plan_prediction(src: str | Path, options: PredictOptions) -> PredictPlan:
    """Open and check everything; raise a ``VoxelmillError`` naming the problem."""
    import zarr

    from engine.blocks import check_block, default_block
    from engine.cutter.train import KIND as CUTTER_KIND
    from engine.learn.model import load_model

    src = Path(src)
    attrs, ngff = omezarr.read_image_attrs(src)
    check_output_name(options.name, "membranes_unet")
    for value, choices, what in ((options.probabilities, PROBABILITY_DTYPES, "--probabilities"),
                                 (options.norm, NORM_SOURCES, "--norm")):
        if value not in choices:
            raise OptionError(f"{what} {value!r}: expected {' or '.join(choices)}")
    if not 0 < options.threshold < 1:
        raise OptionError(f"--threshold {options.threshold}: must be between 0 and 1")
    if options.batch < 1:
        raise OptionError(f"--batch {options.batch}: must be ≥ 1")
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
    level0 = str(src / ms["datasets"][0]["path"])
    arr = zarr.open_array(level0, mode="r")
    shape = tuple(int(volume.data.shape[volume.axes.index(a)]) for a in axes)
    chunks = tuple(int(c) for a, c in zip(volume.axes, arr.chunks, strict=True) if a in "zyx")
    tile = _ints(options.tile or meta["patch_shape"], dims, "--tile")
    grid = TileGrid.make(shape, tile, options.overlap, meta["divisor"])
    blend_weights(grid.tile, options.blend)  # checks the name
    # blocks of whole chunks, at least four tiles wide: tiles across a block edge are
    # predicted by both neighbours, about tile / block of the work per axis
    if options.block:
        block = _ints(options.block, dims, "--block")
        check_block(block, chunks, shape)
    else:
        block = tuple(max(b, c * -(-4 * t // c)) for b, c, t in
                      zip(default_block(chunks, shape), chunks, grid.tile, strict=True))
    block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    check_destination(src / "labels" / options.name, options.overwrite)
    check_destination(src / "predictions" / options.name, options.overwrite)
    levels = plan_levels(shape, axes, tuple(volume.voxel_size), chunks,
                         max_levels=len(ms["datasets"]))
    identity = {"op": "predict", "version": __version__, "input": file_identity(
        Path(level0) / "zarr.json") if (Path(level0) / "zarr.json").exists() else level0,
        "model": file_identity(options.model), "options": {
            k: str(v) for k, v in options.__dict__.items() if k not in ("overwrite", "device")},
        "block": block, "grid": [grid.tile, grid.stride], "channels": channels}
    state = RunState(partial_path(src / "labels" / options.name) / ".voxelmill",
                     stable_hash(identity), identity)
    return PredictPlan(src, options, meta, level0, channels, has_c, axes, shape, chunks, block,
                       grid, tuple(volume.voxel_size), volume.unit, ngff, levels, state)


@dataclass
class PredictTask:
    """One block: read, normalize, predict the overlapping tiles, blend, write."""

    model: str
    device: str
    level0: str
    channels: tuple[int, ...]
    has_channel_axis: bool
    prefix: tuple[int, ...]
    shape: tuple[int, ...]
    grid: TileGrid
    blend: str
    batch: int
    tta: bool
    stats: ChannelStats
    prob_path: str
    label_path: str
    prob_dtype: str
    threshold: float
    kind: str

    def _read(self, box: tuple[slice, ...]) -> np.ndarray:
        from engine.io.chunkcache import read_chunked

        inner = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in
                      zip(box, self.shape, strict=True))
        pad = [(i.start - b.start, b.stop - i.stop) for b, i in zip(box, inner, strict=True)]
        parts = [read_chunked(self.level0, inner, self.prefix + ((c,) if self.has_channel_axis
                                                                  else ()))
                 for c in self.channels]
        image = apply_stats(np.stack(parts), self.stats)
        if any(a or b for a, b in pad):  # beyond the volume: 0, the normalized background
            image = np.pad(image, [(0, 0), *pad])
        return image

    def __call__(self, block: Block) -> dict[str, Any]:
        import zarr

        from engine.predict.workers import (
            TilePredictor,
            load_counts,
            use_worker_threads,
            worker_model,
        )

        t0 = time.perf_counter()
        model, meta, dev = worker_model(self.model, self.device)
        if dev.type == "cpu":
            use_worker_threads()
        predictor = TilePredictor(model, dev, meta["target"].get("activation", "sigmoid"),
                                  self.tta)
        reads = [0.0]

        def read(box: tuple[slice, ...]) -> np.ndarray:
            r0 = time.perf_counter()
            out = self._read(box)
            reads[0] += time.perf_counter() - r0
            return out

        weights = blend_weights(self.grid.tile, self.blend)
        t1 = time.perf_counter()
        probs = predict_region(predictor, read, self.grid, block.write, weights,
                               int(meta["arch"]["out_channels"]), self.batch)
        t2 = time.perf_counter()
        if self.prob_dtype == "uint8":
            stored = np.rint(np.clip(probs, 0, 1) * 255).astype(np.uint8)
        else:
            stored = probs.astype(np.float16)
        zarr.open_array(self.prob_path, mode="r+")[(slice(None), *block.write)] = stored
        if self.kind == "classes":
            label = probs.argmax(0).astype(np.uint8)
        else:  # binary and boundary models: the foreground channel
            label = (probs[0] > self.threshold).astype(np.uint8)
        zarr.open_array(self.label_path, mode="r+")[block.write] = label
        t3 = time.perf_counter()
        from distributed import get_worker

        try:
            worker = get_worker().address
        except ValueError:  # run outside a worker (tests calling the task directly)
            worker = socket.gethostname()
        return {"worker": worker, "voxels": int(np.prod(block.shape)),
                "tiles": len(self.grid.tiles_for(block.write)), "read_s": reads[0],
                "compute_s": (t2 - t1) - reads[0], "write_s": t3 - t2,
                "load_s": t1 - t0, "loads": load_counts().get(str(Path(self.model).resolve()),
                                                              0),
                "device": str(dev)}


def _stats(plan: PredictPlan, client: Any) -> ChannelStats:
    import dask.array as da

    meta = plan.meta
    if plan.options.norm == "checkpoint":
        stored = meta["input"].get("stats") or []
        if not stored:
            raise InputError(f"{plan.options.model}: the checkpoint stores no normalization "
                             "statistics; use --norm volume")
        return ChannelStats.from_dict(stored[0])
    norm = Normalization.from_dict(meta["input"]["normalization"])
    arr = da.from_zarr(plan.level0)
    prefix = (0,) if arr.ndim > len(plan.axes) + (1 if plan.has_channel_axis else 0) else ()
    if prefix:
        arr = arr[0]
    data = arr[list(plan.channels)] if plan.has_channel_axis else arr[None]
    return compute_stats(data, norm, client)


def _output_names(meta: dict[str, Any], k: int, name: str) -> list[str]:
    kind = meta["target"]["kind"]
    if kind == "classes":
        return list(meta["target"]["classes"])[:k]
    return ["foreground", "boundary"][:k] if kind == "boundary" else [name]


def throughput(results: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Voxels per second overall and per worker, the read / compute / write split and the
    share of the task time spent computing."""
    per: dict[str, dict[str, float]] = {}
    for r in results:
        w = per.setdefault(r["worker"], {"voxels": 0, "read_s": 0.0, "compute_s": 0.0,
                                         "write_s": 0.0, "load_s": 0.0, "blocks": 0})
        for k in ("voxels", "read_s", "compute_s", "write_s", "load_s"):
            w[k] += r[k]
        w["blocks"] += 1
    total = {k: sum(w[k] for w in per.values()) for k in ("voxels", "read_s", "compute_s",
                                                          "write_s", "load_s")}
    busy = total["read_s"] + total["compute_s"] + total["write_s"] + total["load_s"]
    return {
        "voxels": int(total["voxels"]), "seconds": round(seconds, 3),
        "voxels_per_s": round(total["voxels"] / seconds, 1) if seconds else None,
        "read_s": round(total["read_s"], 3), "compute_s": round(total["compute_s"], 3),
        "write_s": round(total["write_s"], 3), "load_s": round(total["load_s"], 3),
        "compute_fraction": round(total["compute_s"] / busy, 3) if busy else None,
        "workers": {a: {"blocks": int(w["blocks"]), "voxels_per_s": round(
            w["voxels"] / max(w["read_s"] + w["compute_s"] + w["write_s"] + w["load_s"],
                              1e-9), 1)} for a, w in sorted(per.items())},
    }


def run_prediction(plan: PredictPlan, client: Any, progress: Callable[[], Any] | None = None,
                   report: Callable[[str], None] = print) -> PredictResult:
    """Predict the planned image blockwise and write probabilities and labels."""
    with output_lock(plan.labels_destination, report=report), \
            output_lock(plan.probabilities_destination, report=report), \
            provenance.RunRecord("predict", plan.state.identity) as record:
        import dask.array as da
        import zarr

        opts = plan.options
        labels_partial = partial_path(plan.labels_destination)
        probs_partial = partial_path(plan.probabilities_destination)
        work = labels_partial / ".work"
        resumable = (plan.state.directory / plan.state.run_hash).exists()
        if resumable:
            report(f"resuming an interrupted prediction in {labels_partial}")
        else:
            for p in (labels_partial, probs_partial):
                shutil.rmtree(p, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        plan.state.begin()
        k = plan.out_channels
        prob_path, label_path = str(work / "probabilities"), str(work / "labels")
        zarr.open_array(prob_path, mode="a", shape=(k, *plan.shape), chunks=(1, *plan.chunks),
                        dtype=opts.probabilities, zarr_format=3)
        zarr.open_array(label_path, mode="a", shape=plan.shape, chunks=plan.chunks, dtype=np.uint8,
                        zarr_format=3)
        try:
            stats = _stats(plan, client)
            arr = zarr.open_array(plan.level0, mode="r")
            prefix = (0,) if arr.ndim > len(plan.axes) + int(plan.has_channel_axis) else ()
            task = PredictTask(str(Path(opts.model).resolve()), opts.device, plan.level0,
                               plan.channels, plan.has_channel_axis, prefix, plan.shape, plan.grid,
                               opts.blend, opts.batch, opts.tta, stats, prob_path, label_path,
                               opts.probabilities, opts.threshold, plan.meta["target"]["kind"])
            gpus = gpu_workers(client)
            report(f"predicting {len(BlockGrid(plan.shape, plan.block, chunks=plan.chunks))} "
                   f"blocks of {plan.block} with tiles {plan.grid.tile} (stride "
                   f"{plan.grid.stride}) on "
                   f"{'the GPU workers ' + ', '.join(gpus) if gpus else 'every worker'}")
            grid = BlockGrid(plan.shape, plan.block, chunks=plan.chunks)
            t_pass = time.monotonic()
            # one prediction at a time per worker (GPU=1 does it on GPU workers), using all of
            # the worker's threads for torch: dask starts workers with OMP_NUM_THREADS=1
            run = run_blocks(client, grid, task, name="predict", state=plan.state,
                             progress=progress() if progress else None,
                             resources={"GPU": 1} if gpus else None,
                             max_in_flight=len(gpus) if gpus else len(client.nthreads()))
            pass_s = time.monotonic() - t_pass
            stats_report = throughput(list(run.results.values()), pass_s)
            stats_report["skipped_blocks"] = run.skipped
            probs = da.from_zarr(prob_path)
            write_multiscale(client, probs, probs_partial, opts.name, "c" + plan.axes, plan.unit,
                             (1, *plan.chunks), plan_levels(
                                 (k, *plan.shape), "c" + plan.axes, (1.0, *plan.voxel_size),
                                 (1, *plan.chunks), max_levels=len(plan.levels)),
                             plan.ngff, "mean", progress)
            omezarr.write_group_attrs(probs_partial, {"omero": omezarr.omero(
                _output_names(plan.meta, k, opts.name),
                [(0.0, 255.0 if opts.probabilities == "uint8" else 1.0, 0.0,
                  255.0 if opts.probabilities == "uint8" else 1.0)] * k)}, plan.ngff)
            n_objects = None
            label_data = da.from_zarr(label_path)
            values: list[int] | None = list(range(len(plan.meta["target"].get("classes", [0, 1]))))
            if opts.instances:
                from engine.labels import label as label_components

                result = label_components(client, label_data > 0, str(work / "instances"),
                                          connectivity=1, lazy=True)
                label_data = result.view if result.view is not None else da.from_zarr(
                    str(result.path))
                n_objects, values = result.n_objects, result.values
            write_multiscale(client, label_data, labels_partial, opts.name, plan.axes, plan.unit,
                             plan.chunks, plan.levels, plan.ngff, "mode", progress)
            omezarr.write_group_attrs(labels_partial, {"image-label": omezarr.image_label(
                values, plan.ngff)}, plan.ngff)
        except VoxelmillError:
            shutil.rmtree(labels_partial, ignore_errors=True)
            shutil.rmtree(probs_partial, ignore_errors=True)
            raise
        shutil.rmtree(work)
        plan.state.clear()
        commit_recorded([(probs_partial, plan.probabilities_destination),
                         (labels_partial, plan.labels_destination)], record.entry())
        omezarr.add_label_names(plan.source, [opts.name], plan.ngff)
        return PredictResult(plan.labels_destination, plan.probabilities_destination, n_objects,
                             record.seconds, stats_report, record.collector.stages)


def predict(src: str | Path, options: PredictOptions, client: Any,
            progress: Callable[[], Any] | None = None,
            report: Callable[[str], None] = print) -> PredictResult:
    """Plan and run a prediction."""
    return run_prediction(plan_prediction(src, options), client, progress, report)
