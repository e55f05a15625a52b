"""Declared sizes checked before anything is allocated: against the file, and against memory.

A 150-byte file can declare 10¹⁸ voxels. Readers that map voxels to byte offsets check the
file is long enough (a truncated file is refused); readers that must decompress a stream
whole (gzip or bzip2 NRRD, compressed ``.npz`` members, PartSeg archives) or in large
pieces (an HDF5 chunk, a gzip NIfTI slab) check here, before the allocation, that

* a deflate (gzip, zip) stream of ``n`` bytes can hold what it declares: deflate expands
  at most :data:`DEFLATE_MAX_RATIO` times, so more declared bytes is a lie, and
* what is held in memory at once fits the memory budget (:func:`memory_budget`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import InputError

#: deflate's largest expansion (a 258-byte match per ~2 bits): 1032:1
DEFLATE_MAX_RATIO = 1032
#: environment variable that sets the budget in MiB (default: half the available memory)
BUDGET_ENV = "VOXELMILL_READ_BUDGET_MIB"


def memory_budget() -> int:
    """Bytes one reader may hold at once: ``VOXELMILL_READ_BUDGET_MIB``, or half the memory
    available now."""
    if os.environ.get(BUDGET_ENV):
        return int(float(os.environ[BUDGET_ENV]) * 2**20)
    try:
        import psutil

        return int(psutil.virtual_memory().available // 2)
    except Exception:  # noqa: BLE001 - no psutil or no /proc: a fixed 4 GiB
        return 4 * 2**30


def declared_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    """Bytes of ``shape`` voxels of ``dtype``, in Python integers (no overflow)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * np.dtype(dtype).itemsize


def _shown(shape: Sequence[int], dtype: np.dtype) -> str:
    return f"{'×'.join(str(int(s)) for s in shape)} {np.dtype(dtype).name}"


def check_memory(path: str | Path, shape: Sequence[int], dtype: np.dtype, what: str) -> None:
    """Refuse reading ``shape`` × ``dtype`` into memory at once when it exceeds the budget.

    ``what`` says why it is read whole, e.g. ``"a gzip NRRD is decompressed whole"``.
    """
    need, budget = declared_bytes(shape, dtype), memory_budget()
    if need > budget:
        raise InputError(
            f"{path}: declares {_shown(shape, dtype)} ({need:.3g} bytes); {what}, and that is "
            f"more than the memory budget of {budget:.3g} bytes (half the available memory, "
            f"or {BUDGET_ENV})")


def check_deflate(path: str | Path, shape: Sequence[int], dtype: np.dtype,
                  compressed: int) -> None:
    """Refuse a deflate stream of ``compressed`` bytes that declares more than it can hold."""
    need = declared_bytes(shape, dtype)
    if need > max(compressed, 1) * DEFLATE_MAX_RATIO:
        raise InputError(
            f"{path}: declares {_shown(shape, dtype)} ({need:.3g} bytes) but its "
            f"{compressed}-byte compressed stream can hold at most "
            f"{compressed * DEFLATE_MAX_RATIO:.3g} (deflate expands at most "
            f"{DEFLATE_MAX_RATIO}:1): the header is wrong or the file truncated")
