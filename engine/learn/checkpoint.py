"""Model checkpoints that load without running pickled code.

A checkpoint is one torch file holding a plain dict of tensors and primitive values, so it
always loads with ``torch.load(path, weights_only=True)``::

    {
        "format": "voxelmill-checkpoint",
        "format_version": 1,
        "metadata": "<JSON string>",      # architecture, normalization, classes, history ...
        "state_dict": {name: tensor},     # model.state_dict()
        "optimizer": {...} or None,       # optimizer.state_dict()
        "extra": {...} or None,           # anything else weights_only can load
    }

The metadata travels as a JSON string (never pickled objects): the caller fills in the
architecture and its arguments, input channels, normalization, patch shape, receptive field,
voxel size, classes and training history; :func:`save_checkpoint` adds
``voxelmill_version``. :func:`save_checkpoint` writes atomically (a temporary file in the
destination folder, then a rename), and verifies that what it wrote loads with
``weights_only=True`` before the rename, so a checkpoint that exists is always loadable.
:func:`load_checkpoint` always uses ``weights_only=True`` and refuses files that are not
voxelmill checkpoints, have a newer format version, or need unpickling code.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import InputError, OptionError

FORMAT = "voxelmill-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes
    ----------
    state_dict : dict of str to torch.Tensor
        The model's parameters and buffers, for ``model.load_state_dict``.
    metadata : dict
        The JSON metadata (architecture, normalization, classes, history,
        ``voxelmill_version``, ...).
    optimizer : dict or None
        The optimizer's ``state_dict()``, for ``optimizer.load_state_dict``, or None.
    extra : dict or None
        Extra weights_only-loadable values saved with the checkpoint, or None.
    format_version : int
        The format version the file was written with.
    """

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION


def _metadata_json(metadata: Mapping[str, Any]) -> str:
    from engine import __version__

    if not isinstance(metadata, Mapping):
        raise OptionError(
            f"checkpoint metadata must be a dict, got {type(metadata).__name__}"
        )
    bad_keys = [k for k in metadata if not isinstance(k, str)]
    if bad_keys:
        raise OptionError(f"checkpoint metadata keys must be strings, got {bad_keys[0]!r}")
    meta = dict(metadata)
    meta["voxelmill_version"] = __version__
    try:
        return json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"checkpoint metadata is not JSON-serialisable: {exc}") from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    path : str or path-like
        Destination file (conventionally ``*.pt``); its folder must exist. An existing file
        is replaced atomically.
    state_dict : mapping of str to torch.Tensor
        ``model.state_dict()``.
    metadata : mapping
        JSON-serialisable description of the model (string keys). ``voxelmill_version`` is
        set automatically from ``engine.__version__``. The caller's mapping is not changed.
    optimizer_state : mapping, optional
        ``optimizer.state_dict()`` to resume training.
    extra : mapping, optional
        Other values (tensors, numbers, strings, lists, dicts of those) loadable with
        ``weights_only=True``, e.g. an RNG state tensor.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    OptionError
        If the metadata is not JSON-serialisable or the payload holds objects that
        ``torch.load(..., weights_only=True)`` cannot load.
    OSError
        If the destination folder does not exist or cannot be written (no temporary file
        is left behind).
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": _metadata_json(metadata),
        "state_dict": dict(state_dict),
        "optimizer": None if optimizer_state is None else dict(optimizer_state),
        "extra": None if extra is None else dict(extra),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            torch.load(tmp, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise OptionError(
                f"checkpoint {path}: the state, optimizer state or extra values hold objects "
                f"that cannot be loaded with weights_only=True (use tensors, numbers, strings, "
                f"lists and dicts): {_short_reason(exc)}"
            ) from exc
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _short_reason(exc: BaseException) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`, never running pickled code.

    Parameters
    ----------
    path : str or path-like
        The checkpoint file.
    map_location : str or torch.device, default "cpu"
        Where to put the tensors, as for ``torch.load``.

    Returns
    -------
    Checkpoint

    Raises
    ------
    InputError
        If the file is missing, not a torch file, not a voxelmill checkpoint (no or another
        ``format`` key), has a newer ``format_version`` than this voxelmill reads, has
        corrupt metadata, or needs unpickling code (refused: only ``weights_only=True``
        loading is allowed).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "Weights only load failed" in text:
            raise InputError(
                f"checkpoint {path}: needs unpickling code: refused ({_short_reason(exc)})"
            ) from exc
        raise InputError(f"checkpoint {path}: not a torch checkpoint ({exc})") from exc
    except Exception as exc:  # torch raises KeyError/RuntimeError/EOFError on junk files
        raise InputError(
            f"checkpoint {path}: not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise InputError(
            f"checkpoint {path}: not a voxelmill checkpoint (format {found!r}, "
            f"expected {FORMAT!r})"
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"checkpoint {path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise InputError(
            f"checkpoint {path}: format_version {version} is newer than this voxelmill "
            f"reads ({FORMAT_VERSION}); upgrade voxelmill"
        )
    try:
        metadata = json.loads(obj["metadata"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"checkpoint {path}: missing or corrupt metadata ({exc})") from exc
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict):
        raise InputError(f"checkpoint {path}: missing state_dict")
    return Checkpoint(
        state_dict=state_dict,
        metadata=metadata,
        optimizer=obj.get("optimizer"),
        extra=obj.get("extra"),
        format_version=version,
    )
