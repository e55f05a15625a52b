"""Zarr arrays opened once per thread.

Opening an array reads and parses its metadata (~0.8 ms on the 2-core development
machine), and block tasks opened several arrays per block (the work array they read,
the one they write, each pyramid level): on segment's 64³ blocks about a tenth of the
workers' time. An opened array is kept per thread, keyed by its path, its mode and the
bytes of its metadata file (read again on every call, ~20 µs), so an array written anew
at the same path is opened anew, whatever the file system's timestamps say.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

#: arrays each thread keeps open
OPEN_PER_THREAD = 32

_opened = threading.local()


def _metadata(path: str) -> bytes | None:
    for name in ("zarr.json", ".zarray"):
        try:
            return (Path(path) / name).read_bytes()
        except OSError:
            continue
    return None


def open_array(path: str | Path, mode: str = "r", config: dict[str, Any] | None = None) -> Any:
    """``zarr.open_array(path, mode=mode)`` of an existing array (``mode`` ``"r"`` or
    ``"r+"``), with ``config`` (zarr's array configuration, e.g. ``write_empty_chunks``)
    applied; the same object again while the array's metadata file is unchanged.

    Parameters
    ----------
    path : str or Path
        A zarr array (v3 or v2) on a local file system.
    mode : {"r", "r+"}
        Read only, or read and write (the array is never created here).
    config : dict, optional
        Passed to ``Array.with_config``.

    Returns
    -------
    zarr.Array
    """
    import zarr

    if mode not in ("r", "r+"):
        raise ValueError(f"mode {mode!r}: only 'r' and 'r+' arrays are kept open")
    path = str(path)
    meta = _metadata(path)
    key = (path, mode, tuple(sorted((config or {}).items())), meta)
    cache: OrderedDict[tuple, Any] | None = getattr(_opened, "arrays", None)
    if cache is None:
        cache = _opened.arrays = OrderedDict()
    arr = cache.get(key) if meta is not None else None
    if arr is not None:
        cache.move_to_end(key)
        return arr
    arr = zarr.open_array(path, mode=mode)  # raises zarr's own error when not an array
    if config:
        arr = arr.with_config(config)
    if meta is not None:
        cache[key] = arr
        if len(cache) > OPEN_PER_THREAD:
            cache.popitem(last=False)
    return arr


def forget() -> None:
    """Drop the arrays this thread keeps open."""
    _opened.arrays = OrderedDict()
