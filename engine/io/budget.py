"""Declared sizes checked before anything is allocated: against the file, and against memory.

A 150-byte file can declare 10¹⁸ voxels. Readers that map voxels to byte offsets check the
file is long enough (a truncated file is refused); readers that must decompress a stream
whole (gzip or bzip2 NRRD, compressed ``.npz`` members, PartSeg archives) or in large
pieces (an HDF5 chunk, a gzip NIfTI slab) check here, before the allocation, that

* a deflate (gzip, zip) stream of ``n`` bytes can hold what it declares: deflate expands
  at most :data:`DEFLATE_MAX_RATIO` times, so more declared bytes is a lie, and
* what is held in memory at once fits the memory budget (:func:`memory_budget`).

Outputs are checked the same way before a command writes anything: an output whose size
an option (or the input) sets must fit the free disk of its destination
(:func:`check_output_size`), and what a plan holds whole in memory (a shard's buffer, a
PartSeg project, a patch) the memory budget (:func:`check_held`); each refusal names the
option and the number.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import InputError, OptionError

#: deflate's largest expansion (a 258-byte match per ~2 bits): 1032:1
DEFLATE_MAX_RATIO = 1032
#: environment variable that sets the budget in MiB (default: half the available memory)
BUDGET_ENV = "VOXELMILL_READ_BUDGET_MIB"
#: environment variable that sets the free disk in MiB (default: what the file system says)
DISK_ENV = "VOXELMILL_FREE_DISK_MIB"


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


def nearest_existing(path: str | Path) -> Path:
    """``path`` made absolute, or its nearest ancestor that exists (where something not
    made yet will go)."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    return where


def free_disk(dst: str | Path) -> int:
    """Bytes free on the file system that will hold ``dst`` (its nearest existing folder),
    or ``VOXELMILL_FREE_DISK_MIB``."""
    if os.environ.get(DISK_ENV):
        return int(float(os.environ[DISK_ENV]) * 2**20)
    return shutil.disk_usage(nearest_existing(dst)).free


def check_output_size(dst: str | Path, nbytes: int, option: str, *,
                      copies: bool = False) -> None:
    """Refuse a plan whose output ``dst`` (about ``nbytes``, uncompressed: an upper bound
    for most images; ``copies``: the exact size of files copied) cannot fit the free disk,
    before anything is written.

    ``option`` names what sizes the output, e.g. ``"--scale 1000"`` or
    ``"--size 160 × 12 patches"``.
    """
    free = free_disk(dst)
    if nbytes > free:
        given = bool(os.environ.get(DISK_ENV))
        # uncompressed is a bound, not a forecast: labels and masks compress many times over,
        # so say how to go on where the user knows the run fits
        raise OptionError(f"{option}: the output {dst} would hold about {nbytes:.3g} bytes"
                          f"{'' if copies else ' (uncompressed)'}, more than the {free:.3g} "
                          "bytes free on its file system"
                          + (f" ({DISK_ENV})" if given else "" if copies else
                             f"; where you know it fits compressed, set {DISK_ENV} to the "
                             "MiB you allow it"))


def check_held(nbytes: int, option: str, what: str) -> None:
    """Refuse a plan that holds ``nbytes`` in one process's memory at once (``what``: why,
    e.g. ``"a shard is written from one buffer"``) above :func:`memory_budget`."""
    budget = memory_budget()
    if nbytes > budget:
        raise OptionError(f"{option}: {what}, about {nbytes:.3g} bytes at once, more than "
                          f"the memory budget of {budget:.3g} bytes (half the available "
                          f"memory, or {BUDGET_ENV})")
