"""OME-Zarr (OME-NGFF 0.5 on zarr v3, 0.4 on zarr v2): metadata, arrays, and reading."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from engine.errors import InputError, OptionError
from engine.io import readguard
from engine.io.integrity import COMPLETE_ATTR
from engine.io.sources import ZarrSource, to_dask
from engine.names import safe_name
from engine.provenance import jsonable
from engine.volume import Volume

NGFF_VERSIONS = ("0.4", "0.5")
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
#: distinct label colours (RGBA) for image-label metadata, cycled.
LABEL_COLORS = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]
CHANNEL_COLORS = ["FFFFFF", "00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00"]


def zarr_format(ngff: str) -> int:
    if ngff not in NGFF_VERSIONS:
        raise OptionError(f"--ngff {ngff!r}: use 0.5 (zarr v3) or 0.4 (zarr v2)")
    return 3 if ngff == "0.5" else 2


def compressor(name: str, clevel: int, zarr_fmt: int, itemsize: int) -> Any:
    """Blosc with ``lz4`` or ``zstd`` and byte shuffle, for zarr v3 or v2."""
    if name not in ("lz4", "zstd"):
        raise OptionError(f"--compression {name!r}: use lz4 or zstd")
    if not 0 <= clevel <= 9:
        raise OptionError(f"--clevel {clevel}: must be between 0 and 9")
    if zarr_fmt == 3:
        from zarr.codecs import BloscCodec

        return BloscCodec(cname=name, clevel=clevel, shuffle="shuffle", typesize=itemsize)
    from numcodecs import Blosc

    return Blosc(cname=name, clevel=clevel, shuffle=Blosc.SHUFFLE)


def create_level(
    group_path: Path, name: str, shape: Sequence[int], chunks: Sequence[int], dtype: np.dtype,
    axes: str, ngff: str, codec: str = "lz4", clevel: int = 5, fill_value: Any = 0,
    shards: Sequence[int] | None = None, every_chunk_written: bool = False,
) -> zarr.Array:
    """Create one multiscale level array (empty; blocks write into it later).

    ``every_chunk_written`` records that the writers store every chunk (images do, labels
    skip empty ones): a missing chunk of such an array is then reported as lost data by
    :func:`engine.io.integrity.read_checked` instead of reading as the fill value.
    """
    fmt = zarr_format(ngff)
    kwargs: dict[str, Any] = {}
    if fmt == 3:
        kwargs["dimension_names"] = list(axes)
        if shards is not None:
            kwargs["shards"] = tuple(shards)
    else:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return zarr.create_array(
        store=str(group_path / name), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype,
        compressors=compressor(codec, clevel, fmt, np.dtype(dtype).itemsize),
        fill_value=fill_value, zarr_format=fmt, overwrite=True,
        attributes={"voxelmill": {COMPLETE_ATTR: True}} if every_chunk_written else None,
        **kwargs,
    )


@dataclass(frozen=True)
class LevelMeta:
    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


def multiscales(axes: str, unit: str, levels: Sequence[LevelMeta], name: str, ngff: str,
                method: str) -> dict[str, Any]:
    """The ``multiscales`` entry of an image (or label) group."""
    ms: dict[str, Any] = {
        "name": name,
        "axes": [
            {"name": a, "type": AXIS_TYPES[a], **({"unit": unit} if a in "zyx" else {})}
            for a in axes
        ],
        "datasets": [
            {"path": lv.path, "coordinateTransformations": [
                {"type": "scale", "scale": list(lv.scale)},
                *([{"type": "translation", "translation": list(lv.translation)}]
                  if any(lv.translation) else []),
            ]}
            for lv in levels
        ],
        "type": method,
        "metadata": {"method": f"voxelmill.pyramid.{method}", "version": "0.1"},
    }
    if ngff == "0.4":
        ms["version"] = "0.4"
    return ms


def omero(channel_names: Sequence[str], windows: Sequence[tuple[float, float, float, float]]
          ) -> dict[str, Any]:
    """``omero`` rendering hints: channel names, colours and display windows."""
    return {
        "channels": [
            {"label": n, "color": CHANNEL_COLORS[i % len(CHANNEL_COLORS)] if len(windows) > 1
             else "FFFFFF", "active": True, "coefficient": 1.0, "family": "linear",
             "inverted": False,
             "window": {"min": w[0], "max": w[1], "start": w[2], "end": w[3]}}
            for i, (n, w) in enumerate(zip(channel_names, windows, strict=True))
        ],
        "rdefs": {"model": "color" if len(windows) > 1 else "greyscale"},
    }


def image_label(values: Sequence[int] | None, ngff: str) -> dict[str, Any]:
    """``image-label`` metadata; colours only when the label values are few enough to list
    (``values`` is None otherwise, and viewers use their own colour cycle)."""
    meta: dict[str, Any] = {"source": {"image": "../../"}}
    if values is not None:
        meta["colors"] = [
            {"label-value": int(v), "rgba": [*LABEL_COLORS[i % len(LABEL_COLORS)], 255]}
            for i, v in enumerate(v for v in values if v != 0)
        ]
    if ngff == "0.4":
        meta["version"] = "0.4"
    return meta


def write_group_attrs(path: Path, attrs: dict[str, Any], ngff: str) -> None:
    """Write (or update) a group's OME attributes in the layout of the NGFF version."""
    fmt = zarr_format(ngff)
    group = zarr.open_group(str(path), mode="a", zarr_format=fmt)
    attrs = jsonable(attrs)  # strict JSON: a NaN window is null, never a bare NaN
    if fmt == 3:
        ome = dict(group.attrs.get("ome", {}))
        ome.update(attrs)
        ome["version"] = "0.5"
        group.attrs["ome"] = ome
    else:
        group.attrs.update(attrs)


# ---------------------------------------------------------------------------------- reading

def read_attrs(path: Path) -> tuple[dict[str, Any], str]:
    """A group's OME attributes and its NGFF version ("0.5" or "0.4")."""
    if (path / "zarr.json").exists():
        meta = json.loads((path / "zarr.json").read_text())
        attrs = meta.get("attributes", {})
        if "ome" in attrs:
            return attrs["ome"], str(attrs["ome"].get("version", "0.5"))
        return attrs, "0.5"
    if (path / ".zattrs").exists():
        attrs = json.loads((path / ".zattrs").read_text())
        ms = attrs.get("multiscales") or [{}]
        return attrs, str(ms[0].get("version", "0.4"))
    raise InputError(f"{path}: not an OME-Zarr group (no zarr.json or .zattrs)")


def read_image_attrs(path: Path) -> tuple[dict[str, Any], str]:
    """Attributes and NGFF version of an OME-Zarr *image* a command works on; an
    InputError naming ``path`` (with the way to make one) otherwise."""
    if not path.exists():
        raise InputError(f"{path}: no such OME-Zarr image")
    try:
        attrs, ngff = read_attrs(path)
    except InputError:
        raise InputError(f"{path}: not an OME-Zarr image; convert it first with "
                         "'voxelmill convert'") from None
    if "multiscales" not in attrs:
        raise InputError(f"{path}: OME-Zarr group has no 'multiscales' image metadata")
    return attrs, ngff


def dataset_path(group: Path, dataset: Any) -> Path:
    """The array of one ``multiscales`` dataset entry, confined to ``group``.

    A path read from metadata is data, not a place to go: ``../../victim`` or an absolute
    path (or a symbolic link leading out) would make a command read, or write, outside the
    store. Such a path is refused with an :class:`InputError` naming the group and the path.
    """
    raw = dataset.get("path") if isinstance(dataset, dict) else None
    if not isinstance(raw, str) or not raw.strip():
        raise InputError(f"{group}: a multiscales dataset has no 'path' (got {raw!r})")
    target = Path(group) / raw
    root = Path(group).resolve()
    resolved = target.resolve()
    if Path(raw).is_absolute() or resolved == root or not resolved.is_relative_to(root):
        raise InputError(f"{group}: multiscales dataset path {raw!r} leads outside the "
                         "store (paths from metadata must name an array inside it)")
    return target


def scale_of(dataset: dict[str, Any]) -> list[float]:
    """The ``scale`` transformation of a multiscale dataset entry (empty when none)."""
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            return [float(s) for s in t["scale"]]
    return []


def label_names(path: Path) -> list[str]:
    """Names of the label images under ``path/labels``."""
    lp = path / "labels"
    if not lp.exists():
        return []
    try:
        attrs, _ = read_attrs(lp)
    except InputError:
        return []
    listed = attrs.get("labels", [])
    if not isinstance(listed, list):
        raise InputError(f"{lp}: 'labels' must be a list of names, got {listed!r}")
    # names from metadata become paths (labels/NAME): plain names only, never ../x or /x
    return [safe_name(str(n), f"{lp} 'labels' list") for n in listed]


def add_label_names(path: Path, names: Sequence[str], ngff: str) -> None:
    """List label images ``names`` in ``path/labels``' ``labels`` attribute (once each,
    after those already there), so that viewers find them."""
    listed = label_names(path)
    listed += [n for n in names if n not in listed]
    write_group_attrs(path / "labels", {"labels": listed}, ngff)


def read(path: Path, level: int = 0, **_: object) -> Volume:
    """Open one level of an OME-Zarr image lazily, with its label images.

    The group (and each label group) is watched from before its metadata is read (see
    :mod:`engine.io.readguard`), so a replacement during the command is detected."""
    readguard.hold(path)
    attrs, _version = read_attrs(path)
    if "multiscales" not in attrs:
        raise InputError(f"{path}: OME-Zarr group has no 'multiscales' image metadata")
    ms = attrs["multiscales"][0]
    datasets = ms["datasets"]
    if not 0 <= level < len(datasets):
        raise OptionError(f"{path}: level {level} does not exist; levels are 0..{len(datasets)-1}")
    axes_meta = ms["axes"]
    axes = "".join(a["name"] if isinstance(a, dict) else a for a in axes_meta)
    units = [a.get("unit") for a in axes_meta if isinstance(a, dict) and a.get("unit")]
    unit = units[0] if units else "micrometer"
    level_path = dataset_path(path, datasets[level])
    arr = zarr.open_array(str(level_path), mode="r")
    source = ZarrSource(str(level_path), shape=tuple(arr.shape),
                        dtype=np.dtype(arr.dtype))
    data = to_dask(source, axes, chunks=arr.chunks)
    scale = scale_of(datasets[level]) or [1.0] * len(axes)
    voxel = tuple(s for a, s in zip(axes, scale, strict=True) if a in "zyx")
    channels = tuple(c.get("label", f"channel {i}")
                     for i, c in enumerate(attrs.get("omero", {}).get("channels", [])))
    labels = {}
    for name in label_names(path):
        lab = read(path / "labels" / name, level=min(level, _levels(path / "labels" / name) - 1))
        labels[name] = lab
    nchan = data.shape[axes.index("c")] if "c" in axes else 0
    return Volume(data, axes, voxel, unit, channel_names=channels if len(channels) == nchan
                  else (), labels=labels, source=str(path))


def _levels(path: Path) -> int:
    attrs, _ = read_attrs(path)
    return len(attrs["multiscales"][0]["datasets"])


def describe(path: Path) -> dict[str, Any]:
    """Shape, dtype, chunks, levels, voxel size, channels and labels of an OME-Zarr image."""
    attrs, version = read_attrs(path)
    ms = attrs["multiscales"][0]
    out: dict[str, Any] = {"path": str(path), "ngff": version, "levels": []}
    for ds in ms["datasets"]:
        arr = zarr.open_array(str(dataset_path(path, ds)), mode="r")
        out["levels"].append({"path": ds["path"], "shape": list(arr.shape),
                              "chunks": list(arr.chunks), "dtype": str(arr.dtype),
                              "scale": scale_of(ds)})
    out["axes"] = "".join(a["name"] for a in ms["axes"])
    units = [a.get("unit") for a in ms["axes"] if a.get("unit")]
    out["unit"] = units[0] if units else None
    out["channels"] = [c.get("label") for c in attrs.get("omero", {}).get("channels", [])]
    out["windows"] = [c.get("window") for c in attrs.get("omero", {}).get("channels", [])
                      if isinstance(c, dict)]
    out["labels"] = label_names(path)
    return out
