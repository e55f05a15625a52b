"""Patch centres from CSV files: voxel or physical coordinates, with or without a header.

MemBrain-seg takes x, y, z voxel coordinates, one centre per line. We also accept a header
row (columns named x, y and z in any order, other columns ignored), z,y,x order, floats,
comment lines and physical coordinates (Å, nm, µm) divided by the voxel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import InputError, OptionError
from engine.volume import convert_length, normalize_unit

#: accepted values of ``unit`` besides the length units of :func:`normalize_unit`.
PIXEL_UNITS = ("px", "pixel", "pixels", "voxel", "voxels")
ORDERS = ("xyz", "zyx")


def _split(line: str) -> list[str]:
    """Cells of one line: comma, semicolon or tab separated, else whitespace separated."""
    for sep in (",", ";", "\t"):
        if sep in line:
            cells = line.split(sep)
            break
    else:
        cells = line.split()
    return [c.strip().strip('"').strip("'").strip() for c in cells]


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def round_half_up(values: np.ndarray) -> np.ndarray:
    """Nearest integer, halves rounded up (``2.5 → 3``, ``-0.5 → 0``), as int64.

    Voxel ``i`` covers ``[i - 0.5, i + 0.5)``, so a coordinate on the boundary of two voxels
    goes to the upper one, whatever the parity (numpy's ``round`` would round half to even).
    """
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


def read_coords_table(
    path: str | Path,
    order: str = "xyz",
    unit: str = "px",
    voxel_size: Sequence[float] | None = None,
    vox_unit: str = "angstrom",
) -> tuple[np.ndarray, np.ndarray]:
    """Read patch centres and the line each came from (for messages).

    Parameters and conversion as :func:`read_coords`.

    Returns
    -------
    zyx : ndarray of int64, shape (n, 3)
        Voxel centres in z, y, x order.
    lines : ndarray of int64, shape (n,)
        1-based line number of each centre in ``path``.
    """
    path = Path(path)
    if order not in ORDERS:
        raise OptionError(f"--order {order!r}: use xyz or zyx")
    scale = _voxel_scale(unit, voxel_size, vox_unit)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such coordinates file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a text/CSV file ({exc})") from None

    columns: tuple[int, int, int] | None = None  # indices of z, y, x cells
    rows: list[tuple[float, float, float]] = []
    lines: list[int] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cells = _split(line)
        if columns is None:  # the first significant line: a header, or the first centre
            if len(cells) < 3 or any(_number(c) is None for c in cells[:3]):
                columns = _header_columns(cells, path, n)
                continue
            columns = (0, 1, 2) if order == "zyx" else (2, 1, 0)
        width = max(columns) + 1
        if len(cells) < width:
            raise InputError(f"{path}, line {n}: expected at least {width} columns, found "
                             f"{len(cells)}: {line!r}")
        picked = [_number(cells[i]) for i in columns]
        if any(v is None or not np.isfinite(v) for v in picked):
            raise InputError(f"{path}, line {n}: coordinates must be finite numbers, "
                             f"found {line!r}")
        rows.append(tuple(picked))  # type: ignore[arg-type]
        lines.append(n)
    if not rows:
        raise InputError(f"{path}: no coordinates found (expected one x,y,z centre per line)")
    zyx = np.asarray(rows, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
    return round_half_up(zyx), np.asarray(lines, dtype=np.int64)


def read_coords(
    path: str | Path,
    order: str = "xyz",
    unit: str = "px",
    voxel_size: Sequence[float] | None = None,
    vox_unit: str = "angstrom",
) -> np.ndarray:
    """Read patch centres from a CSV file as integer voxel coordinates.

    Parameters
    ----------
    path : str or Path
        Text file, one centre per line, cells separated by commas (or semicolons, tabs or
        spaces). Blank lines and lines starting with ``#`` are skipped. An optional header
        row names the columns: ``x``, ``y`` and ``z`` in any order, case-insensitive; other
        columns (e.g. ``score``) are ignored. Without a header, the first three columns
        are the coordinates in ``order`` and further columns are ignored.
    order : {"xyz", "zyx"}
        Column order of a file without header (MemBrain-seg writes x, y, z).
    unit : {"px", "angstrom", "nm", "um"}
        Unit of the coordinates: voxels, or a physical length (any alias of
        :func:`engine.volume.normalize_unit`), then divided by ``voxel_size``.
    voxel_size : sequence of 3 float, optional
        Voxel size (z, y, x) in ``vox_unit``; required for physical coordinates.
    vox_unit : str
        Unit of ``voxel_size``.

    Returns
    -------
    zyx : ndarray of int64, shape (n, 3)
        Voxel centres in z, y, x order. Coordinates are taken with the origin at the
        centre of voxel 0 and rounded to the nearest voxel, halves up
        (``floor(v + 0.5)``: 2.5 → 3, -0.5 → 0), not numpy's half-to-even.

    Raises
    ------
    InputError
        A malformed row (message with the file and 1-based line number) or no coordinates.
    """
    return read_coords_table(path, order, unit, voxel_size, vox_unit)[0]


def write_coords(path: str | Path, zyx: np.ndarray, scores: Sequence[float] | None = None
                 ) -> Path:
    """Write voxel centres as a CSV with header ``x,y,z`` (and ``score``).

    Parameters
    ----------
    path : str or Path
        Destination file (overwritten).
    zyx : array_like, shape (n, 3)
        Centres in z, y, x voxel order; integral values are written as integers.
    scores : sequence of float, optional
        One score per centre, written as a fourth column.

    Returns
    -------
    Path
        ``path``; :func:`read_coords` reads it back.
    """
    path = Path(path)
    arr = np.asarray(zyx)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise OptionError(f"write_coords: expected an (n, 3) array of z, y, x, got {arr.shape}")
    if scores is not None and len(scores) != len(arr):
        raise OptionError(f"write_coords: {len(scores)} scores for {len(arr)} centres")

    def fmt(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else repr(float(v))

    out = ["x,y,z" + (",score" if scores is not None else "")]
    for i, (z, y, x) in enumerate(arr):
        cells = [fmt(x), fmt(y), fmt(z)]
        if scores is not None:
            cells.append(repr(float(scores[i])))
        out.append(",".join(cells))
    path.write_text("\n".join(out) + "\n")
    return path


def _header_columns(cells: list[str], path: Path, line: int) -> tuple[int, int, int]:
    names = [c.lower() for c in cells]
    missing = [a for a in "xyz" if a not in names]
    if missing:
        raise InputError(
            f"{path}, line {line}: not coordinates and not a header with columns x, y, z "
            f"(found {', '.join(repr(c) for c in cells)})"
        )
    return names.index("z"), names.index("y"), names.index("x")


def _voxel_scale(unit: str, voxel_size: Sequence[float] | None, vox_unit: str
                 ) -> tuple[float, float, float]:
    """Length of one voxel (z, y, x) in ``unit``; ones for voxel coordinates."""
    if unit.strip().lower() in PIXEL_UNITS:
        return (1.0, 1.0, 1.0)
    try:
        target = normalize_unit(unit)
    except OptionError:
        raise OptionError(f"--coords-unit {unit!r}: use px, angstrom, nm or um") from None
    if voxel_size is None or len(voxel_size) != 3:
        raise OptionError(f"coordinates in {target} need the voxel size (z, y, x) of the volume")
    return tuple(convert_length(float(v), vox_unit, target) for v in voxel_size)  # type: ignore
