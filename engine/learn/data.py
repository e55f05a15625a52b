"""Training data: sources, lazily readable image/label volumes, and random crops.

Sources (``data.train`` / ``data.val`` entries of the training configuration), mixable:

``zarr``
    An OME-Zarr image with a label image under ``SRC/labels/NAME`` (``labels: NAME``; the
    only one when not named), e.g. labels that ``voxelmill segment`` made from another
    channel. Crops are read lazily: only the chunks a crop touches are read.
``patches``
    A patch folder from ``voxelmill patches extract`` (``imagesCorr/``, ``labelsCorr/`` or
    ``labels: FOLDER`` e.g. merged corrections, ``patches.csv``); labels 0 = background,
    1 = foreground, 2 = ignore (MemBrain-seg's convention: ``ignore: [2]`` by default).
``split``
    A folder from ``voxelmill dataset split``: ``imagesTr/labelsTr`` train,
    ``imagesVal/labelsVal`` validate (unless ``data.val`` is given); PartSeg projects in
    ``imagesTr/``/``imagesVal/`` are read as ``partseg`` sources with this entry's
    ``labels``/``classes``/``channels``.
``samples``
    Curated samples from ``voxelmill curate`` (``samples.csv``): the ground truth ``gt``
    with the cost map ``cost`` (0 = ignore).
``partseg``
    A PartSeg project: ``labels: ROI`` (default) or a named alternative map (e.g.
    Trapalyzer's ``Labeling``); with ``classes: {value: class | ignore}`` the label values
    map to output classes, chosen classes being ignored.

Every source becomes :class:`TrainVolume` objects whose ``label`` follows one convention:
values ``>= 0`` are kept (instance ids or class indices), :data:`IGNORE` (-1) marks voxels
that count nowhere in the loss. The training loop makes binary, boundary or class targets
from it. :class:`CropSampler` draws random crops (a share of them centred on foreground),
normalized with the volume's global statistics.
"""

from __future__ import annotations

import csv
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from engine.errors import InputError, OptionError
from engine.io import open_volume
from engine.io.chunkcache import read_source
from engine.io.layouts import (
    IMAGES_DIR,
    LABELS_DIR,
    PATCHES_MANIFEST,
    SAMPLES_MANIFEST,
    SPLIT_CSV,
    SPLIT_DIRS,
    collect_items,
    image_for,
    patch_entries,
)
from engine.io.sources import Source, source_of
from engine.learn.normalize import ChannelStats, Normalization, apply_stats, compute_stats
from engine.volume import Volume, select_channel

KINDS = ("auto", "patches", "split", "samples", "zarr", "partseg")
IGNORE = -1
_KEYS = ("path", "kind", "labels", "channels", "ignore", "classes", "weight", "level")
_PARTSEG_SUFFIXES = (".tgz", ".tbz2", ".tar.gz", ".tar.bz2")
#: label chunks whose foreground coordinates are kept for the foreground sampler
_CACHE_CHUNKS = 8


@dataclass(frozen=True)
class SourceSpec:
    """One training source (see the module docstring)."""

    path: Path
    kind: str = "auto"
    labels: str | None = None
    channels: tuple[int | str, ...] | None = None
    ignore: tuple[int, ...] | None = None
    classes: dict[int, int | str] | None = None
    weight: float = 1.0
    level: int = 0


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_sources(entries: Any, where: str) -> list[SourceSpec]:
    """Validate the source entries of a configuration (mappings, or bare path strings).

    Raises
    ------
    InputError
        Naming ``where[i].key`` and the value, for a missing path, an unknown key or kind,
        or a value of the wrong type.
    """
    if not isinstance(entries, list):
        entries = [entries]
    out = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        if isinstance(entry, str | Path):
            entry = {"path": str(entry)}
        if not isinstance(entry, Mapping):
            raise InputError(f"{at}: expected a path or a mapping with a path, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in _KEYS)
        if unknown:
            raise InputError(f"{at}.{unknown[0]}: unknown key; known: {', '.join(_KEYS)}")
        if not isinstance(entry.get("path"), str | Path) or not str(entry["path"]):
            raise InputError(f"{at}.path: missing (the file or folder to train from)")
        path = Path(entry["path"])
        if not path.exists():
            raise InputError(f"{at}.path: {path}: no such file or folder")
        kind = entry.get("kind", "auto")
        if kind not in KINDS:
            raise InputError(f"{at}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        labels = entry.get("labels")
        if labels is not None and not isinstance(labels, str):
            raise InputError(f"{at}.labels: expected a name, got {labels!r}")
        channels = entry.get("channels")
        if channels is not None:
            if isinstance(channels, str | int) and not isinstance(channels, bool):
                channels = [channels]
            if not isinstance(channels, list) or not channels or not all(
                    isinstance(c, str) or (_int(c) and c >= 0) for c in channels):
                raise InputError(f"{at}.channels: expected channel names or indices, got "
                                 f"{channels!r}")
            channels = tuple(channels)
        ignore = entry.get("ignore")
        if ignore is not None:
            if _int(ignore):
                ignore = [ignore]
            if not isinstance(ignore, list) or not all(_int(v) and v >= 0 for v in ignore):
                raise InputError(f"{at}.ignore: expected label values ≥ 0, got {ignore!r}")
            ignore = tuple(ignore)
        classes = entry.get("classes")
        if classes is not None:
            if not isinstance(classes, Mapping) or not classes or not all(
                    _int(k) and k >= 0 and ((_int(v) and v >= 0) or v == "ignore")
                    for k, v in classes.items()):
                raise InputError(f"{at}.classes: expected {{label value: class index or "
                                 f"ignore}}, got {classes!r}")
            classes = dict(classes)
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0 \
                or not math.isfinite(weight):
            raise InputError(f"{at}.weight: expected a number > 0, got {weight!r}")
        level = entry.get("level", 0)
        if not _int(level) or level < 0:
            raise InputError(f"{at}.level: expected a pyramid level ≥ 0, got {level!r}")
        out.append(SourceSpec(path, kind, labels, channels, ignore, classes, float(weight),
                              level))
    return out


def detect_kind(path: Path) -> str:
    """The source kind of ``path`` (see the module docstring)."""
    if path.is_dir():
        if (path / SPLIT_DIRS["train"][0]).is_dir():
            return "split"
        if (path / SAMPLES_MANIFEST).is_file():
            return "samples"
        if (path / IMAGES_DIR).is_dir() or (path / PATCHES_MANIFEST).is_file():
            return "patches"
        if path.name.endswith(".zarr") or (path / "zarr.json").is_file() \
                or (path / ".zattrs").is_file():
            return "zarr"
    elif path.name.lower().endswith(_PARTSEG_SUFFIXES):
        return "partseg"
    raise InputError(f"{path}: not a training source: expected an OME-Zarr image with labels, "
                     f"a patch folder ({IMAGES_DIR}/), a dataset split ({SPLIT_DIRS['train'][0]}/"
                     f"), curated samples ({SAMPLES_MANIFEST}) or a PartSeg project (.tgz)")


@dataclass
class TrainVolume:
    """One image and its labels, read lazily.

    Attributes
    ----------
    image : dask.array.Array, shape (C, *S)
        Input channels in the stored dtype.
    label : dask.array.Array of int64, shape S
        Values ``>= 0`` as in the source (after ``classes`` mapping), :data:`IGNORE` where
        ignored.
    name : str
        The file it came from (with the label name), for messages.
    group : str
        The source volume (all its patches share a split and normalization statistics).
    region : tuple of slice
        The part of the volume crops may come from (validation hold-out).
    stats : ChannelStats or None
        Filled by :func:`prepare`.
    direct : DirectReader or None
        Reads crops from the stores under ``image`` and ``label`` without dask, when they
        are plain sources (:func:`engine.io.sources.source_of`).
    """

    image: da.Array
    label: da.Array
    name: str
    group: str
    channel_names: tuple[str, ...]
    voxel_size: tuple[float, ...]
    unit: str
    weight: float = 1.0
    region: tuple[slice, ...] = ()
    stats: ChannelStats | None = None
    direct: DirectReader | None = field(default=None, repr=False, compare=False)
    _fg: Any = field(default=None, repr=False, compare=False)
    _loaded: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False,
                                                          compare=False)

    def __post_init__(self) -> None:
        if not self.region:
            self.region = tuple(slice(0, n) for n in self.label.shape)

    @property
    def spatial_dims(self) -> int:
        return self.label.ndim

    @property
    def region_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.region)

    def read_label(self, box: tuple[slice, ...]) -> np.ndarray:
        """``label[box]`` as int64 NumPy."""
        if self.direct is not None:
            return self.direct.label(box)
        return read_box(self.label, box).astype(np.int64, copy=False)

    def read(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``image[:, box]`` in the stored dtype and ``label[box]`` as int64, NumPy."""
        if self.direct is not None:
            return self.direct.image(box), self.direct.label(box)
        # one graph for both: dask's per-call overhead holds the GIL the loader shares
        image, label = dask.compute(self.image[(slice(None), *box)], self.label[box],
                                    scheduler="synchronous")
        return np.asarray(image), np.asarray(label).astype(np.int64, copy=False)


@dataclass(frozen=True)
class DirectReader:
    """Reads a :class:`TrainVolume`'s crops from its sources, without a dask graph per
    read: the same values as computing the volume's dask arrays, at a fraction of the
    CPU time (and of the time holding the GIL the loader threads share). A zarr array that
    fits in half the process's bounded cache of decoded chunks is read through it, shared
    by the loader threads (:func:`engine.io.chunkcache.read_source`).

    Attributes
    ----------
    channels : tuple of (Source, tuple of int)
        Per input channel, the source and the indices of its leading (t, c) axes.
    labels : Source
        The label source (spatial axes only).
    cost : Source or None
        The cost map (0 = ignore), spatial axes only.
    ignore, classes, where
        :func:`_map_labels`'s arguments.
    """

    channels: tuple[tuple[Source, tuple[int, ...]], ...]
    labels: Source
    cost: Source | None
    ignore: tuple[int, ...]
    classes: dict[int, Any] | None
    where: str

    def image(self, box: tuple[slice, ...]) -> np.ndarray:
        """``(C, *box)`` in the sources' dtype."""
        parts = [read_source(src, box, prefix) for src, prefix in self.channels]
        return parts[0][None] if len(parts) == 1 else np.stack(parts)

    def label(self, box: tuple[slice, ...]) -> np.ndarray:
        """int64 labels of ``box``, mapped (``classes``, ``ignore``, ``cost``)."""
        out = _map_labels(read_source(self.labels, box), self.ignore, self.classes,
                          self.where)
        if self.cost is not None:
            out[~(read_source(self.cost, box) > 0)] = IGNORE  # as da.where(cost > 0): NaN too
        return out


def _channels(vol: Volume, channels: Sequence[int | str] | None, where: str
              ) -> tuple[da.Array, tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """The stacked channels, their names, and each one's indices on the leading axes."""
    if "c" not in vol.axes:
        if channels not in (None, (0,), ("0",)):
            raise OptionError(f"{where}: channels {list(channels or ())}: the image has no "
                              "channel axis")
        data, _, prefix = select_channel(vol, None)
        return data[None], (Path(vol.source).name,), (prefix,)
    n = vol.data.shape[vol.axes.index("c")]
    wanted = list(range(n)) if channels is None else list(channels)
    arrays, names, prefixes = [], [], []
    for ch in wanted:
        try:
            data, _, prefix = select_channel(vol, ch)
        except OptionError as exc:
            raise OptionError(f"{where}: channels: {exc}".replace("--channel ", "")) from None
        arrays.append(data)
        names.append(vol.channel_names[prefix[-1]])
        prefixes.append(prefix)
    return da.stack(arrays), tuple(names), tuple(prefixes)


def _map_labels(block: np.ndarray, ignore: tuple[int, ...], classes: dict[int, Any] | None,
                where: str) -> np.ndarray:
    out = block.astype(np.int64)
    if classes is not None:
        mapped = np.zeros_like(out)
        known = np.zeros(out.shape, bool)
        for value, cls in classes.items():
            hit = block == value
            mapped[hit] = IGNORE if cls == "ignore" else cls
            known |= hit
        unknown = ~known & (block != 0)
        if unknown.any():
            raise InputError(f"{where}: label value {int(block[unknown].flat[0])} is not listed "
                             "in classes; map every value (or mark it ignore)")
        out = mapped
    if ignore:
        out[np.isin(block, ignore)] = IGNORE
    return out


def _volume(image: Volume, label: da.Array, spec: SourceSpec, name: str, group: str,
            cost: da.Array | None = None, default_ignore: tuple[int, ...] = ()) -> TrainVolume:
    data, names, prefixes = _channels(image, spec.channels, name)
    spatial = data.shape[1:]
    if tuple(label.shape) != tuple(spatial):
        raise InputError(f"{name}: labels of shape {tuple(label.shape)} do not match the image's "
                         f"spatial shape {tuple(spatial)}")
    if label.dtype.kind not in "iub":
        raise InputError(f"{name}: labels must be integers, not {label.dtype}")
    ignore = spec.ignore if spec.ignore is not None else default_ignore
    mapped = label.map_blocks(_map_labels, ignore, spec.classes, name, dtype=np.int64)
    if cost is not None:
        mapped = da.where(cost.rechunk(mapped.chunks) > 0, mapped, IGNORE)
    sources = (source_of(image.data), source_of(label),
               None if cost is None else source_of(cost))
    direct = None
    if sources[0] is not None and sources[1] is not None and (cost is None or sources[2]):
        direct = DirectReader(tuple((sources[0], p) for p in prefixes), sources[1],
                              sources[2], ignore, spec.classes, name)
    return TrainVolume(data, mapped, name, group, names, tuple(image.voxel_size), image.unit,
                       spec.weight, direct=direct)


def _label_volume(path: Path) -> da.Array:
    vol = open_volume(path)
    if "c" in vol.axes or "t" in vol.axes:
        raise InputError(f"{path}: a label image must have spatial axes only, not {vol.axes!r}")
    return vol.data


def _zarr(spec: SourceSpec) -> list[TrainVolume]:
    vol = open_volume(spec.path, level=spec.level)
    if not vol.labels:
        raise InputError(f"{spec.path}: has no label images (labels/); make some with "
                         "voxelmill segment or convert --labels")
    name = spec.labels
    if name is None:
        if len(vol.labels) != 1:
            raise InputError(f"{spec.path}: has several label images ({', '.join(vol.labels)}); "
                             "choose one with labels:")
        name = next(iter(vol.labels))
    if name not in vol.labels:
        raise InputError(f"{spec.path}: no label image {name!r}; it has "
                         f"{', '.join(vol.labels)}")
    return [_volume(vol, vol.labels[name].data, spec, f"{spec.path}:{name}", str(spec.path))]


def _partseg(spec: SourceSpec, group: str | None = None) -> list[TrainVolume]:
    vol = open_volume(spec.path)
    key = "roi" if spec.labels in (None, "roi", "ROI") else f"alt_{spec.labels}"
    if key not in vol.labels:
        maps = ["ROI"] + [k[4:] for k in vol.labels if k.startswith("alt_")]
        raise InputError(f"{spec.path}: no label map {spec.labels!r}; the project has "
                         f"{', '.join(maps)}")
    return [_volume(vol, vol.labels[key].data, spec, f"{spec.path}:{spec.labels or 'ROI'}",
                    group or str(spec.path))]


def _patches(spec: SourceSpec) -> list[TrainVolume]:
    items = collect_items(spec.path, spec.labels or LABELS_DIR)
    return [_volume(open_volume(it.image), _label_volume(it.labels), spec, str(it.labels),
                    it.group, default_ignore=(2,)) for it in items if it.labels is not None]


def _samples(spec: SourceSpec) -> list[TrainVolume]:
    out = []
    for it in collect_items(spec.path):
        vol = open_volume(it.image)
        for needed in ("gt", "cost"):
            if needed not in vol.labels:
                raise InputError(f"{it.image}: a curated sample needs labels/gt and "
                                 "labels/cost")
        out.append(_volume(vol, vol.labels["gt"].data, spec, f"{it.image}:gt", it.group,
                           cost=vol.labels["cost"].data))
    return out


def _split(spec: SourceSpec, split: str) -> list[TrainVolume]:
    img_dir, lab_dir = (spec.path / d for d in SPLIT_DIRS[split])
    groups: dict[str, str] = {}
    if (spec.path / SPLIT_CSV).is_file():
        with open(spec.path / SPLIT_CSV, newline="", encoding="utf-8") as fh:
            groups = {r["name"]: r["group"] for r in csv.DictReader(fh)}
    out = []
    # PartSeg projects go whole into images<Split>/: read with the source's labels/classes
    if img_dir.is_dir():
        for project in sorted(img_dir.iterdir()):
            if project.name.lower().endswith(_PARTSEG_SUFFIXES):
                out.extend(_partseg(replace(spec, path=project),
                                    groups.get(project.name, project.name)))
    if not lab_dir.is_dir():
        return out
    for name, label in patch_entries(lab_dir).items():
        image = image_for(patch_entries(img_dir), name, img_dir)
        out.append(_volume(open_volume(image), _label_volume(label), spec, str(label),
                           groups.get(name, name), default_ignore=(2,)))
    return out


def _open(spec: SourceSpec, split: str = "train") -> list[TrainVolume]:
    kind = detect_kind(spec.path) if spec.kind == "auto" else spec.kind
    if kind == "split":
        return _split(spec, split)
    if split != "train":
        return []
    return {"zarr": _zarr, "partseg": _partseg, "patches": _patches,
            "samples": _samples}[kind](spec)


def open_sources(specs: Sequence[SourceSpec]) -> list[TrainVolume]:
    """The training volumes of the sources (a split folder's train part).

    Raises
    ------
    InputError, OptionError
        Naming the file: unreadable, no such label image or channel, shapes that differ,
        volumes of different channel counts or dimensionality.
    """
    out = [v for spec in specs for v in _open(spec)]
    _check_consistent(out)
    return out


def split_folder_validation(specs: Sequence[SourceSpec]) -> list[TrainVolume]:
    """The validation volumes of the split folders among the sources (``imagesVal``)."""
    out = [v for spec in specs for v in _open(spec, "val")]
    _check_consistent(out)
    return out


def _check_consistent(volumes: Sequence[TrainVolume]) -> None:
    if not volumes:
        return
    first = volumes[0]
    for v in volumes[1:]:
        if v.image.shape[0] != first.image.shape[0] or v.spatial_dims != first.spatial_dims:
            raise InputError(
                f"{v.name}: {v.image.shape[0]} channel(s) in {v.spatial_dims}D, but "
                f"{first.name} has {first.image.shape[0]} in {first.spatial_dims}D; all "
                "sources of one training must match")


def prepare(volumes: Sequence[TrainVolume], norm: Normalization, client: Any = None) -> None:
    """Compute each source volume's global normalization statistics, over the whole image
    (inference normalizes the whole volume too); patches of one source volume share
    statistics computed over all of them together."""
    groups: dict[str, dict[str, TrainVolume]] = {}
    for v in volumes:
        groups.setdefault(v.group, {}).setdefault(v.name, v)
    done: dict[str, ChannelStats] = {}
    for group, images in groups.items():
        if len(images) == 1:
            done[group] = compute_stats(next(iter(images.values())).image, norm, client)
        else:  # patches: small; their values together stand for the source volume
            flat = [v.image.reshape(v.image.shape[0], -1) for v in images.values()]
            done[group] = compute_stats(da.concatenate(flat, axis=1), norm, client)
    for v in volumes:
        v.stats = done[v.group]


# --------------------------------------------------------------------------- crops


def read_box(array: da.Array | np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The voxels of ``box`` of a training volume's array, as NumPy.

    Synchronous: a crop or validation read may run inside a Dask task (training on a
    worker), which must not go back to the scheduler.
    """
    if isinstance(array, np.ndarray):
        return array[box]
    return np.asarray(array[box].compute(scheduler="synchronous"))


class _Foreground:
    """Foreground voxel counts per label chunk (within a region) and, for the chunks
    sampled recently, the foreground coordinates."""

    def __init__(self, vol: TrainVolume) -> None:
        starts = [np.cumsum((0,) + c) for c in vol.label.chunks]
        boxes = []
        for idx in np.ndindex(*[len(c) for c in vol.label.chunks]):
            box = []
            for a, i in enumerate(idx):
                lo = max(int(starts[a][i]), vol.region[a].start)
                hi = min(int(starts[a][i + 1]), vol.region[a].stop)
                box.append(slice(lo, hi))
            if all(s.stop > s.start for s in box):
                boxes.append(tuple(box))
        tasks = [((vol.label[b] > 0).sum(), (vol.label[b] >= 0).sum()) for b in boxes]
        counts = dask.compute(*tasks, scheduler="threads", num_workers=2)
        self.boxes = boxes
        self.fg = np.array([int(c[0]) for c in counts], np.int64)
        self.valid = int(sum(int(c[1]) for c in counts))
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # crops are sampled by several loader threads (engine.learn.loader)
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # the plan travels to a worker: counts yes, the lock and the cached chunks no
        return {**self.__dict__, "lock": None, "cache": OrderedDict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def voxel(self, vol: TrainVolume, rng: np.random.Generator) -> tuple[int, ...] | None:
        total = int(self.fg.sum())
        if total == 0:
            return None
        k = int(rng.choice(len(self.fg), p=self.fg / total))
        with self.lock:
            coords = self.cache.get(k)
            if coords is not None:
                self.cache.move_to_end(k)
        if coords is None:  # read outside the lock: other threads keep sampling meanwhile
            coords = np.flatnonzero(vol.read_label(self.boxes[k]) > 0)
            with self.lock:
                self.cache[k] = coords
                if len(self.cache) > _CACHE_CHUNKS:
                    self.cache.popitem(last=False)
        flat = int(coords[rng.integers(len(coords))])
        box = self.boxes[k]
        local = np.unravel_index(flat, tuple(s.stop - s.start for s in box))
        return tuple(int(s.start + i) for s, i in zip(box, local, strict=True))


class CropSampler:
    """Random and grid crops of fixed shape from training volumes.

    Parameters
    ----------
    volumes : sequence of TrainVolume
        With statistics (:func:`prepare`).
    patch_shape : tuple of int
        Crop shape ``(Y, X)`` or ``(Z, Y, X)``.
    foreground_fraction : float
        Share of random crops centred (± a quarter patch) on a foreground voxel.
    seed : int
        Unused by :meth:`sample` (which takes a generator); kept for :meth:`grid`.
    memory_bytes : int
        Volumes are loaded whole into memory, in order, while their images and labels fit
        in this budget (patches, slides: a crop is then a slice); the others are streamed,
        each crop reading only the chunks it touches.
    """

    def __init__(self, volumes: Sequence[TrainVolume], patch_shape: Sequence[int],
                 foreground_fraction: float = 0.5, seed: int = 0,
                 memory_bytes: int = 512 * 2**20) -> None:
        if not volumes:
            raise InputError("no training volumes")
        self.volumes = list(volumes)
        self.patch = tuple(int(p) for p in patch_shape)
        if len(self.patch) != self.volumes[0].spatial_dims:
            raise OptionError(f"patch shape {self.patch} does not fit "
                              f"{self.volumes[0].spatial_dims}D volumes")
        self.foreground_fraction = float(foreground_fraction)
        self.seed = seed
        sizes = np.array([v.weight * math.prod(v.region_shape) for v in self.volumes], float)
        self.p = sizes / sizes.sum()
        self.in_memory: set[int] = set()
        self._lock = threading.Lock()  # lazy loads, shared by the loader's threads
        budget = memory_bytes
        for k, v in enumerate(self.volumes):
            need = v.image.nbytes + v.label.nbytes
            if need <= budget:
                self.in_memory.add(k)
                budget -= need

    def _arrays(self, k: int) -> tuple[da.Array | np.ndarray, da.Array | np.ndarray]:
        vol = self.volumes[k]
        if k not in self.in_memory:
            return vol.image, vol.label
        with self._lock:
            if vol._loaded is None:
                vol._loaded = (np.asarray(vol.image.compute(scheduler="synchronous")),
                               np.asarray(vol.label.compute(scheduler="synchronous")))
            return vol._loaded

    def _fg(self, vol: TrainVolume) -> _Foreground:
        with self._lock:
            if vol._fg is None:
                vol._fg = _Foreground(vol)
            return vol._fg

    def check_foreground(self) -> None:
        """Refuse label sources without any foreground voxel (nothing to learn)."""
        for v in self.volumes:
            if not self._fg(v).fg.any():
                continue
            return
        names = ", ".join(sorted({v.name for v in self.volumes})[:3])
        raise InputError(f"{names}: the labels have no foreground voxel (all 0 or ignored) "
                         "in the training region; check labels: and classes:")

    def foreground_fraction_estimate(self) -> float:
        """Foreground share of the valid (not ignored) voxels of all volumes."""
        fg = sum(int(self._fg(v).fg.sum()) for v in self.volumes)
        valid = sum(self._fg(v).valid for v in self.volumes)
        return fg / valid if valid else 0.0

    def crop(self, k: int, start: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The crop of volume ``k`` at ``start`` (may extend past the region: padded with 0
        in the normalized image and :data:`IGNORE` in the labels, so padding never
        trains)."""
        vol = self.volumes[k]
        image_src, label_src = self._arrays(k)
        inner, pad = [], []
        for a, (s, p) in enumerate(zip(start, self.patch, strict=True)):
            r = vol.region[a]
            lo, hi = max(s, r.start), min(s + p, r.stop)
            inner.append(slice(lo, hi))
            pad.append((lo - s, s + p - hi))
        box = tuple(inner)
        if isinstance(image_src, np.ndarray) or isinstance(label_src, np.ndarray):
            image = read_box(image_src, (slice(None), *box))
            label = read_box(label_src, box).astype(np.int64)
        else:
            image, label = vol.read(box)
        stats = vol.stats or ChannelStats((0.0,) * image.shape[0], (1.0,) * image.shape[0])
        image = apply_stats(image, stats)
        if any(a or b for a, b in pad):
            image = np.pad(image, [(0, 0), *pad])
            label = np.pad(label, pad, constant_values=IGNORE)
        return image, label

    def sample_position(self, rng: np.random.Generator) -> tuple[int, tuple[int, ...]]:
        """A random volume index and crop start."""
        k = int(rng.choice(len(self.volumes), p=self.p))
        vol = self.volumes[k]
        centre = None
        if rng.random() < self.foreground_fraction:
            centre = self._fg(vol).voxel(vol, rng)
        start = []
        for a, p in enumerate(self.patch):
            r = vol.region[a]
            hi = max(r.start, r.stop - p)
            if centre is None:
                s = int(rng.integers(r.start, hi + 1))
            else:
                jitter = int(rng.integers(-(p // 4), p // 4 + 1))
                s = min(max(centre[a] - p // 2 + jitter, r.start), hi)
            start.append(s)
        return k, tuple(start)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One random crop: image float32 ``(C, *patch)``, label int64 ``patch``."""
        k, start = self.sample_position(rng)
        return self.crop(k, start)

    def grid_positions(self) -> list[tuple[int, tuple[int, ...]]]:
        """Crop starts on a regular grid covering each volume's region (last crop flush
        with the end)."""
        out = []
        for k, vol in enumerate(self.volumes):
            axes = []
            for a, p in enumerate(self.patch):
                r = vol.region[a]
                n = r.stop - r.start
                if n <= p:
                    axes.append([r.start])
                    continue
                count = math.ceil(n / p)
                axes.append(sorted({r.start + round(i * (n - p) / (count - 1))
                                    for i in range(count)}))
            out.extend((k, tuple(int(v) for v in pos)) for pos in np.ndindex(
                *[len(a) for a in axes]) for pos in [tuple(axes[i][j] for i, j in
                                                       enumerate(pos))])
        return out

    def grid(self, max_crops: int | None = None, seed: int = 0
             ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Deterministic crops: the grid, or a seeded subset of ``max_crops`` (validation
        no longer uses them: it predicts whole regions, :mod:`engine.learn.validation`)."""
        positions = self.grid_positions()
        if max_crops is not None and len(positions) > max_crops:
            pick = np.random.default_rng(seed).choice(len(positions), max_crops, replace=False)
            positions = [positions[i] for i in sorted(pick)]
        return [self.crop(k, start) for k, start in positions]
