"""``voxelmill segment``: run a classic segmentation workflow and write NGFF labels.

Everything is checked before any compute (the image, the channel, the workflow, the label
name, the destination). The labels are built in a hidden ``labels/.NAME.partial`` group
with their own pyramid (mode downsampling) and renamed into place when complete; only then
is the name added to ``labels/``'s list, so an interrupted run leaves the image as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.blocks import check_block, default_block, stable_hash
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.budget import check_output_size
from engine.io.sources import file_identity
from engine.labels import LabelResult, label_values
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
from engine.segment.execute import Context, run_workflow
from engine.segment.refs import ArrayRef, Pointwise, Stored
from engine.segment.units import in_voxels, voxel_size_um
from engine.segment.workflow import Step, Workflow, load_workflow, parse_overrides
from engine.volume import select_channel


@dataclass
class SegmentOptions:
    """What the user chose. ``workflow`` is a YAML path or a preset name."""

    workflow: str
    name: str
    channel: str | int | None = None
    keep: tuple[str, ...] = ()
    block: tuple[int, ...] | None = None
    overwrite: bool = False
    params: tuple[str, ...] = ()
    """``--param KEY=VALUE``: a workflow parameter (``diameter_um=8``) or a step's
    (``smooth.sigma=2``)."""


@dataclass
class SegmentPlan:
    """Everything decided before compute."""

    source: Path
    options: SegmentOptions
    workflow: Workflow
    image: Stored  # level 0, spatial axes only (time point and channel fixed)
    axes: str
    voxel_size: tuple[float, ...]
    unit: str
    chunks: tuple[int, ...]
    block_shape: tuple[int, ...]
    ngff: str
    levels: list[Level]
    state: RunState

    @property
    def destination(self) -> Path:
        return self.source / "labels" / self.options.name

    @property
    def keep_destination(self) -> Path:
        return self.source / "intermediates" / self.options.name


@dataclass
class SegmentResult:
    destination: Path
    n_objects: int | None  # None: too many labels to count without a label step
    max_id: int | None
    dtype: str
    levels: list[tuple[int, ...]]
    kept: list[Path]
    seconds: float
    statistics: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)  # "stage-end" events


def plan_segmentation(src: str | Path, options: SegmentOptions) -> SegmentPlan:
    """Open and check everything; raise a ``VoxelmillError`` naming the problem."""
    import zarr

    src = Path(src)
    attrs, ngff = omezarr.read_image_attrs(src)
    workflow = load_workflow(options.workflow, overrides=parse_overrides(options.params))
    name = options.name
    check_output_name(name, "membranes")
    unknown = [k for k in options.keep if k not in {s.name for s in workflow.steps}]
    if unknown:
        raise OptionError(f"--keep {', '.join(unknown)}: no such step in workflow "
                          f"{workflow.name!r} (steps: {', '.join(s.name for s in workflow.steps)})")
    volume = omezarr.read(src)
    data, axes, prefix = select_channel(volume, options.channel)
    if not 2 <= len(axes) <= 3:
        raise InputError(f"{src}: segmentation needs a 2D or 3D image, not axes {axes!r}")
    # sizes given in µm become voxels of this image (checked like sizes written in voxels)
    workflow = in_voxels(workflow, volume.voxel_size, volume.unit)
    for step in workflow.steps:
        c = step.params.get("connectivity")
        if c is not None and c > len(axes):
            raise OptionError(f"{workflow.source}: step {step.name!r} ({step.function}): "
                              f"connectivity {c} is more than the image's {len(axes)} "
                              f"dimensions ({axes})")
    level0_path = str(omezarr.dataset_path(src, attrs["multiscales"][0]["datasets"][0]))
    level0 = zarr.open_array(level0_path, mode="r")
    full_axes = volume.axes
    chunks = tuple(int(c) for a, c in zip(full_axes, level0.chunks, strict=True) if a in "zyx")
    shape = tuple(int(s) for s in data.shape)
    block = tuple(options.block) if options.block else default_block(chunks, shape)
    check_block(block, chunks, shape)
    block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    scale = tuple(volume.voxel_size)
    levels = plan_levels(shape, axes, scale, chunks,
                         max_levels=len(attrs["multiscales"][0]["datasets"]))
    # the work folder holds a store per step (float32 at most), then the labels (uint64 at
    # most) and each --keep step's float32 image are written with their levels
    voxels, pyramid = math.prod(shape), sum(math.prod(lv.shape) for lv in levels)
    n = len(workflow.steps)
    check_output_size(src / "labels" / name,
                      voxels * 4 * n + pyramid * (8 + 4 * len(options.keep)),
                      f"--workflow {workflow.name} ({n} step{'s' if n != 1 else ''}"
                      f"{', --keep ' + ','.join(options.keep) if options.keep else ''})")
    check_destination(src / "labels" / name, options.overwrite)
    if options.keep:
        check_destination(src / "intermediates" / name, options.overwrite)
    image = Stored(level0_path, shape, chunks, np.dtype(level0.dtype), prefix)
    # what the finished blocks depend on: a different image, workflow or layout starts afresh
    identity = {"op": "segment", "version": __version__,
                "input": file_identity(Path(level0_path) / "zarr.json"), "prefix": prefix,
                "workflow": workflow.to_dict(), "block": block, "shape": shape,
                "dtype": str(level0.dtype)}
    state = RunState(partial_path(src / "labels" / name) / ".voxelmill", stable_hash(identity),
                     identity)
    return SegmentPlan(src, options, workflow, image, axes, scale, volume.unit, chunks, block,
                       ngff, levels, state)


def _as_label_source(result: Any) -> tuple[Any, int | None, int | None]:
    """The final output as a source of label values for block tasks (``read_region``,
    ``dtype``; never a dask array, whose graph every task would carry), its object count
    and largest id."""
    if isinstance(result, LabelResult):
        return result.source, result.n_objects, result.n_labels
    ref: ArrayRef = result
    return _as_uint8_labels(ref), None, (1 if np.dtype(ref.dtype) == bool else None)


def _as_uint8_labels(ref: ArrayRef) -> ArrayRef:
    """A mask as labels (uint8, 1 = foreground); any other reference as it is."""
    return Pointwise(pw.AsLabels(), (ref,), np.dtype(np.uint8)) \
        if np.dtype(ref.dtype) == bool else ref


def _write_multiscale(plan: SegmentPlan, client: Any, data: Any, group: Path, name: str,
                      method: str, progress: Callable[[], Any] | None,
                      levels: list[Level] | None = None) -> None:
    write_multiscale(client, data, group, name, plan.axes, plan.unit, plan.chunks,
                     levels or plan.levels, plan.ngff, method, progress)


def run_segmentation(plan: SegmentPlan, client: Any,
                     progress: Callable[[], Any] | None = None,
                     report: Callable[[str], None] = print) -> SegmentResult:
    """Run the planned workflow on the cluster and write the labels (and kept steps)."""
    dst = plan.destination
    # kept images are rewritten whole by every run
    with output_run("segment", [dst], state=plan.state, scratch=[plan.keep_destination],
                    report=report, what="segmentation", client=client,
                    inputs=[plan.source]) as run:
        partial, keep_partial = run.partial(), run.partial(plan.keep_destination)
        ctx = Context(client, run.work, plan.block_shape, progress, report, state=plan.state,
                      voxel_size_um=voxel_size_um(plan.voxel_size, plan.unit))
        kept: list[Path] = []

        def keep(step: Step, ref: Any) -> None:
            if isinstance(ref, LabelResult):  # kept label steps are stored, never lazy
                return
            data = _as_uint8_labels(ref)
            method = "mean" if step.kind == "image" else "mode"
            _write_multiscale(plan, client, data, keep_partial / step.name, step.name, method,
                              progress, plan.levels[:1])
            kept.append(plan.keep_destination / step.name)

        result = run_workflow(ctx, plan.workflow, plan.image, plan.options.keep, keep)
        data, n_objects, max_id = _as_label_source(result)
        _write_multiscale(plan, client, data, partial, plan.options.name, "mode", progress)
        if isinstance(result, LabelResult):  # the labelling listed its ids: no extra pass
            values = result.values
        else:
            values = label_values(client, partial / "0", plan.block_shape)
        if values is not None:
            max_id = max(values, default=0)
            n_objects = len([v for v in values if v])
        omezarr.write_group_attrs(partial, {"image-label": omezarr.image_label(values,
                                                                               plan.ngff)},
                                  plan.ngff)
        run.commit([dst, plan.keep_destination] if kept else [dst], recorded=[partial])
        omezarr.add_label_names(plan.source, [plan.options.name], plan.ngff)
        return SegmentResult(dst, n_objects, max_id, str(data.dtype),
                             [lv.shape for lv in plan.levels], kept, run.record.seconds,
                             ctx.stats_log, run.record.collector.stages)


def segment(src: str | Path, options: SegmentOptions, client: Any,
            progress: Callable[[], Any] | None = None,
            report: Callable[[str], None] = print) -> SegmentResult:
    """Segment the OME-Zarr image ``src`` with a workflow; write ``src/labels/NAME``."""
    return run_segmentation(plan_segmentation(src, options), client, progress, report)
