"""A voxelmill checkpoint as a BioImage Model Zoo package (bioimage.io model format 0.5).

The package is one zip file::

    rdf.yaml                 the description: name, authors, citation, axes with voxel size
                             and unit, pre- and postprocessing, weights, test tensors
    README.md                documentation (what the model takes and gives, how it was made)
    weights.pt               PyTorch state dict (torch.save of a plain dict of tensors)
    voxelmill_unet.py        its architecture, self-contained (engine.zoo.architecture)
    weights.torchscript.pt   the same network traced to TorchScript
    test_input.npy           a crop of the training data (or of --sample), (1, C, *patch)
    test_output.npy          the package's output for it, (1, K, *patch), float32
    sample_*.tif             the same two as TIFF images, for people and image viewers
    cover.png                the test input's and output's middle planes
    config.yaml, metrics.json  the training configuration and history (attachments)

The preprocessing reproduces the checkpoint's global normalization with the statistics it
stores (``scale_linear`` per channel: ``x * (1 / scale) - offset / scale``), so a zoo tool
gives voxelmill's numbers for ``--norm checkpoint``; the postprocessing is the checkpoint's
activation (``sigmoid``, or ``softmax`` along the channel axis). Everything is checked before
anything is written; the zip is built in a hidden temporary file next to ``OUT`` and renamed
into place once it has been validated with ``bioimageio.spec`` (format and file hashes, no
network).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import yaml

from engine.errors import InputError, OptionError, VoxelmillError
from engine.learn.model import export_torchscript, load_model
from engine.learn.normalize import ChannelStats, apply_stats
from engine.output import check_destination
from engine.zoo.architecture import CALLABLE, FILE_NAME, architecture_source

#: the bioimage.io model format version voxelmill writes
FORMAT_VERSION = "0.5.4"
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
STATE_DICT, TORCHSCRIPT = "weights.pt", "weights.torchscript.pt"
TEST_INPUT, TEST_OUTPUT, COVER = "test_input.npy", "test_output.npy", "cover.png"
SAMPLE_INPUT, SAMPLE_OUTPUT = "sample_input.tif", "sample_output.tif"
#: bioimageio.spec's warning when no author or maintainer names a GitHub account: it checks
#: such accounts online, so voxelmill (offline) names none; the zoo asks for one at upload
NO_GITHUB_USER = "Missing `maintainers` or any author in `authors` with a specified `github_user`"
#: the U-Net paper, cited when the user names no citation
UNET_CITATION = ("Ronneberger, Fischer and Brox: U-Net: Convolutional Networks for "
                 "Biomedical Image Segmentation (MICCAI 2015)", "10.1007/978-3-319-24574-4_28")


@dataclass(frozen=True)
class PackageInfo:
    """What a package says about itself that a training configuration does not hold.

    Attributes
    ----------
    authors : sequence of str
        At least one author name (the format requires it).
    name, description : str or None
        Defaults: from the training run's folder name and its configuration.
    cite : sequence of (text, DOI or URL)
        Default: the U-Net paper.
    license : str
        An SPDX identifier.
    tags : sequence of str
        Added to voxelmill's own (``voxelmill``, ``unet``, ``2d``/``3d``, the target kind).
    """

    authors: Sequence[str] = ()
    name: str | None = None
    description: str | None = None
    cite: Sequence[tuple[str, str]] = ()
    license: str = "CC-BY-4.0"
    tags: Sequence[str] = field(default_factory=tuple)


def parse_citation(text: str) -> tuple[str, str]:
    """``"TEXT|DOI-or-URL"`` (as ``--cite`` takes it) → ``(text, doi_or_url)``."""
    body, sep, ref = text.rpartition("|")
    if not sep or not body.strip() or not ref.strip():
        raise OptionError(f"--cite {text!r}: expected 'TEXT|DOI' or 'TEXT|URL'")
    return body.strip(), ref.strip()


def _sample_crop(meta: Mapping[str, Any], sample: Path | None) -> tuple[np.ndarray, str]:
    """A ``(C, *patch)`` float32 crop of the sample image (or of the first training source)
    around its centre, with the model's input channels, and where it came from."""
    from engine.io import open_volume

    if sample is None:
        sources = meta.get("config", {}).get("data", {}).get("train", [])
        path = Path(sources[0]["path"]) if sources else None
        if path is None or not path.exists():
            raise InputError(f"the training data {path or '(not recorded)'} is gone: pass "
                             "--sample IMAGE to cut the package's test input from")
    else:
        path = Path(sample)
        if not path.exists():
            raise InputError(f"--sample {path}: no such file or folder")
    try:
        volume = open_volume(path)
    except VoxelmillError as exc:
        if sample is not None:
            raise
        raise InputError(f"cannot cut the package's test input from the training data "
                         f"({exc}); pass --sample IMAGE") from None
    dims = int(meta["arch"]["spatial_dims"])
    axes = volume.spatial_axes
    if len(axes) != dims:
        raise InputError(f"{path}: a {len(axes)}D image ({axes}), the model is {dims}D")
    data = volume.data
    if "t" in volume.axes:
        data = data[0]
    wanted = list(meta["input"]["channels"])
    if "c" in volume.axes:
        names = list(volume.channel_names)
        if all(c in names for c in wanted):
            idx = [names.index(c) for c in wanted]
        elif len(names) == len(wanted):
            idx = list(range(len(names)))
        else:
            raise InputError(f"{path}: has channels {', '.join(names)}; the model needs "
                             f"{', '.join(wanted)}")
        data = data[idx]
    elif len(wanted) == 1:
        data = data[None]
    else:
        raise InputError(f"{path}: has one channel, the model needs {len(wanted)}")
    shape = data.shape[1:]
    patch, div = meta["patch_shape"], meta["divisor"]
    crop = [min(p, n // d * d) for p, n, d in zip(patch, shape, div, strict=True)]
    if any(c < 2 * d for c, d in zip(crop, div, strict=True)):  # the package's smallest tile
        raise InputError(f"{path}: shape {tuple(shape)} is smaller than the package's "
                         f"smallest tile {tuple(2 * d for d in div)}")
    box = tuple(slice((n - c) // 2, (n - c) // 2 + c) for n, c in zip(shape, crop, strict=True))
    return np.asarray(data[(slice(None), *box)], dtype=np.float32), str(path)


def _stats(meta: Mapping[str, Any]) -> ChannelStats | None:
    """The stored statistics, or None when the checkpoint does not normalize."""
    mode = meta["input"].get("normalization", {}).get("mode")
    stored = meta["input"].get("stats") or []
    if mode == "none":
        return None
    if not stored:
        raise InputError("the checkpoint stores no normalization statistics, which the "
                         "package's preprocessing needs")
    return ChannelStats.from_dict(stored[0])


def _forward(model: torch.nn.Module, x: np.ndarray, activation: str) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(x[None]))
    probs = torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
    return probs.numpy().astype(np.float32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _space_axes(meta: Mapping[str, Any], sizes: list[Any]) -> list[dict[str, Any]]:
    dims = int(meta["arch"]["spatial_dims"])
    voxel = meta.get("voxel_size") or [1.0] * dims
    unit = meta.get("unit") or None
    out = []
    for a, size, v in zip("zyx"[-dims:], sizes, voxel, strict=True):
        axis: dict[str, Any] = {"type": "space", "id": a, "size": size, "scale": float(v)}
        if unit:
            axis["unit"] = unit
        out.append(axis)
    return out


def _output_names(meta: Mapping[str, Any]) -> list[str]:
    target, k = meta["target"], int(meta["arch"]["out_channels"])
    if target.get("kind") == "classes":
        return list(target.get("classes", []))[:k]
    return ["foreground", "boundary"][:k]


def _description(meta: Mapping[str, Any], source: str) -> str:
    arch, target = meta["arch"], meta["target"]
    return (f"A {arch['spatial_dims']}D U-Net (features {arch['features']}) trained with "
            f"voxelmill to predict {target.get('kind')} "
            f"({', '.join(_output_names(meta))}) from "
            f"{', '.join(meta['input']['channels'])}; test input cut from {Path(source).name}.")


def _readme(meta: Mapping[str, Any], rdf: Mapping[str, Any], source: str) -> str:
    best = meta.get("best", {})
    lines = [f"# {rdf['name']}", "", rdf["description"], "",
             "## Input", "",
             f"Channels {', '.join(meta['input']['channels'])}, axes "
             f"{''.join('zyx'[-int(meta['arch']['spatial_dims']):])}, voxel size "
             f"{meta.get('voxel_size')} {meta.get('unit', '')}; each spatial axis a multiple "
             f"of {meta['divisor']}. The preprocessing applies the training data's global "
             f"normalization ({meta['input'].get('normalization', {}).get('mode')}) with "
             "fixed statistics.", "",
             "## Output", "",
             f"{', '.join(_output_names(meta))}: probabilities "
             f"({meta['target'].get('activation')}).", "",
             "## Training", "",
             f"{meta.get('iteration')} iterations with voxelmill "
             f"{meta.get('voxelmill_version', '?')}"
             + (f"; best validation Dice {best['val_dice']:.3f}" if "val_dice" in best else "")
             + ". The configuration and the metrics are attached (config.yaml, metrics.json).",
             "", "## Validation", "",
             "The training run held out a validation set (a slab of the volume or whole "
             "volumes) and measured Dice and IoU of the thresholded foreground against its "
             "labels (metrics.json). To validate on unseen data, predict it (e.g. "
             "`voxelmill predict IMAGE --model this.zip --name NAME`) and compare with "
             "labels made by hand; the test tensors reproduce the package's numbers.", "",
             f"Test input: a crop of {Path(source).name}.", ""]
    return "\n".join(lines)


def _cover(path: Path, test_in: np.ndarray, test_out: np.ndarray) -> None:
    """The middle plane of the test input's first channel beside the first output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plane(a: np.ndarray) -> np.ndarray:
        a = a[0]
        return a[a.shape[0] // 2] if a.ndim == 3 else a

    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    for ax, img, cmap in zip(axes, (plane(test_in), plane(test_out)), ("gray", "magma"),
                             strict=True):
        ax.imshow(img, cmap=cmap)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _rdf(meta: Mapping[str, Any], info: PackageInfo, stats: ChannelStats | None,
         files: Mapping[str, Path], source: str, run_name: str) -> dict[str, Any]:
    dims = int(meta["arch"]["spatial_dims"])
    div = meta["divisor"]
    preprocessing: list[dict[str, Any]] = [{"id": "ensure_dtype",
                                            "kwargs": {"dtype": "float32"}}]
    if stats is not None and (any(o != 0 for o in stats.offset)
                              or any(s != 1 for s in stats.scale)):
        preprocessing.append({"id": "scale_linear", "kwargs": {
            "axis": "channel", "gain": [1.0 / s for s in stats.scale],
            "offset": [-o / s for o, s in zip(stats.offset, stats.scale, strict=True)]}})
    activation = meta["target"].get("activation", "sigmoid")
    post = [{"id": "softmax", "kwargs": {"axis": "channel"}} if activation == "softmax"
            else {"id": "sigmoid"}]
    # a tile of the divisor leaves one voxel at the coarsest level, where instance norm fails
    in_sizes = [{"min": 2 * d, "step": d} for d in div]
    out_sizes = [{"tensor_id": INPUT_ID, "axis_id": a} for a in "zyx"[-dims:]]
    cites = list(info.cite) or [UNET_CITATION]
    arch = {k: v for k, v in meta["arch"].items() if k != "name"}
    version = str(torch.__version__).split("+")[0]
    return {
        "type": "model",
        "format_version": FORMAT_VERSION,
        "name": info.name or f"voxelmill U-Net {run_name}",
        "description": info.description or _description(meta, source),
        "authors": [{"name": a} for a in info.authors],
        "cite": [{"text": t, ("doi" if not r.startswith(("http://", "https://")) else "url"): r}
                 for t, r in cites],
        "license": info.license,
        "tags": sorted({"voxelmill", "unet", f"{dims}d", "pytorch",
                        str(meta["target"].get("kind")), *info.tags}),
        "documentation": "README.md",
        "covers": [COVER],
        "attachments": [{"source": "config.yaml", "sha256": _sha256(files["config.yaml"])},
                        {"source": "metrics.json", "sha256": _sha256(files["metrics.json"])}],
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "inputs": [{
            "id": INPUT_ID,
            "description": f"raw intensities of {', '.join(meta['input']['channels'])}",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": list(meta["input"]["channels"])},
                     *_space_axes(meta, in_sizes)],
            "test_tensor": {"source": TEST_INPUT, "sha256": _sha256(files[TEST_INPUT])},
            "sample_tensor": {"source": SAMPLE_INPUT, "sha256": _sha256(files[SAMPLE_INPUT])},
            "data": {"type": "float32"},
            "preprocessing": preprocessing,
        }],
        "outputs": [{
            "id": OUTPUT_ID,
            "description": f"{meta['target'].get('kind')} probabilities",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": _output_names(meta)},
                     *_space_axes(meta, out_sizes)],
            "test_tensor": {"source": TEST_OUTPUT, "sha256": _sha256(files[TEST_OUTPUT])},
            "sample_tensor": {"source": SAMPLE_OUTPUT,
                              "sha256": _sha256(files[SAMPLE_OUTPUT])},
            "data": {"type": "float32"},
            "postprocessing": post,
        }],
        "weights": {
            "pytorch_state_dict": {
                "source": STATE_DICT, "sha256": _sha256(files[STATE_DICT]),
                "architecture": {"source": FILE_NAME, "sha256": _sha256(files[FILE_NAME]),
                                 "callable": CALLABLE, "kwargs": arch},
                "pytorch_version": version,
            },
            "torchscript": {
                "source": TORCHSCRIPT, "sha256": _sha256(files[TORCHSCRIPT]),
                "pytorch_version": version, "parent": "pytorch_state_dict",
            },
        },
        "config": {"voxelmill": {"version": meta.get("voxelmill_version"),
                                 "target": meta["target"], "patch_shape": meta["patch_shape"],
                                 "receptive_field": meta.get("receptive_field"),
                                 "normalization": meta["input"].get("normalization")}},
    }


def validate_format(path: Path) -> list[str]:
    """Validate a package with ``bioimageio.spec`` (format and file hashes, no inference,
    no network); return its warnings. Raises InputError with the first error."""
    try:
        from bioimageio.spec import load_model_description
        from bioimageio.spec.model.v0_5 import ModelDescr
    except ImportError as exc:
        raise OptionError("exporting or validating a bioimage.io package needs "
                          "bioimageio.spec: pip install 'voxelmill[zoo]'") from exc
    try:
        descr = load_model_description(path, perform_io_checks=True)
    except ValueError as exc:
        raise InputError(f"{path}: not a valid bioimage.io model package "
                         f"({' '.join(str(exc).split())[:400]})") from None
    if not isinstance(descr, ModelDescr):
        raise InputError(f"{path}: not a bioimage.io model of format 0.5")
    summary = descr.validation_summary
    return [f"{w.loc}: {w.msg}" for d in summary.details for w in d.warnings]


def export_package(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                   info: PackageInfo, sample: str | os.PathLike[str] | None = None,
                   overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write a bioimage.io model package (zip) of a voxelmill checkpoint.

    Parameters
    ----------
    checkpoint : path
        A voxelmill checkpoint (``best.pt``), not a TorchScript export.
    out : path
        The zip file to write.
    info : PackageInfo
        Authors (required), name, description, citations, license, tags.
    sample : path, optional
        An image to cut the test input from when the training data is gone (or to prefer).
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    (pathlib.Path, list of str)
        The package written and ``bioimageio.spec``'s warnings about it.

    Raises
    ------
    InputError, OptionError, DestinationError
        Before anything is written.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != ".zip":
        raise OptionError(f"{out}: a bioimage.io package is a .zip file")
    if not info.authors or not all(a.strip() for a in info.authors):
        raise OptionError("--author: a bioimage.io package needs at least one author (the "
                          "training configuration holds none)")
    model, meta = load_model(checkpoint)
    if meta.get("format") == "torchscript":
        raise InputError(f"{checkpoint}: a TorchScript export; export the checkpoint it came "
                         "from (best.pt)")
    if meta.get("arch", {}).get("name", "unet") != "unet":
        raise InputError(f"{checkpoint}: architecture {meta['arch'].get('name')!r} cannot "
                         "be exported (only voxelmill's U-Net)")
    try:  # the package is validated before it is renamed into place
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise OptionError("exporting a bioimage.io package needs bioimageio.spec: "
                          "pip install 'voxelmill[zoo]'") from exc
    stats = _stats(meta)
    crop, source = _sample_crop(meta, None if sample is None else Path(sample))
    norm = crop if stats is None else apply_stats(crop, stats)
    activation = meta["target"].get("activation", "sigmoid")
    test_out = _forward(model, norm, activation)
    check_destination(out, overwrite, checkpoint, file=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp_zip = stage.parent / f"{stage.name}.zip"
    try:
        files = {name: stage / name for name in (
            STATE_DICT, FILE_NAME, TORCHSCRIPT, TEST_INPUT, TEST_OUTPUT, SAMPLE_INPUT,
            SAMPLE_OUTPUT, COVER, "config.yaml", "metrics.json", "README.md")}
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   files[STATE_DICT])
        files[FILE_NAME].write_bytes(architecture_source())
        export_torchscript(checkpoint, files[TORCHSCRIPT])
        np.save(files[TEST_INPUT], crop[None])
        np.save(files[TEST_OUTPUT], test_out)
        tifffile.imwrite(files[SAMPLE_INPUT], crop)
        tifffile.imwrite(files[SAMPLE_OUTPUT], test_out[0])
        _cover(files[COVER], crop, test_out[0])
        files["config.yaml"].write_text(yaml.safe_dump(meta.get("config", {}),
                                                       sort_keys=False))
        files["metrics.json"].write_text(json.dumps(
            {"iteration": meta.get("iteration"), "best": meta.get("best", {}),
             "history": meta.get("history", [])}, indent=1))
        run_name = checkpoint.resolve().parent.name
        rdf = _rdf(meta, info, stats, files, source, run_name)
        files["README.md"].write_text(_readme(meta, rdf, source))
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
            buf = io.StringIO()
            yaml.safe_dump(rdf, buf, sort_keys=False, allow_unicode=True)
            zf.writestr("rdf.yaml", buf.getvalue())
            for name, path in files.items():
                zf.write(path, name)
        warnings = validate_format(tmp_zip)
        os.replace(tmp_zip, out)
    finally:
        tmp_zip.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
    return out, warnings
