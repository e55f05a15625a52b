"""Trained models: rebuild from a checkpoint, load checkpoints or TorchScript files, export,
describe.

A voxelmill checkpoint (:mod:`engine.learn.checkpoint`) holds the weights and JSON metadata
(architecture, input channels, normalization, patch shape, receptive field, voxel size,
classes, history); it loads with ``torch.load(weights_only=True)``. An exported TorchScript
file holds the traced model and the same metadata as the extra file ``voxelmill.json``; it
runs without voxelmill (``torch.jit.load``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.errors import InputError
from engine.learn.checkpoint import load_checkpoint
from engine.learn.unet import UNet
from engine.output import check_destination

META_FILE = "voxelmill.json"
ARCHITECTURES = {"unet": UNet}


def build_model(metadata: Mapping[str, Any]) -> torch.nn.Module:
    """The (untrained) model that the metadata's ``arch`` describes."""
    arch = dict(metadata.get("arch") or {})
    name = arch.pop("name", "unet")
    if name not in ARCHITECTURES:
        raise InputError(f"unknown model architecture {name!r}; this voxelmill knows "
                         f"{', '.join(ARCHITECTURES)}")
    try:
        return ARCHITECTURES[name](**arch)
    except TypeError as exc:
        raise InputError(f"model architecture arguments do not fit {name}: {exc}") from None


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or n.endswith(f"extra/{META_FILE}")
                       for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a voxelmill checkpoint or an exported TorchScript model, in eval mode.

    Raises
    ------
    InputError
        Naming the file: missing, not a model voxelmill wrote, needing unpickling code,
        or weights that do not fit the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model {path}: no such file")
    if _is_torchscript(path):
        extra = {META_FILE: ""}
        try:
            with warnings.catch_warnings():  # deprecated in favour of torch.export, still the
                warnings.simplefilter("ignore", DeprecationWarning)  # format users can run
                model = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError for foreign archives
            raise InputError(f"model {path}: not a loadable TorchScript file ({exc})") from None
        if not extra[META_FILE]:
            raise InputError(f"model {path}: a TorchScript file without voxelmill metadata "
                             f"({META_FILE}); export it with voxelmill model export")
        return model.eval(), json.loads(extra[META_FILE])
    ck = load_checkpoint(path, map_location=device)
    model = build_model(ck.metadata)
    try:
        model.load_state_dict(ck.state_dict)
    except RuntimeError as exc:
        raise InputError(f"model {path}: weights do not fit the architecture "
                         f"({str(exc).splitlines()[0]})") from None
    return model.to(device).eval(), ck.metadata


def export_torchscript(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str],
                       overwrite: bool = False) -> Path:
    """Trace a checkpoint's model into a TorchScript file with its metadata embedded.

    The trace runs on a zero input of the training patch shape; the U-Net has no
    shape-dependent control flow, so the traced model takes any divisible shape.
    """
    out = Path(out)
    check_destination(out, overwrite, Path(checkpoint), file=True)
    model, meta = load_model(checkpoint)
    arch = meta["arch"]
    example = torch.zeros((1, arch["in_channels"], *meta["patch_shape"]))
    with torch.no_grad(), warnings.catch_warnings():
        # the shape checks of the model's Python code become constants: expected, the
        # trace is verified on other shapes by the tests
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
    meta = {**meta, "format": "torchscript", "exported_from": str(Path(checkpoint).resolve())}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(traced, tmp, _extra_files={META_FILE: json.dumps(meta)})
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def describe(metadata: Mapping[str, Any]) -> list[str]:
    """Human-readable lines about a model, for ``voxelmill model info``."""
    arch = metadata.get("arch", {})
    inp = metadata.get("input", {})
    target = metadata.get("target", {})
    norm = inp.get("normalization", {})
    best = metadata.get("best", {})
    lines = [
        f"model      {arch.get('name', 'unet')} {arch.get('spatial_dims')}D, features "
        f"{arch.get('features')}, norm {arch.get('norm')}, anisotropic levels "
        f"{arch.get('anisotropic_levels', 0)}",
        f"input      {', '.join(inp.get('channels', [])) or '?'}; normalization "
        f"{norm.get('mode')}" + (f" ({norm.get('low')}–{norm.get('high')} %)"
                                 if norm.get("mode") == "percentile" else ""),
        f"output     {target.get('kind')} ({target.get('activation')}): "
        f"{', '.join(target.get('classes', []))}",
        f"patch      {metadata.get('patch_shape')} (divisible by {metadata.get('divisor')}), "
        f"receptive field {metadata.get('receptive_field')}",
        f"voxel size {metadata.get('voxel_size')} {metadata.get('unit', '')}",
        f"trained    {metadata.get('iteration')} iterations"
        + (f"; best validation Dice {best['val_dice']:.3f}, IoU {best['val_iou']:.3f} at "
           f"iteration {best['iteration']}" if "val_dice" in best else
           f"; lowest validation loss {best['val_loss']:.4f} at iteration {best['iteration']}"
           if "val_loss" in best else ""),
        f"voxelmill  {metadata.get('voxelmill_version', '?')}",
    ]
    if metadata.get("format") == "torchscript":
        lines.append(f"exported   TorchScript from {metadata.get('exported_from')}")
    return lines
