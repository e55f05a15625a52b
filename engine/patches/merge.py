"""Merge hand-made Add/Remove/Ignore corrections into label patches (MemBrain-seg layout).

MemBrain-seg's ``patch_corrections`` workflow: label patches (0 = background,
1 = foreground, 2 = ignore) are corrected in MITK or napari by painting masks that are
saved next to each other, one folder per patch::

    labels_dir/p1.nii.gz            corrections_dir/p1/Add1.nrrd
    labels_dir/p2.nii.gz            corrections_dir/p1/Remove1.nrrd
                                    corrections_dir/p1/Ignore1.nrrd ...

Per class, the masks of a folder are combined (a voxel is marked when any file has a
value > 0 there) and applied in the order Remove → 0, Add → 1, Ignore → 2 (so Ignore
wins), then the outer ``border`` voxels of the patch are set to 2 again.

Where this differs from MemBrain-seg's ``merge_corrections``, on purpose:

- prefixes match case-insensitively (``add_membrane.nii.gz``, ``REMOVE2.nrrd``);
- masks are combined with a logical or of ``> 0`` per file instead of a sum then
  ``> 0``: the same for non-negative masks, but no integer overflow and no cancelling
  of a positive by a negative value;
- shapes are checked (a mismatch is an error naming both files), and label values other
  than 0, 1, 2 are refused instead of passing through;
- the output keeps the label file's format, name, voxel size, origin and dtype
  (MemBrain-seg writes headerless NIfTI under the original name, even for ``.nrrd``);
- a patch without corrections folder is copied unchanged (MemBrain-seg writes nothing for
  it), a corrections folder without label patch is an error (MemBrain-seg ignores it);
- ``border=0`` disables the border (MemBrain-seg's ``patch[-0:]`` would set the whole
  patch to ignore), and a border that leaves no editable voxel (twice the border at least
  the patch's size on some axis) is refused;
- without a ``border``, the extraction border recorded in the patches' manifest
  (``DIR/patches.csv`` next to ``DIR/labelsCorr``, by ``voxelmill patches extract``) is
  used, and MemBrain-seg's 16 voxels only when there is none: a border wider than the one
  the patches were cut with would erase the corrections near their edges;
- everything is checked before anything is written, the output folder is created, and
  it appears only when complete (written to a hidden sibling, then renamed).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import DestinationError, InputError, OptionError
from engine.io.layouts import PATCHES_MANIFEST, patch_name_suffix
from engine.output import check_destination, commit, partial_path
from engine.patches.files import (
    PatchHeader,
    patch_format,
    patch_stem,
    read_patch,
    read_patch_header,
    unit_recorded,
    write_patch,
)
from engine.volume import convert_length

#: correction classes in the order they are applied, and the label each one writes.
CLASSES: tuple[tuple[str, int], ...] = (("remove", 0), ("add", 1), ("ignore", 2))
IGNORE = 2
LABEL_VALUES = (0, 1, 2)
#: MemBrain-seg's border, used when neither the caller nor a manifest gives one
DEFAULT_BORDER = 16
Border = tuple[int, int, int]

#: header agreement: voxel sizes within this relative tolerance, origins within this
#: fraction of a voxel.
VOXEL_RTOL = 1e-4
ORIGIN_VOXELS = 0.01


@dataclass
class MergeReport:
    """What :func:`merge_corrections` did.

    Attributes
    ----------
    out_dir : Path
        The folder written.
    merged : int
        Label patches written with their corrections applied.
    copied : int
        Label patches without a corrections folder, copied unchanged.
    skipped : int
        Files or folders that were neither label patches nor corrections, left alone.
    warnings : int
        Warning lines reported (header disagreements, empty correction folders).
    """

    out_dir: Path
    merged: int = 0
    copied: int = 0
    skipped: int = 0
    warnings: int = 0


@dataclass
class _Plan:
    """One label patch and its corrections, checked before any voxel is read."""

    label: PatchHeader
    folder: Path | None
    border: Border = (DEFAULT_BORDER,) * 3
    corrections: dict[str, list[Path]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _is_patch_entry(path: Path) -> bool:
    """A file with a patch suffix, or a ``.zarr`` folder."""
    try:
        fmt = patch_format(path)
    except OptionError:
        return False
    return path.is_dir() if fmt == "zarr" else path.is_file()


def _correction_class(name: str) -> str | None:
    lower = name.lower()
    return next((c for c, _ in CLASSES if lower.startswith(c)), None)


def _units(header: PatchHeader) -> list[str]:
    """Units the header's numbers may be in: its own, and millimetres when the file does
    not record a unit (ITK tools such as MITK write such files in millimetres)."""
    return [header.unit] if unit_recorded(header.path) else [header.unit, "millimeter"]


def _agree(a: tuple[float, ...], b: tuple[float, ...], scale: tuple[float, ...], tol: float,
           units_a: list[str], units_b: list[str]) -> bool:
    """Whether two header vectors agree: as plain numbers (tools that drop units), or in
    one of the units each side may mean. ``tol`` times ``scale`` (same units as ``a``)
    bounds the difference."""
    va, vb, sc = (np.asarray(v, dtype=float) for v in (a, b, scale))
    if np.all(np.abs(va - vb) <= tol * np.abs(sc)):
        return True
    for ua in units_a:
        for ub in units_b:
            f = convert_length(1.0, ua, ub)
            if np.all(np.abs(va * f - vb) <= tol * np.abs(sc * f)):
                return True
    return False


def _header_warnings(label: PatchHeader, corr: PatchHeader) -> list[str]:
    """Warnings when a correction's voxel size or origin disagree with its label patch."""
    units_l, units_c = _units(label), _units(corr)
    out = []
    if not _agree(label.voxel_size, corr.voxel_size, label.voxel_size, VOXEL_RTOL, units_l,
                  units_c):
        out.append(f"warning: {corr.path}: voxel size {_fmt(corr.voxel_size)} {corr.unit} "
                   f"differs from {_fmt(label.voxel_size)} {label.unit} of {label.path}; "
                   "was it saved from another patch?")
    if label.origin is not None and corr.origin is not None and not _agree(
            label.origin, corr.origin, label.voxel_size, ORIGIN_VOXELS, units_l, units_c):
        out.append(f"warning: {corr.path}: origin {_fmt(corr.origin)} {corr.unit} differs "
                   f"from {_fmt(label.origin)} {label.unit} of {label.path}; was it saved "
                   "from another patch?")
    return out


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def recorded_borders(labels_dir: Path) -> tuple[Path, dict[str, Border]]:
    """The extraction border per patch name from the manifest next to ``labels_dir``
    (``labels_dir/../patches.csv``); empty when there is none or it records no border."""
    from engine.patches.extract import BORDER_COLUMNS

    manifest = labels_dir.parent / PATCHES_MANIFEST
    if not manifest.is_file():
        return manifest, {}
    try:
        with open(manifest, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{manifest}: cannot be read ({exc})") from None
    out: dict[str, Border] = {}
    for i, row in enumerate(rows, start=2):
        if not all(row.get(c) for c in BORDER_COLUMNS) or not row.get("name"):
            continue
        try:
            border = tuple(int(row[c]) for c in BORDER_COLUMNS)
        except ValueError:
            raise InputError(f"{manifest}, line {i}: border "
                             f"{[row[c] for c in BORDER_COLUMNS]} is not whole numbers") from None
        if any(b < 0 for b in border):
            raise InputError(f"{manifest}, line {i}: negative border {border}")
        out[row["name"]] = border  # type: ignore[assignment]
    return manifest, out


def _plan(labels_dir: Path, corrections_dir: Path, border: Border | None,
          report: Callable[[str], None]) -> tuple[list[_Plan], int]:
    """Pair label patches with correction folders and check names, shapes, borders.

    Reads headers only. Returns the plans (sorted by file name) and the number of
    entries skipped (each reported).
    """
    skipped = 0
    stems: dict[str, Path] = {}
    for entry in sorted(labels_dir.iterdir()):
        if entry.name.startswith("."):  # e.g. a partial file left by an interrupted writer
            report(f"skipped {entry}: hidden")
            skipped += 1
            continue
        if not _is_patch_entry(entry):
            report(f"skipped {entry}: not a label patch (.nii.gz, .nii, .nrrd, .mrc, .tif, "
                   ".tiff file or .zarr folder)")
            skipped += 1
            continue
        stem = patch_stem(entry)
        if stem in stems:
            raise InputError(f"{stems[stem]} and {entry}: two label patches named {stem!r}; "
                             "their corrections folder would be ambiguous")
        stems[stem] = entry
    if not stems:
        raise InputError(f"{labels_dir}: no label patches (.nii.gz, .nii, .nrrd, .mrc, .tif, "
                         ".tiff files or .zarr folders)")

    folders: dict[str, Path] = {}
    orphans = []
    for entry in sorted(corrections_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            report(f"skipped {entry}: not a corrections folder")
            skipped += 1
        elif entry.name in stems:
            folders[entry.name] = entry
        else:
            orphans.append(entry)
    if orphans:
        names = ", ".join(str(p) for p in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        what = "corrections folder matches" if len(orphans) == 1 else "corrections folders match"
        raise InputError(f"{names}: {what} no label patch in {labels_dir} (a folder is named "
                         "like its patch without suffix, e.g. 'p1' for p1.nii.gz)")

    manifest, recorded = recorded_borders(labels_dir) if border is None else (None, {})
    if recorded:
        report(f"border: as extracted, from {manifest}")
    plans = []
    for stem, path in stems.items():
        label = read_patch_header(path)
        chosen = border if border is not None else recorded.get(stem, (DEFAULT_BORDER,) * 3)
        origin = "--border" if border is not None else (
            f"the border recorded in {manifest}" if stem in recorded else "the default border")
        if any(2 * b >= s for b, s in zip(chosen, label.shape, strict=False)):
            shown = chosen[0] if len(set(chosen)) == 1 else chosen
            raise OptionError(
                f"border {shown} ({origin}) leaves no editable voxel of {path} (shape "
                f"{label.shape}): every voxel would be ignore and the corrections lost; use "
                f"at most {(min(label.shape) - 1) // 2}")
        plan = _Plan(label, folders.get(stem), chosen)
        if plan.folder is not None:
            for entry in sorted(plan.folder.iterdir()):
                cls = _correction_class(entry.name)
                if cls is None:
                    report(f"skipped {entry}: not a correction (names start with Add, Remove "
                           "or Ignore)")
                    skipped += 1
                    continue
                corr = read_patch_header(entry)  # a correction that cannot be read is an error
                if corr.shape != label.shape:
                    raise InputError(f"{entry}: correction of shape {corr.shape} does not fit "
                                     f"{path} of shape {label.shape}")
                plan.warnings += _header_warnings(label, corr)
                plan.corrections.setdefault(cls, []).append(entry)
            if not plan.corrections:
                plan.warnings.append(f"warning: {plan.folder}: no Add, Remove or Ignore "
                                     f"files; {path.name} only gets its border set to ignore")
        plans.append(plan)
    return plans, skipped


def _mask(paths: list[Path], shape: tuple[int, ...]) -> np.ndarray:
    """Voxels where any of the files is > 0 (bool, ``shape``)."""
    mask = np.zeros(shape, dtype=bool)
    for path in paths:
        data = read_patch(path).data
        if data.shape != shape:  # the header said otherwise: the file changed meanwhile
            raise InputError(f"{path}: correction of shape {data.shape} does not fit {shape}")
        mask |= data > 0
    return mask


def apply_corrections(labels: np.ndarray, masks: dict[str, np.ndarray],
                      border: int | Sequence[int], where: str = "labels") -> np.ndarray:
    """Apply correction masks and the ignore border to a label patch.

    Parameters
    ----------
    labels : numpy.ndarray
        Label patch of shape ``(z, y, x)`` with values 0 (background), 1 (foreground)
        and 2 (ignore); any numeric dtype (bool becomes uint8 so it can hold 2).
    masks : dict of str to numpy.ndarray
        Boolean masks of ``labels.shape`` under ``"remove"``, ``"add"``, ``"ignore"``
        (each optional), applied in that order: Remove → 0, Add → 1, Ignore → 2.
    border : int or sequence of int
        Width in voxels of the outer shell set to 2 afterwards (one, or one per axis); 0
        for none.
    where : str
        Name of the labels for error messages.

    Returns
    -------
    numpy.ndarray
        A new array of ``labels``' shape and dtype.

    Raises
    ------
    InputError
        When ``labels`` holds values other than 0, 1 and 2.
    """
    values = np.unique(labels)
    bad = values[~np.isin(values, LABEL_VALUES)]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise InputError(f"{where}: label patch values must be 0 (background), 1 (foreground) "
                         f"or 2 (ignore); found {shown}")
    out = labels.astype(np.uint8) if labels.dtype == np.bool_ else labels.copy()
    for cls, value in CLASSES:
        if cls in masks:
            out[masks[cls]] = value
    widths = (border,) * out.ndim if isinstance(border, int | np.integer) else tuple(border)
    if any(widths):
        shell = np.ones(out.shape, dtype=bool)
        shell[tuple(slice(b, n - b) for b, n in zip(widths, out.shape, strict=True))] = False
        out[shell] = IGNORE
    return out


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def merge_corrections(labels_dir: str | Path, corrections_dir: str | Path,
                      out_dir: str | Path, border: int | None = None,
                      report: Callable[[str], None] = print,
                      overwrite: bool = False) -> MergeReport:
    """Merge Add/Remove/Ignore correction masks into label patches.

    Parameters
    ----------
    labels_dir : str or Path
        Folder of label patches (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mrc``,
        ``.tif``/``.tiff`` files or ``.zarr`` images), shape ``(z, y, x)``, values 0, 1, 2.
        Other entries are reported and skipped.
    corrections_dir : str or Path
        One folder per corrected patch, named like the patch without its suffix. In it,
        files whose names start with ``Add``, ``Remove`` or ``Ignore`` (any case) are
        masks of the patch's shape in any patch format; other entries are reported and
        skipped.
    out_dir : str or Path
        Folder to create: one file per label patch, same name and format, with the
        label's voxel size, origin and dtype.
    border : int or None
        Outer shell width in voxels set to ignore (2) after the corrections; 0 for none.
        None: the extraction border recorded in ``labels_dir/../patches.csv`` for each
        patch, else :data:`DEFAULT_BORDER` (16, MemBrain-seg's).
    report : callable
        Receives one line per patch, per skipped entry and per warning.
    overwrite : bool
        Replace an existing ``out_dir``.

    Returns
    -------
    MergeReport
        Counts of merged and copied patches, skipped entries and warnings.

    Raises
    ------
    InputError
        For a missing folder, no label patches, a correction folder without label patch,
        an unreadable patch or correction, a shape mismatch or label values other than
        0, 1, 2. Nothing is written then.
    OptionError
        For a negative border or one that leaves no editable voxel of a patch.
    DestinationError
        When ``out_dir`` exists without ``overwrite`` or overlaps an input folder.
    """
    labels_dir, corrections_dir, out_dir = (Path(p) for p in (labels_dir, corrections_dir,
                                                                 out_dir))
    if border is not None and (isinstance(border, bool) or not isinstance(
            border, int | np.integer) or border < 0):
        raise OptionError(f"border {border!r}: must be a whole number of voxels >= 0")
    for what, d in (("labels", labels_dir), ("corrections", corrections_dir)):
        if not d.is_dir():
            raise InputError(f"{d}: {what} folder does not exist" if not d.exists()
                             else f"{d}: {what} folder is not a folder")
    dst = out_dir.resolve()
    for d in (labels_dir, corrections_dir):
        src = d.resolve()
        if _inside(dst, src) or _inside(src, dst):
            raise DestinationError(f"{out_dir}: output folder overlaps the input folder {d}; "
                                   "choose a folder outside it")
    if out_dir.exists() and not overwrite:
        raise DestinationError(f"{out_dir}: destination exists; pass --overwrite to replace it")

    plans, skipped = _plan(labels_dir, corrections_dir,
                           None if border is None else (int(border),) * 3, report)

    # a merge writes no manifest: its output folder holds patch files only
    check_destination(out_dir, overwrite, sources=(labels_dir, corrections_dir),
                      owned=lambda d: all(patch_name_suffix(p) for p in d.iterdir()))
    result = MergeReport(out_dir, skipped=skipped)
    partial = partial_path(out_dir)
    if partial.exists():  # left by an interrupted run; nothing in it is trusted
        shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    partial.mkdir()
    try:
        for plan in plans:
            for line in plan.warnings:
                report(line)
            result.warnings += len(plan.warnings)
            src = plan.label.path
            if plan.folder is None:
                if src.is_dir():
                    shutil.copytree(src, partial / src.name)
                else:
                    shutil.copy2(src, partial / src.name)
                report(f"copied {src.name} unchanged: no corrections folder "
                       f"{corrections_dir / patch_stem(src)}")
                result.copied += 1
                continue
            label = read_patch(src)
            masks = {cls: _mask(paths, label.data.shape)
                     for cls, paths in plan.corrections.items()}
            merged = apply_corrections(label.data, masks, plan.border, where=str(src))
            write_patch(partial / src.name, merged, label.voxel_size, label.unit, label.origin)
            counts = ", ".join(f"{cls} {int(masks[cls].sum())}" if cls in masks else f"{cls} 0"
                               for cls, _ in CLASSES)
            n_files = sum(len(p) for p in plan.corrections.values())
            report(f"merged {src.name}: {n_files} correction file{'s' * (n_files != 1)} "
                   f"(voxels marked: {counts}), border "
                   f"{plan.border[0] if len(set(plan.border)) == 1 else plan.border}")
            result.merged += 1
        commit(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result
