"""``voxelmill export``: one level or region of an OME-Zarr image to MRC, TIFF, NRRD or NIfTI."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InputError, OptionError
from engine.io import detect_format, iter_slabs, omezarr, slab_bounds, writer_for
from engine.pipelines.output import check_destination, commit, partial_path
from engine.progress import Progress, SilentProgress
from engine.volume import Volume


def parse_roi(text: str, spatial: str, shape: Sequence[int]) -> tuple[slice, ...]:
    """Parse ``z0:z1,y0:y1,x0:x1`` (one range per spatial axis; empty bounds allowed)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(spatial):
        raise OptionError(f"--roi {text!r}: give {len(spatial)} ranges for axes {spatial}, "
                          "e.g. " + ",".join("0:64" for _ in spatial))
    out = []
    for ax, part, n in zip(spatial, parts, shape, strict=True):
        lo, sep, hi = part.partition(":")
        try:
            start = int(lo) if lo else 0
            stop = int(hi) if hi else n
        except ValueError:
            raise OptionError(f"--roi {text!r}: {part!r} on axis {ax} is not start:stop") from None
        if not sep or not 0 <= start < stop <= n:
            raise OptionError(f"--roi {text!r}: range {part!r} on axis {ax} must satisfy "
                              f"0 ≤ start < stop ≤ {n}")
        out.append(slice(start, stop))
    return tuple(out)


def select(volume: Volume, roi: str | None = None, channel: int | None = None) -> Volume:
    """Cut a region (spatial ROI) and optionally one channel out of a volume, lazily."""
    data, axes, names = volume.data, volume.axes, volume.channel_names
    if channel is not None:
        if "c" not in axes:
            raise OptionError(f"--channel {channel}: {volume.source} has no channel axis")
        n = data.shape[axes.index("c")]
        if not 0 <= channel < n:
            raise OptionError(f"--channel {channel}: {volume.source} has channels 0..{n - 1}")
        c = axes.index("c")
        data = data[tuple(channel if i == c else slice(None) for i in range(data.ndim))]
        axes, names = axes.replace("c", ""), ()
    if roi:
        spatial_idx = [i for i, a in enumerate(axes) if a in "zyx"]
        slices = parse_roi(roi, volume.spatial_axes, [data.shape[i] for i in spatial_idx])
        key = [slice(None)] * data.ndim
        for i, s in zip(spatial_idx, slices, strict=True):
            key[i] = s
        data = data[tuple(key)]
    return replace(volume, data=data, axes=axes, channel_names=names, labels={})


@dataclass(frozen=True)
class ExportPlan:
    volume: Volume
    destination: Path
    writer: Any


def plan_export(src: str | Path, dst: str | Path, level: int = 0, roi: str | None = None,
                channel: int | None = None, label: str | None = None,
                overwrite: bool = False) -> ExportPlan:
    """Check the source, options and destination before anything runs."""
    src, dst = Path(src), Path(dst)
    writer = writer_for(dst)
    if detect_format(src) != "omezarr":
        raise InputError(f"{src}: export reads OME-Zarr images; convert it first")
    check_destination(dst, overwrite, src)
    if label and label not in omezarr.label_names(src):
        raise OptionError(f"--label {label!r}: {src} has label images "
                          f"{omezarr.label_names(src) or 'none'}")
    group = src / "labels" / label if label else src
    return ExportPlan(select(omezarr.read(group, level=level), roi, channel), dst, writer)


def run_export(plan: ExportPlan, client: Any, progress: Progress | None = None) -> Volume:
    """Stream the planned region into a hidden partial file, renamed when complete."""
    dst = plan.destination
    tmp = partial_path(dst)
    tmp = tmp.with_name(tmp.name + "".join(dst.suffixes[-2:]))  # writers pick on suffix
    progress = progress or SilentProgress()
    progress.start(f"export {dst.name}", len(slab_bounds(plan.volume.data)) - 1)

    def slabs() -> Iterator[np.ndarray]:
        for slab in iter_slabs(plan.volume.data, client):
            yield slab
            progress.advance()

    try:
        plan.writer.write(plan.volume, tmp, slabs())
        commit(tmp, dst)
    finally:
        progress.finish()
        if tmp.exists():
            tmp.unlink()
    return plan.volume


def export(src: str | Path, dst: str | Path, client: Any, level: int = 0, roi: str | None = None,
           channel: int | None = None, label: str | None = None,
           overwrite: bool = False, progress: Progress | None = None) -> Volume:
    """Write one level (or a region of it) of an OME-Zarr image, or of one of its label
    images, to a single file whose format follows ``dst``'s suffix (MRC, TIFF, NRRD, NIfTI).

    The voxel size of the chosen level goes into the header; the source is only read.
    """
    return run_export(plan_export(src, dst, level, roi, channel, label, overwrite), client,
                      progress)
