"""Write merged correction patches back into the full-volume labels of an OME-Zarr image.

The loop MemBrain-seg leaves open: patches cut by :mod:`engine.patches.extract` (bounds in
``patches.csv``), corrected and merged (:mod:`engine.patches.merge`, values 0, 1 and
2 = ignore) go back into ``IMAGE/labels/NAME`` so it can be re-exported or trained on.

What is written
    For each manifest row whose patch file is in the merged folder (name plus any patch
    suffix), the patch lands at its recorded bounds ``z0:z1, y0:y1, x0:x1`` of level 0:
    voxels equal to 2 (ignore) keep the existing value, 0 writes 0 (background) and 1
    writes the foreground value; the part of a padded patch outside the volume is
    dropped. The foreground value is 1 when the label image is binary (its values are
    0 and 1 only, read from the ``image-label`` colours, else by a blockwise scan). A label
    image holding anything else (instance ids, or 2 from an earlier round) is refused
    unless ``value`` names the id foreground gets. Rows without a file are reported
    and skipped; a patch file without a row is an error.

Chunk safety
    Work is grouped by storage unit (shard, else chunk) of level 0: one task per touched
    unit reads it, applies every patch touching it in manifest order (a later patch wins
    where patches overlap), and writes it. No two tasks write one chunk, and only touched
    chunks are read or written. The lower pyramid levels are then recomputed in the
    touched region, level by level, with :class:`engine.pyramid.PyramidTask` (mode
    downsampling, exactly as the conversion built them), one task per touched chunk.

Provenance
    Kept in the label group's attributes (``zarr.json`` / ``.zattrs``) under
    ``"voxelmill" → "provenance"``: a list of entries, oldest first. An ``"apply"`` entry
    holds ``id``, ``patch``, ``bounds`` (``[[z0, z1], [y0, y1], [x0, x1]]`` as in the
    manifest), ``clipped`` (the same, inside the volume), ``file``, ``manifest`` (absolute
    paths), ``sha256`` (of the patch file's bytes; for a ``.zarr`` folder, of its files'
    relative paths and bytes in sorted order), ``value``, ``written`` (voxels set),
    ``time`` (ISO 8601, UTC) and ``undo`` (the undo record, relative to the group). An
    ``"undo"`` entry holds ``id``, ``patch``, ``undoes`` (the apply entry's id),
    ``restored`` and ``time``.

Undo
    Before any voxel is modified, each application saves the previous values of its
    clipped region and the mask of the voxels it writes, as uncompressed ``.npy`` files in
    ``IMAGE/labels/NAME/.voxelmill-undo/<id>/`` (``before.npy``, ``written.npy``). Undoing
    a patch restores its most recent application that is not yet undone: the voxels it
    wrote get their previous values back, nothing else changes. When a later, still
    applied patch wrote some of those voxels, undo is refused, naming the later patches
    (undo them first, latest first): restoring would silently clobber their values.

Atomicity and interruptions
    Everything (manifest, files, shapes, values, voxel size, label values) is validated
    before anything is written. Then the undo records are written, then a journal of the
    run (``.voxelmill-undo/pending.json``), then the voxels, then the log entries, and
    the journal is removed. A run interrupted between journal and log leaves the journal;
    the next apply or undo first rolls that run back from its undo records (latest
    patch first, which gives back the exact previous state whatever was written).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from engine import events, provenance
from engine.blocks import Block, BlockGrid
from engine.errors import InputError, OptionError
from engine.io import omezarr
from engine.io.integrity import unit_shape
from engine.io.layouts import PATCH_SUFFIXES, patch_stem
from engine.names import safe_name
from engine.patches.extract import IGNORE, MANIFEST_COLUMNS
from engine.patches.files import read_patch
from engine.progress import Progress
from engine.volume import convert_length
from engine.workerpaths import check_workers_see

UNDO_DIR = ".voxelmill-undo"
JOURNAL = "pending.json"
#: relative tolerance when comparing the manifest's voxel size with the label image's.
VOXEL_RTOL = 1e-3

Bounds = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class PatchEntry:
    """One manifest row with its merged patch file.

    Attributes
    ----------
    name : str
        The patch name (manifest ``name``, the file name without suffix).
    path : str
        Absolute path of the merged patch file.
    start, stop : tuple of 3 int
        Patch bounds ``(z, y, x)`` in level-0 voxels; may lie outside the volume (padding).
    sha256 : str
        Hash of the patch file (see the module docstring).
    """

    name: str
    path: str
    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    sha256: str

    def clipped(self, shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """The bounds inside a volume of ``shape``, as level-0 slices."""
        return tuple(slice(max(a, 0), min(b, n))  # type: ignore[return-value]
                     for a, b, n in zip(self.start, self.stop, shape, strict=True))

    @property
    def bounds(self) -> Bounds:
        return tuple((a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore


@dataclass
class LabelTarget:
    """A label image of an OME-Zarr image, with its pyramid levels.

    Attributes
    ----------
    group : Path
        ``IMAGE/labels/NAME``.
    ngff : str
        NGFF version of the group ("0.5" or "0.4").
    paths : list of str
        Level array paths, level 0 first.
    shapes, units : list of tuple of int
        Level shapes and storage units (shard, else chunk) ``(z, y, x)``.
    factors : list of tuple of int
        Downsampling factor of each level from the previous one (level 0: all 1).
    voxel_size : tuple of 3 float
        Level-0 voxel size ``(z, y, x)`` in ``unit``.
    unit : str
    dtype : numpy.dtype
    """

    group: Path
    ngff: str
    paths: list[str]
    shapes: list[tuple[int, ...]]
    units: list[tuple[int, ...]]
    factors: list[tuple[int, ...]]
    voxel_size: tuple[float, ...]
    unit: str
    dtype: np.dtype

    @property
    def undo_dir(self) -> Path:
        return self.group / UNDO_DIR


@dataclass
class ApplyPlan:
    """Everything :func:`run_apply` needs, validated."""

    target: LabelTarget
    entries: list[PatchEntry]
    manifest: Path
    value: int | None
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ApplyResult:
    """What :func:`run_apply` or :func:`undo_patch` did.

    Attributes
    ----------
    entries : list of dict
        The provenance entries appended to the log.
    chunks : int
        Level-0 storage units rewritten.
    voxels : int
        Level-0 voxels written (apply) or restored (undo).
    rolled_back : int
        Patches of an interrupted earlier run rolled back first.
    seconds : float
    """

    entries: list[dict[str, Any]]
    chunks: int
    voxels: int
    rolled_back: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------- reading

def open_target(image: str | Path, name: str) -> LabelTarget:
    """Open ``IMAGE/labels/NAME`` of an OME-Zarr image as a 3D label pyramid.

    Raises
    ------
    InputError
        When the image or label group is missing, or the labels are not a 3D (z, y, x)
        integer pyramid whose levels follow one another by integer factors.
    """
    import zarr

    image = Path(image)
    if not image.is_dir():
        raise InputError(f"{image}: no such OME-Zarr image")
    group = image / "labels" / name
    if not name or "/" in name or not group.is_dir():
        known = omezarr.label_names(image)
        raise InputError(f"{image}: no label image {name!r}; its labels are "
                         + (", ".join(known) if known else "none"))
    if not group.resolve().is_relative_to(image.resolve()):  # a link out of the store
        raise InputError(f"{group}: the label group leads outside the store {image}")
    attrs, ngff = omezarr.read_attrs(group)
    if "multiscales" not in attrs:
        raise InputError(f"{group}: label group has no 'multiscales' metadata")
    ms = attrs["multiscales"][0]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms["axes"])
    if axes != "zyx":
        raise InputError(f"{group}: labels must be 3D (z, y, x), not axes {axes!r}")
    units = [a.get("unit") for a in ms["axes"] if isinstance(a, dict) and a.get("unit")]
    paths, shapes, chunks, scales = [], [], [], []
    for ds in ms["datasets"]:
        level_path = str(omezarr.dataset_path(group, ds))  # writes go here: confined
        arr = zarr.open_array(level_path, mode="r")
        paths.append(level_path)
        shapes.append(tuple(int(s) for s in arr.shape))
        chunks.append(tuple(int(c) for c in unit_shape(arr)))
        scale = next((t["scale"] for t in ds.get("coordinateTransformations", [])
                      if t.get("type") == "scale"), [1.0, 1.0, 1.0])
        scales.append([float(s) for s in scale])
    dtype = np.dtype(zarr.open_array(paths[0], mode="r").dtype)
    if dtype.kind not in "iub":
        raise InputError(f"{group}: labels must have an integer dtype, not {dtype}")
    factors = [(1, 1, 1)]
    for i in range(1, len(paths)):
        f = tuple(int(round(b / a)) for a, b in zip(scales[i - 1], scales[i], strict=True))
        expect = tuple(-(-s // k) for s, k in zip(shapes[i - 1], f, strict=True)) \
            if all(k >= 1 for k in f) else None
        if expect != shapes[i]:
            raise InputError(f"{group}: level {ds['path']} of shape {shapes[i]} is not level "
                             f"{i - 1} ({shapes[i - 1]}) downsampled by an integer factor")
        factors.append(f)  # type: ignore[arg-type]
    return LabelTarget(group, ngff, paths, shapes, chunks, factors,
                       tuple(scales[0]), units[0] if units else "micrometer", dtype)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a patch file's bytes; of a ``.zarr`` folder, of each file's relative path
    and bytes in sorted path order."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
    else:
        with open(p, "rb") as fh:
            for piece in iter(lambda: fh.read(2**20), b""):
                h.update(piece)
    return h.hexdigest()


def _read_manifest(manifest: Path) -> list[dict[str, str]]:
    if not manifest.is_file():
        raise InputError(f"{manifest}: no such manifest (patches.csv written by "
                         "'voxelmill patches extract')")
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{manifest}: not a patch manifest; columns missing: "
                             f"{', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise InputError(f"{manifest}: the manifest lists no patches")
    return rows


def _patch_files(merged_dir: Path) -> dict[str, Path]:
    """Patch files of ``merged_dir`` by name without suffix (hidden entries skipped)."""
    if not merged_dir.is_dir():
        raise InputError(f"{merged_dir}: merged patch folder does not exist")
    files: dict[str, Path] = {}
    for p in sorted(merged_dir.iterdir()):
        lower = p.name.lower()
        if p.name.startswith(".") or not any(lower.endswith(s) and len(lower) > len(s)
                                             for s in PATCH_SUFFIXES):
            continue
        stem = patch_stem(p)
        if stem in files:
            raise InputError(f"{merged_dir}: two files for patch {stem}: {files[stem].name} "
                             f"and {p.name}; keep one")
        files[stem] = p
    return files


def _label_set(target: LabelTarget, client: Any) -> set[int] | None | bool:
    """The label values of level 0: from the ``image-label`` colours, else by a blockwise
    scan on ``client`` (None past 1024 values; False when a scan is needed but no client
    is given)."""
    attrs, _ = omezarr.read_attrs(target.group)
    colors = attrs.get("image-label", {}).get("colors")
    if colors is not None:
        return {0} | {int(c["label-value"]) for c in colors}
    if client is None:
        return False
    from engine.labels import label_values

    values = label_values(client, Path(target.paths[0]), target.units[0])
    return None if values is None else set(values)


def _value_for(target: LabelTarget, found: set[int] | None) -> int:
    """1 for binary labels; an InputError for any other label image."""
    if found is None or not found <= {0, 1}:
        shown = ("more than 1024 values" if found is None else
                 ", ".join(str(v) for v in sorted(found)[:12]))
        raise InputError(
            f"{target.group}: labels are not binary (values {shown}); pass --value V to say "
            "which label id the patches' foreground (1) gets")
    return 1


def _check_value(target: LabelTarget, value: int) -> None:
    info = np.iinfo(target.dtype) if target.dtype.kind in "iu" else None
    if value == 0 or (info is not None and not info.min <= value <= info.max) or \
            (info is None and value != 1):
        raise OptionError(f"--value {value}: must be a non-zero label id that fits the "
                          f"labels' dtype {target.dtype}")


def plan_apply(merged_dir: str | Path, manifest: str | Path, image: str | Path, labels: str,
               value: int | None = None, client: Any = None) -> ApplyPlan:
    """Validate an application of merged patches; nothing is written.

    Parameters
    ----------
    merged_dir : str or Path
        Folder of merged label patches (any patch format), values 0, 1, 2 (ignore).
    manifest : str or Path
        The ``patches.csv`` of the extraction.
    image : str or Path
        The OME-Zarr image; the patches go into ``IMAGE/labels/LABELS`` level 0.
    labels : str
        Name of the label image.
    value : int, optional
        Label id written for foreground (1). Required unless the label image is binary.
    client : distributed.Client, optional
        Scans the label values when the ``image-label`` metadata lists none; without
        it the scan waits for :func:`run_apply` (``plan.value`` is None until then).

    Returns
    -------
    ApplyPlan

    Raises
    ------
    InputError
        For a missing or malformed manifest, folder or label image, a patch file without
        manifest row, a patch whose shape differs from its bounds or that lies outside
        the volume, patch values other than 0, 1, 2, a voxel size that differs from the
        manifest's, or instance labels without ``value``.
    OptionError
        For a ``value`` that is 0 or does not fit the label dtype.
    """
    merged_dir, manifest = Path(merged_dir), Path(manifest)
    target = open_target(image, labels)
    rows = _read_manifest(manifest)
    files = _patch_files(merged_dir)
    names = [safe_name(r["name"] or "", f"{manifest}, line {line}")
             for line, r in enumerate(rows, start=2)]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{manifest}: patch names listed twice: {', '.join(dup)}")
    extra = sorted(set(files) - set(names))
    if extra:
        raise InputError(f"{files[extra[0]]}: no row for patch {extra[0]!r} in {manifest}"
                         + (f" ({len(extra) - 1} more files without row)" if len(extra) > 1
                            else ""))

    shape = target.shapes[0]
    entries, missing = [], []
    for line, row in enumerate(rows, start=2):
        try:
            b = [int(row[k]) for k in ("z0", "z1", "y0", "y1", "x0", "x1")]
            vs = [float(row[f"voxel_size_{a}"]) for a in "zyx"]
            vs = [convert_length(v, row["unit"], target.unit) for v in vs]
        except (ValueError, KeyError) as exc:
            raise InputError(f"{manifest}, line {line}: cannot read the bounds or voxel size "
                             f"({exc})") from None
        if not np.allclose(vs, target.voxel_size, rtol=VOXEL_RTOL):
            raise InputError(
                f"{manifest}, line {line}: voxel size {tuple(vs)} {target.unit} differs from "
                f"the voxel size {target.voxel_size} of {target.group}; the patches were cut "
                "from another image")
        start, stop = (b[0], b[2], b[4]), (b[1], b[3], b[5])
        name = row["name"]
        if name not in files:
            missing.append(name)
            continue
        path = files[name]
        inside = [(max(a, 0), min(z, n)) for a, z, n in zip(start, stop, shape, strict=True)]
        if any(lo >= hi for lo, hi in inside):
            raise InputError(
                f"{manifest}, line {line}: patch {name} at z {start[0]}:{stop[0]}, y "
                f"{start[1]}:{stop[1]}, x {start[2]}:{stop[2]} lies outside {target.group} "
                f"of shape {shape} (z, y, x); the patches were cut from another image")
        patch = read_patch(path).data
        extent = tuple(z - a for a, z in zip(start, stop, strict=True))
        if patch.shape != extent:
            raise InputError(f"{path}: patch shape {patch.shape} (z, y, x) differs from its "
                             f"bounds' extent {extent} in {manifest}, line {line}")
        found = np.unique(patch)
        bad = found[~np.isin(found, (0, 1, IGNORE))]
        if bad.size:
            raise InputError(f"{path}: merged patches hold 0, 1 or 2 (ignore); found "
                             f"{', '.join(str(v) for v in bad[:8].tolist())}")
        entries.append(PatchEntry(name, str(path.resolve()), start, stop,  # type: ignore
                                  file_sha256(path)))
    if not entries:
        raise InputError(f"{merged_dir}: none of the {len(rows)} patches of {manifest} has a "
                         "file here")

    notes = []
    if value is not None:
        value = int(value)
        _check_value(target, value)
    elif (found := _label_set(target, client)) is not False:
        value = _value_for(target, found)  # else: scanned in run_apply, before any write
    notes += [f"no file for patch {n} in {merged_dir}; skipped" for n in missing]
    return ApplyPlan(target, entries, manifest.resolve(), value, missing, notes)


# ------------------------------------------------------------------------------- tasks

def _overlap(region: Sequence[slice], start: Sequence[int], stop: Sequence[int]
             ) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices in region coordinates, slices in patch coordinates) of the overlap, or None."""
    lo = [max(r.start, a) for r, a in zip(region, start, strict=True)]
    hi = [min(r.stop, b) for r, b in zip(region, stop, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return None
    dst = tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region, strict=True))
    src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    return dst, src


def _paint(data: np.ndarray, region: Sequence[slice], entry: PatchEntry, value: int) -> int:
    """Write ``entry``'s patch into ``data`` (the voxels of ``region``); voxels written."""
    ov = _overlap(region, entry.start, entry.stop)
    if ov is None:
        return 0
    dst, src = ov
    patch = read_patch(entry.path).data[src]
    keep = patch != IGNORE
    view = data[dst]
    view[keep] = np.where(patch[keep] == 1, value, 0).astype(data.dtype)
    return int(keep.sum())


@dataclass(frozen=True)
class _RecordTask:
    """Runs on a worker for patch ``block.index[0]``: save the values its clipped region
    holds just before it is applied (earlier patches of the run painted in), and the
    mask of the voxels it writes."""

    level0: str
    shape: tuple[int, ...]
    entries: tuple[PatchEntry, ...]
    ids: tuple[str, ...]
    undo_dir: str
    value: int

    def __call__(self, block: Block) -> None:
        import zarr

        i = block.index[0]
        entry = self.entries[i]
        region = entry.clipped(self.shape)
        before = np.asarray(zarr.open_array(self.level0, mode="r")[region])
        for earlier in self.entries[:i]:
            _paint(before, region, earlier, self.value)
        dst, src = _overlap(region, entry.start, entry.stop)  # type: ignore[misc]
        written = read_patch(entry.path).data[src] != IGNORE
        _save_record(Path(self.undo_dir) / self.ids[i], before, written)


def _save_record(folder: Path, before: np.ndarray, written: np.ndarray) -> None:
    """Write an undo record completely, then rename it into place."""
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "before.npy", before)
    np.save(tmp / "written.npy", written)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


@dataclass(frozen=True)
class _ApplyTask:
    """Runs on a worker for one level-0 storage unit: paint every patch touching it, in
    order, and write the unit back."""

    level0: str
    entries: tuple[PatchEntry, ...]
    value: int

    def __call__(self, block: Block) -> int:
        import zarr

        arr = zarr.open_array(self.level0, mode="r+")
        data = np.asarray(arr[block.write])
        n = sum(_paint(data, block.write, e, self.value) for e in self.entries)
        arr[block.write] = data
        return n


@dataclass(frozen=True)
class _RestoreTask:
    """Runs on a worker for one level-0 storage unit: put the previous values back where
    the recorded applications wrote, latest record first."""

    level0: str
    records: tuple[tuple[str, tuple[slice, ...]], ...]

    def __call__(self, block: Block) -> int:
        import zarr

        arr = zarr.open_array(self.level0, mode="r+")
        data = np.asarray(arr[block.write])
        n = 0
        for folder, region in self.records:
            start = [r.start for r in region]
            stop = [r.stop for r in region]
            ov = _overlap(block.write, start, stop)
            if ov is None:
                continue
            dst, src = ov
            before = np.load(Path(folder) / "before.npy", mmap_mode="r")[src]
            written = np.load(Path(folder) / "written.npy", mmap_mode="r")[src]
            data[dst][written] = before[written]
            n += int(written.sum())
        arr[block.write] = data
        return n


class _Touched(BlockGrid):
    """The blocks of a grid (one storage unit each) that some regions touch."""

    def __init__(self, shape: Sequence[int], block_shape: Sequence[int],
                 regions: Sequence[Sequence[slice]]) -> None:
        super().__init__(shape, block_shape)
        touched: set[tuple[int, ...]] = set()
        for region in regions:
            ranges = [range(r.start // b, -(-r.stop // b))
                      for r, b in zip(region, self.block_shape, strict=True)]
            touched.update(itertools.product(*ranges))
        self.only = sorted(touched)

    def __len__(self) -> int:
        return len(self.only)

    def __iter__(self):
        for index in self.only:
            yield self.block(index)


def _add_counts(a: int | None, b: int | None) -> int:
    return (a or 0) + (b or 0)


def _run(client: Any, grid: BlockGrid, task: Any, name: str,
         progress: Callable[[], Progress] | None, voxels: bool = True) -> int:
    """Run a pass; the sum of its blocks' counts (tasks that count nothing return None),
    folded as blocks finish. ``voxels=False``: the grid's blocks are patch entries."""
    from engine.runner import run_blocks

    return int(run_blocks(client, grid, task, name=name,
                          progress=progress() if progress else None,
                          combine=_add_counts, initial=0, voxels=voxels).value or 0)


def refresh_pyramid(client: Any, target: LabelTarget, regions: Sequence[Sequence[slice]],
                    progress: Callable[[], Progress] | None = None) -> None:
    """Recompute the lower levels of ``target`` where level-0 ``regions`` changed.

    Level by level, each touched chunk (shard) of level L is recomputed from level L - 1
    by :class:`engine.pyramid.PyramidTask` (mode), one task per chunk, exactly as the
    conversion built it.
    """
    from engine.pyramid import PyramidTask

    regions = [tuple(r) for r in regions]
    for lv in range(1, len(target.paths)):
        f = target.factors[lv]
        # blocks of level L-1 that map onto exactly one unit (shard, else chunk) of level L
        block = tuple(u * k for u, k in zip(target.units[lv], f, strict=True))
        grid = _Touched(target.shapes[lv - 1], block, regions)
        task = PyramidTask(target.paths[lv - 1], (target.paths[lv],), False, (f,), "mode")
        _run(client, grid, task, f"patches-apply-level{lv}", progress)
        regions = [tuple(slice(r.start // k, -(-r.stop // k)) for r, k in zip(reg, f, strict=True))
                   for reg in regions]


# ------------------------------------------------------------------------------- log

def read_log(group: str | Path) -> list[dict[str, Any]]:
    """The patch entries (``"apply"`` and ``"undo"``) of a label group's provenance, oldest
    first (see the module docstring); run entries of other operations are left out."""
    return [e for e in provenance.read(group) if "action" in e]


def _new_id(name: str) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}-{name}"


def _update_colors(target: LabelTarget, value: int) -> None:
    """Add ``value`` to the ``image-label`` colours when they list values and lack it."""
    attrs, ngff = omezarr.read_attrs(target.group)
    meta = dict(attrs.get("image-label", {}))
    colors = meta.get("colors")
    if colors is None or value == 0 or any(int(c["label-value"]) == value for c in colors):
        return
    rgba = [*omezarr.LABEL_COLORS[len(colors) % len(omezarr.LABEL_COLORS)], 255]
    meta["colors"] = [*colors, {"label-value": int(value), "rgba": rgba}]
    omezarr.write_group_attrs(target.group, {"image-label": meta}, ngff)


def _regions(records: Sequence[dict[str, Any]]) -> list[tuple[slice, ...]]:
    return [tuple(slice(a, b) for a, b in r["clipped"]) for r in records]


def _restore(client: Any, target: LabelTarget, records: Sequence[dict[str, Any]],
             progress: Callable[[], Progress] | None) -> tuple[int, int]:
    """Restore the voxels of apply ``records`` (latest first), refresh the pyramid."""
    regions = _regions(records)
    ordered = tuple((str(target.group / r["undo"]), reg)
                    for r, reg in reversed(list(zip(records, regions, strict=True))))
    grid = _Touched(target.shapes[0], target.units[0], regions)
    written = _run(client, grid, _RestoreTask(target.paths[0], ordered),
                   "patches-undo", progress)
    refresh_pyramid(client, target, regions, progress)
    return len(grid), written


def _roll_back_pending(client: Any, target: LabelTarget,
                       progress: Callable[[], Progress] | None) -> int:
    """Undo the voxels of a run interrupted before its log entries were written."""
    journal = target.undo_dir / JOURNAL
    if not journal.exists():
        return 0
    pending = json.loads(journal.read_text())
    logged = {e.get("id") for e in read_log(target.group)}
    todo = [e for e in pending if e["id"] not in logged]
    if todo:
        _restore(client, target, todo, progress)
    for e in todo:
        shutil.rmtree(target.group / e["undo"], ignore_errors=True)
    journal.unlink()
    return len(todo)


# ------------------------------------------------------------------------------- running

def run_apply(plan: ApplyPlan, client: Any,
              progress: Callable[[], Progress] | None = None) -> ApplyResult:
    """Apply the planned patches: undo records, journal, voxels, pyramid, log.

    Parameters
    ----------
    plan : ApplyPlan
        From :func:`plan_apply`.
    client : distributed.Client
    progress : callable, optional
        Factory of a fresh ``Progress`` per pass.

    Returns
    -------
    ApplyResult
    """
    t0 = time.monotonic()
    target = plan.target
    check_workers_see(client, [plan.manifest, *sorted({Path(e.path).parent
                                                       for e in plan.entries})],
                      [target.undo_dir])
    if plan.value is None:  # labels without listed values: scan them now, before writing
        plan.value = _value_for(target, _label_set(target, client))  # type: ignore[arg-type]
    rolled = _roll_back_pending(client, target, progress)
    shape = target.shapes[0]
    entries = tuple(plan.entries)
    ids = tuple(_new_id(e.name) for e in entries)
    target.undo_dir.mkdir(exist_ok=True)
    _run(client, BlockGrid((len(entries),), 1),
         _RecordTask(target.paths[0], shape, entries, ids, str(target.undo_dir), plan.value),
         "patches-apply-undo-records", progress, voxels=False)
    regions = [e.clipped(shape) for e in entries]
    log = []
    for e, i, reg in zip(entries, ids, regions, strict=True):
        written = int(np.load(target.undo_dir / i / "written.npy", mmap_mode="r").sum())
        log.append({
            "action": "apply", "id": i, "patch": e.name,
            "bounds": [list(b) for b in e.bounds],
            "clipped": [[r.start, r.stop] for r in reg],
            "file": e.path, "manifest": str(plan.manifest), "sha256": e.sha256,
            "value": plan.value, "written": written, "time": events.now(),
            "undo": f"{UNDO_DIR}/{i}",
        })
    journal = target.undo_dir / JOURNAL
    journal.write_text(json.dumps(log, indent=1))
    grid = _Touched(shape, target.units[0], regions)
    written = _run(client, grid, _ApplyTask(target.paths[0], entries, plan.value),
                   "patches-apply", progress)
    refresh_pyramid(client, target, regions, progress)
    if any(entry["written"] for entry in log):
        _update_colors(target, plan.value)
    provenance.append(target.group, log)
    journal.unlink()
    return ApplyResult(log, len(grid), written, rolled, time.monotonic() - t0)


def apply_patches(merged_dir: str | Path, manifest: str | Path, image: str | Path,
                  labels: str, client: Any, value: int | None = None,
                  progress: Callable[[], Progress] | None = None,
                  report: Callable[[str], None] | None = None) -> ApplyResult:
    """Plan and run an application (see :func:`plan_apply` and :func:`run_apply`)."""
    plan = plan_apply(merged_dir, manifest, image, labels, value, client)
    for note in plan.notes:
        (report or (lambda _line: None))(note)
    return run_apply(plan, client, progress)


def undo_patch(image: str | Path, labels: str, patch: str, client: Any,
               progress: Callable[[], Progress] | None = None) -> ApplyResult:
    """Undo the most recent, not yet undone application of ``patch``.

    The voxels it wrote get their previous values back; the lower levels are refreshed
    and an ``"undo"`` entry is logged.

    Raises
    ------
    InputError
        When the patch was never applied (or every application is undone), its undo
        record is missing, or a later, still applied patch wrote some of the same voxels
        (they are named; undo them first).
    """
    t0 = time.monotonic()
    target = open_target(image, labels)
    rolled = _roll_back_pending(client, target, progress)
    log = read_log(target.group)
    undone = {e["undoes"] for e in log if e.get("action") == "undo"}
    active = [(k, e) for k, e in enumerate(log)
              if e.get("action") == "apply" and e["id"] not in undone]
    mine = [(k, e) for k, e in active if e["patch"] == patch]
    if not mine:
        ever = any(e.get("patch") == patch for e in log)
        raise InputError(f"{target.group}: patch {patch!r} "
                         + ("has no application left to undo" if ever
                            else "was never applied here"))
    k, rec = mine[-1]
    folder = target.group / rec["undo"]
    if not (folder / "before.npy").exists() or not (folder / "written.npy").exists():
        raise InputError(f"{folder}: undo record of patch {patch!r} is missing")
    region = _regions([rec])[0]
    written = np.load(folder / "written.npy", mmap_mode="r")
    clobbered = []
    for _, later in (a for a in active if a[0] > k):
        reg = _regions([later])[0]
        ov = _overlap(region, [r.start for r in reg], [r.stop for r in reg])
        if ov is None:
            continue
        dst, src = ov
        other = np.load(target.group / later["undo"] / "written.npy", mmap_mode="r")
        if np.any(written[dst] & other[src]):
            clobbered.append(later["patch"])
    if clobbered:
        raise InputError(
            f"{target.group}: cannot undo patch {patch!r}: later patches wrote some of its "
            f"voxels: {', '.join(dict.fromkeys(clobbered))}; undo them first (latest first)")
    chunks, voxels = _restore(client, target, [rec], progress)
    entry = {"action": "undo", "id": _new_id(patch), "patch": patch, "undoes": rec["id"],
             "restored": voxels, "time": events.now()}
    provenance.append(target.group, [entry])
    return ApplyResult([entry], chunks, voxels, rolled, time.monotonic() - t0)
