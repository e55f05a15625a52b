"""``voxelmill instances``: class-probability maps to labelled instances with a class each.

A class model's prediction (``SRC/predictions/NAME``: one channel per class, uint8 0–255 or
float16, as ``voxelmill predict`` writes it) becomes objects, blockwise over the cluster:

1. **classify** — each block takes the winning class of every voxel (``numpy.argmax`` over
   the channels: ties go to the lower class index) and its probability (uint8 values / 255);
   a voxel is foreground when its class is not the background class, is one of the chosen
   classes (all others by default) and its winning probability is ``>= confidence``;
2. **label** — connected components of the foreground across blocks with
   :func:`engine.labels.label` (the blockwise labelling ``segment`` and ``predict
   --instances`` use: ids equal ``scipy.ndimage.label`` on the whole array), objects
   smaller than ``min_size`` voxels (their *global* size) removed and the rest numbered
   1..n in raster order of their first voxel;
3. **histograms** — a reduction pass counts, per instance, its voxels of each class; the
   sparse per-block counts are summed into a table sharded by instance id on disk
   (:mod:`engine.objtables`), which gives every instance its majority class (ties: the
   lower class index): the client holds a few numbers per shard, whatever the number of
   instances;
4. **class map** — each block maps its instance ids through that table.

Outputs (built in hidden ``.partial`` groups, renamed into place when complete)::

    SRC/labels/OUT            instance ids (uint32), NGFF labels with a pyramid (mode)
    SRC/labels/OUT_classes    every voxel of an instance = its majority class index, every
                              other voxel = the background class (uint8)
    SRC/labels/OUT/OUT.csv    instance, class, class_name, voxels (one row per instance;
                              or the file given as ``table``)

The result does not depend on the block layout: every step is per voxel, or the global
labelling, or an exact sum of integer counts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.budget import check_output_size
from engine.io.chunkfiles import write_region
from engine.io.sources import read_region, zarr_source
from engine.labels import label as label_components
from engine.objtables import ShardedTable, reduce_objects
from engine.output import check_destination, check_output_name, output_run, write_multiscale
from engine.pyramid import Level, plan_levels
from engine.runner import run_blocks

#: suffix of the class-map label image written beside the instances
CLASSES_SUFFIX = "_classes"
TABLE_COLUMNS = ("instance", "class", "class_name", "voxels")


@dataclass(frozen=True)
class InstanceOptions:
    """Options of ``voxelmill instances`` (see its ``--help``).

    Parameters
    ----------
    predictions : str
        Name of the prediction under ``SRC/predictions/``.
    name : str
        Output name: ``SRC/labels/NAME`` and ``SRC/labels/NAME_classes``.
    confidence : float
        Voxels whose winning class probability is below this, in [0, 1], are background.
    min_size : int
        Instances smaller than this many voxels (whole-volume size) are removed.
    connectivity : int
        1 = face neighbours … ndim = faces, edges and corners.
    background_class : int
        Channel index of the background class.
    classes : tuple of int, optional
        Classes that form instances (default: every class but the background).
    block : tuple of int, optional
        Block shape, multiples of the prediction's chunks.
    table : Path, optional
        Where to write the CSV table (default ``SRC/labels/NAME/NAME.csv``).
    overwrite : bool
        Replace existing outputs.
    """

    predictions: str
    name: str
    confidence: float = 0.5
    min_size: int = 0
    connectivity: int = 1
    background_class: int = 0
    classes: tuple[int, ...] | None = None
    block: tuple[int, ...] | None = None
    table: Path | None = None
    overwrite: bool = False


@dataclass
class InstancePlan:
    """Everything decided before compute."""

    source: Path
    options: InstanceOptions
    level0: str
    axes: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    block: tuple[int, ...]
    n_classes: int
    class_names: tuple[str, ...]
    scale: float  # stored value of probability 1 (255 for uint8)
    foreground: tuple[int, ...]
    voxel_size: tuple[float, ...]
    unit: str
    ngff: str
    levels: list[Level]

    @property
    def destination(self) -> Path:
        return self.source / "labels" / self.options.name

    @property
    def classes_destination(self) -> Path:
        return self.source / "labels" / f"{self.options.name}{CLASSES_SUFFIX}"

    @property
    def table_destination(self) -> Path:
        return self.options.table or self.destination / f"{self.options.name}.csv"


@dataclass
class InstanceResult:
    """What :func:`run_instances` wrote: paths, the instance table and timings."""

    labels: Path
    classes: Path
    table: Path
    n_instances: int
    per_class: dict[str, int]
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)


def foreground_classes(probs: np.ndarray, scale: float, confidence: float, background: int,
                       foreground: Sequence[int]) -> np.ndarray:
    """Winning class + 1 of the foreground voxels, 0 elsewhere.

    Parameters
    ----------
    probs : ndarray, shape (K, *S)
        Stored class probabilities (uint8 0–255 or float).
    scale : float
        Stored value of probability 1 (255 for uint8, 1 for floats).
    confidence : float
        Minimum winning probability, in [0, 1].
    background : int
        Background class index.
    foreground : sequence of int
        Classes that form instances.

    Returns
    -------
    ndarray of uint8 (uint16 past 254 classes), shape S
    """
    cls = np.argmax(probs, axis=0)  # ties: the lower class index
    top = np.take_along_axis(probs, cls[None], axis=0)[0].astype(np.float64) / scale
    fg = (top >= confidence) & (cls != background)
    if len(foreground) < probs.shape[0] - 1:
        fg &= np.isin(cls, foreground)
    dtype = np.uint8 if probs.shape[0] < 255 else np.uint16
    return np.where(fg, cls + 1, 0).astype(dtype)


@dataclass(frozen=True)
class Classify:
    """Block task: the foreground class map (:func:`foreground_classes`) of a block."""

    level0: str
    n_classes: int
    scale: float
    confidence: float
    background: int
    foreground: tuple[int, ...]
    out: str

    def __call__(self, block: Block) -> None:
        probs = read_region(self.level0, (slice(0, self.n_classes), *block.write))
        write_region(self.out, block.write, foreground_classes(
            probs, self.scale, self.confidence, self.background, self.foreground))


@dataclass(frozen=True)
class ClassCounts:
    """Block task: voxels of each class per instance, a sparse table keyed
    ``id * K + class`` (sorted unique uint64 keys, int64 counts)."""

    instances: str
    classes: str
    n_classes: int

    def __call__(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        ids = read_region(self.instances, block.write)
        fg = ids > 0
        cls = read_region(self.classes, block.write)[fg].astype(np.uint64) - np.uint64(1)
        keys = ids[fg].astype(np.uint64) * np.uint64(self.n_classes) + cls
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq, counts.astype(np.int64)


def majority_classes(keys: np.ndarray, counts: np.ndarray, n_classes: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Majority class (ties: the lower class index) and size of every instance of a table of
    summed class counts.

    Parameters
    ----------
    keys : ndarray of uint64, shape (n,)
        ``id * n_classes + class``, sorted and unique.
    counts : ndarray of int, shape (n,)
        Voxels of that class in that instance.
    n_classes : int

    Returns
    -------
    ids : ndarray of uint64, shape (m,)
        The instances, sorted.
    majority : ndarray of int64, shape (m,)
    sizes : ndarray of int64, shape (m,)
        Voxels of each instance, all classes.
    """
    k = np.uint64(n_classes)
    ids, cls = keys // k, (keys % k).astype(np.int64)
    counts = np.asarray(counts, np.int64)
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if ids.size else \
        np.zeros(0, np.int64)
    sizes = np.add.reduceat(counts, first) if ids.size else np.zeros(0, np.int64)
    # per instance, the largest count and among those the lowest class: keys are sorted by
    # (id, class), so a stable sort on -count within each id puts that row first
    order = np.lexsort((cls, -counts, ids))
    return ids[first], cls[order][first], sizes


@dataclass(frozen=True)
class MajorityShard:
    """``finish`` of one shard of summed class counts: the table ``(ids, majority class,
    size)`` kept for the class map and the CSV, and its summary (instances of each class)."""

    n_classes: int

    def __call__(self, table: tuple[np.ndarray, ...]
                 ) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        keys, counts = table
        ids, majority, sizes = majority_classes(np.asarray(keys, np.uint64), counts,
                                                self.n_classes)
        return (ids, majority, sizes), np.bincount(majority, minlength=self.n_classes)


@dataclass(frozen=True)
class ClassOfInstance:
    """Block task: every voxel of an instance gets its majority class (looked up in the
    sharded table), every other voxel the background class."""

    instances: str
    out: str
    table: ShardedTable
    background: int
    dtype: str

    def __call__(self, block: Block) -> None:
        data = read_region(self.instances, block.write)
        ids, inverse = np.unique(data, return_inverse=True)
        found, rows = self.table.lookup(ids.astype(np.uint64))
        value = np.full(ids.size, self.background, self.dtype)
        value[found] = rows[2]  # id 0 (background) is not in the table
        write_region(self.out, block.write, value[inverse.reshape(data.shape)])


def _class_names(attrs: dict[str, Any], k: int) -> tuple[str, ...]:
    names = [c.get("label", "") for c in attrs.get("omero", {}).get("channels", [])]
    return tuple(names) if len(names) == k and all(names) else tuple(f"class{i}"
                                                                     for i in range(k))


def plan_instances(src: str | Path, options: InstanceOptions) -> InstancePlan:
    """Open and check everything; raise a ``VoxelmillError`` naming the problem."""
    import zarr

    from engine.blocks import check_block, default_block

    src = Path(src)
    img_attrs, ngff = omezarr.read_image_attrs(src)
    check_output_name(options.name, "nuclei")
    check_output_name(options.predictions, "classes_unet")
    if not 0 <= options.confidence <= 1:
        raise OptionError(f"--confidence {options.confidence}: must be between 0 and 1")
    if options.min_size < 0:
        raise OptionError(f"--min-size {options.min_size}: must be ≥ 0")
    group = src / "predictions" / options.predictions
    if not group.exists():
        found = sorted(p.name for p in (src / "predictions").iterdir()
                       if not p.name.startswith(".")) if (src / "predictions").is_dir() else []
        raise InputError(f"{group}: no such prediction; {src} has "
                         f"{', '.join(found) or 'none'} (make one with voxelmill predict)")
    attrs, _ = omezarr.read_attrs(group)
    if "multiscales" not in attrs:
        raise InputError(f"{group}: no 'multiscales' metadata; not a voxelmill prediction")
    ms = attrs["multiscales"][0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms["axes"])
    if not axes.startswith("c") or not 2 <= len(axes) - 1 <= 3 or set(axes[1:]) - set("zyx"):
        raise InputError(f"{group}: axes {axes!r}; expected a channel per class then the "
                         "spatial axes (cyx or czyx)")
    level0 = str(omezarr.dataset_path(group, ms["datasets"][0]))
    arr = zarr.open_array(level0, mode="r")
    k = int(arr.shape[0])
    if k < 2:
        raise InputError(f"{group}: has {k} channel; instances needs a class model's "
                         "prediction (one channel per class); for a binary model use "
                         "voxelmill predict --instances")
    if arr.dtype == np.uint8:
        scale = 255.0
    elif arr.dtype.kind == "f":
        scale = 1.0
    else:
        raise InputError(f"{group}: probabilities stored as {arr.dtype}; expected uint8 "
                         "(0–255) or float16")
    if not 0 <= options.background_class < k:
        raise OptionError(f"--background-class {options.background_class}: the prediction "
                          f"has classes 0..{k - 1}")
    if options.classes is None:
        foreground = tuple(c for c in range(k) if c != options.background_class)
    else:
        foreground = tuple(sorted(set(options.classes)))
        bad = [c for c in foreground if not 0 <= c < k or c == options.background_class]
        if bad or not foreground:
            raise OptionError(f"--classes {','.join(map(str, options.classes))}: give class "
                              f"indices in 0..{k - 1} other than the background class "
                              f"{options.background_class}")
    spatial = axes[1:]
    shape = tuple(int(n) for n in arr.shape[1:])
    chunks = tuple(int(c) for c in arr.chunks[1:])
    if options.block:
        block = tuple(options.block) if len(options.block) > 1 else options.block * len(shape)
        check_block(block, chunks, shape)
    else:
        block = default_block(chunks, shape)
    block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    scale0 = [float(s) for t in ms["datasets"][0].get("coordinateTransformations", [])
              if t.get("type") == "scale" for s in t["scale"]][1:] or [1.0] * len(shape)
    units = [a.get("unit") for a in ms["axes"] if isinstance(a, dict) and a.get("unit")]
    unit = units[0] if units else "micrometer"
    dst = src / "labels" / options.name
    dst_classes = src / "labels" / f"{options.name}{CLASSES_SUFFIX}"
    n_levels = len(img_attrs["multiscales"][0]["datasets"])
    levels = plan_levels(shape, spatial, tuple(scale0), chunks, max_levels=n_levels)
    # uint64 instance ids at worst and uint8 classes, every level; the table is small
    check_output_size(dst, sum(math.prod(lv.shape) for lv in levels) * (8 + 1),
                      f"--predictions {options.predictions} ({'×'.join(map(str, shape))})")
    check_destination(dst, options.overwrite)
    check_destination(dst_classes, options.overwrite)
    if options.table is not None:
        check_destination(Path(options.table), options.overwrite, file=True)
    return InstancePlan(src, options, level0, spatial, shape, chunks, block, k,
                        _class_names(attrs, k), scale, foreground, tuple(scale0), unit, ngff,
                        levels)


def _write_table(path: Path, table: ShardedTable, names: Sequence[str]) -> None:
    """The CSV of every instance, read shard by shard (one shard in memory at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(TABLE_COLUMNS)
        for ids, majority, sizes in table.shards():
            w.writerows((i, c, names[c], n) for i, c, n in
                        zip(ids.tolist(), majority.tolist(), sizes.tolist(), strict=True))


def run_instances(plan: InstancePlan, client: Any, progress: Callable[[], Any] | None = None,
                  report: Callable[[str], None] = print) -> InstanceResult:
    """Classify, label, count and write the planned instances (see the module docstring)."""
    import zarr

    opts = plan.options
    outputs = [plan.destination, plan.classes_destination]
    table = [Path(opts.table)] if opts.table is not None else []
    identity = {"predictions": opts.predictions, "confidence": opts.confidence,
                "min_size": opts.min_size, "connectivity": opts.connectivity,
                "background_class": opts.background_class, "classes": plan.foreground,
                "block": plan.block}
    with output_run("instances", outputs, identity=identity, scratch=table,
                    report=report, client=client, inputs=[plan.source]) as run:
        inst_partial = run.partial(plan.destination)
        cls_partial = run.partial(plan.classes_destination)
        work = run.work
        prog = (lambda: progress()) if progress else (lambda: None)
        grid = BlockGrid(plan.shape, plan.block, chunks=plan.chunks)
        vclass = str(work / "vclass")
        dtype = np.uint8 if plan.n_classes < 255 else np.uint16
        zarr.create_array(store=vclass, shape=plan.shape, chunks=plan.chunks, dtype=dtype,
                          fill_value=0, zarr_format=3)
        run_blocks(client, grid, Classify(plan.level0, plan.n_classes, plan.scale,
                                          opts.confidence, opts.background_class,
                                          plan.foreground, vclass),
                   name="instances-classify", progress=prog())
        result = label_components(client, vclass, work / "instances",
                                  connectivity=opts.connectivity, min_size=opts.min_size,
                                  sequential=True, block_shape=plan.block,
                                  chunks=plan.chunks, progress=prog())
        instances = str(result.path)
        # per-instance class counts as a sharded table on disk: the client holds a few
        # numbers per shard, whatever the number of instances
        majority, per_shard = reduce_objects(
            client, grid, ClassCounts(instances, vclass, plan.n_classes), ("add",),
            MajorityShard(plan.n_classes), work / "majority", name="instances-classes",
            progress=prog(), align=plan.n_classes, columns=3)
        classes = str(work / "classes")
        zarr.create_array(store=classes, shape=plan.shape, chunks=plan.chunks, dtype=dtype,
                          fill_value=opts.background_class, zarr_format=3)
        run_blocks(client, grid, ClassOfInstance(instances, classes, majority,
                                                 opts.background_class, np.dtype(dtype).str),
                   name="instances-classmap", progress=prog())

        write_multiscale(client, zarr_source(instances), inst_partial, opts.name,
                         plan.axes, plan.unit, plan.chunks, plan.levels, plan.ngff, "mode",
                         progress)
        omezarr.write_group_attrs(inst_partial, {"image-label": omezarr.image_label(
            result.values, plan.ngff)}, plan.ngff)
        write_multiscale(client, zarr_source(classes), cls_partial,
                         f"{opts.name}{CLASSES_SUFFIX}", plan.axes, plan.unit, plan.chunks,
                         plan.levels, plan.ngff, "mode", progress)
        omezarr.write_group_attrs(cls_partial, {"image-label": omezarr.image_label(
            list(range(plan.n_classes)), plan.ngff)}, plan.ngff)
        if opts.table is None:
            _write_table(inst_partial / f"{opts.name}.csv", majority, plan.class_names)
        else:
            _write_table(run.partial(Path(opts.table)), majority, plan.class_names)
        run.commit([*outputs, *table], recorded=[inst_partial, cls_partial])
        omezarr.add_label_names(plan.source, [opts.name, f"{opts.name}{CLASSES_SUFFIX}"],
                                plan.ngff)
        of_class = np.sum(per_shard, axis=0)
        per_class = {plan.class_names[c]: int(of_class[c]) for c in plan.foreground}
        return InstanceResult(plan.destination, plan.classes_destination,
                              plan.table_destination, int(of_class.sum()), per_class,
                              run.record.seconds, run.record.collector.stages)


def instances(src: str | Path, options: InstanceOptions, client: Any,
              progress: Callable[[], Any] | None = None,
              report: Callable[[str], None] = print) -> InstanceResult:
    """Plan and run :func:`run_instances`."""
    return run_instances(plan_instances(src, options), client, progress, report)


__all__ = ["InstanceOptions", "InstancePlan", "InstanceResult", "foreground_classes",
           "instances", "majority_classes", "plan_instances", "run_instances"]
