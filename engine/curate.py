"""Curation of classic segmentations into training samples: the Allen Cell Structure
Segmenter Curator's three modes (``curator_sorting``, ``curator_merging``,
``curator_takeall``) in batch, driven by a table instead of a GUI.

Each sample is an image, a ground truth ``gt`` (uint8, 0 = background, 1 = foreground) and
a cost map ``cost`` (uint8, 0 = ignore in training, 1 = train), all of the image's spatial
shape. The modes differ in how the ground truth and the cost map are made:

=========  =====================================  ====================================
mode       ground truth                            cost map
=========  =====================================  ====================================
sort       ``segmentation > 0``, "good" rows only  0 where ``mask`` says, else 1
merge      ``segmentation2 > 0`` where ``mask``    0 where ``cost_mask`` says, else 1
           ``> 0``, ``segmentation > 0`` elsewhere
take-all   ``segmentation > 0``, every row         0 where ``mask`` says, else 1
=========  =====================================  ====================================

"Where the mask says": with ``mask_means="exclude"`` (the default) the cost is 0 inside the
mask (``mask > 0``), as Allen's sorting and merging excluding masks; with ``"include"`` it is
0 outside the mask, as Allen's take-all masks (``cmap[mask == 0] = 0``). The merge mask
itself always means "take ``segmentation2`` here" (Allen's merging mask).

Segmentations are binarized (``> 0``): instance labels, 0/255 masks and probability maps
all become 0/1 ground truth, as Allen's Curator writes it. Images are copied unchanged
(dtype, channels, voxel size); Allen normalizes at curation time, voxelmill leaves
normalization to training so that one curated set serves every recipe.

Output folder ``DIR``:

    DIR/sample_NNN.ome.zarr     image (level 0) + labels/gt, labels/cost (OME-NGFF 0.5)
    DIR/img_NNN.ome.tif         with ``allen_tif``: Allen's layout, read by its trainer
    DIR/img_NNN_GT.ome.tif      uint8 0/1 (as Allen's current Curator writes)
    DIR/img_NNN_CM.ome.tif      float32 0/1 (as Allen's Curator writes)
    DIR/samples.csv             manifest (:data:`MANIFEST_COLUMNS`)

Samples are numbered from 0 in table order. Everything is checked (table, files, shapes)
before anything is written; the folder is written as a hidden ``.DIR.partial`` sibling and
renamed into place when complete.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import dask.array as da
import numpy as np

from engine.errors import InputError, OptionError, VoxelmillError
from engine.io import omezarr, open_volume, writer_for
from engine.output import check_destination, commit, partial_path
from engine.stats import display_windows
from engine.volume import Volume, select_channel, spatial_chunks

MODES: tuple[str, ...] = ("sort", "merge", "take-all")
MASK_MEANINGS: tuple[str, ...] = ("exclude", "include")
MANIFEST = "samples.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "sample", "image", "segmentation", "segmentation2", "mask", "cost_mask", "mode",
    "verdict", "mask_means", "table_line",
)

#: table columns per mode: (required, optional).
COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sort": (("image", "segmentation", "verdict"), ("mask",)),
    "merge": (("image", "segmentation", "segmentation2", "mask"), ("cost_mask",)),
    "take-all": (("image", "segmentation"), ("mask",)),
}
#: Allen's Curator CSV headers, accepted as aliases (its sorting CSV has raw, seg, score, mask;
#: its merging CSV raw, seg1, seg2, score, merging_mask, excluding_mask).
ALIASES = {"raw": "image", "seg": "segmentation", "seg1": "segmentation",
           "seg2": "segmentation2", "score": "verdict", "merging_mask": "mask",
           "excluding_mask": "cost_mask"}
#: verdicts (case-insensitive); 1/0 are Allen's sorting scores.
VERDICTS = {"good": True, "bad": False, "1": True, "0": False, "1.0": True, "0.0": False}

SAMPLE_PREFIX = "sample_"


@dataclass(frozen=True)
class CurateOptions:
    """Options of a curation run.

    Parameters
    ----------
    mask_means : {"exclude", "include"}
        Meaning of the cost mask (``mask`` in sort and take-all, ``cost_mask`` in merge):
        ``exclude`` sets the cost to 0 inside it, ``include`` sets it to 0 outside it.
    allen_tif : bool
        Also write Allen's ``img_NNN.ome.tif``, ``_GT`` and ``_CM`` files.
    channel : int or str, optional
        One image channel (index or name) to keep; by default all channels are kept.
    overwrite : bool
        Replace an existing output folder.
    """

    mask_means: str = "exclude"
    allen_tif: bool = False
    channel: int | str | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class CurateRow:
    """One table row, resolved.

    Parameters
    ----------
    line : int
        Line of the table file (the header is line 1).
    image, segmentation : Path
        Absolute paths.
    segmentation2 : Path or None
        Merge mode: the segmentation taken inside ``mask``.
    mask : Path or None
        Sort/take-all: the cost mask; merge: the merge mask.
    cost_mask : Path or None
        Merge mode: the cost mask.
    keep : bool
        Whether the row becomes a sample (sort: verdict "good"; other modes: always).
    verdict : str
        The verdict as written ("" outside sort mode).
    """

    line: int
    image: Path
    segmentation: Path
    segmentation2: Path | None = None
    mask: Path | None = None
    cost_mask: Path | None = None
    keep: bool = True
    verdict: str = ""


@dataclass
class CuratePlan:
    """Everything checked before anything is written."""

    mode: str
    table: Path
    destination: Path
    options: CurateOptions
    rows: list[CurateRow]
    images: dict[int, Volume] = field(default_factory=dict)  # line → image (channel chosen)

    @property
    def samples(self) -> list[CurateRow]:
        return [r for r in self.rows if r.keep]


@dataclass
class CurateResult:
    destination: Path
    samples: list[str]
    skipped: int  # rows not made into samples (sort: "bad")
    seconds: float


# ---------------------------------------------------------------------------- the table

def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OptionError(f"curation mode {mode!r}: use one of {', '.join(MODES)}")


def _resolve(cell: str, folder: Path) -> Path:
    p = Path(cell).expanduser()
    return (p if p.is_absolute() else folder / p).absolute()


def read_table(table: str | Path, mode: str) -> list[CurateRow]:
    """Read and check a curation table.

    Parameters
    ----------
    table : str or Path
        CSV with a header row naming the columns of :data:`COLUMNS` for ``mode``
        (case-insensitive; Allen's headers raw, seg, seg1, seg2, score, merging_mask,
        excluding_mask accepted). Paths may be relative to the table's folder; an empty
        optional cell means "none". Blank lines and lines starting with ``#`` are skipped.
    mode : {"sort", "merge", "take-all"}

    Returns
    -------
    list of CurateRow
        In table order.

    Raises
    ------
    InputError
        Naming the table and line for a missing column, an empty required cell or a verdict
        other than good/bad (or Allen's 1/0).
    """
    _check_mode(mode)
    path = Path(table)
    if not path.is_file():
        raise InputError(f"{path}: no such table file")
    required, optional = COLUMNS[mode]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a CSV table ({exc})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[CurateRow] = []
    folder = path.parent.absolute()
    for cells in reader:
        line = reader.line_num
        if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [ALIASES.get(c.strip().lower(), c.strip().lower()) for c in cells]
            missing = [c for c in required if c not in header]
            if missing:
                raise InputError(
                    f"{path}: line {line}: header lacks column(s) {', '.join(missing)}; "
                    f"{mode} needs {', '.join(required)} (optional: {', '.join(optional)})")
            continue
        if len(cells) > len(header):
            raise InputError(f"{path}: line {line}: {len(cells)} cells but the header names "
                             f"{len(header)} columns")
        values = {h: c.strip() for h, c in zip(header, cells, strict=False)}
        for col in required:
            if not values.get(col):
                raise InputError(f"{path}: line {line}: empty {col!r} cell")
        keep, verdict = True, ""
        if mode == "sort":
            verdict = values["verdict"]
            if verdict.lower() not in VERDICTS:
                raise InputError(f"{path}: line {line}: verdict {verdict!r} is neither good "
                                 "nor bad")
            keep = VERDICTS[verdict.lower()]

        def opt(col: str, values: dict[str, str] = values) -> Path | None:
            v = values.get(col, "")
            return _resolve(v, folder) if v and v.lower() != "nan" else None

        rows.append(CurateRow(
            line=line, image=_resolve(values["image"], folder),
            segmentation=_resolve(values["segmentation"], folder),
            segmentation2=opt("segmentation2"), mask=opt("mask"), cost_mask=opt("cost_mask"),
            keep=keep, verdict=verdict))
    if header is None:
        raise InputError(f"{path}: empty table; the first line must name the columns "
                         f"{', '.join(required)}")
    if not rows:
        raise InputError(f"{path}: the table has a header but no rows")
    return rows


# ------------------------------------------------------------------------- checking inputs

def _image(row: CurateRow, channel: int | str | None) -> Volume:
    """The row's image with one channel chosen (or all kept) and a singleton time dropped."""
    vol = open_volume(row.image)
    if channel is not None:
        data, axes, _ = select_channel(vol, channel)
        return replace(vol, data=data, axes=axes, channel_names=(), labels={})
    if "t" in vol.axes:
        t = vol.axes.index("t")
        if vol.shape[t] != 1:
            raise InputError(f"{row.image}: has {vol.shape[t]} time points; curate one at a "
                             "time (export a single time point)")
        return replace(vol, data=vol.data[(slice(None),) * t + (0,)],
                       axes=vol.axes.replace("t", ""), labels={})
    return replace(vol, labels={})


def _spatial_shape(vol: Volume) -> tuple[int, ...]:
    return tuple(s for a, s in zip(vol.axes, vol.shape, strict=True) if a in "zyx")


def _label(path: Path, image: Volume, image_path: Path, what: str) -> da.Array:
    """A segmentation or mask as a lazy spatial array, checked against the image's shape."""
    vol = open_volume(path)
    data, axes = vol.data, vol.axes
    for a in "tc":  # a singleton channel or time axis (a TIFF saved as CZYX) carries nothing
        if a in axes:
            if data.shape[axes.index(a)] != 1:
                raise InputError(f"{path}: a {what} has one channel and one time point, not "
                                 f"axes {vol.axes!r} of shape {vol.shape}")
            data = data[(slice(None),) * axes.index(a) + (0,)]
            axes = axes.replace(a, "")
    shape = _spatial_shape(image)
    if tuple(data.shape) != shape:
        raise InputError(f"{what} {path} has shape {tuple(data.shape)} (axes {axes}) but image "
                         f"{image_path} has spatial shape {shape} (axes {image.spatial_axes})")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{path}: a {what} must be numeric, not {data.dtype}")
    return data


def _sources(row: CurateRow) -> list[tuple[str, Path | None]]:
    return [("segmentation", row.segmentation), ("segmentation2", row.segmentation2),
            ("mask", row.mask), ("cost mask", row.cost_mask)]


def plan_curation(mode: str, table: str | Path, destination: str | Path,
                  options: CurateOptions) -> CuratePlan:
    """Read the table and check every file a sample needs, before anything is written.

    Raises
    ------
    VoxelmillError
        For an unknown mode or mask meaning, a bad table (see :func:`read_table`), a missing
        or unreadable file, a shape mismatch (naming both files and shapes), no sample to
        write, or an existing destination without ``overwrite``.
    """
    _check_mode(mode)
    if options.mask_means not in MASK_MEANINGS:
        raise OptionError(f"--mask-means {options.mask_means!r}: use exclude or include")
    table, dst = Path(table), Path(destination)
    rows = read_table(table, mode)
    plan = CuratePlan(mode, table, dst, options, rows)
    if not plan.samples:
        raise InputError(f"{table}: no row is marked good; there is no sample to write")
    for row in plan.samples:
        image = _image(row, options.channel)
        for what, path in _sources(row):
            if path is not None:
                _label(path, image, row.image, what)
        plan.images[row.line] = image
    # --overwrite must not delete the inputs it reads
    check_destination(dst, options.overwrite, manifests=(MANIFEST,), sources=[
        p for row in plan.samples
        for p in (row.image, *(p for _, p in _sources(row) if p is not None))])
    return plan


# ------------------------------------------------------------------------------ the maps

def ground_truth(segmentation: np.ndarray, segmentation2: np.ndarray | None = None,
                 merge_mask: np.ndarray | None = None) -> np.ndarray:
    """Binary ground truth from one segmentation, or two merged by a mask.

    Parameters
    ----------
    segmentation : ndarray
        Any numeric dtype; foreground is ``> 0``.
    segmentation2, merge_mask : ndarray, optional
        Same shape; where ``merge_mask > 0`` the ground truth is ``segmentation2 > 0``.

    Returns
    -------
    ndarray of uint8
        0 = background, 1 = foreground; shape of ``segmentation``.
    """
    gt = np.asarray(segmentation) > 0
    if segmentation2 is not None:
        if merge_mask is None:
            raise OptionError("merging two segmentations needs a merge mask")
        gt = np.where(np.asarray(merge_mask) > 0, np.asarray(segmentation2) > 0, gt)
    return gt.astype(np.uint8)


def cost_map(shape: Sequence[int], mask: np.ndarray | None = None,
             mask_means: str = "exclude") -> np.ndarray:
    """Cost map: 1 = train, 0 = ignore.

    Parameters
    ----------
    shape : sequence of int
        Spatial shape.
    mask : ndarray, optional
        Of ``shape``; inside means ``mask > 0``. None: all 1.
    mask_means : {"exclude", "include"}
        ``exclude``: 0 inside the mask; ``include``: 0 outside it.

    Returns
    -------
    ndarray of uint8
    """
    if mask_means not in MASK_MEANINGS:
        raise OptionError(f"--mask-means {mask_means!r}: use exclude or include")
    if mask is None:
        return np.ones(tuple(shape), np.uint8)
    inside = np.asarray(mask) > 0
    return (~inside if mask_means == "exclude" else inside).astype(np.uint8)


# ------------------------------------------------------------------------------- writing

def _load(data: da.Array, path: Path) -> np.ndarray:
    try:
        return np.asarray(data.compute(scheduler="synchronous"))
    except VoxelmillError:
        raise
    except Exception as exc:  # a library's decoding error: name the file and the problem
        raise InputError(f"{path}: cannot read the voxels: {type(exc).__name__}: {exc}"
                         ) from None


def _write_image(group: Path, vol: Volume, data: np.ndarray, name: str, method: str) -> None:
    """One single-level NGFF 0.5 image (or label image) ``group`` holding ``data``."""
    group.mkdir(parents=True, exist_ok=True)
    chunks = spatial_chunks(vol, None)
    arr = omezarr.create_level(group, "0", data.shape, chunks, data.dtype, vol.axes, "0.5")
    arr[...] = data
    level = omezarr.LevelMeta("0", vol.scale(), (0.0,) * len(vol.axes))
    omezarr.write_group_attrs(group, {"multiscales": [
        omezarr.multiscales(vol.axes, vol.unit, [level], name, "0.5", method)]}, "0.5")


def write_sample(folder: Path, name: str, image: Volume, data: np.ndarray, gt: np.ndarray,
                 cost: np.ndarray, allen_name: str | None = None) -> None:
    """Write one sample into ``folder``.

    Parameters
    ----------
    folder : Path
        Existing output folder.
    name : str
        ``NAME.ome.zarr`` is written: ``data`` as the image, ``gt`` and ``cost`` as the
        label images ``labels/gt`` and ``labels/cost``, voxel size and unit of ``image``.
    image : Volume
        The source image (axes, voxel size, unit, channel names) whose voxels are ``data``.
    data : ndarray
        Image voxels, shape ``image.shape``.
    gt, cost : ndarray of uint8
        Spatial shape of the image.
    allen_name : str, optional
        Also write ``ALLEN.ome.tif``, ``ALLEN_GT.ome.tif`` (uint8 0/1) and
        ``ALLEN_CM.ome.tif`` (float32 0/1), OME-TIFF with physical sizes in µm.
    """
    zpath = folder / f"{name}.ome.zarr"
    _write_image(zpath, image, data, name, "none")
    spatial = Volume(da.from_array(gt, chunks=gt.shape), image.spatial_axes, image.voxel_size,
                     image.unit, source=image.source)
    for lab, values in (("gt", gt), ("cost", cost)):
        _write_image(zpath / "labels" / lab, spatial, values, lab, "none")
        omezarr.write_group_attrs(zpath / "labels" / lab, {
            "image-label": omezarr.image_label(sorted({0, 1}), "0.5")}, "0.5")
    omezarr.write_group_attrs(zpath / "labels", {"labels": ["gt", "cost"]}, "0.5")
    nchan = data.shape[image.axes.index("c")] if "c" in image.axes else 1
    omezarr.write_group_attrs(zpath, {"omero": omezarr.omero(
        image.channel_names or (name,), display_windows(zpath / "0", image.axes, nchan))}, "0.5")
    if allen_name is None:
        return
    for suffix, vol, values in (
        ("", image, data),
        ("_GT", spatial, gt),
        ("_CM", spatial, cost.astype(np.float32)),  # Allen writes float32 cost maps
    ):
        path = folder / f"{allen_name}{suffix}.ome.tif"
        out = replace(vol, data=da.from_array(values, chunks=values.shape))
        writer_for(path).write(out, path, [values])


def run_curation(plan: CuratePlan, report: Callable[[str], None] = print) -> CurateResult:
    """Write the planned samples and the manifest; nothing appears at the destination
    unless every sample was written."""
    t0 = time.monotonic()
    opts, dst = plan.options, plan.destination
    partial = partial_path(dst)
    if partial.exists():
        report(f"removing an unfinished curation: {partial}")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    names: list[str] = []
    manifest: list[list[str]] = []
    try:
        for i, row in enumerate(plan.samples):
            image = plan.images[row.line]
            data = _load(image.data, row.image)
            arrays = {what: _load(_label(p, image, row.image, what), p)
                      for what, p in _sources(row) if p is not None}
            if plan.mode == "merge":
                gt = ground_truth(arrays["segmentation"], arrays["segmentation2"],
                                  arrays["mask"])
                cost = cost_map(gt.shape, arrays.get("cost mask"), opts.mask_means)
            else:
                gt = ground_truth(arrays["segmentation"])
                cost = cost_map(gt.shape, arrays.get("mask"), opts.mask_means)
            name = f"{SAMPLE_PREFIX}{i:03d}"
            write_sample(partial, name, image, data, gt, cost,
                         f"img_{i:03d}" if opts.allen_tif else None)
            names.append(name)
            manifest.append([name, str(row.image), str(row.segmentation),
                             str(row.segmentation2 or ""), str(row.mask or ""),
                             str(row.cost_mask or ""), plan.mode, row.verdict.lower(),
                             opts.mask_means, str(row.line)])
            report(f"{name}: {row.image.name} (table line {row.line})")
        with open(partial / MANIFEST, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(MANIFEST_COLUMNS)
            w.writerows(manifest)
        commit(partial, dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return CurateResult(dst, names, len(plan.rows) - len(plan.samples), time.monotonic() - t0)


def curate(mode: str, table: str | Path, destination: str | Path,
           options: CurateOptions | None = None,
           report: Callable[[str], None] = print) -> CurateResult:
    """Plan and run a curation (see the module docstring)."""
    plan = plan_curation(mode, table, destination, options or CurateOptions())
    return run_curation(plan, report)
