"""``voxelmill info``: what an image holds, without reading its voxels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.io import detect_format, omezarr, open_volume, readguard


def describe(path: str | Path) -> dict[str, Any]:
    """Format, shape, dtype, chunks, levels, voxel size, channels and label groups."""
    p = Path(path)
    fmt = detect_format(p)
    vol = open_volume(p)
    out: dict[str, Any] = {
        "path": str(p), "format": fmt, "axes": vol.axes, "shape": list(vol.shape),
        "dtype": str(vol.dtype), "voxel_size": list(vol.voxel_size), "unit": vol.unit,
        "channels": list(vol.channel_names), "labels": sorted(vol.labels),
        "chunks": [int(c[0]) for c in vol.data.chunks],
        "size_mib": round(vol.nbytes / 2**20, 1),
    }
    if fmt == "omezarr":
        meta = omezarr.describe(p)
        out.update(ngff=meta["ngff"], levels=meta["levels"], chunks=meta["levels"][0]["chunks"])
    readguard.check()  # the two reads above describe one version of the image
    return out
