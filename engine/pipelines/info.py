"""``voxelmill info``: what an image or container holds, without reading its voxels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.io import detect_format, hdf5, omezarr, open_volume, readguard, split_path, zarrarray


def _volume_fields(path: str | Path, axes: str | None) -> dict[str, Any]:
    vol = open_volume(path, axes=axes)
    recorded = not vol.voxel_size_problem
    return {
        "axes": vol.axes, "shape": list(vol.shape), "dtype": str(vol.dtype),
        "voxel_size": list(vol.voxel_size) if recorded else None,
        "voxel_size_problem": vol.voxel_size_problem, "unit": vol.unit,
        "channels": list(vol.channel_names), "labels": sorted(vol.labels),
        "chunks": [int(c[0]) for c in vol.data.chunks],
        "size_mib": round(vol.nbytes / 2**20, 1),
    }


def describe(path: str | Path, axes: str | None = None) -> dict[str, Any]:
    """Format, shape, dtype, chunks, levels, voxel size, channels and label groups of any
    input ``voxelmill convert`` takes (``file.h5:dataset`` too) or of a zarr array; for an
    HDF5 file or a zarr group, also every dataset/array in it (``arrays``).

    An HDF5 file whose image dataset cannot be chosen (several, none named ``raw``) and a
    zarr group that is no image are described by their arrays alone, with ``error``
    saying why there is no image; ``voxel_size`` is ``None`` when the file records none.
    """
    base, dataset = split_path(path)
    fmt = "hdf5" if dataset is not None else detect_format(base)
    out: dict[str, Any] = {"path": str(path), "format": fmt}
    has_image = True
    if fmt == "hdf5":
        out.update(container="datasets", arrays=hdf5.dataset_table(base))
        has_image = dataset is not None or hdf5.default_dataset(
            [a["name"] for a in out["arrays"]]) is not None
        why = f"no default image dataset; choose one with {base}:<dataset>"
    elif fmt == "omezarr":
        out.update(container="arrays", arrays=zarrarray.container_arrays(base))
        has_image = "multiscales" in omezarr.read_attrs(base)[0]
        why = "a zarr group without OME image metadata; open one of its arrays"
    if not has_image:
        out["error"] = why  # a container without a default image: list what it holds
        return out
    out.update(_volume_fields(path, axes))
    if fmt == "omezarr":
        meta = omezarr.describe(base)
        out.update(ngff=meta["ngff"], levels=meta["levels"], chunks=meta["levels"][0]["chunks"],
                   windows=meta["windows"])
    if np.dtype(out["dtype"]).kind in "fc":
        out["non_finite"] = NON_FINITE_NOTE
    readguard.check()  # the reads above describe one version of the image
    return out


#: how voxelmill treats NaN and ±inf in a float image (``info`` says so)
NON_FINITE_NOTE = ("NaN and ±inf voxels are ignored (not counted) by statistics "
                   "(histograms, percentiles, moments, thresholds, normalization) and by "
                   "display windows")
