"""Run a validated workflow over the cluster: one executor per step function.

Executors turn a step and its inputs (:mod:`engine.segment.refs`) into the step's output:
block operations run through :func:`engine.runner.run_blocks` with their declared halo and
store their result; global statistics come from reduction passes (:mod:`engine.stats` and
block reductions); voxel-wise steps become views; connected components and everything
built on them go through :mod:`engine.labels`. The algorithms themselves
(:mod:`engine.segment.filters` and friends) never see the cluster.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import labels as labelling
from engine import stats
from engine.blocks import Block, BlockGrid, Region, blocks_reading, pad_read
from engine.errors import InputError, OptionError
from engine.io.chunkfiles import write_region
from engine.objtables import reduce_objects
from engine.runner import Pass, RunReport, RunState, run_blocks, run_passes
from engine.segment import pointwise as pw
from engine.segment.blockops import BlockOp, BlockReduce, input_pad_modes
from engine.segment.filters import EdgePreservingStats, FilamentStats
from engine.segment.objects import (
    ExtremaSummary,
    ObjectExtrema,
    ObjectHistograms,
    ObjectOtsu,
    check_key_space,
    histogram_bits,
)
from engine.segment.refs import ArrayRef, Pointwise, Stored
from engine.segment.workflow import RAW, Step, Workflow


@dataclass
class Context:
    """What executors share: the cluster, a work folder, the block layout, progress."""

    client: Any
    work: Path
    block_shape: tuple[int, ...]
    progress: Callable[[], Any] | None = None
    log: Callable[[str], None] = lambda _msg: None
    stats_log: dict[str, Any] = field(default_factory=dict)
    state: RunState | None = None
    """Done-markers of the block passes that write images: a re-run of the same plan
    skips their finished blocks (see ``engine.pipelines.segment``)."""
    voxel_size_um: tuple[float, ...] | None = None
    """The image's voxel size in µm per spatial axis (``None``: unknown, distances are then
    measured in voxels)."""

    def new_progress(self) -> Any:
        return self.progress() if self.progress else None

    def path(self, name: str) -> Path:
        return self.work / name


# --------------------------------------------------------------------------- block passes


def _padded_inputs(op: BlockOp | BlockReduce, inputs: Sequence[Any], block: Block
                   ) -> list[np.ndarray]:
    """Each input's read region, padded beyond the volume edges with its mode."""
    return [pad_read(ref.read_region(block.read), block, mode)
            for ref, mode in zip(inputs, input_pad_modes(op, len(inputs)), strict=True)]


@dataclass(frozen=True)
class OpTask:
    """Block task: pad the inputs' read regions, apply the op, write the write region."""

    op: BlockOp
    inputs: tuple[Any, ...]
    out: str

    def __call__(self, block: Block) -> Any:
        result = self.op.interior(block.crop, *_padded_inputs(self.op, self.inputs, block))
        result = result.astype(self.op.dtype, copy=False)
        # every chunk is written: skip zarr's scan of each chunk for the fill value
        write_region(self.out, block.write, result, {"write_empty_chunks": True})
        # a float image is usually thresholded next: its range now saves a histogram pass
        return stats.value_range(result) if result.dtype.kind == "f" else None


@dataclass(frozen=True)
class ReduceTask:
    """Block task: the partial result of a block reduction."""

    op: BlockReduce
    inputs: tuple[Any, ...]

    def __call__(self, block: Block) -> Any:
        return self.op.partial(block.crop, *_padded_inputs(self.op, self.inputs, block))


def create_store(ctx: Context, name: str, shape: Sequence[int], dtype: Any) -> Stored:
    """An empty zarr array in the work folder, one chunk per block; on a resumed run the
    array already there (its finished blocks are kept)."""
    import zarr

    from engine.io.omezarr import compressor

    path = ctx.path(name)
    dtype = np.dtype(dtype)
    chunks = tuple(min(b, s) for b, s in zip(ctx.block_shape, shape, strict=True))
    if ctx.state is not None and (path / "zarr.json").exists():
        return Stored(str(path), tuple(shape), chunks, dtype)
    # float intermediates are incompressible noise to lz4: store them raw
    codecs = None if dtype.kind == "f" else compressor("lz4", 5, 3, dtype.itemsize)
    zarr.create_array(store=str(path), shape=tuple(shape), chunks=chunks, dtype=dtype,
                      fill_value=0, zarr_format=3, overwrite=True, compressors=codecs)
    return Stored(str(path), tuple(shape), chunks, dtype)


def _op_pass(ctx: Context, name: str, op: BlockOp, inputs: Sequence[ArrayRef]
             ) -> tuple[Pass, Stored]:
    """The pass that runs a block operation over the whole volume, and its output store."""
    shape = inputs[0].shape
    out = create_store(ctx, name, shape, op.dtype)
    grid = BlockGrid(shape, ctx.block_shape, halo=op.halo(len(shape)), chunks=out.chunks)
    return Pass(grid, OpTask(op, tuple(inputs), out.path), name,
                combine=stats.merge_range), out


def _op_result(ctx: Context, out: Stored, report: RunReport) -> Stored:
    """The stored output of a finished op pass, with its value range when every block was
    computed (float outputs: what a threshold's histogram needs)."""
    if report.skipped:
        ctx.log(f"{report.name}: {report.skipped} of {report.total} blocks already done")
    if out.dtype.kind != "f" or report.computed != report.total:  # no range from skipped
        return out
    return replace(out, extent=report.value)


def run_op(ctx: Context, name: str, op: BlockOp, inputs: Sequence[ArrayRef]) -> Stored:
    """Run a block operation over the whole volume; store its output."""
    spec, out = _op_pass(ctx, name, op, inputs)
    report = run_passes(ctx.client, [spec], state=ctx.state, progress=ctx.new_progress())[0]
    return _op_result(ctx, out, report)


def _stored_under(ref: Any) -> list[Stored]:
    """The stored arrays a reference reads (through voxel-wise views, which read the same
    region of their inputs)."""
    if isinstance(ref, Stored):
        return [ref]
    if isinstance(ref, Pointwise):
        return [s for r in ref.inputs for s in _stored_under(r)]
    return []


@dataclass(frozen=True)
class _ReadBy:
    """The blocks of ``grid`` that wrote what ``block``'s read region (halo included)
    covers."""

    grid: BlockGrid

    def __call__(self, block: Block) -> Any:
        return blocks_reading(self.grid, block.read)


def run_ops(ctx: Context,
            planned: Sequence[tuple[str, Callable[[dict[str, Stored]], tuple[BlockOp, Any]]]]
            ) -> list[Stored]:
    """Run a chain of block operations at once: a block of a later one starts as soon as
    the blocks of the earlier ones its read region covers (halo included) are stored.

    Parameters
    ----------
    planned : sequence of (name, plan)
        In order; ``plan(made)`` gives the op and its inputs, where ``made`` maps the
        names of the earlier ops to their outputs (:class:`Stored` arrays in ``ctx``'s
        work folder, still to be written).

    Returns
    -------
    list of Stored
        Each op's output, as :func:`run_op` returns it.
    """
    specs: list[Pass] = []
    outs: list[Stored] = []
    writers: dict[str, Pass] = {}  # output path -> the pass writing it
    made: dict[str, Stored] = {}
    for name, plan in planned:
        op, inputs = plan(dict(made))
        spec, out = _op_pass(ctx, name, op, inputs)
        for ref in inputs:
            for stored in _stored_under(ref):
                if stored.path in writers:
                    writer = writers[stored.path]
                    spec.needs[writer.name] = _ReadBy(writer.grid)
        writers[out.path] = spec
        made[name] = out
        specs.append(spec)
        outs.append(out)
    reports = run_passes(ctx.client, specs, state=ctx.state, progress=ctx.new_progress())
    return [_op_result(ctx, out, report) for out, report in zip(outs, reports, strict=True)]


def run_reduce(ctx: Context, name: str, op: BlockReduce, inputs: Sequence[ArrayRef]) -> Any:
    """Run a block reduction over the whole volume; its partials are merged on the client
    as blocks finish (``op.merge``), then finished (``op.finish``)."""
    shape = inputs[0].shape
    grid = BlockGrid(shape, ctx.block_shape, halo=op.halo(len(shape)))
    report = run_blocks(ctx.client, grid, ReduceTask(op, tuple(inputs)),
                        name=f"{name}-{uuid.uuid4().hex[:6]}", progress=ctx.new_progress(),
                        combine=op.merge)
    return op.finish(report.value)


# --------------------------------------------------------------------------- reductions


@dataclass(frozen=True)
class Moments(BlockReduce):
    """Count, min, max, mean and M2 of all voxels and of those inside ``window``.

    ``window = (lo, hi, closed)`` selects ``lo < v < hi`` (``closed``: ``lo <= v <= hi``);
    infinite ends are allowed.
    """

    window: tuple[float, float, bool] = (-math.inf, math.inf, True)

    def halo(self, ndim: int) -> tuple[int, ...]:
        return (0,) * ndim

    @staticmethod
    def _summary(v: np.ndarray) -> tuple[int, float, float, int, float]:
        """Count, min, max, exact sum (:func:`engine.stats.to_fixed`) and M2 of ``v``."""
        if v.size == 0:
            return 0, math.inf, -math.inf, 0, 0.0
        f = v.astype(np.float64)
        s = float(f.sum())
        return (int(v.size), float(f.min()), float(f.max()), stats.to_fixed(s),
                float(((f - s / f.size) ** 2).sum()))

    def partial(self, crop: Region, *images: np.ndarray) -> Any:
        v = stats.finite_values(images[0][crop].ravel())  # NaN and ±inf are not counted
        lo, hi, closed = self.window
        inside = (v >= lo) & (v <= hi) if closed else (v > lo) & (v < hi)
        return self._summary(v), self._summary(v[inside])

    @staticmethod
    def _merge(a: tuple, b: tuple) -> tuple:
        if not a[0]:
            return b
        if not b[0]:
            return a
        m2 = stats.chan_m2(a[0], stats.from_fixed(a[3]), a[4],
                           b[0], stats.from_fixed(b[3]), b[4])
        return a[0] + b[0], min(a[1], b[1]), max(a[2], b[2]), a[3] + b[3], m2

    @staticmethod
    def _result(summary: tuple) -> dict[str, float]:
        n, lo, hi, total, m2 = summary
        mean = stats.from_fixed(total) / n if n else math.nan
        return {"count": n, "min": lo, "max": hi, "mean": mean,
                "std": math.sqrt(max(m2, 0.0) / n) if n else math.nan}

    def merge(self, a: Any, b: Any) -> Any:
        return self._merge(a[0], b[0]), self._merge(a[1], b[1])

    def finish(self, merged: Any) -> tuple[dict[str, float], dict[str, float]]:
        return self._result(merged[0]), self._result(merged[1])


# --------------------------------------------------------------------------- executors


def _histogram(ctx: Context, ref: ArrayRef, moments: bool = False) -> stats.Histogram:
    # scikit-image's thresholds bin float images into 256 bins, integers by value
    bins = 256 if np.dtype(ref.dtype).kind == "f" else None
    return stats.histogram(ctx.client, ref, bins=bins,
                           extent=getattr(ref, "extent", None), moments=moments)


def _median(ctx: Context, ref: ArrayRef, hist: stats.Histogram) -> float:
    return float(stats.percentile(ctx.client, ref, 50, hist=hist))


def global_threshold(ctx: Context, ref: ArrayRef, method: str, *, value: float | None = None,
                     classes: int = 3, level: int = 1) -> float:
    """A threshold of the whole image from its global histogram (scikit-image's methods)."""
    if method == "absolute":
        return float(value)
    hist = _histogram(ctx, ref, moments=method == "mean")
    if method == "otsu":
        return stats.threshold_otsu(hist)
    if method == "triangle":
        return stats.threshold_triangle(hist)
    if method == "median":
        return _median(ctx, ref, hist)
    if method == "ave_tri_med":
        return (stats.threshold_triangle(hist) + _median(ctx, ref, hist)) / 2
    if method == "mean":
        return stats.threshold_mean(hist)
    if method == "yen":
        return stats.threshold_yen(hist)
    if method == "isodata":
        return stats.threshold_isodata(hist)
    if method == "multiotsu":
        return float(stats.threshold_multiotsu(hist, classes)[level - 1])
    raise OptionError(f"unknown threshold method {method!r}")


def ex_threshold(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    p = step.params
    t = global_threshold(ctx, ref, p["method"], value=p["value"], classes=p["classes"],
                         level=p["level"])
    if p["factor"] != 1.0:
        t = t * p["factor"]
    ctx.log(f"{step.name}: threshold {t:.6g} ({p['method']})")
    ctx.stats_log[step.name] = {"threshold": t}
    return Pointwise(pw.Greater(t), (ref,), np.dtype(bool))


def ex_normalize(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    scaling = tuple(step.params["scaling"])
    reset = None
    if len(scaling) == 1 and scaling[0] >= 1:  # Allen: an upper bound from 1 up
        reset = scaling[0]
        every, below = run_reduce(ctx, f"{step.name}-stats",
                                  Moments((-math.inf, reset, True)), [ref])
        lo = every["min"]
        hi = below["max"] if below["count"] < every["count"] else every["max"]
        if below["count"] == 0:
            hi = lo
    else:
        window = (-math.inf, math.inf, True) if len(scaling) != 4 else \
            (scaling[2], scaling[3], False)
        every, inside = run_reduce(ctx, f"{step.name}-stats", Moments(window), [ref])
        lo, hi = every["min"], every["max"]
        if len(scaling) == 2:
            lo = max(every["mean"] - scaling[0] * every["std"], lo)
            hi = min(every["mean"] + scaling[1] * every["std"], hi)
        elif len(scaling) == 4:
            if inside["count"] == 0:
                raise InputError(f"step {step.name!r} (normalize): no voxel lies between "
                                 f"{scaling[2]} and {scaling[3]}; adjust scaling")
            lo = max(scaling[2] - scaling[0] * inside["std"], lo)
            hi = min(scaling[3] + scaling[1] * inside["std"], hi)
    if not lo < hi:
        raise InputError(f"step {step.name!r} (normalize): scaling {list(scaling)} gives the "
                         f"empty range [{lo:.6g}, {hi:.6g}]; adjust it (the image ranges "
                         f"{every['min']:.6g}..{every['max']:.6g}, mean {every['mean']:.6g}, "
                         f"std {every['std']:.6g})")
    ctx.stats_log[step.name] = {"lo": lo, "hi": hi}
    return Pointwise(pw.Stretch(lo, hi, reset, every["min"]), (ref,), np.dtype(np.float32))


def ex_clip_percentiles(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    p = step.params
    lo, hi = stats.percentile(ctx.client, ref, [p["low"], p["high"]])
    ctx.stats_log[step.name] = {"lo": float(lo), "hi": float(hi)}
    return Pointwise(pw.Clip(float(lo), float(hi), p["rescale"]), (ref,), np.dtype(np.float32))


def plan_op(ctx: Context, step: Step, *inputs: ArrayRef) -> tuple[BlockOp, tuple[Any, ...]]:
    """The block operation of a step that needs nothing but its parameters, and what it
    reads."""
    return step.make_op(), inputs


def ex_block_op(ctx: Context, step: Step, *inputs: ArrayRef) -> ArrayRef:
    """A step that is one block operation (see :data:`OP_PLANS`): run it, store its
    output."""
    return run_op(ctx, step.name, *OP_PLANS[step.function](ctx, step, *inputs))


def ex_edge_preserving(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    op = step.make_op()
    # the conductance is scaled by the whole image's mean squared gradient (one pass)
    g2 = run_reduce(ctx, f"{step.name}-stats", EdgePreservingStats(op.slice_wise), [ref])
    ctx.stats_log[step.name] = {"mean_sq_gradient": float(g2)}
    return run_op(ctx, step.name, replace(op, mean_sq_gradient=float(g2)), [ref])


def ex_filament(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    op = step.make_op()
    l3_min = run_reduce(ctx, f"{step.name}-stats",
                        FilamentStats(op.scales, op.slice_wise, op.polarity), [ref])
    ctx.stats_log[step.name] = {"l3_min": [float(v) for v in l3_min]}
    return run_op(ctx, step.name, replace(op, l3_min=tuple(float(v) for v in l3_min)), [ref])


def plan_distance_transform(ctx: Context, step: Step, mask: ArrayRef
                            ) -> tuple[BlockOp, tuple[Any, ...]]:
    sampling = ctx.voxel_size_um
    if sampling is not None and len(sampling) != len(mask.shape):
        raise OptionError(f"step {step.name!r}: voxel size {list(sampling)} does not match "
                          f"the image's {len(mask.shape)} axes")
    return step.make_op(sampling=sampling), (mask,)


def ex_graph_cut(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    # cellcutter normalises by the whole image's range: take it in one pass
    every, _ = run_reduce(ctx, f"{step.name}-stats", Moments(), [ref])
    ctx.stats_log[step.name] = {"min": every["min"], "max": every["max"]}
    return run_op(ctx, step.name, step.make_op(lo=every["min"], hi=every["max"]), [ref])


def plan_watershed(ctx: Context, step: Step, image: ArrayRef, markers: ArrayRef,
                   mask: ArrayRef | None = None) -> tuple[BlockOp, tuple[Any, ...]]:
    op = step.make_op(masked=mask is not None, labels_dtype=str(markers.dtype))
    return op, (image, markers) + ((mask,) if mask is not None else ())


def _label(ctx: Context, name: str, mask: ArrayRef, *, connectivity: int | None,
           slice_wise: bool = False, min_size: int = 0, max_size: int | None = None,
           sequential: bool = False, lazy: bool = False) -> labelling.LabelResult:
    res = labelling.label(ctx.client, mask, ctx.path(name), connectivity=connectivity,
                          slice_wise=slice_wise, min_size=min_size, max_size=max_size,
                          sequential=sequential, block_shape=ctx.block_shape,
                          chunks=tuple(min(b, s) for b, s in zip(ctx.block_shape, mask.shape,
                                                                  strict=True)),
                          progress=ctx.new_progress(), lazy=lazy, state=ctx.state)
    ctx.log(f"{name}: {res.n_objects} objects")
    ctx.stats_log[name] = {"objects": res.n_objects, "max_id": res.n_labels}
    return res


def _stored(res: labelling.LabelResult, block_shape: tuple[int, ...]) -> ArrayRef:
    import zarr

    arr = zarr.open_array(str(res.path), mode="r")
    return Stored(str(res.path), tuple(arr.shape), tuple(arr.chunks), np.dtype(arr.dtype))


def _check_connectivity(step: Step, ndim: int, key: str = "connectivity") -> int | None:
    c = step.params.get(key)
    if c is not None and c > ndim:
        raise OptionError(f"step {step.name!r} ({step.function}): connectivity {c} is more "
                          f"than the image's {ndim} dimensions")
    return c


def ex_label(ctx: Context, step: Step, mask: ArrayRef, *, size: Step | None = None,
             lazy: bool = False) -> Any:
    p = step.params
    kw: dict[str, Any] = {}
    if size is not None:  # label → size_filter fused: one labelling, filtered on the way
        kw = {"min_size": size.params["min_size"], "max_size": size.params["max_size"],
              "sequential": size.params["relabel"]}
    res = _label(ctx, (size or step).name, mask,
                 connectivity=_check_connectivity(step, len(mask.shape)),
                 slice_wise=p["slice_wise"], lazy=lazy, **kw)
    return res if lazy else _stored(res, ctx.block_shape)


def ex_size_filter(ctx: Context, step: Step, ref: ArrayRef, kind: str) -> ArrayRef:
    p = step.params
    if kind == "mask":
        res = _label(ctx, step.name, ref, connectivity=_check_connectivity(step, len(ref.shape)),
                     min_size=p["min_size"], max_size=p["max_size"])
        return Pointwise(pw.NonZero(), (_stored(res, ctx.block_shape),), np.dtype(bool))
    if not isinstance(ref, Stored):
        raise OptionError(f"step {step.name!r}: size_filter needs stored labels")
    out = ctx.path(step.name)
    labelling.filter_sizes(ctx.client, ref.path, out, min_size=p["min_size"],
                           max_size=p["max_size"], relabel=p["relabel"],
                           progress=ctx.new_progress())
    return Stored(str(out), ref.shape, ref.chunks, ref.dtype)


def ex_fill_holes(ctx: Context, step: Step, mask: ArrayRef) -> ArrayRef:
    p = step.params
    background = Pointwise(pw.Not(), (mask,), np.dtype(bool))
    holes = _label(ctx, step.name, background,
                   connectivity=_check_connectivity(step, len(mask.shape)),
                   slice_wise=p["slice_wise"], min_size=p["min_size"], max_size=p["max_size"])
    return Pointwise(pw.Combine("or"), (mask, _stored(holes, ctx.block_shape)), np.dtype(bool))


def ex_masked_object(ctx: Context, step: Step, image: ArrayRef) -> ArrayRef:
    """The Allen segmenter's masked-object thresholding, with exact global statistics.

    Low level: global threshold (triangle, median or their mean), objects of at least
    ``object_min_size`` voxels (connectivity as given; 1 in Allen's code). High level:
    inside each object, ``image > otsu(object's voxels) * local_adjust``; the per-object
    Otsu comes from histograms merged over every block the object touches.
    """
    p = step.params
    t = global_threshold(ctx, image, p["global_method"])
    ctx.log(f"{step.name}: low-level threshold {t:.6g} ({p['global_method']})")
    low = Pointwise(pw.Greater(t), (image,), np.dtype(bool))
    objects = _stored(_label(ctx, f"{step.name}-objects", low,
                             connectivity=_check_connectivity(step, len(image.shape)),
                             min_size=p["object_min_size"]), ctx.block_shape)
    # per-object tables sharded on disk: neither the client nor a task holds all objects
    grid = BlockGrid(image.shape, ctx.block_shape, halo=(0,) * len(image.shape))
    tables = ctx.path(f"{step.name}-tables")
    extrema, summaries = reduce_objects(
        ctx.client, grid, ReduceTask(ObjectExtrema(), (image, objects)),
        ("minimum", "maximum"), ExtremaSummary(), tables / "extrema",
        name=f"{step.name}-extrema", progress=ctx.new_progress())
    dtype = np.dtype(image.dtype)
    bits = histogram_bits(dtype, max(w for _, _, w in summaries))
    check_key_space(step.name, max(top for _, top, _ in summaries), bits)
    thresholds, counts = reduce_objects(
        ctx.client, grid, ReduceTask(ObjectHistograms(extrema, bits), (image, objects)),
        ("add",), ObjectOtsu(extrema, bits, dtype.str, p["local_adjust"]), tables / "otsu",
        name=f"{step.name}-histograms", progress=ctx.new_progress(), align=1 << bits)
    ctx.stats_log[step.name] = {"threshold": t, "objects": sum(counts)}
    return Pointwise(pw.LocalThreshold(thresholds), (image, objects), np.dtype(bool))


def ex_combine(ctx: Context, step: Step, *masks: ArrayRef) -> ArrayRef:
    return Pointwise(pw.Combine(step.params["op"]), tuple(masks), np.dtype(bool))


def ex_invert(ctx: Context, step: Step, ref: ArrayRef, kind: str) -> ArrayRef:
    if kind == "mask":
        return Pointwise(pw.Not(), (ref,), np.dtype(bool))
    return Pointwise(pw.Negate(), (ref,), np.dtype(np.float32))


def ex_gamma(ctx: Context, step: Step, ref: ArrayRef) -> ArrayRef:
    if np.dtype(ref.dtype).kind in "iub":
        raise OptionError(f"step {step.name!r} (gamma) expects an image in [0, 1], not raw "
                          f"{np.dtype(ref.dtype)} intensities: put normalize or "
                          "clip_percentiles before it")
    # voxel-wise (halo 0): a view evaluated on read, never stored
    return Pointwise(step.make_op(), (ref,), np.dtype(np.float32))


@dataclass(frozen=True)
class Inside:
    """A boolean array that is ``True`` over the whole volume, read without storage.

    Padded with ``False`` beyond the volume edges (pad mode ``"constant"``), it tells an op
    which voxels of its padded read region lie in the volume (see
    :class:`~engine.segment.filters.ShapeIndex`)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype = np.dtype(bool)

    def read_region(self, region: Region) -> np.ndarray:
        return np.ones(tuple(s.stop - s.start for s in region), bool)


def plan_shape_index(ctx: Context, step: Step, ref: ArrayRef
                     ) -> tuple[BlockOp, tuple[Any, ...]]:
    op = step.make_op()
    axes = op.check_dims(len(ref.shape))  # refuse 3D without slice_wise before any work
    if any(ref.shape[a] < 2 for a in axes):
        raise InputError(f"step {step.name!r} (shape_index) needs at least 2 voxels along y "
                         f"and x, got an image of shape {list(ref.shape)}")
    return op, (ref, Inside(tuple(ref.shape), tuple(ref.chunks)))


# --------------------------------------------------------------------------- the workflow


def _fusable_label(wf: Workflow, step: Step, keep: Sequence[str]) -> Step | None:
    """The ``label`` parent of a ``size_filter`` on labels, when only it uses the labels."""
    if step.function != "size_filter" or wf.kind(step.inputs[0]) != "labels":
        return None
    if step.inputs[0] == RAW:
        return None
    parent = wf.step(step.inputs[0])
    if parent.function == "label" and wf.consumers(parent.name) == (step.name,) \
            and parent.name not in keep and parent.name != wf.output:
        return parent
    return None


def _op_chain(wf: Workflow, first: int, skip: set[str]) -> list[Step]:
    """The steps from ``wf.steps[first]`` on that are block operations each reading an
    earlier one's output (a straight chain, e.g. gaussian → spot filter), up to the
    workflow's output; one step when it starts none."""
    chain: list[Step] = []
    for step in wf.steps[first:]:
        if step.name in skip or step.function not in OP_PLANS or (
                chain and not set(step.inputs) & {s.name for s in chain}):
            break
        chain.append(step)
        if step.name == wf.output:
            break
    return chain


@dataclass(frozen=True)
class _Planned:
    """Plans a chained step once the outputs of the steps before it exist (``values``
    receives them as the chain is planned)."""

    ctx: Context
    step: Step
    values: dict[str, Any]

    def __call__(self, made: dict[str, Stored]) -> tuple[BlockOp, tuple[Any, ...]]:
        self.values.update(made)
        inputs = [self.values[name] for name in self.step.inputs]
        return OP_PLANS[self.step.function](self.ctx, self.step, *inputs)


def run_workflow(ctx: Context, wf: Workflow, raw: ArrayRef,
                 keep: Sequence[str] = (),
                 on_result: Callable[[Step, ArrayRef], None] | None = None) -> Any:
    """Execute ``wf`` on ``raw``; return the output step's result.

    The output is an :class:`ArrayRef`, or — when the output step is connected-component
    labelling — a lazy :class:`~engine.labels.LabelResult` view, so that the final
    relabelling is fused with writing the label pyramid. ``on_result`` is called for
    every step named in ``keep``.
    """
    physical = [f"{s.name}.{p}" for s in wf.steps for p in s.physical]
    if physical:
        raise InputError(f"{wf.source}: {', '.join(physical)} in physical units: convert "
                         "the workflow with the image's voxel size first (units.in_voxels)")
    values: dict[str, ArrayRef] = {RAW: raw}
    fused = {parent.name: step for step in wf.steps
             if (parent := _fusable_label(wf, step, keep)) is not None}
    skip = set(fused)
    for i, step in enumerate(wf.steps):
        if step.name in skip:
            continue
        chain = _op_chain(wf, i, skip)
        if len(chain) > 1:  # block ops reading each other's output: one sweep
            for s in chain:
                ctx.log(f"step {s.name} ({s.function})")
            results = run_ops(ctx, [(s.name, _Planned(ctx, s, values)) for s in chain])
            for s, result in zip(chain, results, strict=True):
                values[s.name] = result
                skip.add(s.name)
                if s.name in keep and on_result is not None:
                    on_result(s, result)
            if chain[-1].name == wf.output:
                return values[wf.output]
            continue
        final = step.name == wf.output
        ctx.log(f"step {step.name} ({step.function})")
        f = step.function
        if f == "size_filter" and step.inputs[0] in fused:
            label_step = wf.step(step.inputs[0])
            result = ex_label(ctx, label_step, values[label_step.inputs[0]], size=step,
                              lazy=final and step.name not in keep)
            values[step.name] = result
            if final:
                return result
            continue
        inputs = [values[name] for name in step.inputs]
        kinds = [wf.kind(name) for name in step.inputs]
        if f == "label":
            result = ex_label(ctx, step, inputs[0], lazy=final and step.name not in keep)
        elif f in ("size_filter", "invert"):
            result = EXECUTORS[f](ctx, step, inputs[0], kinds[0])
        else:
            result = EXECUTORS[f](ctx, step, *inputs)
        values[step.name] = result
        if step.name in keep and on_result is not None:
            on_result(step, result)
        if final:
            return result
    raise OptionError(f"workflow {wf.name!r}: output step {wf.output!r} was never reached")


#: Steps that are one block operation, planned from their parameters and inputs (checks
#: included) without touching the data: consecutive ones run as one sweep (:func:`run_ops`).
OP_PLANS: dict[str, Callable[..., tuple[BlockOp, tuple[Any, ...]]]] = {
    "gaussian": plan_op,
    "spot": plan_op,
    "local_maxima": plan_op,
    "h_maxima": plan_op,
    "unsharp_mask": plan_op,
    "distance_transform": plan_distance_transform,
    "watershed": plan_watershed,
    "shape_index": plan_shape_index,
}

EXECUTORS: dict[str, Callable[..., Any]] = {
    "normalize": ex_normalize,
    "clip_percentiles": ex_clip_percentiles,
    "gaussian": ex_block_op,
    "edge_preserving": ex_edge_preserving,
    "spot": ex_block_op,
    "filament": ex_filament,
    "threshold": ex_threshold,
    "masked_object": ex_masked_object,
    "label": ex_label,
    "size_filter": ex_size_filter,
    "fill_holes": ex_fill_holes,
    "watershed": ex_block_op,
    "distance_transform": ex_block_op,
    "local_maxima": ex_block_op,
    "h_maxima": ex_block_op,
    "graph_cut": ex_graph_cut,
    "combine": ex_combine,
    "invert": ex_invert,
    "gamma": ex_gamma,
    "unsharp_mask": ex_block_op,
    "shape_index": ex_block_op,
}
