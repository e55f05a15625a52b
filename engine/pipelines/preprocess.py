"""``voxelmill preprocess``: rescale an image (and its labels) and run a workflow's image steps.

MISIC's preparation of a brightfield image, blockwise: the image is first resampled so that
objects have the width a network was trained on (``scale = target width / object width``),
then a workflow whose output is an *image* (gamma, unsharp mask, shape index, invert ...)
runs on it through the segment executor; the result is a new float32 multiscale OME-Zarr
image with the chosen channels. ``--back`` carries labels predicted on the rescaled image
back onto the original image's grid.

Resampling equals ``scipy.ndimage.zoom(x, F, order=1, mode="nearest", grid_mode=True)`` on
the whole array (``order=0`` for labels): the output has ``round(n·F)`` voxels per axis and
output voxel ``o`` samples the input at ``(o + 0.5)·n_in/n_out − 0.5`` (voxel edges aligned,
so the field of view keeps its physical size), clamped to the edge voxels. Each block
computes its write region from the input region those coordinates fall in (plus the next
voxel: a 1-voxel halo), so any block layout gives the whole-array result. The voxel size is
multiplied by ``n_in/n_out`` (≈ divided by F).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.blocks import Region, check_block, default_block, stable_hash
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.budget import check_output_size
from engine.io.sources import file_identity
from engine.output import (
    check_destination,
    check_output_name,
    output_run,
    partial_path,
    write_multiscale,
)
from engine.pyramid import Level, plan_levels
from engine.runner import RunState
from engine.segment import pointwise as pw
from engine.segment.refs import ArrayRef, Pointwise, Stacked, Stored
from engine.segment.units import in_voxels, voxel_size_um
from engine.segment.workflow import Workflow, load_workflow
from engine.volume import Volume, select_channel

DEFAULT_TARGET_WIDTH = 10.0
"""MISIC's default: the network was trained on objects about 10 pixels wide."""


# --------------------------------------------------------------------------- resampling


def zoom_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, ...]:
    """Output shape of ``scipy.ndimage.zoom``: ``round(n·F)`` per axis (Python's round)."""
    return tuple(int(round(n * f)) for n, f in zip(shape, factors, strict=True))


def source_coordinates(n_in: int, n_out: int, start: int, stop: int) -> np.ndarray:
    """Input coordinates sampled by output voxels ``start..stop-1`` of one axis.

    As ``scipy.ndimage.zoom`` with ``grid_mode=True`` computes them (same float64
    operations, so order-0 picks are identical): ``(o + 0.5)·(n_in/n_out) − 0.5``, then
    clamped to ``[0, n_in − 1]`` (``mode="nearest"``).

    Returns
    -------
    ndarray of float64, shape (stop - start,)
    """
    zoom = n_in / n_out
    c = (np.arange(start, stop, dtype=np.float64) + 0.5) * zoom - 0.5
    return np.clip(c, 0.0, n_in - 1.0)


def _axis_plan(n_in: int, n_out: int, write: slice, order: int
               ) -> tuple[slice, np.ndarray, np.ndarray, np.ndarray]:
    """For one axis: the input read range, and per output voxel the two input indices
    (relative to that range) and the weight of the second (order 1), or the one index."""
    c = source_coordinates(n_in, n_out, write.start, write.stop)
    if order == 0:
        i0 = np.minimum(np.floor(c + 0.5).astype(np.int64), n_in - 1)
        i1, t = i0, np.zeros_like(c)
    else:
        i0 = np.floor(c).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        t = c - i0
    lo, hi = int(i0.min()), int(i1.max()) + 1
    return slice(lo, hi), i0 - lo, i1 - lo, t


def input_region(in_shape: Sequence[int], out_shape: Sequence[int], write: Region,
                 order: int = 1) -> Region:
    """The input voxels an output region needs (its source coordinates plus one voxel)."""
    return tuple(_axis_plan(n, m, w, order)[0]
                 for n, m, w in zip(in_shape, out_shape, write, strict=True))


def resample_region(read: Callable[[Region], np.ndarray], in_shape: Sequence[int],
                    out_shape: Sequence[int], write: Region, order: int = 1) -> np.ndarray:
    """Output voxels ``write`` of the zoom from ``in_shape`` to ``out_shape``.

    Parameters
    ----------
    read : callable
        ``read(region) -> ndarray``: input voxels of a region (any dtype).
    in_shape, out_shape : tuple of int
        Whole input and output shapes (spatial axes).
    write : tuple of slice
        The output region to compute.
    order : {0, 1}
        0: nearest neighbour (labels; the input dtype is kept); 1: linear interpolation,
        separable, in float64, returned as float32.

    Returns
    -------
    ndarray, shape of ``write``
        Equal to the same region of ``scipy.ndimage.zoom(x, out/in, order=order,
        mode="nearest", grid_mode=True)`` (order 1: within float32 rounding).
    """
    plans = [_axis_plan(n, m, w, order) for n, m, w in zip(in_shape, out_shape, write,
                                                           strict=True)]
    data = np.asarray(read(tuple(p[0] for p in plans)))
    if order == 0:
        return data[np.ix_(*(p[1] for p in plans))]
    out = data.astype(np.float64)
    for axis, (_, i0, i1, t) in enumerate(plans):
        shape = [1] * out.ndim
        shape[axis] = len(t)
        w = t.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32)


@dataclass(frozen=True)
class Resampled:
    """A lazy resampled view of an array reference (an :class:`~engine.segment.refs.ArrayRef`
    itself): a block reads only the input region its output region maps to.

    ``order`` 1 gives float32 (linear), 0 keeps the input dtype (nearest neighbour).
    """

    source: Any  # an ArrayRef
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    order: int = 1

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.order else np.dtype(self.source.dtype)

    def read_region(self, region: Region) -> np.ndarray:
        return resample_region(self.source.read_region, self.source.shape, self.shape,
                               region, self.order)


# --------------------------------------------------------------------------- options, plan


@dataclass
class PreprocessOptions:
    """What the user chose.

    ``scale`` is one factor or one per spatial axis; ``object_width`` (pixels) with
    ``target_width`` gives the factor ``target_width / object_width`` on every spatial axis.
    """

    workflow: str | None = None
    channels: tuple[str | int, ...] = ()
    scale: tuple[float, ...] | None = None
    object_width: float | None = None
    target_width: float = DEFAULT_TARGET_WIDTH
    labels: tuple[str, ...] = ()
    block: tuple[int, ...] | None = None
    overwrite: bool = False


@dataclass
class ChannelPlan:
    index: int | None  # None: the image has no channel axis
    name: str
    image: Stored  # the source channel, spatial axes only


@dataclass
class PreprocessPlan:
    """Everything decided before compute."""

    source: Path
    destination: Path
    options: PreprocessOptions
    workflow: Workflow | None
    channels: list[ChannelPlan]
    has_channel_axis: bool
    spatial_axes: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    factors: tuple[float, ...]
    voxel_size: tuple[float, ...]  # of the output
    unit: str
    chunks: tuple[int, ...]  # spatial chunks of the output
    block_shape: tuple[int, ...]  # output blocks of the workflow passes
    ngff: str
    levels: list[Level]  # of the output image (with the channel axis when there is one)
    label_levels: list[Level]
    labels: dict[str, Stored]
    identity: dict[str, Any]

    @property
    def partial(self) -> Path:
        return partial_path(self.destination)

    @property
    def axes(self) -> str:
        return ("c" if self.has_channel_axis else "") + self.spatial_axes

    def state(self, k: int) -> RunState:
        """Done-markers of channel ``k``'s workflow passes (one folder per channel, so the
        same step name on two channels never shares markers)."""
        return RunState(self.partial / ".voxelmill" / f"channel-{k}",
                        stable_hash(self.identity), self.identity)


@dataclass
class PreprocessResult:
    destination: Path
    shape: tuple[int, ...]
    channels: list[str]
    voxel_size: tuple[float, ...]
    unit: str
    factors: tuple[float, ...]
    levels: list[tuple[int, ...]]
    labels: list[str]
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)


def scale_factors(options: PreprocessOptions, ndim: int) -> tuple[float, ...]:
    """The zoom factor per spatial axis from ``--scale`` or ``--object-width``."""
    if options.scale is not None and options.object_width is not None:
        raise OptionError("give --scale or --object-width, not both")
    if options.object_width is not None:
        w, t = options.object_width, options.target_width
        if not (math.isfinite(w) and w > 0):
            raise OptionError(f"--object-width {w:g}: must be a positive number of pixels")
        if not (math.isfinite(t) and t > 0):
            raise OptionError(f"--target-width {t:g}: must be a positive number of pixels")
        return (t / w,) * ndim
    if options.scale is None:
        return (1.0,) * ndim
    scale = tuple(float(v) for v in options.scale)
    if len(scale) == 1:
        scale *= ndim
    if len(scale) != ndim:
        raise OptionError(f"--scale {','.join(f'{v:g}' for v in options.scale)}: give one "
                          f"factor or one per spatial axis ({ndim})")
    for v in scale:
        if not (math.isfinite(v) and v > 0):
            raise OptionError(f"--scale {v:g}: factors must be positive (e.g. 0.5 halves "
                              "the image, 2 doubles it)")
    return scale


def _level0(path: Path, attrs: dict[str, Any]) -> tuple[str, Any]:
    import zarr

    level0_path = str(omezarr.dataset_path(path, attrs["multiscales"][0]["datasets"][0]))
    return level0_path, zarr.open_array(level0_path, mode="r")


def _source_labels(src: Path, names: Sequence[str], spatial_shape: tuple[int, ...]
                   ) -> dict[str, Stored]:
    available = omezarr.label_names(src)
    out = {}
    for name in names:
        if name not in available:
            raise InputError(f"{src}: no label image {name!r} (labels: "
                             f"{', '.join(available) or 'none'})")
        attrs, _ = omezarr.read_attrs(src / "labels" / name)
        path, arr = _level0(src / "labels" / name, attrs)
        if tuple(arr.shape) != spatial_shape:
            raise InputError(f"{src}/labels/{name}: shape {tuple(arr.shape)} does not match the "
                             f"image's spatial shape {spatial_shape}")
        out[name] = Stored(path, tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))
    return out


def plan_preprocess(src: str | Path, dst: str | Path, options: PreprocessOptions
                    ) -> PreprocessPlan:
    """Open and check everything; raise a ``VoxelmillError`` naming the problem."""
    src, dst = Path(src), Path(dst)
    attrs, ngff = omezarr.read_image_attrs(src)
    workflow = None
    if options.workflow is not None:
        workflow = load_workflow(options.workflow, image_output=True)
        kind = workflow.kind(workflow.output)
        if kind != "image":
            raise OptionError(
                f"{workflow.source}: the output step {workflow.output!r} "
                f"({workflow.step(workflow.output).function}) produces {kind}, but "
                "'voxelmill preprocess' writes an image; end the workflow with an image step "
                "(gamma, unsharp_mask, shape_index, gaussian, normalize, invert ...), or use "
                "'voxelmill segment' for masks and labels")
    for name in options.labels:
        check_output_name(name, "cells")
    volume = omezarr.read(src)
    level0_path, level0 = _level0(src, attrs)
    has_c = "c" in volume.axes
    picks: list[str | int | None] = list(options.channels) or (
        list(range(volume.shape[volume.axes.index("c")])) if has_c else [None])
    channels: list[ChannelPlan] = []
    seen: set[int | None] = set()
    for pick in picks:
        data, axes, prefix = select_channel(volume, pick)
        index = prefix[-1] if has_c else None
        if index in seen:
            raise OptionError(f"--channel {pick}: chosen twice")
        seen.add(index)
        name = volume.channel_names[index] if has_c else src.name
        channels.append(ChannelPlan(index, name, Stored(level0_path, tuple(data.shape),
                                                        _spatial(volume, level0.chunks),
                                                        np.dtype(level0.dtype), prefix)))
    spatial = "".join(a for a in volume.axes if a in "zyx")
    if not 2 <= len(spatial) <= 3:
        raise InputError(f"{src}: preprocess needs a 2D or 3D image, not axes {volume.axes!r}")
    in_shape = channels[0].image.shape
    factors = scale_factors(options, len(in_shape))
    out_shape = zoom_shape(in_shape, factors)
    if any(n < 1 for n in out_shape):
        raise OptionError(f"scale {', '.join(f'{f:g}' for f in factors)} turns the "
                          f"{'×'.join(map(str, in_shape))} image into "
                          f"{'×'.join(map(str, out_shape))} voxels; use a larger factor")
    labels = _source_labels(src, options.labels, in_shape)
    voxel = tuple(v * n / m for v, n, m in zip(volume.voxel_size, in_shape, out_shape,
                                               strict=True))
    if workflow is not None:  # sizes in µm, in voxels of the image the workflow sees
        workflow = in_voxels(workflow, voxel, volume.unit)
    chunks = tuple(min(c, s) for c, s in zip(_spatial(volume, level0.chunks), out_shape,
                                             strict=True))
    block = tuple(options.block) if options.block else default_block(chunks, out_shape)
    check_block(block, chunks, out_shape)
    block = tuple(min(b, s) for b, s in zip(block, out_shape, strict=True))
    check_destination(dst, options.overwrite, src)
    full_shape = ((len(channels),) if has_c else ()) + out_shape
    # float32 voxels, a pyramid (at most 1/7 more in 3D, 1/3 in 2D) and uint labels
    voxels = math.prod(full_shape)
    if options.scale is not None:
        sized_by = f"--scale {','.join(f'{f:g}' for f in options.scale)}"
    elif options.object_width is not None:
        sized_by = (f"--object-width {options.object_width:g} --target-width "
                    f"{options.target_width:g}")
    else:
        sized_by = f"{src} (not rescaled)"
    check_output_size(dst, int(voxels * 4 * 4 / 3) + len(labels) * math.prod(out_shape) * 8,
                     sized_by)
    axes = ("c" if has_c else "") + spatial
    n_levels = len(attrs["multiscales"][0]["datasets"])
    levels = plan_levels(full_shape, axes, ((1.0,) if has_c else ()) + voxel,
                         ((1,) if has_c else ()) + chunks, max_levels=n_levels)
    label_levels = plan_levels(out_shape, spatial, voxel, chunks, max_levels=len(levels))
    identity = {"op": "preprocess", "version": __version__,
                "input": file_identity(_array_meta(Path(level0_path))),
                "channels": [c.image.prefix for c in channels],
                "workflow": workflow.to_dict() if workflow else None,
                "scale": factors, "shape": out_shape, "block": block,
                "dtype": str(level0.dtype)}
    return PreprocessPlan(src, dst, options, workflow, channels, has_c, spatial, in_shape,
                          out_shape, factors, voxel, volume.unit, chunks, block, ngff, levels,
                          label_levels, labels, identity)


def _array_meta(array: Path) -> Path:
    """The metadata file of a zarr array (v3 or v2): rewritten whenever the array is."""
    return array / "zarr.json" if (array / "zarr.json").exists() else array / ".zarray"


def _spatial(volume: Volume, values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for a, v in zip(volume.axes, values, strict=True) if a in "zyx")


# --------------------------------------------------------------------------- run


def _channel_image(plan: PreprocessPlan, k: int, client: Any,
                   progress: Callable[[], Any] | None, report: Callable[[str], None]) -> Any:
    """Channel ``k`` resampled and through the workflow: a lazy array reference."""
    from engine.segment.execute import Context, run_workflow

    channel = plan.channels[k]
    ref: ArrayRef | Resampled = channel.image
    if plan.out_shape != plan.in_shape:
        ref = Resampled(channel.image, plan.out_shape, plan.block_shape, order=1)
    if plan.workflow is None:
        return ref
    work = plan.partial / ".work" / f"channel-{k}"
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(client, work, plan.block_shape, progress, report, state=plan.state(k),
                  voxel_size_um=voxel_size_um(plan.voxel_size, plan.unit))
    report(f"channel {channel.name}: workflow {plan.workflow.name!r}")
    return run_workflow(ctx, plan.workflow, ref)


def run_preprocess(plan: PreprocessPlan, client: Any,
                   progress: Callable[[], Any] | None = None,
                   report: Callable[[str], None] = print) -> PreprocessResult:
    """Resample, run the workflow on every chosen channel and write the planned image."""
    from engine.labels import label_values
    from engine.stats import display_windows

    # one state per channel, so that its passes keep their done-markers apart; without a
    # workflow there are no passes to resume
    states = ([plan.state(k) for k in range(len(plan.channels))]
              if plan.workflow is not None else [])
    with output_run("preprocess", [plan.destination], state=states, identity=plan.identity,
                    report=report, what="preprocessing", client=client,
                    inputs=[plan.source]) as run:
        partial = run.partial()
        refs = [_channel_image(plan, k, client, progress, report)
                for k in range(len(plan.channels))]
        # read region by region (block tasks carry these references; a dask array's graph
        # would grow with the volume)
        f32 = np.dtype(np.float32)
        data = Stacked(tuple(refs), f32) if plan.has_channel_axis else \
            Pointwise(pw.AsType(f32), (refs[0],), f32)
        chunks = ((1,) if plan.has_channel_axis else ()) + plan.chunks
        write_multiscale(client, data, partial, plan.destination.name, plan.axes,
                         plan.unit, chunks, plan.levels, plan.ngff, "mean", progress)
        names = [c.name for c in plan.channels]
        windows = display_windows(partial / str(len(plan.levels) - 1), plan.axes,
                                  len(names))
        omezarr.write_group_attrs(partial, {"omero": omezarr.omero(names, windows)},
                                  plan.ngff)
        for name, lab in plan.labels.items():
            group = partial / "labels" / name
            view = Resampled(lab, plan.out_shape, plan.block_shape, order=0)
            write_multiscale(client, view, group, name,
                             plan.spatial_axes, plan.unit, plan.chunks, plan.label_levels,
                             plan.ngff, "mode", progress)
            values = label_values(client, group / "0", plan.block_shape)
            omezarr.write_group_attrs(group, {"image-label": omezarr.image_label(
                values, plan.ngff)}, plan.ngff)
        if plan.labels:
            omezarr.write_group_attrs(partial / "labels", {"labels": list(plan.labels)},
                                      plan.ngff)
        shutil.rmtree(partial / ".voxelmill", ignore_errors=True)  # the channels' states
        run.commit(recorded=[partial, *(partial / "labels" / n for n in plan.labels)])
        return PreprocessResult(plan.destination, plan.out_shape, names, plan.voxel_size,
                                plan.unit, plan.factors, [lv.shape for lv in plan.levels],
                                list(plan.labels), run.record.seconds,
                                run.record.collector.stages)


def preprocess(src: str | Path, dst: str | Path, options: PreprocessOptions, client: Any,
               progress: Callable[[], Any] | None = None,
               report: Callable[[str], None] = print) -> PreprocessResult:
    """Resample ``src`` and run a workflow's image steps on it; write the image ``dst``."""
    return run_preprocess(plan_preprocess(src, dst, options), client, progress, report)


# --------------------------------------------------------------------------- back


@dataclass
class BackPlan:
    """Labels of a rescaled image, to be written onto the original image's grid."""

    scaled: Path
    original: Path
    label: Stored
    name: str  # in the scaled image
    new_name: str  # in the original
    spatial_axes: str
    shape: tuple[int, ...]  # the original's spatial shape
    unit: str
    chunks: tuple[int, ...]
    block_shape: tuple[int, ...]
    ngff: str
    levels: list[Level]
    overwrite: bool

    @property
    def destination(self) -> Path:
        return self.original / "labels" / self.new_name


@dataclass
class BackResult:
    destination: Path
    shape: tuple[int, ...]
    n_labels: int | None  # distinct nonzero values, None when too many to list
    seconds: float


def plan_back(scaled: str | Path, original: str | Path, name: str, new_name: str | None = None,
              overwrite: bool = False) -> BackPlan:
    """Check the scaled image, its labels ``name`` and the original image; decide the grid.

    The two images must show the same field of view (shape × voxel size equal within one
    voxel per axis), as ``preprocess`` keeps it.
    """
    scaled, original = Path(scaled), Path(original)
    omezarr.read_image_attrs(scaled)
    attrs, ngff = omezarr.read_image_attrs(original)
    new_name = new_name or name
    check_output_name(new_name, "cells")
    small, big = omezarr.read(scaled), omezarr.read(original)
    label = _source_labels(scaled, [name], _spatial(small, small.shape))[name]
    spatial = big.spatial_axes
    if small.spatial_axes != spatial:
        raise InputError(f"{scaled}: spatial axes {small.spatial_axes!r} differ from "
                         f"{original}'s {spatial!r}")
    shape = _spatial(big, big.shape)
    for a, n_s, v_s, n_o, v_o in zip(spatial, label.shape, small.voxel_size, shape,
                                     big.voxel_size, strict=True):
        if abs(n_s * v_s - n_o * v_o) > max(v_s, v_o) * 1.001:
            raise InputError(
                f"{scaled} and {original} do not cover the same field of view on axis {a} "
                f"({n_s} × {v_s:g} vs {n_o} × {v_o:g} {big.unit}); give the image that "
                f"'voxelmill preprocess' rescaled as --into")
    _, level0 = _level0(original, attrs)
    chunks = tuple(min(c, s) for c, s in zip(_spatial(big, level0.chunks), shape, strict=True))
    block = default_block(chunks, shape)
    check_destination(original / "labels" / new_name, overwrite)
    levels = plan_levels(shape, spatial, big.voxel_size, chunks,
                         max_levels=len(attrs["multiscales"][0]["datasets"]))
    return BackPlan(scaled, original, label, name, new_name, spatial, shape, big.unit, chunks,
                    block, ngff, levels, overwrite)


def run_back(plan: BackPlan, client: Any, progress: Callable[[], Any] | None = None,
             report: Callable[[str], None] = print) -> BackResult:
    """Resample the labels (nearest neighbour) onto the original grid; write them there."""
    from engine.labels import label_values

    dst = plan.destination
    identity = {"op": "preprocess-back", "version": __version__, "scaled": str(plan.scaled),
                "labels": plan.name, "shape": plan.shape}
    with output_run("preprocess-back", [dst], identity=identity, report=report,
                    work=False, client=client, inputs=[plan.scaled]) as run:
        partial = run.partial()
        view = Resampled(plan.label, plan.shape, plan.block_shape, order=0)
        write_multiscale(client, view, partial, plan.new_name,
                         plan.spatial_axes, plan.unit, plan.chunks, plan.levels, plan.ngff,
                         "mode", progress)
        values = label_values(client, partial / "0", plan.block_shape)
        omezarr.write_group_attrs(partial, {"image-label": omezarr.image_label(
            values, plan.ngff)}, plan.ngff)
        run.commit()
        omezarr.add_label_names(plan.original, [plan.new_name], plan.ngff)
        n = None if values is None else len([v for v in values if v])
        return BackResult(dst, plan.shape, n, run.record.seconds)
