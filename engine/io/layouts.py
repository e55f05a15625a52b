"""The folder layouts that stages exchange, described once: how their files are named and
how a stage reads the items another one wrote.

Patch folder (``voxelmill patches extract``; read by ``patches merge``/``apply``,
``dataset split`` and ``train``)::

    DIR/imagesCorr/<name>.<ext>     DIR/labelsCorr/<name>.<ext>
    DIR/patches.csv                 one row per patch: name, source image, position …

Patch files are named ``<stem><suffix>``, the suffix naming the format
(:data:`PATCH_SUFFIXES`). A *samples folder* (``voxelmill curate``) lists its samples in
``samples.csv``; a *split folder* (``voxelmill dataset split``; read by ``train``) holds
``images<Split>/`` and ``labels<Split>/`` (:data:`SPLIT_DIRS`) with ``split.csv`` and
``split.json``; PartSeg projects are archives (:data:`PARTSEG_SUFFIXES`).

An :class:`Item` is one training item of such a source (a patch, a sample or a PartSeg
project) with the *group* (its source volume) that keeps correlated items in one split;
:func:`collect_items` reads them from any of these sources.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError, OptionError
from engine.names import safe_name

#: the patch folder: image and label patches, and the manifest of the patches.
IMAGES_DIR = "imagesCorr"
LABELS_DIR = "labelsCorr"
PATCHES_MANIFEST = "patches.csv"

#: split names, in the order ties are broken, and their (images, labels) folders.
SPLITS: tuple[str, ...] = ("train", "val", "verify")
SPLIT_DIRS: dict[str, tuple[str, str]] = {
    "train": ("imagesTr", "labelsTr"),
    "val": ("imagesVal", "labelsVal"),
    "verify": ("imagesVerify", "labelsVerify"),
}
#: channel suffix of image files: MemBrain-seg / nnU-Net pair labels/<n> with images/<n>_0000.
CHANNEL_SUFFIX = "_0000"
SAMPLES_MANIFEST = "samples.csv"
SPLIT_CSV = "split.csv"
SPLIT_JSON = "split.json"
SPLIT_COLUMNS = ("name", "group", "split", "source", "image", "labels", "out_image",
                 "out_labels")
#: PartSeg project archives (engine.io.partseg reads them)
PARTSEG_SUFFIXES = (".tgz", ".tbz2", ".tar.gz", ".tar.bz2")

_PATCH_NAME = re.compile(r"^(?P<group>.+)_patch(?P<index>\d+)$")
#: samples.csv columns, first match wins: the sample entry, and its source volume (group).
_SAMPLE_COLUMNS = ("sample", "path", "name")
_SOURCE_COLUMNS = ("source", "source_image", "image")


#: the formats a patch file may have, and the suffixes that name them.
PATCH_FORMATS: tuple[str, ...] = ("nii.gz", "nrrd", "mrc", "tif", "zarr")

#: file-name suffix (lower case) → patch format; ``.nii`` and ``.tiff`` are the same formats.
PATCH_SUFFIXES = {".nii.gz": "nii.gz", ".nii": "nii.gz", ".nrrd": "nrrd", ".mrc": "mrc",
                  ".tif": "tif", ".tiff": "tif", ".zarr": "zarr"}


def patch_suffix(fmt: str) -> str:
    """File-name suffix of a patch format (``"nii.gz"`` → ``".nii.gz"``).

    Raises
    ------
    OptionError
        When ``fmt`` is not one of :data:`PATCH_FORMATS`.
    """
    if fmt not in PATCH_FORMATS:
        raise OptionError(f"patch format {fmt!r}: use one of {', '.join(PATCH_FORMATS)}")
    return "." + fmt


def patch_name_suffix(path: str | Path) -> str | None:
    """The patch suffix that ends ``path``'s name, in the name's own case, or None."""
    name = Path(path).name
    for suffix in sorted(PATCH_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[-len(suffix):]
    return None


def patch_format(path: str | Path) -> str:
    """The patch format of ``path`` by its suffix (case-insensitive).

    ``.nii.gz`` and ``.nii`` give ``"nii.gz"`` (NIfTI), ``.tif`` and ``.tiff`` give
    ``"tif"``; ``.nrrd``, ``.mrc`` and ``.zarr`` give their names.

    Raises
    ------
    OptionError
        Naming the file when its suffix is none of these.
    """
    suffix = patch_name_suffix(path)
    if suffix is None:
        raise OptionError(f"{path}: not a patch file; patch files end with "
                          f"{', '.join(PATCH_SUFFIXES)}")
    return PATCH_SUFFIXES[suffix.lower()]


def patch_stem(path: str | Path) -> str:
    """``path``'s name without its patch suffix (``"p1.nii.gz"`` → ``"p1"``).

    Raises
    ------
    OptionError
        When the name has no patch suffix.
    """
    patch_format(path)
    name = Path(path).name
    return name[: len(name) - len(patch_name_suffix(path) or "")]


@dataclass(frozen=True)
class Item:
    """One training item.

    Parameters
    ----------
    name : str
        Output name, unique over all sources (a patch's stem, a sample's entry name).
    group : str
        The source volume it came from; items of one group share a split.
    image : Path
        Image file (or OME-Zarr folder) to copy or link.
    labels : Path or None
        Label file, None for a sample that holds its labels.
    source : Path
        The SOURCE folder it was found in.
    """

    name: str
    group: str
    image: Path
    labels: Path | None
    source: Path

    def out_image(self) -> str:
        """File name under ``images<Split>/``."""
        if self.labels is None:  # a whole sample keeps its name
            return self.image.name
        stem = patch_stem(self.image)
        if not stem.endswith(CHANNEL_SUFFIX):
            stem += CHANNEL_SUFFIX
        return stem + self.image.name[len(patch_stem(self.image)):]

    def out_labels(self) -> str:
        """File name under ``labels<Split>/`` (empty for a sample)."""
        return "" if self.labels is None else self.labels.name


def patch_entries(folder: Path) -> dict[str, Path]:
    """Patch files (and ``.zarr`` folders) of ``folder`` by stem; two with one stem: error."""
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue  # hidden: partial writes, .DS_Store
        try:
            fmt = patch_format(path)
        except OptionError:
            continue
        if (fmt == "zarr") != path.is_dir():
            continue
        stem = patch_stem(path)
        if stem in out:
            raise InputError(f"{out[stem]} and {path}: two patches named {stem!r}; keep one")
        out[stem] = path
    return out


def image_for(images: dict[str, Path], name: str, folder: Path) -> Path:
    path = images.get(name) or images.get(name + CHANNEL_SUFFIX)
    if path is None:
        raise InputError(f"{folder}: no image patch {name!r} for its label patch")
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    return rows


def _patch_folder(source: Path, labels_dir: str) -> list[Item]:
    """Items of a patch folder, grouped by ``patches.csv``'s ``image`` or by name."""
    img_dir, lab_dir = source / IMAGES_DIR, source / labels_dir
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise InputError(f"{source}: no {d.name}/ folder; a patch folder holds "
                             f"{IMAGES_DIR}/ and {labels_dir}/ (from 'voxelmill patches "
                             "extract')")
    images, labels = patch_entries(img_dir), patch_entries(lab_dir)
    manifest = source / PATCHES_MANIFEST
    items: list[Item] = []
    if manifest.is_file():
        rows = _read_csv(manifest)
        if rows and not {"name", "image"} <= set(rows[0]):
            raise InputError(f"{manifest}: needs the columns name and image")
        seen: set[str] = set()
        for row in rows:
            name, group = (row["name"] or "").strip(), (row["image"] or "").strip()
            if not name or not group:
                raise InputError(f"{manifest}: a row without name or image: {row}")
            safe_name(name, str(manifest))
            if name in seen:
                raise InputError(f"{manifest}: patch {name!r} listed twice")
            seen.add(name)
            if name not in labels:
                raise InputError(f"{lab_dir}: no label patch {name!r} (listed in {manifest})")
            items.append(Item(name, group, image_for(images, name, img_dir), labels[name],
                              source))
        extra = sorted(set(labels) - seen)
        if extra:
            raise InputError(f"{lab_dir / extra[0]}: not in {manifest}, so its source volume "
                             f"is unknown ({len(extra)} such patches); remove them or add "
                             "rows")
        return items
    for name, path in labels.items():
        m = _PATCH_NAME.match(name)
        if m is None:
            raise InputError(f"{path}: name is not <ds>_<token>_patch<N> and {source} has no "
                             f"{PATCHES_MANIFEST}, so its source volume is unknown")
        items.append(Item(name, m["group"], image_for(images, name, img_dir), path, source))
    return items


def read_samples(source: Path) -> list[Item]:
    """Items of a curated samples folder.

    ``SOURCE/samples.csv`` names each sample in a column ``sample``, ``path`` or ``name``
    (the first present; relative to ``SOURCE``, the ``.ome.zarr`` suffix may be left out)
    and its source volume in a column ``source``, ``source_image`` or ``image``: the
    manifest ``voxelmill curate`` writes (``sample`` = ``sample_NNN``, ``image``) reads as
    it is. Allen-layout TIFF copies beside the samples are not split.

    Raises
    ------
    InputError
        Naming the file when a column is missing, a row is empty or a sample is absent.
    """
    manifest = source / SAMPLES_MANIFEST
    rows = _read_csv(manifest)
    cols = set(rows[0]) if rows else set()
    name_col = next((c for c in _SAMPLE_COLUMNS if c in cols), None)
    group_col = next((c for c in _SOURCE_COLUMNS if c in cols), None)
    if rows and (name_col is None or group_col is None):
        raise InputError(f"{manifest}: needs a sample column ({', '.join(_SAMPLE_COLUMNS)}) "
                         f"and a source column ({', '.join(_SOURCE_COLUMNS)})")
    items: list[Item] = []
    seen: set[str] = set()
    for row in rows:
        entry, group = (row[name_col] or "").strip(), (row[group_col] or "").strip()
        if not entry or not group:
            raise InputError(f"{manifest}: a row without sample or source: {row}")
        path = source / entry
        if not path.exists() and (source / f"{entry}.ome.zarr").exists():
            path = source / f"{entry}.ome.zarr"
        if not path.exists():
            raise InputError(f"{path}: sample listed in {manifest} does not exist")
        if path.name in seen:
            raise InputError(f"{manifest}: sample {path.name!r} listed twice")
        seen.add(path.name)
        items.append(Item(path.name, group, path, None, source))
    return items


def is_partseg_project(path: Path) -> bool:
    """Whether ``path`` is a PartSeg project archive (a file with a project suffix)."""
    return path.is_file() and path.name.lower().endswith(PARTSEG_SUFFIXES)


def partseg_items(source: Path) -> list[Item]:
    """Items of a PartSeg project file, or of a folder of project files: one item and one
    group per project (the group is the project's resolved path)."""
    files = [source] if source.is_file() else sorted(
        p for p in source.iterdir() if not p.name.startswith(".") and is_partseg_project(p))
    return [Item(p.name, str(p.resolve()), p, None, source) for p in files]


def collect_items(source: str | Path, labels_dir: str = LABELS_DIR) -> list[Item]:
    """The items of one SOURCE (patch folder, samples folder, PartSeg project or folder of
    PartSeg projects).

    Raises
    ------
    InputError
        Naming the folder when it is none of these, or naming the file that is
        inconsistent.
    """
    src = Path(source)
    if src.is_file() and src.name.lower().endswith(PARTSEG_SUFFIXES):
        return partseg_items(src)
    if not src.is_dir():
        raise InputError(f"{src}: no such folder (or PartSeg project .tgz/.tbz2)")
    if (src / SAMPLES_MANIFEST).is_file():
        items = read_samples(src)
    elif (src / PATCHES_MANIFEST).is_file() or (src / IMAGES_DIR).is_dir():
        items = _patch_folder(src, labels_dir)
    elif any(is_partseg_project(p) for p in src.iterdir()):
        items = partseg_items(src)
    else:
        raise InputError(f"{src}: neither a patch folder ({IMAGES_DIR}/, {labels_dir}/, "
                         f"{PATCHES_MANIFEST}), a samples folder ({SAMPLES_MANIFEST}) nor a folder "
                         "of PartSeg projects (.tgz, .tbz2)")
    if not items:
        raise InputError(f"{src}: holds no patches or samples")
    return items
