"""Reading zarr arrays so that a damaged input stops the run with a message naming the chunk.

Two kinds of damage:

* a *corrupt* chunk (truncated file, bad bytes): decoding fails; the failing storage unit
  (chunk, or shard of a sharded zarr v3 array) is found by reading the region's units one
  by one, and an :class:`~engine.errors.InputError` names the array, the unit's grid index
  and its file;
* a *missing* chunk: zarr reads a missing chunk as the fill value, which is right for
  arrays that skip empty chunks, but for an array written with every chunk stored (images
  written by voxelmill carry ``"voxelmill": {"every_chunk_written": true}`` in their
  attributes) a missing chunk file means lost data, and reading it is refused.

The error is a user error: the block task fails, nothing is marked done for it, and the
run stops with that message.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine import provenance
from engine.errors import InputError
from engine.io.chunkfiles import ChunkFiles, chunk_overlap, chunk_region

COMPLETE_ATTR = "every_chunk_written"


def unit_shape(arr: Any) -> tuple[int, ...]:
    """Shape of the array's storage unit: its shard when sharded, else its chunk."""
    shards = getattr(arr, "shards", None)
    return tuple(shards) if shards else tuple(arr.chunks)


def _bounds(arr: Any, selection: Sequence[Any]) -> list[tuple[int, int]]:
    out = []
    sel = tuple(selection) + (slice(None),) * (arr.ndim - len(selection))
    for s, n in zip(sel, arr.shape, strict=True):
        if isinstance(s, slice):
            start, stop, _ = s.indices(n)
            out.append((start, max(start, stop)))
        else:
            i = int(s) % n if n else 0
            out.append((i, i + 1))
    return out


def units(arr: Any, selection: Sequence[Any]) -> Iterator[tuple[int, ...]]:
    """Grid indices of the storage units a selection touches."""
    unit = unit_shape(arr)
    bounds = _bounds(arr, selection)
    if any(a >= b for a, b in bounds):
        return iter(())
    return itertools.product(*(range(a // u, -(-b // u)) for (a, b), u in
                               zip(bounds, unit, strict=True)))


def unit_file(arr: Any, path: str, index: Sequence[int]) -> Path:
    """The file holding storage unit ``index`` of the array at ``path``."""
    return Path(path) / arr.metadata.encode_chunk_key(tuple(index))


def location(arr: Any) -> str:
    """The folder of a zarr array opened from a local store (for messages and chunk files)."""
    sp = arr.store_path
    root = getattr(sp.store, "root", None)
    return str(Path(root) / sp.path) if root is not None else str(sp)


def every_chunk_written(arr: Any) -> bool:
    return bool(dict(arr.attrs.get("voxelmill", {}) or {}).get(COMPLETE_ATTR, False))


def remedy(path: str | Path) -> str:
    """How to re-create the array at ``path``: the command recorded in its group's
    provenance (``voxelmill`` writes one in every group it makes: a damaged prediction
    is re-made by ``voxelmill predict``, not by a conversion), else a general hint."""
    group = Path(path).parent
    try:
        entries = provenance.read(group)
    except Exception:  # noqa: BLE001 - no group there, or unreadable attributes: no record
        entries = []
    runs = [e for e in entries if isinstance(e, dict) and e.get("op")]
    if not runs:
        return "re-create the array from its source (voxelmill convert for an image)"
    last = runs[-1]
    if last.get("command"):
        return f"re-create the array: it was written by `{last['command']}`"
    return (f"re-create the array: it was written by voxelmill's {last['op']!r} operation "
            f"(its parameters are in the provenance attribute of {group})")


def _missing(arr: Any, path: str, index: Sequence[int]) -> InputError:
    return InputError(
        f"{path}: chunk {tuple(index)} is missing (expected file "
        f"{unit_file(arr, path, index)}); this array was written with every "
        f"chunk stored, so data was lost: {remedy(path)}")


def _corrupt(arr: Any, path: str, index: Sequence[int], exc: Exception) -> InputError:
    return InputError(
        f"{path}: chunk {tuple(index)} cannot be read ({type(exc).__name__}: {exc}); its "
        f"file {unit_file(arr, path, index)} is corrupt or truncated: {remedy(path)}")


def _read_files(files: ChunkFiles, arr: Any, path: str, selection: tuple[Any, ...],
                out: np.ndarray | None) -> np.ndarray:
    """:func:`read_checked` of a plain local array: its chunk files decoded here, each
    copied into place (:mod:`engine.io.chunkfiles`)."""
    region = tuple(slice(a, b) for a, b in _bounds(arr, selection))
    full = tuple(r.stop - r.start for r in region)
    # integer indices drop their axes from the result
    kept = tuple(n for k, n in enumerate(full)
                 if k >= len(selection) or not isinstance(selection[k], int | np.integer))
    result = np.empty(kept, arr.dtype) if out is None else out
    out = result.view()
    out.shape = full  # never a copy (raises for a non-contiguous ``out``)
    complete = every_chunk_written(arr)
    for index in units(arr, selection):
        try:
            chunk = files.read(index)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - any decoding failure names the chunk
            raise _corrupt(arr, path, index, exc) from None
        if chunk is None and complete:
            raise _missing(arr, path, index)
        dst, src = chunk_overlap(region, index, files.chunks)
        out[dst] = files.fill_value if chunk is None else chunk[src]
    return result


def read_checked(arr: Any, path: str, selection: Sequence[Any],
                 out: np.ndarray | None = None) -> np.ndarray:
    """``arr[selection]`` as NumPy, raising :class:`InputError` for a damaged unit.

    Parameters
    ----------
    arr : zarr.Array
        The array, opened read-only.
    path : str
        Its location (for the message and to look for chunk files).
    selection : tuple of slice or int
        Basic selection, steps of 1.
    out : ndarray, optional
        C-contiguous, of the selection's shape and the array's dtype: zarr decodes into it
        (no result array allocated and copied); it is returned.
    """
    selection = tuple(selection)
    files = (ChunkFiles.of(arr) if all(isinstance(x, int | np.integer) or (
        isinstance(x, slice) and x.step in (None, 1)) for x in selection) else None)
    if files is not None:
        return _read_files(files, arr, path, selection, out)
    if every_chunk_written(arr):
        for index in units(arr, selection):
            if not unit_file(arr, path, index).exists():
                raise _missing(arr, path, index)
    try:
        if out is None:
            return np.asarray(arr[selection])
        from zarr.core.buffer.cpu import NDBuffer

        arr.get_basic_selection(selection, out=NDBuffer.from_numpy_array(out))
        return out
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure: find the damaged unit
        for index in units(arr, selection):
            try:
                arr[chunk_region(index, unit_shape(arr), arr.shape)]
            except Exception as unit_exc:  # noqa: BLE001
                raise _corrupt(arr, path, index, unit_exc) from None
        raise exc
