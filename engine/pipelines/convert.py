"""``voxelmill convert``: any supported image → multiscale OME-Zarr, blockwise on the cluster."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.blocks import stable_hash
from engine.errors import InputError, OptionError
from engine.io import omezarr, open_volume
from engine.io.axes import VOXEL_SIZE_FIXES
from engine.io.sources import file_identity
from engine.labels import label_values
from engine.output import check_destination, output_run, partial_path
from engine.progress import Progress
from engine.pyramid import Level, build_pyramid, plan_levels
from engine.runner import RunReport, RunState
from engine.stats import display_windows
from engine.volume import Volume, check_voxel_size, normalize_unit, per_axis, spatial_chunks


@dataclass(frozen=True)
class ConvertOptions:
    """Options of a conversion.

    Parameters
    ----------
    chunks : tuple of int, optional
        Chunk shape for the spatial axes (z, y, x or y, x), or one int for all; channel and
        time axes are chunked by 1. Default 128³ for volumes, 1024² for 2D images.
    shards : tuple of int, optional
        Zarr v3 shard shape for the spatial axes (multiples of the chunks): many chunks in
        one file, for volumes whose chunk count would overwhelm a file system. Blocks are
        aligned to shards, so no two tasks write one shard.
    ngff : {"0.5", "0.4"}
        OME-NGFF version: 0.5 writes zarr v3, 0.4 writes zarr v2.
    compression : {"lz4", "zstd"}
        Blosc codec; ``clevel`` its level.
    voxel_size : tuple of float, optional
        Overrides the header's voxel size (one value per spatial axis, or one for all),
        in ``unit`` (default: the header's unit).
    assume_voxel_size : bool
        Accept the placeholder of 1 ``unit`` per voxel for an input that records no
        (valid) voxel size; without it, or ``voxel_size``, such an input is refused.
    axes : str, optional
        What each stored axis of the input is (``--axes zcyx``), for formats that do
        not record it.
    max_levels : int, optional
        Cap on the number of pyramid levels.
    block_mib : float
        Memory budget of one block task, in MiB of voxels.
    labels : tuple of (name, path)
        Label images to store under ``labels/NAME`` (integer voxels, same spatial shape).
    """

    chunks: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    ngff: str = "0.5"
    compression: str = "lz4"
    clevel: int = 5
    voxel_size: tuple[float, ...] | None = None
    unit: str | None = None
    assume_voxel_size: bool = False
    axes: str | None = None
    overwrite: bool = False
    max_levels: int | None = None
    block_mib: float = 64
    labels: tuple[tuple[str, str], ...] = ()


@dataclass
class ConvertResult:
    destination: Path
    levels: list[tuple[int, ...]]
    labels: list[str]
    reports: list[RunReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.reports)

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.reports)


def level_shards(shards: Sequence[int], chunks: Sequence[int], shape: Sequence[int]
                 ) -> tuple[int, ...]:
    """Shard shape of one level: at most the level rounded up to whole chunks."""
    return tuple(min(sh, -(-s // c) * c) for sh, c, s in zip(shards, chunks, shape, strict=True))


def apply_voxel_size(volume: Volume, voxel_size: Sequence[float] | None,
                     unit: str | None, assume: bool = False) -> Volume:
    """``volume`` with the voxel size (and unit) the user gave; a volume whose file
    records no usable voxel size is refused unless one is given or ``assume`` accepts the
    placeholder.

    Raises
    ------
    OptionError
        Naming the file and both fixes (``--voxel-size``, ``--assume-voxel-size``), or a
        ``--voxel-size`` with the wrong number of values.
    """
    if voxel_size is None:
        if volume.voxel_size_problem and not assume:
            raise OptionError(f"{volume.source}: {volume.voxel_size_problem}; "
                              + VOXEL_SIZE_FIXES.format(unit=normalize_unit(unit or volume.unit)))
        if unit is None:
            return volume
        return replace(volume, unit=normalize_unit(unit))
    n = len(volume.spatial_axes)
    vs = tuple(voxel_size)
    if len(vs) == 1:
        vs = vs * n
    if len(vs) != n:
        raise OptionError(f"--voxel-size {vs}: give one value or {n} (for axes "
                          f"{volume.spatial_axes}) for {volume.source}")
    check_voxel_size(vs, volume.source)
    return volume.with_voxel_size(vs, normalize_unit(unit) if unit else volume.unit)


def attach_labels(volume: Volume, labels: Sequence[tuple[str, str]]) -> Volume:
    """Open label images and check they fit the image voxel for voxel."""
    if not labels:
        return volume
    spatial = tuple(s for a, s in zip(volume.axes, volume.shape, strict=True) if a in "zyx")
    found = dict(volume.labels)
    for name, path in labels:
        if not name or "/" in name or name.startswith("."):
            raise OptionError(f"label name {name!r}: use a plain name such as 'membranes'")
        lab = open_volume(path)
        if "c" in lab.axes or "t" in lab.axes:
            raise OptionError(f"{path}: a label image has no channel or time axis "
                              f"(axes {lab.axes!r})")
        if lab.shape != spatial:
            raise OptionError(f"{path}: label shape {lab.shape} (axes {lab.axes}) does not match "
                              f"the image's spatial shape {spatial} (axes {volume.spatial_axes})")
        if lab.dtype.kind not in "iub":
            raise OptionError(f"{path}: labels must be integers, not {lab.dtype}")
        found[name] = Volume(lab.data, lab.axes, volume.voxel_size, volume.unit, source=str(path))
    return replace(volume, labels=found)


@dataclass
class Multiscale:
    """One multiscale group to write: the image, or one label image."""

    volume: Volume
    group: Path
    name: str
    chunks: tuple[int, ...]
    levels: list[Level]
    method: str
    shards: tuple[int, ...] | None = None

    @property
    def write_unit(self) -> tuple[int, ...]:
        """What one task must write whole: a shard when sharded, else a chunk."""
        return self.shards or self.chunks


@dataclass
class ConvertPlan:
    """Everything checked and decided before any worker starts or anything is written."""

    source: Path
    destination: Path
    options: ConvertOptions
    image: Multiscale
    labels: dict[str, Multiscale]
    state: RunState

    @property
    def partial(self) -> Path:
        return partial_path(self.destination)


def plan_conversion(src: str | Path, dst: str | Path, options: ConvertOptions) -> ConvertPlan:
    """Open and check the input, labels, options and destination; decide chunks and levels.

    Raises a ``VoxelmillError`` naming the file or value for any user error.
    """
    src, dst = Path(src), Path(dst)
    omezarr.zarr_format(options.ngff)
    omezarr.compressor(options.compression, options.clevel, 3, 1)
    volume = open_volume(src, axes=options.axes)
    if np.dtype(volume.dtype).kind == "c":  # the pyramid's mean and the display windows
        raise InputError(f"{src}: complex voxels ({volume.dtype}) are not supported; save "
                         "the magnitude or the real part as a real image first")
    volume = apply_voxel_size(volume, options.voxel_size, options.unit,
                              options.assume_voxel_size)
    volume = attach_labels(volume, options.labels)
    check_destination(dst, options.overwrite, src,
                      sources=[Path(p) for _, p in options.labels])
    partial = partial_path(dst)

    def multiscale(vol: Volume, group: Path, name: str, method: str) -> Multiscale:
        chunks = spatial_chunks(vol, options.chunks)
        levels = plan_levels(vol.shape, vol.axes, vol.scale(), chunks, options.max_levels)
        shards = None
        if options.shards:
            if options.ngff != "0.5":
                raise OptionError("--shards needs zarr v3, i.e. --ngff 0.5")
            shards = level_shards(per_axis(vol, options.shards, "--shards"), chunks, vol.shape)
            if any(sh % c for sh, c in zip(shards, chunks, strict=True)):
                pairs = [(sh, c) for sh, c, a in zip(shards, chunks, vol.axes, strict=True)
                         if a in "zyx"]
                fixed = ",".join(str(max(c, sh // c * c)) for sh, c in pairs)
                raise OptionError(f"--shards {','.join(map(str, options.shards))}: each shard "
                                  "size must be a multiple of the chunk size "
                                  f"{','.join(str(c) for _, c in pairs)}; use --shards {fixed} "
                                  "or change --chunks")
        return Multiscale(vol, group, name, chunks, levels, method, shards)

    image = multiscale(volume, partial, src.name, "mean")
    labels = {n: multiscale(lab, partial / "labels" / n, n, "mode")
              for n, lab in volume.labels.items()}
    _check_budgets(src, dst, options, [image, *labels.values()])
    identity = {"op": "convert", "version": __version__, "input": file_identity(src),
                "labels": [file_identity(p) for _, p in options.labels],
                "options": {k: v for k, v in asdict(options).items() if k != "overwrite"},
                "chunks": image.chunks, "shape": volume.shape, "dtype": str(volume.dtype)}
    state = RunState(partial / ".voxelmill", stable_hash(identity), identity)
    return ConvertPlan(src, dst, options, image, labels, state)


def _check_budgets(src: Path, dst: Path, options: ConvertOptions,
                   groups: Sequence[Multiscale]) -> None:
    """Refuse, before anything is written, a store that cannot fit the free disk (every
    level of every group, uncompressed) and a write unit one task cannot hold: a task
    writes at least one whole shard (else chunk), from one buffer."""
    from engine.io.budget import check_held, check_output_size, declared_bytes

    for ms in groups:
        unit = tuple(min(u, s) for u, s in zip(ms.write_unit, ms.volume.shape, strict=True))
        which = (f"--shards {','.join(map(str, options.shards))}" if ms.shards else
                 f"--chunks {','.join(map(str, ms.chunks))}")
        check_held(declared_bytes(unit, ms.volume.dtype), which,
                   f"one task of {ms.name} holds a whole {'shard' if ms.shards else 'chunk'} "
                   f"of {'×'.join(map(str, unit))} {np.dtype(ms.volume.dtype).name}")
    total = sum(declared_bytes(lv.shape, ms.volume.dtype) for ms in groups for lv in ms.levels)
    shape = groups[0].volume.shape
    check_output_size(dst, total, f"{src.name} ({'×'.join(map(str, shape))} "
                                  f"{np.dtype(groups[0].volume.dtype).name}, "
                                  f"{len(groups[0].levels)} levels)")


def _create(ms: Multiscale, opts: ConvertOptions, resumed: bool) -> None:
    """Create the empty level arrays and the multiscales metadata of one group; resuming,
    only the arrays that are missing (a run stopped while creating them), never over the
    blocks a run wrote."""
    ms.group.mkdir(parents=True, exist_ok=True)
    for i, lv in enumerate(ms.levels):
        if resumed and any((ms.group / str(i) / meta).is_file()
                           for meta in ("zarr.json", ".zarray")):
            continue
        chunks = [min(c, s) for c, s in zip(ms.chunks, lv.shape, strict=True)]
        shards = level_shards(ms.shards, chunks, lv.shape) if ms.shards else None
        omezarr.create_level(ms.group, str(i), lv.shape, chunks, ms.volume.dtype, ms.volume.axes,
                             opts.ngff, opts.compression, opts.clevel, shards=shards,
                             every_chunk_written=ms.method != "mode")
    metas = [omezarr.LevelMeta(str(i), lv.scale, lv.translation) for i, lv in enumerate(ms.levels)]
    omezarr.write_group_attrs(ms.group, {"multiscales": [omezarr.multiscales(
        ms.volume.axes, ms.volume.unit, metas, ms.name, opts.ngff, ms.method)]}, opts.ngff)


def run_conversion(plan: ConvertPlan, client: Any,
                   progress: Callable[[], Progress] | None = None,
                   report: Callable[[str], None] = print) -> ConvertResult:
    """Write the planned OME-Zarr blockwise on the cluster; resume when possible."""
    with output_run("convert", [plan.destination], state=plan.state, report=report,
                    what="conversion", work=False, client=client,
                    inputs=[plan.source]) as run:
        opts, partial = plan.options, run.partial()
        groups = [plan.image, *plan.labels.values()]
        for ms in groups:
            _create(ms, opts, run.resumed)
        if plan.labels:
            omezarr.write_group_attrs(partial / "labels", {"labels": list(plan.labels)},
                                      opts.ngff)

        reports: list[RunReport] = []
        for ms in groups:
            reports += build_pyramid(client, ms.volume.data, ms.group, ms.levels, ms.write_unit,
                                     method=ms.method, state=plan.state, progress=progress,
                                     budget_bytes=int(opts.block_mib * 2**20),
                                     name="image" if ms is plan.image else f"labels-{ms.name}")
        for ms in plan.labels.values():
            values = label_values(client, ms.group / "0", ms.write_unit)
            omezarr.write_group_attrs(
                ms.group, {"image-label": omezarr.image_label(values, opts.ngff)}, opts.ngff)
        vol = plan.image.volume
        nchan = vol.shape[vol.axes.index("c")] if "c" in vol.axes else 1
        windows = display_windows(partial / str(len(plan.image.levels) - 1), vol.axes, nchan)
        omezarr.write_group_attrs(partial, {"omero": omezarr.omero(
            vol.channel_names or (plan.image.name,), windows)}, opts.ngff)
        run.commit(recorded=[ms.group for ms in groups])
        return ConvertResult(plan.destination, [lv.shape for lv in plan.image.levels],
                             list(plan.labels), reports, run.record.seconds)


def convert(src: str | Path, dst: str | Path, options: ConvertOptions, client: Any,
            progress: Callable[[], Progress] | None = None,
            report: Callable[[str], None] = print) -> ConvertResult:
    """Convert ``src`` into an OME-Zarr image at ``dst``, with pyramid and labels.

    The output is built in a hidden sibling ``.NAME.partial`` and renamed into place when
    complete. An interrupted run resumes from its done-markers when re-run with the same
    input and options; different options start the partial output afresh.
    """
    return run_conversion(plan_conversion(src, dst, options), client, progress, report)
