"""A plain zarr array (v2 or v3, no OME metadata), e.g. one written by another tool or one
level inside an OME-Zarr image: axes from its ``dimension_names`` or by the number of
dimensions (``--axes`` names them), no voxel size recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from engine.errors import InputError, OptionError
from engine.io.axes import AXES_BY_NDIM, arrange, check_axes, stored_axes, voxel_problem
from engine.io.sources import ZarrSource
from engine.volume import Volume


def is_array(path: Path) -> bool:
    """Whether ``path`` is a zarr array (v3 ``zarr.json`` of node type array, or v2)."""
    if (path / ".zarray").is_file():
        return True
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("node_type") == "array"
    except (OSError, ValueError, AttributeError):
        return False


def read(path: Path, axes: str | None = None, **_: object) -> Volume:
    """Open a plain zarr array lazily.

    Parameters
    ----------
    path : Path
        The array's folder.
    axes : str, optional
        One letter of ``tczyx`` per dimension (``--axes``); default the array's
        ``dimension_names`` when they are such letters, else by the number of
        dimensions (yx, zyx, czyx, tczyx).

    Returns
    -------
    Volume
        In NGFF axis order; the voxel size is not recorded (``voxel_size_problem``).
    """
    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception as exc:  # zarr's many parse errors: name the folder
        raise InputError(f"{path}: not a readable zarr array ({exc})") from None
    shape = tuple(int(s) for s in arr.shape)
    default = AXES_BY_NDIM.get(len(shape))
    dims = getattr(arr.metadata, "dimension_names", None)
    if dims and all(isinstance(d, str) for d in dims):
        try:
            named_dims = check_axes("".join(dims))
        except OptionError:  # names that are not axis letters: keep the default
            named_dims = ""
        if len(named_dims) == len(shape):
            default = named_dims
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: zarr array holds {arr.dtype} values, not an image")
    named = stored_axes(path, axes, default, shape)
    source = ZarrSource(str(path), shape=shape, dtype=np.dtype(arr.dtype))
    data, named = arrange(source, named, arr.chunks, name="zarr")
    n_spatial = len([a for a in named if a in "zyx"])
    return Volume(data, named, (1.0,) * n_spatial, "micrometer", source=str(path),
                  voxel_size_problem=voxel_problem([None] * n_spatial))


def container_arrays(path: Path) -> list[dict[str, Any]]:
    """Every array of a zarr group and its subgroups (hidden ones, such as voxelmill's
    run records, left out), sorted by path: ``name``, ``shape``, ``dtype``, ``chunks``."""
    try:
        group = zarr.open_group(str(path), mode="r")
        members = group.members(max_depth=None)
    except Exception as exc:  # zarr's many parse errors: name the folder
        raise InputError(f"{path}: not a readable zarr group ({exc})") from None
    out = [{"name": name, "shape": [int(s) for s in node.shape], "dtype": str(node.dtype),
            "chunks": [int(c) for c in node.chunks]}
           for name, node in members
           if isinstance(node, zarr.Array) and not any(p.startswith(".") for p in name.split("/"))]
    return sorted(out, key=lambda a: a["name"])
