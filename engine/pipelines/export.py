"""``voxelmill export``: one level or region of an OME-Zarr image to MRC, TIFF, NRRD or NIfTI,
or with its label images to a PartSeg project (.tgz/.tbz2).

A PartSeg project holds the image (every channel, or ``--channel``), its ROI (``--label``),
optionally a mask and named alternative label maps, as :func:`engine.io.partseg.write_project`
writes them. PartSeg keeps a whole project in memory, so the selected level or region is
gathered on the client before it is written (choose ``--level`` or ``--roi`` for large
images).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import InputError, OptionError
from engine.io import detect_format, iter_slabs, omezarr, slab_bounds, writer_for
from engine.io.budget import check_held, check_output_size, declared_bytes
from engine.output import check_destination, commit, partial_path
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


def changed_values(slab: np.ndarray, stored: np.dtype) -> np.ndarray:
    """Where storing ``slab`` as ``stored`` changes a value (bool, ``slab``'s shape): a
    rounded integer, a dropped imaginary part, a float out of range. NaN stays NaN."""
    if np.iscomplexobj(slab) and not np.issubdtype(stored, np.complexfloating):
        return (slab.imag != 0) | changed_values(slab.real, stored)
    with np.errstate(invalid="ignore", over="ignore"):  # out of range: changed, no warning
        back = slab.astype(stored).astype(slab.dtype)
    changed = back != slab
    if np.issubdtype(slab.dtype, np.inexact):
        changed &= ~(np.isnan(slab) & np.isnan(back))
    return changed


@dataclass
class Conversion:
    """A dtype change the destination format imposes, checked on every slab written."""

    source: np.dtype
    stored: np.dtype
    allow_lossy: bool
    destination: Path
    changed: int = 0  # values changed (counted with ``allow_lossy`` only)

    @property
    def needs_check(self) -> bool:
        return not np.can_cast(self.source, self.stored, "safe")

    def check(self, slab: np.ndarray, z0: int) -> None:
        """Refuse (or, with ``allow_lossy``, count) values of ``slab`` (rows ``z0…`` along
        the first axis) that ``stored`` cannot hold exactly."""
        if not self.needs_check or slab.size == 0:
            return
        changed = changed_values(slab, self.stored)
        if not changed.any():
            return
        if self.allow_lossy:
            self.changed += int(changed.sum())
            return
        at = tuple(int(i) for i in np.argwhere(changed)[0])
        value = slab[at].item()
        with np.errstate(invalid="ignore", over="ignore"):
            becomes = np.asarray(slab[at].real if np.iscomplexobj(slab) else slab[at]
                                 ).astype(self.stored).item()
        raise OptionError(
            f"{self.destination}: storing {self.source} voxels as {self.stored} (what this "
            f"format holds) would change the data, e.g. {value!r} at {(at[0] + z0, *at[1:])} "
            f"becomes {becomes!r}; pass --allow-lossy to convert anyway, or export to .tif, "
            f"which keeps {self.source}")

    def summary(self) -> str:
        """What was converted, for the command's report ("" when nothing was)."""
        if self.source == self.stored:
            return ""
        if not self.needs_check or not self.changed:
            return f"{self.source} stored as {self.stored}, every value exact"
        return (f"{self.source} stored as {self.stored} (--allow-lossy): {self.changed} "
                "values changed")


@dataclass(frozen=True)
class ExportPlan:
    volume: Volume
    destination: Path
    writer: Any
    #: PartSeg projects only: "roi", "mask" and "alt_<name>" label volumes (same region)
    labels: dict[str, Volume] = field(default_factory=dict)
    #: PartSeg projects only: what algorithm.json records
    algorithm: dict[str, Any] = field(default_factory=dict)
    #: refuse a dtype change that alters values present (False), or make it and count them
    allow_lossy: bool = False
    #: the dtype change the destination format imposes; after the run, what it changed
    conversion: Conversion = field(init=False)

    def __post_init__(self) -> None:
        source = np.dtype(self.volume.dtype)
        stored_dtype = getattr(self.writer, "stored_dtype", None)
        stored = np.dtype(stored_dtype(source)) if stored_dtype else source
        object.__setattr__(self, "conversion", Conversion(source, stored, self.allow_lossy,
                                                          self.destination))

    @property
    def partseg(self) -> bool:
        return self.writer is None


def is_partseg(path: str | Path) -> bool:
    """Whether ``path`` names a PartSeg project archive (by its suffix)."""
    from engine.io.partseg import SUFFIXES

    return Path(path).name.lower().endswith(SUFFIXES)


def _label_volume(src: Path, name: str, what: str, level: int, roi: str | None) -> Volume:
    names = omezarr.label_names(src)
    if name not in names:
        raise OptionError(f"{what} {name!r}: {src} has label images {names or 'none'}")
    return select(omezarr.read(src / "labels" / name, level=level), roi)


def plan_export(src: str | Path, dst: str | Path, level: int = 0, roi: str | None = None,
                channel: int | None = None, label: str | None = None,
                overwrite: bool = False, mask: str | None = None,
                alternative: Sequence[tuple[str, str]] = (),
                allow_lossy: bool = False) -> ExportPlan:
    """Check the source, options and destination before anything runs.

    For a PartSeg destination (.tgz, .tbz2, .tar.gz, .tar.bz2) ``label`` is the ROI (needed),
    ``mask`` an optional mask label image and ``alternative`` (project name, label image)
    pairs of alternative maps; the image keeps its channels unless ``channel`` picks one.
    """
    src, dst = Path(src), Path(dst)
    partseg = is_partseg(dst)
    writer = None if partseg else writer_for(dst)
    if detect_format(src) != "omezarr":
        raise InputError(f"{src}: export reads OME-Zarr images; convert it first")
    if not partseg and (mask or alternative):
        raise OptionError("--mask and --alternative go into PartSeg projects only; give a "
                          ".tgz or .tbz2 destination")
    check_destination(dst, overwrite, src, file=True)
    if not partseg:
        if label and label not in omezarr.label_names(src):
            raise OptionError(f"--label {label!r}: {src} has label images "
                              f"{omezarr.label_names(src) or 'none'}")
        group = src / "labels" / label if label else src
        plan = ExportPlan(select(omezarr.read(group, level=level), roi, channel), dst, writer,
                          allow_lossy=allow_lossy)
        check_output_size(dst, declared_bytes(plan.volume.shape, plan.conversion.stored),
                          _sized_by(level, roi, channel))
        return plan
    if not label:
        raise OptionError(f"{dst}: a PartSeg project needs its ROI: give --label NAME")
    image = select(omezarr.read(src, level=level), roi, channel)
    labels = {"roi": _label_volume(src, label, "--label", level, roi)}
    if mask:
        labels["mask"] = _label_volume(src, mask, "--mask", level, roi)
    seen: set[str] = set()
    for name, group in alternative:
        if not name.isidentifier() or name in seen:
            raise OptionError(f"--alternative {name}={group}: the map name must be a plain "
                              "identifier (letters, digits, '_'), given once")
        seen.add(name)
        labels[f"alt_{name}"] = _label_volume(src, group, "--alternative", level, roi)
    spatial = tuple(n for n, a in zip(image.shape, image.axes, strict=True) if a != "c")
    for key, vol in labels.items():
        if tuple(vol.shape) != spatial:
            raise InputError(f"{src}: label image for {key} has shape {tuple(vol.shape)}, the "
                             f"image {spatial} (level {level})")
    algorithm = {"algorithm_name": "voxelmill", "values": {
        "source": str(src.resolve()), "level": level, "roi": roi, "channel": channel,
        "label": label, "mask": mask, "alternative": dict(alternative)}}
    # PartSeg holds a project in memory: the region is gathered here whole, then written
    held = sum(declared_bytes(v.shape, v.dtype) for v in (image, *labels.values()))
    check_held(held, _sized_by(level, roi, channel),
               f"a PartSeg project is gathered whole on this machine ({dst})")
    check_output_size(dst, held, _sized_by(level, roi, channel))
    return ExportPlan(image, dst, None, labels, algorithm)


def _sized_by(level: int, roi: str | None, channel: int | None) -> str:
    """The options that choose the exported region, as the user gave them."""
    return " ".join([f"--level {level}", *([f"--roi {roi}"] if roi else []),
                     *([f"--channel {channel}"] if channel is not None else [])])


def _run_partseg(plan: ExportPlan, tmp: Path, client: Any) -> None:
    from engine.io.partseg import write_project

    keys = list(plan.labels)
    data = [plan.volume.data, *(plan.labels[k].data for k in keys)]
    arrays = client.gather(client.compute(data)) if client is not None else [
        d.compute(scheduler="threads") for d in data]
    image, labels = np.asarray(arrays[0]), dict(zip(keys, arrays[1:], strict=True))
    vol = plan.volume
    write_project(tmp, image, vol.axes, tuple(vol.voxel_size), vol.unit, labels["roi"],
                  tuple(vol.channel_names) if "c" in vol.axes else (),
                  mask=labels.get("mask"),
                  alternative={k[4:]: v for k, v in labels.items() if k.startswith("alt_")},
                  algorithm=plan.algorithm)


def run_export(plan: ExportPlan, client: Any, progress: Progress | None = None) -> Volume:
    """Stream the planned region into a hidden partial file, renamed when complete.

    Every slab is checked against the destination's dtype before it is written
    (:class:`Conversion`); a refusal leaves nothing behind. ``plan.conversion.summary()``
    afterwards says what was converted."""
    dst = plan.destination
    tmp = partial_path(dst)
    tmp = tmp.with_name(tmp.name + "".join(dst.suffixes[-2:]))  # writers pick on suffix
    progress = progress or SilentProgress()
    # a PartSeg project is written in one piece; other formats stream slab by slab
    steps = 1 if plan.partseg else len(slab_bounds(plan.volume.data)) - 1
    progress.start(f"export {dst.name}", steps)

    conv = plan.conversion

    def slabs() -> Iterator[np.ndarray]:
        z0 = 0
        for slab in iter_slabs(plan.volume.data, client):
            conv.check(slab, z0)
            z0 += slab.shape[0] if slab.ndim else 0
            yield slab
            progress.advance()

    try:
        if plan.partseg:
            _run_partseg(plan, tmp, client)
            progress.advance()
        else:
            plan.writer.write(plan.volume, tmp, slabs())
        commit(tmp, dst)
    finally:
        progress.finish()
        if tmp.exists():
            tmp.unlink()
    return plan.volume


def export(src: str | Path, dst: str | Path, client: Any, level: int = 0, roi: str | None = None,
           channel: int | None = None, label: str | None = None,
           overwrite: bool = False, progress: Progress | None = None,
           mask: str | None = None, alternative: Sequence[tuple[str, str]] = (),
           allow_lossy: bool = False) -> Volume:
    """Write one level (or a region of it) of an OME-Zarr image, or of one of its label
    images, to a single file whose format follows ``dst``'s suffix (MRC, TIFF, NRRD, NIfTI),
    or the image with its ROI (``label``), ``mask`` and ``alternative`` maps to a PartSeg
    project (.tgz, .tbz2).

    The voxel size of the chosen level goes into the header; the source is only read.
    """
    return run_export(plan_export(src, dst, level, roi, channel, label, overwrite, mask,
                                  alternative, allow_lossy), client, progress)
