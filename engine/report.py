"""A self-contained HTML report of what a run produced (``voxelmill report``).

The input is either an OME-Zarr image group (with its ``labels/NAME`` and
``predictions/NAME`` groups) or a training run folder written by ``voxelmill train``
(``metrics.json``, ``config.yaml``, ``curves.png``, ``best.pt`` / ``last.pt``).

An image report holds orthogonal-slice thumbnails read from the pyramid level whose
largest side is at most about :data:`THUMB_SIDE` voxels (only the needed 2D slices are
read), label overlays with per-label statistics computed blockwise with dask, prediction
heat maps, and the provenance of every group (commands, parameters, stage timings and
block-time histograms, patch applications). A run report holds the learning curves, the
best/last metrics, the configuration and a description of the checkpoint.

The HTML has inline CSS and PNG images embedded as ``data:`` URIs: no external
references. Every string read from the input is HTML-escaped. The input is only read; the
report is written atomically (a temporary file beside the destination, then a rename).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import DestinationError, InputError
from engine.output import check_destination

#: thumbnails come from the finest level whose largest side is at most this (about)
THUMB_SIDE = 512
#: at most this many channel panels
MAX_CHANNELS = 6
#: label arrays above this many voxels get their statistics from a coarser level
MAX_STATS_VOXELS = 2**31
#: ... the coarsest level holding at least this fraction of the full-resolution voxels
MIN_STATS_FRACTION = 1 / 64
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("metrics.json", "config.yaml", "best.pt", "last.pt")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;padding:0 1em;color:#222;background:#fff}
h1{font-size:1.6em;border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
h3{margin-bottom:.3em}table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:.2em .6em;text-align:left;vertical-align:top;
font-size:.9em}th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;border:1px solid #ddd;padding:.6em;overflow-x:auto;font-size:.85em;
white-space:pre-wrap;word-break:break-all}
figure{display:inline-block;margin:.4em;vertical-align:top}
figcaption{font-size:.8em;color:#555;max-width:640px}img{max-width:100%;height:auto}
.meta{color:#555;font-size:.9em}.note{color:#8a5a00}
"""


# ------------------------------------------------------------------------------- entry points

def write_report(path: Path, out: Path | None = None, overwrite: bool = False) -> Path:
    """Write the HTML report of an OME-Zarr image or a training run folder.

    Parameters
    ----------
    path : Path
        An OME-Zarr image group or a ``voxelmill train`` output folder; only read.
    out : Path, optional
        The HTML file to write; default ``<input name>.report.html`` beside the input.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    InputError
        ``path`` is neither an OME-Zarr image nor a training run folder.
    DestinationError
        ``out`` exists (without ``overwrite``), lies inside the input, or its folder does
        not exist.
    """
    path = Path(path)
    kind = input_kind(path)
    out = Path(out) if out is not None else path.parent / f"{path.name}.report.html"
    _check_destination(path, out, overwrite)
    text = build_report(path, kind)
    _write_atomic(out, text, overwrite)
    return out


def input_kind(path: Path) -> str:
    """``"image"`` for an OME-Zarr image group, ``"run"`` for a training run folder.

    Raises
    ------
    InputError
        Naming ``path`` when it is neither.
    """
    from engine.io import omezarr

    if not path.exists():
        raise InputError(f"{path}: no such OME-Zarr image or training run folder")
    if path.is_dir() and (path / "metrics.json").is_file():
        return "run"
    try:
        omezarr.read_image_attrs(path)
    except (InputError, ValueError, OSError):
        raise InputError(f"{path}: not an OME-Zarr image (with 'multiscales' metadata) nor a "
                         "training run folder (with metrics.json)") from None
    return "image"


def build_report(path: Path, kind: str | None = None) -> str:
    """The report's HTML text (see the module docstring)."""
    from engine import __version__
    from engine.events import now

    kind = kind or input_kind(path)
    body = image_sections(path) if kind == "image" else run_sections(path)
    what = "OME-Zarr image" if kind == "image" else "training run"
    title = f"voxelmill report: {path.name}"
    head = (f"<h1>{_e(title)}</h1>\n<table>"
            f"<tr><th>input</th><td>{_e(str(path.resolve()))} ({what})</td></tr>"
            f"<tr><th>generated</th><td>{_e(now())} (UTC)</td></tr>"
            f"<tr><th>voxelmill</th><td>{_e(__version__)}</td></tr></table>\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n"
            f"{head}{''.join(body)}</body></html>\n")


# ------------------------------------------------------------------------------- destination

def _check_destination(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise DestinationError(f"{out}: the report must not be written inside the input {src}")
    if out.is_dir() and not out.is_symlink():
        raise DestinationError(f"{out}: is a folder; give a file name such as report.html")
    if not out.parent.is_dir():
        raise DestinationError(f"{out}: folder {out.parent} does not exist")
    check_destination(out, overwrite, src, file=True)


def _write_atomic(out: Path, text: str, overwrite: bool) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise DestinationError(f"{out}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        if out.exists() and not overwrite:  # appeared while the report was built
            raise DestinationError(f"{out}: exists; use --overwrite to replace it")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------- html helpers

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return _e(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    if not math.isfinite(v):
        return _e(v)
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    if 1e3 <= abs(v) < 1e15:
        return f"{v:,.1f}"
    return f"{v:.{digits + 1}g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table; cells that are numbers are right-aligned, everything else is escaped."""
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        out.append("<tr>")
        for cell in row:
            if isinstance(cell, (int, float, np.number)) and not isinstance(cell, bool):
                out.append(f"<td class=\"n\">{_num(cell)}</td>")
            elif cell is None:
                out.append("<td>—</td>")
            else:
                out.append(f"<td>{_e(cell)}</td>")
        out.append("</tr>")
    out.append("</table>\n")
    return "".join(out)


def _kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = []
    for k, v in pairs:
        cell = _num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _e(v)
        rows.append(f"<tr><th>{_e(k)}</th><td>{cell}</td></tr>")
    return f"<table>{''.join(rows)}</table>\n"


def _pre(text: str) -> str:
    return f"<pre>{_e(text)}</pre>\n"


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_e(alt)}\">"
            f"<figcaption>{_e(caption)}</figcaption></figure>\n")


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


# ------------------------------------------------------------------------------ image groups

@dataclass
class Group:
    """One OME-Zarr multiscale group, opened read-only."""

    path: Path
    attrs: dict[str, Any]
    axes: str
    unit: str
    arrays: list[Any]
    scales: list[list[float]]

    @classmethod
    def open(cls, path: Path) -> Group:
        """Open the group's metadata and its level arrays (lazily, mode ``"r"``)."""
        import zarr

        from engine.io import omezarr

        attrs, _ = omezarr.read_image_attrs(path)
        ms = attrs["multiscales"][0]
        axes = "".join(a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"])
        units = [a.get("unit") for a in ms["axes"]
                 if isinstance(a, dict) and a.get("unit") and a.get("name") in "zyx"]
        arrays, scales = [], []
        for ds in ms["datasets"]:
            arrays.append(zarr.open_array(str(omezarr.dataset_path(path, ds)), mode="r"))
            scales.append(omezarr.scale_of(ds) or [1.0] * len(axes))
        return cls(path, attrs, axes, units[0] if units else "pixel", arrays, scales)

    @property
    def spatial(self) -> str:
        return "".join(a for a in self.axes if a in "zyx")

    def spatial_shape(self, level: int) -> tuple[int, ...]:
        shape = self.arrays[level].shape
        return tuple(int(shape[self.axes.index(a)]) for a in self.spatial)

    def voxel(self, level: int) -> tuple[float, ...]:
        return tuple(float(self.scales[level][self.axes.index(a)]) for a in self.spatial)

    def thumb_level(self) -> int:
        """The finest level whose largest side is at most about :data:`THUMB_SIDE`."""
        for i in range(len(self.arrays)):
            if max(self.spatial_shape(i), default=0) <= THUMB_SIDE * 1.25:
                return i
        return len(self.arrays) - 1

    def level_like(self, shape: tuple[int, ...]) -> int:
        """The level whose spatial shape is ``shape``, else :meth:`thumb_level`."""
        for i in range(len(self.arrays)):
            if self.spatial_shape(i) == tuple(shape):
                return i
        return self.thumb_level()

    def channels(self) -> list[str]:
        n = int(self.arrays[0].shape[self.axes.index("c")]) if "c" in self.axes else 1
        names = [str(c.get("label", "")) for c in self.attrs.get("omero", {}).get("channels", [])]
        if len(names) != n:
            names = [f"channel {i}" for i in range(n)]
        return names

    def plane(self, level: int, fixed: Mapping[str, int], channel: int | None = None,
              step: int = 1) -> np.ndarray:
        """One 2D slice: the spatial axes not in ``fixed`` (in order), read on its own."""
        index: list[Any] = []
        for a in self.axes:
            if a == "c":
                index.append(channel or 0)
            elif a in fixed:
                index.append(int(fixed[a]))
            elif a in "zyx":
                index.append(slice(None, None, step))
            else:  # t and unknown axes: the first
                index.append(0)
        from engine.io.integrity import location, read_checked

        arr = self.arrays[level]
        return read_checked(arr, location(arr), tuple(index))


@dataclass
class View:
    """One orthogonal slice: its name, the fixed index, and the row / column axes."""

    name: str
    fixed: dict[str, int]
    rows: str
    cols: str


def _views(spatial: str, shape: Sequence[int]) -> list[View]:
    centre = {a: int(n) // 2 for a, n in zip(spatial, shape, strict=True)}
    if spatial == "zyx":
        return [View("xy", {"z": centre["z"]}, "y", "x"),
                View("xz", {"y": centre["y"]}, "z", "x"),
                View("yz", {"x": centre["x"]}, "z", "y")]
    if len(spatial) == 2:
        return [View(spatial[1] + spatial[0], {}, spatial[0], spatial[1])]
    raise InputError(f"axes {spatial!r}: only 2D (yx) and 3D (zyx) images can be reported")


def _view_title(v: View) -> str:
    return f"{v.name} ({', '.join(f'{a}={i}' for a, i in v.fixed.items())})" if v.fixed \
        else v.name


def _contrast(planes: Sequence[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([p.ravel().astype(np.float64) for p in planes]) if planes else \
        np.zeros(1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [1.0, 99.5]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _aspect(group: Group, level: int, v: View) -> float:
    vox = dict(zip(group.spatial, group.voxel(level), strict=True))
    return vox[v.rows] / vox[v.cols] if vox[v.cols] else 1.0


def _voxel_text(group: Group, level: int) -> str:
    vox = group.voxel(level)
    return (f"voxel {' × '.join(f'{v:g}' for v in vox)} {group.unit} "
            f"({group.spatial}), level {level} of shape {group.spatial_shape(level)}")


def _step(shape: Sequence[int]) -> int:
    return max(1, math.ceil(max(shape, default=1) / (THUMB_SIDE * 2)))


def _label_rgba(lab: np.ndarray) -> np.ndarray:
    """Ids in a categorical colour map (alpha 0.45), boundaries opaque, 0 transparent;
    consecutive ids get distinct colours."""
    import matplotlib
    from skimage.segmentation import find_boundaries

    ids = lab.astype(np.int64)
    rgba = np.asarray(matplotlib.colormaps["tab10"]((ids - 1) % 10), dtype=np.float32)
    fg = ids > 0
    rgba[..., 3] = np.where(fg, 0.45, 0.0)
    edges = find_boundaries(ids, mode="inner") & fg
    rgba[edges, 3] = 1.0
    return rgba


def _heat_rgba(prob: np.ndarray) -> np.ndarray:
    import matplotlib

    p = np.clip(np.nan_to_num(prob.astype(np.float32)), 0.0, 1.0)
    rgba = np.asarray(matplotlib.colormaps["inferno"](p), dtype=np.float32)
    rgba[..., 3] = 0.75 * p
    return rgba


def _panel_figure(n: int) -> tuple[Any, list[Any]]:
    fig = _figure(3.6 * n, 3.8)
    axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def image_sections(path: Path) -> list[str]:
    """HTML sections of an OME-Zarr image report."""
    image = Group.open(path)
    parts = [_overview(image)]
    parts.append(_thumbnails(image))
    labels = _subgroups(path, "labels")
    predictions = _subgroups(path, "predictions")
    for name, gpath in labels:
        parts.append(_label_section(image, name, gpath))
    for name, gpath in predictions:
        parts.append(_prediction_section(image, name, gpath))
    parts.append("<h2>Provenance</h2>\n")
    parts.append(provenance_section(f"image {path.name}", path))
    for kind, items in (("labels", labels), ("predictions", predictions)):
        for name, gpath in items:
            parts.append(provenance_section(f"{kind}/{name}", gpath))
    return parts


def _subgroups(path: Path, folder: str) -> list[tuple[str, Path]]:
    """The multiscale image groups under ``path/folder`` (listed ones first, then others)."""
    from engine.io import omezarr

    root = path / folder
    if not root.is_dir():
        return []
    names = omezarr.label_names(path) if folder == "labels" else []
    names += sorted(p.name for p in root.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and p.name not in names)
    found = []
    for name in names:
        try:
            omezarr.read_image_attrs(root / name)
        except (InputError, ValueError, OSError):
            continue
        found.append((name, root / name))
    return found


def _overview(image: Group) -> str:
    rows = []
    for i, arr in enumerate(image.arrays):
        rows.append((str(i), " × ".join(str(s) for s in arr.shape), str(arr.dtype),
                     " × ".join(str(c) for c in arr.chunks),
                     " × ".join(f"{s:g}" for s in image.voxel(i))))
    channels = image.channels() if "c" in image.axes else []
    text = (f"<h2>Image</h2>\n<p class=\"meta\">axes {_e(image.axes)}, unit {_e(image.unit)}"
            + (f", channels: {_e(', '.join(channels))}" if channels else "") + "</p>\n")
    return text + _table(("level", "shape", "dtype", "chunks",
                          f"voxel size ({image.spatial}, {image.unit})"), rows)


def _thumbnails(image: Group) -> str:
    level = image.thumb_level()
    shape = image.spatial_shape(level)
    views = _views(image.spatial, shape)
    step = _step(shape)
    channels = image.channels()
    shown = channels[:MAX_CHANNELS]
    out = [f"<h2>Slices</h2>\n<p class=\"meta\">from level {level} "
           f"({_e(' × '.join(map(str, shape)))} {image.spatial}); contrast: percentiles "
           "1–99.5 per channel</p>\n"]
    if len(channels) > len(shown):
        out.append(f"<p class=\"note\">{len(channels) - len(shown)} of {len(channels)} "
                   f"channels left out (only the first {MAX_CHANNELS} are shown)</p>\n")
    for c, name in enumerate(shown):
        planes = [image.plane(level, v.fixed, c, step) for v in views]
        lo, hi = _contrast(planes)
        fig, axes = _panel_figure(len(views))
        for ax, v, p in zip(axes, views, planes, strict=True):
            ax.imshow(p, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                      aspect=_aspect(image, level, v))
            ax.set_title(_view_title(v), fontsize=9)
            ax.set_xlabel(v.cols, fontsize=8)
            ax.set_ylabel(v.rows, fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(name, fontsize=10)
        out.append(_img(_png(fig), f"slices of {name}",
                        f"{name}: {_voxel_text(image, level)}; display range "
                        f"{lo:.4g}–{hi:.4g}"))
    return "".join(out)


def _overlay(image: Group, layer: Group, rgba_of: Any, title: str, colorbar: bool = False,
             channel: int = 0) -> tuple[bytes, str]:
    """Input slices (first channel, grey) with ``layer``'s slices drawn over them."""
    level = layer.thumb_level()
    shape = layer.spatial_shape(level)
    ilevel = image.level_like(shape)
    same = image.spatial_shape(ilevel) == shape and image.spatial == layer.spatial
    views = _views(layer.spatial, shape)
    step = _step(shape)
    backs = [image.plane(ilevel, v.fixed, 0, step) for v in views] if same else []
    lo, hi = _contrast(backs)
    fig, axes = _panel_figure(len(views))
    for i, (ax, v) in enumerate(zip(axes, views, strict=True)):
        aspect = _aspect(layer, level, v)
        top = layer.plane(level, v.fixed, channel, step)
        if same:
            ax.imshow(backs[i], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                      aspect=aspect)
        else:
            ax.imshow(np.zeros(top.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        ax.imshow(rgba_of(top), interpolation="nearest", aspect=aspect)
        ax.set_title(_view_title(v), fontsize=9)
        ax.set_xlabel(v.cols, fontsize=8)
        ax.set_ylabel(v.rows, fontsize=8)
        ax.tick_params(labelsize=7)
    if colorbar:
        import matplotlib
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        fig.colorbar(ScalarMappable(Normalize(0, 1), matplotlib.colormaps["inferno"]),
                     ax=axes, shrink=0.7, label="probability")
    fig.suptitle(title, fontsize=10)
    caption = f"{title}: {_voxel_text(layer, level)}" + (
        "" if same else " (no image level of this shape: drawn on black)")
    return _png(fig), caption


def _label_section(image: Group, name: str, gpath: Path) -> str:
    out = [f"<h2>Labels: {_e(name)}</h2>\n"]
    try:
        labels = Group.open(gpath)
        png, caption = _overlay(image, labels, _label_rgba, f"labels {name}")
        out.append(_img(png, f"labels {name} over the image", caption))
        out.append(label_statistics_html(labels))
    except (InputError, ValueError, OSError, KeyError) as exc:
        out.append(f"<p class=\"note\">cannot read labels {_e(name)}: {_e(exc)}</p>\n")
    return "".join(out)


def _foreground_channel(group: Group) -> int:
    names = [n.lower() for n in group.channels()]
    if len(names) > 1 and names[0] in ("background", "bg", "0", "class 0"):
        return 1
    return 0


def _prediction_section(image: Group, name: str, gpath: Path) -> str:
    out = [f"<h2>Predictions: {_e(name)}</h2>\n"]
    try:
        pred = Group.open(gpath)
        c = _foreground_channel(pred)
        channel_name = pred.channels()[c]
        scale = 255.0 if np.dtype(pred.arrays[0].dtype) == np.uint8 else 1.0

        def rgba(p: np.ndarray) -> np.ndarray:
            return _heat_rgba(p.astype(np.float32) / scale)

        png, caption = _overlay(image, pred, rgba, f"predictions {name}: {channel_name}",
                                colorbar=True, channel=c)
        out.append(f"<p class=\"meta\">{len(pred.channels())} channel(s): "
                   f"{_e(', '.join(pred.channels()))}; stored as {_e(pred.arrays[0].dtype)}"
                   f"; heat map of channel {c} ({_e(channel_name)})</p>\n")
        out.append(_img(png, f"predictions {name} over the image", caption))
    except (InputError, ValueError, OSError, KeyError, IndexError) as exc:
        out.append(f"<p class=\"note\">cannot read predictions {_e(name)}: {_e(exc)}</p>\n")
    return "".join(out)


# ----------------------------------------------------------------------------- label stats

@dataclass
class LabelStats:
    """Objects of a label image, computed blockwise.

    Attributes
    ----------
    level : int
        The pyramid level the counts come from (0 unless level 0 is very large).
    shape : tuple of int
        That level's shape.
    voxel : tuple of float
        Its voxel size (spatial axes).
    ids : numpy.ndarray
        The object ids (> 0) present, ascending.
    counts : numpy.ndarray
        Voxels of each id.
    total : int
        Voxels of the level.
    """

    level: int
    shape: tuple[int, ...]
    voxel: tuple[float, ...]
    ids: np.ndarray
    counts: np.ndarray
    total: int

    @property
    def objects(self) -> int:
        return int(self.ids.size)

    @property
    def foreground(self) -> float:
        return float(self.counts.sum()) / self.total if self.total else 0.0


def _block_counts(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids (> 0) and their voxel counts in one block: ``np.bincount`` for compact ids."""
    flat = np.asarray(block).ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(flat.max())
    if top <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if top < max(4 * flat.size, 1 << 16):
        counts = np.bincount(flat[flat > 0].astype(np.int64), minlength=top + 1)
        ids = np.flatnonzero(counts)
        return ids.astype(np.int64), counts[ids].astype(np.int64)
    ids, counts = np.unique(flat[flat > 0], return_counts=True)  # sparse, huge ids
    return ids.astype(np.int64), counts.astype(np.int64)


def _merge_counts(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    if ids.size == 0:
        return ids, counts
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


def stats_level(group: Group) -> int:
    """Level 0, or for arrays above :data:`MAX_STATS_VOXELS` voxels the coarsest level
    with at least :data:`MIN_STATS_FRACTION` of level 0's voxels."""
    sizes = [int(np.prod(a.shape, dtype=np.int64)) for a in group.arrays]
    if sizes[0] <= MAX_STATS_VOXELS:
        return 0
    ok = [i for i, s in enumerate(sizes) if s >= sizes[0] * MIN_STATS_FRACTION]
    return min(ok, key=lambda i: sizes[i])


def label_statistics(group: Group, level: int | None = None) -> LabelStats:
    """Count the voxels of every id blockwise (one ``np.bincount`` per chunk, reduced in a
    tree with dask), never holding the whole array."""
    import dask

    level = stats_level(group) if level is None else level
    from engine.io.integrity import location
    from engine.io.sources import zarr_dask

    arr = zarr_dask(location(group.arrays[level]))
    parts = [dask.delayed(_block_counts)(b) for b in arr.to_delayed().ravel()]
    while len(parts) > 1:
        parts = [dask.delayed(_merge_counts)(*parts[i:i + 8]) for i in range(0, len(parts), 8)]
    ids, counts = dask.compute(parts[0], scheduler="threads")[0]
    return LabelStats(level, tuple(int(s) for s in arr.shape), group.voxel(level),
                      np.asarray(ids), np.asarray(counts), int(arr.size))


def label_statistics_html(group: Group) -> str:
    """The statistics table of a label image."""
    st = label_statistics(group)
    unit_size = float(np.prod(st.voxel)) if st.voxel else 1.0
    dims = len(st.voxel)
    measure = "area" if dims == 2 else "volume"
    unit = f"{group.unit}²" if dims == 2 else f"{group.unit}³"
    out = [f"<p class=\"meta\">statistics from level {st.level} "
           f"(shape {_e(' × '.join(map(str, st.shape)))}, voxel "
           f"{_e(' × '.join(f'{v:g}' for v in st.voxel))} {_e(group.unit)})"]
    if st.level:
        out.append(f"; level 0 has {_num(int(np.prod(group.arrays[0].shape, dtype=np.int64)))} "
                   "voxels (over 2³¹), so this coarser level was used")
    out.append("</p>\n")
    rows: list[tuple[str, Any, Any]] = [("objects (ids > 0)", st.objects, None),
                                        ("foreground fraction", round(st.foreground, 6), None)]
    if st.objects:
        for what, value in (("min", st.counts.min()), ("median", np.median(st.counts)),
                            ("max", st.counts.max())):
            rows.append((f"{what} object size", float(value), float(value) * unit_size))
    out.append(_table(("", "voxels / value", f"physical {measure} ({unit})"), rows))
    return "".join(out)


# ------------------------------------------------------------------------------ provenance

def provenance_section(title: str, group: Path) -> str:
    """The provenance entries of one group: runs, then patch applications and undos."""
    from engine import provenance

    try:
        entries = provenance.read(group)
    except Exception as exc:  # noqa: BLE001 - a broken attribute file must not stop the report
        return f"<h3>{_e(title)}</h3><p class=\"note\">provenance unreadable: {_e(exc)}</p>\n"
    out = [f"<h3>{_e(title)}</h3>\n"]
    if not entries:
        out.append("<p class=\"meta\">no provenance recorded</p>\n")
        return "".join(out)
    patches = [e for e in entries if isinstance(e, dict) and "action" in e]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "action" in entry:
            continue
        if "op" in entry:
            out.append(run_entry_html(entry, i + 1))
        else:
            out.append(f"<p>entry {i + 1}</p>" + _pre(json.dumps(entry, indent=1,
                                                                  default=str)))
    if patches:
        out.append(patch_table_html(patches))
    return "".join(out)


def run_entry_html(entry: Mapping[str, Any], number: int) -> str:
    """One run entry: command, parameters, stage timings and a block-time histogram."""
    command = entry.get("command")
    out = [f"<h4>{number}. {_e(entry.get('op'))}</h4>\n<p class=\"meta\">started "
           f"{_e(entry.get('started', '?'))}, {_num(entry.get('seconds'))} s wall, voxelmill "
           f"{_e(entry.get('version', '?'))} on {_e(entry.get('host', '?'))}</p>\n",
           "<p>command:</p>", _pre(command if command else "(from Python)")]
    params = entry.get("parameters")
    if isinstance(params, dict) and params:
        rows = []
        for k, v in params.items():
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            if isinstance(v, (dict, list)) and len(text) > 60:
                cell = _pre(json.dumps(v, indent=1, default=str))
            else:
                cell = f"<code>{_e(text)}</code>"
            rows.append(f"<tr><th>{_e(k)}</th><td>{cell}</td></tr>")
        out.append(f"<p>parameters:</p><table>{''.join(rows)}</table>\n")
    elif params:
        out.append("<p>parameters:</p>" + _pre(json.dumps(params, indent=1, default=str)))
    stages = [s for s in entry.get("stages") or [] if isinstance(s, dict)]
    if stages:
        out.append(_stage_table(stages))
        png = _histogram_png(stages, str(entry.get("op")))
        if png is not None:
            out.append(_img(png, f"block times of {entry.get('op')}",
                            f"block task times of {entry.get('op')} (log-spaced bins)"))
    return "".join(out)


def _stage_table(stages: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in stages:
        seconds = s.get("seconds")
        voxels = s.get("voxels")
        computed = s.get("computed")
        mvox = s.get("mvoxels_per_s")
        if voxels is not None and seconds:
            mvox = float(voxels) / float(seconds) / 1e6
        bps = float(computed) / float(seconds) if computed is not None and seconds else None
        bs = s.get("block_seconds") or {}
        rows.append((str(s.get("stage", s.get("name", "?"))), s.get("blocks"), computed,
                     s.get("skipped"), seconds, voxels, mvox, bps, bs.get("median"),
                     bs.get("p95"), bs.get("max")))
    return _table(("stage", "blocks", "computed", "skipped", "seconds", "voxels", "Mvoxel/s",
                   "blocks/s", "block median s", "block p95 s", "block max s"), rows)


def _histogram_png(stages: Sequence[Mapping[str, Any]], op: str) -> bytes | None:
    hists = []
    for s in stages:
        h = (s.get("block_seconds") or {}).get("histogram") or {}
        edges, counts = h.get("edges") or [], h.get("counts") or []
        if len(edges) == len(counts) + 1 and counts and min(edges) > 0:
            e, c = np.asarray(edges, float), np.asarray(counts, float)
            if e[-1] / e[0] < 1.05:  # all blocks took the same time: one visible bar
                e, c = np.array([e[0] / 1.05, e[-1] * 1.05]), np.array([c.sum()])
            hists.append((str(s.get("stage", "?")), e, c))
    if not hists:
        return None
    fig = _figure(6.4, 2.2 + 0.2 * len(hists))
    ax = fig.subplots()
    for name, edges, counts in hists:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", alpha=0.6,
               edgecolor="black", linewidth=0.4, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("block task time (s)", fontsize=8)
    ax.set_ylabel("blocks", fontsize=8)
    ax.set_title(f"{op}: block times", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return _png(fig)


def patch_table_html(entries: Sequence[Mapping[str, Any]]) -> str:
    """Patch applications and undos (``"action"`` entries of :mod:`engine.patches.apply`)."""
    rows = []
    for e in entries:
        bounds = e.get("bounds")
        rows.append((str(e.get("action", "")), str(e.get("id", "")), str(e.get("patch", "")),
                     json.dumps(bounds) if bounds is not None else None,
                     e.get("value"), e.get("written", e.get("restored")),
                     str(e.get("undoes", "")) or None, str(e.get("time", ""))))
    return "<p>patches:</p>" + _table(("action", "id", "patch", "bounds", "value", "voxels",
                                        "undoes", "time"), rows)


# ---------------------------------------------------------------------------- training runs

def run_sections(path: Path) -> list[str]:
    """HTML sections of a training run folder report."""
    parts: list[str] = []
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'metrics.json'}: unreadable ({exc})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{path / 'metrics.json'}: not a voxelmill metrics file")
    history = [h for h in metrics.get("history", []) if isinstance(h, dict)]
    best = metrics.get("best") or {}
    parts.append(f"<h2>Training</h2>\n<p class=\"meta\">{_num(metrics.get('iteration'))} "
                 f"iterations, stopped: {_e(metrics.get('stopped', '?'))}; "
                 f"files: {_e(', '.join(f for f in RUN_FILES if (path / f).exists()))}</p>\n")
    keys = ["iteration", "loss", "lr", "val_loss", "val_dice", "val_iou", "time_s"]
    rows = []
    for what, entry in (("best", best), ("last", history[-1] if history else {})):
        if isinstance(entry, dict) and entry:
            rows.append((what, *(entry.get(k) for k in keys)))
    if rows:
        parts.append(_table(("", *keys), rows))
    png = _curves_png(path, history)
    if png is not None:
        parts.append(_img(png, "learning curves", "learning curves (loss, validation Dice "
                          "and IoU against the iteration)"))
    config = path / "config.yaml"
    if config.is_file():
        parts.append("<h2>Configuration</h2>\n" + _pre(config.read_text(errors="replace")))
    parts.append(_checkpoint_section(path))
    return parts


def _curves_png(path: Path, history: Sequence[Mapping[str, Any]]) -> bytes | None:
    curves = path / "curves.png"
    if curves.is_file():
        data = curves.read_bytes()
        if data.startswith(PNG_SIGNATURE):
            return data
    if not history:
        return None
    from engine.learn.curves import plot_curves

    with tempfile.TemporaryDirectory() as tmp:
        return plot_curves(history, Path(tmp) / "curves.png", title=path.name).read_bytes()


def _checkpoint_section(path: Path) -> str:
    ckpt = next((path / n for n in ("best.pt", "last.pt") if (path / n).is_file()), None)
    if ckpt is None:
        return ""
    out = f"<h2>Model ({_e(ckpt.name)})</h2>\n"
    try:
        from engine.learn.checkpoint import load_checkpoint
        from engine.learn.model import describe

        lines = describe(load_checkpoint(ckpt).metadata)
    except ImportError:
        return out + "<p class=\"note\">torch is not installed: the checkpoint is not read</p>\n"
    except Exception as exc:  # noqa: BLE001 - a bad checkpoint is reported, not fatal
        return out + f"<p class=\"note\">cannot read {_e(ckpt.name)}: {_e(exc)}</p>\n"
    return out + _kv_table(_describe_pairs(lines))


def _describe_pairs(lines: Sequence[str]) -> list[tuple[str, str]]:
    """``describe`` lines (a key in a 10-character column, then the value) as pairs."""
    pairs = []
    for line in lines:
        split = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(split) != 2:
            split = [line[:10], line[10:]]
        pairs.append((split[0].strip(), split[1].strip()))
    return pairs
