"""Cut correction patches around centres from an image and its labels (MemBrain-seg layout).

For every centre ``c`` (z, y, x voxels) a patch of ``size`` voxels spans
``[c - size // 2, c - size // 2 + size)`` on each axis. One Dask task per patch reads only
that region of the image and of the labels (an OME-Zarr level-0 array, or any file
:func:`engine.io.open_volume` reads lazily, e.g. a memory-mapped MRC) and writes two files::

    DIR/imagesCorr/<ds_token>_<token>_patch<N>.<ext>   image, float32, values unchanged
    DIR/labelsCorr/<ds_token>_<token>_patch<N>.<ext>   labels, uint8: 0, 1, 2 = ignore
    DIR/patches.csv                                    manifest: names, centres, bounds

Choices (MemBrain-seg compatible where it has a convention, better where it fails):

- Patches are never shortened. Where a patch reaches beyond the volume, the image is padded
  by reflection without repeating the edge voxel (numpy's ``"reflect"``, scipy's
  ``"mirror"``, PyTorch/MONAI's ``"reflect"``) and the labels with ``2`` (ignore), exactly
  as ``np.pad`` on the whole volume followed by slicing would give.
- The outer ``border`` voxels of every label patch are set to 2 (MemBrain-seg: 16), so the
  loss ignores the voxels whose context a network cannot see.
- Image patches are float32 (what MemBrain-seg writes and trains on) with the source
  values unchanged: no normalisation, which the trainer does, so values stay comparable
  between patches and with the tomogram.
- Labels must be integer (or boolean) with values 0, 1 and optionally 2 (ignore, e.g. a
  segmentation that already went through a correction round). Anything else is refused,
  naming the file, the patch and the values found, unless ``binarize``: then every value
  > 0 (2 included) becomes 1, for float or instance labels too.
- Every header carries the voxel size of the image and an origin of ``start × voxel
  size`` (z, y, x), so a viewer places the patch where it lies in the tomogram.

Everything is validated (volumes, shapes, dtypes, centres, sizes, destination) before
any task runs; only label values need the voxels, so each task checks those of its own
patch. The patches are written into a hidden ``.DIR.partial`` folder renamed to ``DIR``
at the end, so a failure (non-binary labels included) leaves nothing behind.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, BlockGrid
from engine.errors import InputError, OptionError, VoxelmillError
from engine.io import READ_SUFFIXES, detect_format, open_volume
from engine.io.budget import check_held, check_output_size
from engine.io.layouts import IMAGES_DIR, LABELS_DIR, PATCHES_MANIFEST
from engine.io.sources import read_region
from engine.names import safe_name
from engine.output import check_destination, commit, partial_path
from engine.patches.coords import ORDERS, read_coords_table
from engine.progress import Progress
from engine.volume import convert_length
from engine.workerpaths import check_workers_see

IGNORE = 2
MANIFEST_COLUMNS = (
    "name", "centre_z", "centre_y", "centre_x", "z0", "z1", "y0", "y1", "x0", "x1",
    "voxel_size_z", "voxel_size_y", "voxel_size_x", "unit", "image", "labels",
)
#: columns written after :data:`MANIFEST_COLUMNS`: the ignore border of the label patches
#: (voxels per axis), which ``patches merge`` uses by default; optional when read (older
#: manifests lack them)
BORDER_COLUMNS = ("border_z", "border_y", "border_x")


@dataclass(frozen=True)
class ExtractOptions:
    """Options of :func:`plan_extraction` (see ``voxelmill patches extract --help``).

    Parameters
    ----------
    size : tuple of int
        Patch shape in voxels, one value (a cube) or (z, y, x).
    border : tuple of int
        Width of the outer shell of each label patch set to 2 (ignore), one value or
        (z, y, x); 0 for none.
    ds_token, token : str
        Dataset and tomogram names in the file names; ``token`` defaults to the image's
        name without its suffix (``tomo`` for ``tomo.ome.zarr`` or ``tomo.mrc``).
    index_start : int
        Number of the first patch.
    fmt : str
        Patch file format, one of ``engine.patches.files.PATCH_FORMATS``.
    order, coords_unit : str
        Column order of a coordinates file without header, and the unit of its values
        (see :func:`engine.patches.coords.read_coords`).
    max_outside : int
        How far (voxels) a centre may lie outside the volume; 0: it must be inside.
    binarize : bool
        Take every label value > 0 as foreground (1) instead of refusing non-binary labels.
    overwrite : bool
        Replace an existing destination folder.
    """

    size: tuple[int, ...] = (160,)
    border: tuple[int, ...] = (16,)
    ds_token: str = "other"
    token: str | None = None
    index_start: int = 0
    fmt: str = "nii.gz"
    order: str = "xyz"
    coords_unit: str = "px"
    max_outside: int = 0
    binarize: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class PatchSource:
    """A 3D volume that patch tasks read regions of, without ever loading it whole.

    ``reader`` is what :func:`engine.io.sources.read_region` takes: the path of the
    level-0 zarr array of an OME-Zarr image, or a lazy dask array (MRC and the other
    formats, read by region from the file). It pickles as a path and a small graph.
    """

    path: str
    reader: Any
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float]
    unit: str

    def read(self, region: tuple[slice, ...]) -> np.ndarray:
        return read_region(self.reader, region)


@dataclass(frozen=True)
class PatchJob:
    """One patch: its name, centre and the start of its bounds (z, y, x voxels)."""

    name: str
    centre: tuple[int, int, int]
    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def stop(self) -> tuple[int, int, int]:
        return tuple(a + s for a, s in zip(self.start, self.size, strict=True))  # type: ignore

    def padded(self, shape: Sequence[int]) -> bool:
        """Whether the patch reaches beyond a volume of ``shape`` (and is padded there)."""
        return any(a < 0 or b > n for a, b, n in zip(self.start, self.stop, shape, strict=True))


@dataclass
class ExtractPlan:
    """Everything :func:`run_extraction` needs, validated."""

    image: PatchSource
    labels: PatchSource
    jobs: list[PatchJob]
    destination: Path
    options: ExtractOptions
    coords: str
    suffix: str
    notes: list[str] = field(default_factory=list)


@dataclass
class ExtractResult:
    """What a run wrote."""

    destination: Path
    manifest: Path
    jobs: list[PatchJob]
    padded: int
    seconds: float


# ------------------------------------------------------------------------------ geometry

def patch_start(centre: Sequence[int], size: Sequence[int]) -> tuple[int, ...]:
    """First voxel of a patch of ``size`` around ``centre``: ``centre - size // 2``."""
    return tuple(int(c) - int(s) // 2 for c, s in zip(centre, size, strict=True))


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Source indices of ``np.pad(a, ..., mode="reflect")[start:stop]`` along an axis of
    length ``n`` (coordinates of the unpadded axis, so ``start`` may be negative and
    ``stop`` beyond ``n``), int64 of length ``stop - start``.

    Reflection is periodic with period ``2 (n - 1)``, which is what numpy's repeated
    reflection gives for pads wider than the axis; an axis of length 1 repeats its voxel.
    """
    idx = np.arange(start, stop, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def read_image_patch(source: PatchSource, start: Sequence[int], size: Sequence[int]
                     ) -> np.ndarray:
    """Image patch of ``size`` from ``start`` (z, y, x), reflection-padded, float32.

    Reads only the bounding box of the source voxels the patch uses (the patch itself
    inside the volume, plus nothing but its mirrored part at a border).
    """
    idx = [reflect_indices(a, a + s, n) for a, s, n in zip(start, size, source.shape,
                                                           strict=True)]
    region = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    data = source.read(region)
    local = np.ix_(*[i - r.start for i, r in zip(idx, region, strict=True)])
    return np.ascontiguousarray(data[local], dtype=np.float32)


def read_label_patch(source: PatchSource, start: Sequence[int], size: Sequence[int],
                     border: Sequence[int], binarize: bool, name: str = "") -> np.ndarray:
    """Label patch of ``size`` from ``start`` (z, y, x), uint8 with 0, 1 and 2 = ignore.

    Voxels outside the volume and the outer ``border`` shell are 2. Values other than
    0, 1, 2 raise an :class:`InputError` naming the file, unless ``binarize`` (> 0 → 1).
    """
    out = np.full(tuple(size), IGNORE, dtype=np.uint8)
    lo = [max(a, 0) for a in start]
    hi = [min(a + s, n) for a, s, n in zip(start, size, source.shape, strict=True)]
    if all(h > low for low, h in zip(lo, hi, strict=True)):
        data = source.read(tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)))
        if binarize:
            values = (data > 0).astype(np.uint8)
        else:
            found = np.unique(data)
            bad = found[~np.isin(found, (0, 1, IGNORE))]
            if bad.size:
                shown = ", ".join(str(v) for v in found[:12].tolist())
                more = f" … ({found.size} values)" if found.size > 12 else ""
                raise InputError(
                    f"{source.path}: labels must be 0 (background), 1 (foreground) or 2 "
                    f"(ignore); found {shown}{more}"
                    + (f" in patch {name}" if name else "")
                    + "; pass --binarize to take every value > 0 as foreground"
                )
            values = data.astype(np.uint8)
        out[tuple(slice(a - s0, b - s0) for a, b, s0 in zip(lo, hi, start, strict=True))] = values
    for axis, width in enumerate(border):
        if width > 0:
            index: list[Any] = [slice(None)] * 3
            index[axis] = slice(0, width)
            out[tuple(index)] = IGNORE
            index[axis] = slice(out.shape[axis] - width, None)
            out[tuple(index)] = IGNORE
    return out


# ------------------------------------------------------------------------------ planning

def source_stem(path: str | Path) -> str:
    """A file or folder name without its format suffix (``tomo.ome.zarr`` → ``tomo``)."""
    name = Path(path).name
    lower = name.lower()
    for suffix in sorted(READ_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def open_patch_source(path: str | Path, what: str) -> PatchSource:
    """Open ``path`` (OME-Zarr level 0, MRC or any format :func:`open_volume` reads)
    lazily as a 3D z, y, x source."""
    path = Path(path)
    vol = open_volume(path)
    if vol.axes != "zyx":
        raise InputError(
            f"{path}: the {what} must be a 3D z, y, x volume, not axes {vol.axes!r} of shape "
            f"{vol.shape}"
        )
    reader: Any = vol.data
    if detect_format(path) == "omezarr":
        from engine.io.omezarr import dataset_path, read_attrs

        attrs, _ = read_attrs(path)
        # workers open the level-0 array by path: nothing but a string travels
        reader = str(dataset_path(path, attrs["multiscales"][0]["datasets"][0]))
    return PatchSource(str(path), reader, vol.shape, np.dtype(vol.dtype),
                       tuple(float(v) for v in vol.voxel_size), vol.unit)  # type: ignore


def _per_axis(values: Sequence[int], what: str, minimum: int) -> tuple[int, int, int]:
    vals = tuple(int(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise OptionError(f"--{what} {','.join(map(str, values))}: give one value or z,y,x")
    if any(v < minimum for v in vals):
        raise OptionError(f"--{what} {','.join(map(str, values))}: every value must be "
                          f">= {minimum}")
    return vals  # type: ignore[return-value]


def _check_token(value: str, what: str) -> None:
    safe_name(value, f"--{what}", OptionError)


def _resolve_labels(image: Path, labels: Path) -> Path:
    """``LABELS`` may name a label group of an OME-Zarr image (``membranes`` for
    ``IMAGE/labels/membranes``); else it is a path, made absolute (workers open what they
    are given in their own working folder)."""
    if not labels.exists() and len(labels.parts) == 1 and (image / "labels" / labels).is_dir():
        return image / "labels" / labels
    return labels.absolute()


def plan_extraction(
    image: str | Path,
    labels: str | Path,
    coords: str | Path | np.ndarray,
    destination: str | Path,
    options: ExtractOptions | None = None,
) -> ExtractPlan:
    """Validate inputs, centres, options and destination; compute every patch's bounds.

    Parameters
    ----------
    image, labels : str or Path
        The tomogram and its segmentation: OME-Zarr groups (level 0 is read; ``labels``
        may be ``IMAGE/labels/NAME`` or just ``NAME``), MRC files or any 3D format
        :func:`engine.io.open_volume` reads. Shapes must match.
    coords : str, Path or ndarray
        A coordinates CSV (:func:`engine.patches.coords.read_coords`) or an (n, 3) integer
        array of z, y, x voxel centres.
    destination : str or Path
        The output folder ``DIR``.
    options : ExtractOptions

    Returns
    -------
    ExtractPlan
        Raises a :class:`VoxelmillError` for any problem, before anything is written.
    """
    opts = options or ExtractOptions()
    from engine.io.layouts import PATCH_FORMATS, patch_suffix

    if opts.fmt not in PATCH_FORMATS:
        raise OptionError(f"--format {opts.fmt!r}: use one of {', '.join(PATCH_FORMATS)}")
    if opts.order not in ORDERS:
        raise OptionError(f"--order {opts.order!r}: use xyz or zyx")
    size = _per_axis(opts.size, "size", 1)
    border = _per_axis(opts.border, "border", 0)
    if any(2 * b >= s for b, s in zip(border, size, strict=True)):
        raise OptionError(f"--border {border}: leaves nothing of patches of size {size} "
                          "(twice the border must be smaller than the size)")
    if opts.max_outside < 0:
        raise OptionError(f"--max-outside {opts.max_outside}: must be >= 0")
    if opts.index_start < 0:
        raise OptionError(f"--index-start {opts.index_start}: must be >= 0")
    _check_token(opts.ds_token, "ds-token")
    token = opts.token if opts.token is not None else source_stem(image)
    _check_token(token, "token")

    image_p = Path(image)
    labels_p = _resolve_labels(image_p, Path(labels))
    img = open_patch_source(image_p, "image")
    lab = open_patch_source(labels_p, "labels")
    if img.shape != lab.shape:
        raise InputError(f"shapes differ: image {img.path} is {img.shape} (z, y, x) but labels "
                         f"{lab.path} are {lab.shape}")
    if np.issubdtype(img.dtype, np.complexfloating) or img.dtype.kind not in "biuf":
        raise InputError(f"{img.path}: image dtype {img.dtype} is not a real number type")
    if lab.dtype.kind not in "biu" and not (opts.binarize and lab.dtype.kind == "f"):
        raise InputError(f"{lab.path}: labels must have an integer dtype, not {lab.dtype}; "
                         "pass --binarize to take every value > 0 as foreground")
    notes = []
    lab_vs = [convert_length(v, lab.unit, img.unit) for v in lab.voxel_size]
    if not np.allclose(lab_vs, img.voxel_size, rtol=1e-3):
        notes.append(f"note: labels voxel size {lab.voxel_size} {lab.unit} differs from the "
                     f"image's {img.voxel_size} {img.unit}; patches carry the image's")

    if isinstance(coords, np.ndarray):
        centres = np.asarray(coords)
        if centres.ndim != 2 or centres.shape[1] != 3 or centres.dtype.kind not in "iu":
            raise OptionError(f"centres: expected an (n, 3) integer z, y, x array, got "
                              f"{centres.dtype} {centres.shape}")
        if not len(centres):
            raise InputError("centres: no coordinates given")
        lines, where, what = np.arange(1, len(centres) + 1), "centres", "row"
    else:
        centres, lines = read_coords_table(coords, opts.order, opts.coords_unit,
                                           img.voxel_size, img.unit)
        where, what = str(coords), "line"
    _check_inside(centres, lines, img.shape, opts.max_outside, where, what, img.path)

    dst = Path(destination)
    check_destination(dst, opts.overwrite, source=image_p, sources=(labels_p,),
                      manifests=(PATCHES_MANIFEST,))
    for src in (image_p, labels_p):
        if dst.resolve() in src.resolve().parents:
            raise OptionError(f"{dst}: the destination would replace a folder that holds the "
                              f"input {src}; choose another --out")

    jobs = [
        PatchJob(f"{opts.ds_token}_{token}_patch{opts.index_start + i}",
                 tuple(int(v) for v in c), patch_start(c, size), size)  # type: ignore[arg-type]
        for i, c in enumerate(centres)
    ]
    # each patch: a float32 image and a uint8 label file, held whole by one task while made
    voxels = math.prod(size)
    sized_by = f"--size {','.join(map(str, opts.size))}"
    check_held(voxels * (4 + 1 + img.dtype.itemsize + lab.dtype.itemsize), sized_by,
               f"one task holds a whole patch of {'×'.join(map(str, size))} voxels")
    check_output_size(dst, len(jobs) * voxels * (4 + 1),
                      f"{sized_by} × {len(jobs)} patch{'es' if len(jobs) != 1 else ''}")
    return ExtractPlan(img, lab, jobs, dst, opts, str(coords) if where != "centres" else "",
                       patch_suffix(opts.fmt), notes)


def _check_inside(centres: np.ndarray, lines: np.ndarray, shape: Sequence[int], margin: int,
                  where: str, what: str, image: str) -> None:
    shape_a = np.asarray(shape)
    outside = np.any((centres < -margin) | (centres > shape_a - 1 + margin), axis=1)
    if not outside.any():
        return
    first = int(np.flatnonzero(outside)[0])
    z, y, x = (int(v) for v in centres[first])
    others = int(outside.sum()) - 1
    allowed = ("inside it" if margin == 0
               else f"at most {margin} voxels outside it (--max-outside)")
    raise InputError(
        f"{where}, {what} {int(lines[first])}: centre x={x}, y={y}, z={z} (voxels) lies "
        f"outside {image}, whose x, y, z size is {shape[2]}, {shape[1]}, {shape[0]}; centres "
        f"must lie {allowed}"
        + (f" ({others} more centres are outside)" if others else "")
        + (" (check --order and --coords-unit)" if margin == 0 else "")
    )


# ------------------------------------------------------------------------------- running

@dataclass(frozen=True)
class _PatchTask:
    """Runs on a worker: read one patch of image and labels, write its two files.

    The patches are the blocks of a one-dimensional grid over the job list: block ``(i,)``
    is job ``i``.
    """

    jobs: tuple[PatchJob, ...]
    image: PatchSource
    labels: PatchSource
    border: tuple[int, int, int]
    binarize: bool
    root: str
    suffix: str
    voxel_size: tuple[float, float, float]
    unit: str

    def __call__(self, block: Block) -> str | None:
        from engine.patches.files import write_patch

        job = self.jobs[block.index[0]]
        try:
            img = read_image_patch(self.image, job.start, job.size)
            lab = read_label_patch(self.labels, job.start, job.size, self.border,
                                   self.binarize, job.name)
            origin = tuple(a * v for a, v in zip(job.start, self.voxel_size, strict=True))
            root = Path(self.root)
            if not (root / IMAGES_DIR).is_dir():  # the run failed and removed its folder
                return None
            write_patch(root / IMAGES_DIR / f"{job.name}{self.suffix}", img, self.voxel_size,
                        self.unit, origin)
            write_patch(root / LABELS_DIR / f"{job.name}{self.suffix}", lab, self.voxel_size,
                        self.unit, origin)
        except VoxelmillError:
            raise  # a user error: the runner reports it once, without retries
        except Exception as exc:  # name the patch in the runner's message
            raise RuntimeError(f"patch {job.name} (centre z, y, x {job.centre}): "
                               f"{type(exc).__name__}: {exc}") from exc
        return job.name


def run_extraction(plan: ExtractPlan, client: Any, progress: Progress | None = None
                   ) -> ExtractResult:
    """Extract every patch of ``plan`` on the cluster, one task per patch.

    The tasks write into ``.DIR.partial``; the manifest is written last and the folder is
    renamed to ``DIR`` only when everything succeeded (otherwise it is removed).
    """
    from engine.runner import run_blocks

    t0 = time.monotonic()
    dst = plan.destination
    check_workers_see(client, [Path(plan.image.path), Path(plan.labels.path)], [dst])
    partial = partial_path(dst)
    if partial.exists():  # left by an interrupted run; patches are cheap to redo
        shutil.rmtree(partial)
    (partial / IMAGES_DIR).mkdir(parents=True)
    (partial / LABELS_DIR).mkdir()
    task = _PatchTask(tuple(plan.jobs), plan.image, plan.labels,
                      _per_axis(plan.options.border, "border", 0), plan.options.binarize,
                      str(partial), plan.suffix, plan.image.voxel_size, plan.image.unit)
    try:
        if plan.jobs:
            run_blocks(client, BlockGrid((len(plan.jobs),), 1), task, name="patches",
                       progress=progress, retries=1, voxels=False)
        _write_manifest(partial / PATCHES_MANIFEST, plan)
        commit(partial, dst)
    except BaseException:
        # the runner waited for the patches under way, so none writes after this
        shutil.rmtree(partial, ignore_errors=True)
        raise
    padded = sum(j.padded(plan.image.shape) for j in plan.jobs)
    return ExtractResult(dst, dst / PATCHES_MANIFEST, plan.jobs, padded, time.monotonic() - t0)


def _write_manifest(path: Path, plan: ExtractPlan) -> None:
    vz, vy, vx = plan.image.voxel_size
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS + BORDER_COLUMNS)
        border = _per_axis(plan.options.border, "border", 0)
        for job in plan.jobs:
            (z0, y0, x0), (z1, y1, x1) = job.start, job.stop
            w.writerow([job.name, *job.centre, z0, z1, y0, y1, x0, x1, repr(vz), repr(vy),
                        repr(vx), plan.image.unit, str(Path(plan.image.path).resolve()),
                        str(Path(plan.labels.path).resolve()), *border])


def extract_patches(
    image: str | Path, labels: str | Path, coords: str | Path | np.ndarray,
    destination: str | Path, options: ExtractOptions | None, client: Any,
    progress: Progress | None = None, report: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Plan and run a patch extraction (see :func:`plan_extraction`, :func:`run_extraction`)."""
    plan = plan_extraction(image, labels, coords, destination, options)
    for note in plan.notes:
        (report or (lambda _line: None))(note)
    return run_extraction(plan, client, progress)
