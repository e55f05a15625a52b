"""Axis names a user gives for a file whose header does not say what its axes are
(``--axes zcyx``), and the voxel size a file records or does not.

Formats that store a bare array (TIFF, HDF5, NPY, MRC, folders of slices, plain zarr
arrays) guess their axes from the number of dimensions or from tifffile's axis codes;
``--axes`` names each stored axis instead, one letter of ``tczyx`` per dimension in the
order the file stores them, and the reader transposes to NGFF order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from engine.errors import InputError, OptionError
from engine.io.sources import default_chunks, to_dask, view
from engine.volume import AXIS_ORDER

#: default axes of a bare array by its number of dimensions.
AXES_BY_NDIM = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}

#: the formats whose axes ``--axes`` may name (the others record their axes).
AXES_FORMATS = ("tiff", "hdf5", "npy", "mrc", "folder", "zarrarray")

#: what the refusal of a missing voxel size tells the user to do.
VOXEL_SIZE_FIXES = ("give it with --voxel-size Z,Y,X (and --unit, e.g. nm), or pass "
                    "--assume-voxel-size to use 1 {unit} per voxel")


def check_axes(text: str, flag: str = "--axes") -> str:
    """Validate axis letters: each of ``t, c, z, y, x`` at most once, ``y`` and ``x``
    present (any order, any case).

    Returns
    -------
    str
        The letters in lower case, in the order given.

    Raises
    ------
    OptionError
        Naming ``flag`` and the value.
    """
    axes = text.strip().lower()
    bad = sorted(set(axes) - set(AXIS_ORDER))
    if not axes or bad:
        raise OptionError(f"{flag} {text!r}: use one letter of t, c, z, y, x per stored axis, "
                          "e.g. zcyx" + (f" (not {', '.join(map(repr, bad))})" if bad else ""))
    if len(set(axes)) != len(axes):
        raise OptionError(f"{flag} {text!r}: each axis letter may appear once")
    if "y" not in axes or "x" not in axes:
        raise OptionError(f"{flag} {text!r}: an image needs y and x axes")
    return axes


def example_axes(shape: Sequence[int]) -> str:
    """A plausible ``--axes`` value for an array of ``shape``, for messages: the last two
    axes are y, x; the shortest of the others (when it is at most 8 long) is c; then z, t."""
    n = len(shape)
    if n < 2:
        return "yx"
    lead = list(range(n - 2))
    names = [""] * n
    names[-2:] = ["y", "x"]
    short = [i for i in lead if shape[i] <= 8]
    if short and n > 3:
        c = min(short, key=lambda i: shape[i])
        names[c] = "c"
        lead.remove(c)
    for i, letter in zip(reversed(lead), "zt", strict=False):
        names[i] = letter
    # more than five axes cannot be named; leave the rest as "?" for the message
    return "".join(name or "?" for name in names)


def axes_hint(shape: Sequence[int]) -> str:
    """The advice that ends a refusal of unknown or ambiguous axes."""
    return (f"say what each stored axis is with --axes, one letter of tczyx per axis, e.g. "
            f"--axes {example_axes(shape)}")


def stored_axes(path: Any, given: str | None, default: str | None,
                shape: Sequence[int]) -> str:
    """The axes of the array as stored: ``given`` (``--axes``) when set, else ``default``.

    Raises
    ------
    InputError
        When ``given`` has not one letter per dimension of ``shape``, or there is no
        default for this number of dimensions.
    """
    if given is None:
        if default is None:
            raise InputError(f"{path}: {len(shape)}-dimensional array of shape {tuple(shape)}; "
                             + axes_hint(shape))
        return default
    axes = check_axes(given)
    if len(axes) != len(shape):
        raise InputError(f"{path}: --axes {given} names {len(axes)} axes but the stored array "
                         f"has {len(shape)} (shape {tuple(shape)})")
    return axes


def ngff_order(axes: str) -> list[int]:
    """The permutation that puts ``axes`` in NGFF order (t, c, z, y, x)."""
    return sorted(range(len(axes)), key=lambda i: AXIS_ORDER.index(axes[i]))


def arrange(source: Any, axes: str, chunks: Sequence[int] | None = None,
            name: str = "src") -> tuple[Any, str]:
    """A dask array of ``source`` (stored order, named by ``axes``) in NGFF order, and its
    axes.

    The transposition is a :class:`~engine.io.sources.View` of the source, not a dask
    operation, so :func:`~engine.io.sources.source_of` finds a picklable reader behind the
    array. ``chunks`` (stored order; default
    :func:`~engine.io.sources.default_chunks`) are the dask array's, transposed with it.
    """
    order = ngff_order(axes)
    chunks = tuple(chunks) if chunks else default_chunks(source.shape, axes,
                                                         source.dtype.itemsize)
    return (to_dask(view(source, order=order), "", chunks=[chunks[i] for i in order],
                    name=name), "".join(axes[i] for i in order))


def voxel_problem(sizes: Sequence[float | None]) -> str:
    """Why recorded voxel sizes cannot be used ('' when they can): none recorded, or a
    recorded size that is 0, negative or not a number."""
    if not sizes or all(s is None for s in sizes):
        return "records no physical voxel size"
    bad = [s for s in sizes if s is not None and not (math.isfinite(s) and s > 0)]
    if bad:
        shown = ", ".join("nan" if not math.isfinite(s) else f"{s:g}" for s in bad)
        return f"records an invalid voxel size ({shown})"
    return ""


def usable_sizes(sizes: Sequence[float | None]) -> tuple[float, ...]:
    """Recorded sizes with 1 standing in for each one missing or invalid (a placeholder
    that :func:`voxel_problem` reports)."""
    return tuple(s if s is not None and math.isfinite(s) and s > 0 else 1.0 for s in sizes)
