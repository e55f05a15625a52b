"""NRRD (``.nrrd`` attached, ``.nhdr`` detached): raw data memory-mapped, compressed read whole.

NRRD lists axes fastest first (``sizes: x y z``), which is numpy C order reversed, so a
raw NRRD is a C-ordered ``(z, y, x)`` array at a byte offset and maps straight onto
:class:`~engine.io.sources.RawFileSource`. One non-spatial axis (a channel ``list`` or
``vector`` axis, or a ``time`` axis) is allowed, either fastest or slowest.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nrrd
import numpy as np

from engine.errors import InputError, OptionError
from engine.io.axes import usable_sizes, voxel_problem
from engine.io.budget import check_deflate, check_memory
from engine.io.sources import InMemorySource, RawFileSource, default_chunks, to_dask, view
from engine.volume import Volume, normalize_unit

#: NRRD type names (all spellings the NRRD0005 spec allows) → numpy type.
NRRD_TYPES: dict[str, str] = {}
for _names, _np in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int",
      "int64", "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _name in _names:
        NRRD_TYPES[_name] = _np

#: numpy dtype → NRRD type name used when writing.
WRITE_TYPES = {
    np.dtype("i1"): "int8", np.dtype("u1"): "uint8", np.dtype("i2"): "int16",
    np.dtype("u2"): "uint16", np.dtype("i4"): "int32", np.dtype("u4"): "uint32",
    np.dtype("i8"): "int64", np.dtype("u8"): "uint64", np.dtype("f4"): "float",
    np.dtype("f8"): "double",
}

#: NGFF unit → the spelling written to ``space units`` (all accepted by ``normalize_unit``).
UNIT_WRITE = {"angstrom": "angstrom", "nanometer": "nm", "micrometer": "microns",
              "millimeter": "mm", "meter": "m"}

#: ``kinds`` that describe a spatial (domain) axis.
SPATIAL_KINDS = {"domain", "space", "???", "none"}

COMPRESSED = {"gzip", "gz", "bzip2", "bz2"}


def _dtype(header: dict[str, Any], path: Path) -> np.dtype:
    name = str(header.get("type", "")).strip()
    if name not in NRRD_TYPES:
        raise InputError(f"{path}: unsupported NRRD type {name!r}")
    dtype = np.dtype(NRRD_TYPES[name])
    if dtype.itemsize > 1 and header.get("encoding") not in ("ascii", "text", "txt"):
        endian = header.get("endian")
        if endian not in ("little", "big"):
            raise InputError(f"{path}: NRRD header lacks a valid 'endian' field for {name} data")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    return dtype


def _is_spatial(header: dict[str, Any], i: int) -> bool:
    """Whether NRRD axis ``i`` is spatial: a ``space directions`` row, else its ``kinds``."""
    directions = header.get("space directions")
    if directions is not None:
        row = np.asarray(directions[i], dtype=float) if directions[i] is not None else None
        return row is not None and bool(np.all(np.isfinite(row)))
    kinds = header.get("kinds")
    if kinds is not None:
        return str(kinds[i]).strip().lower() in SPATIAL_KINDS
    spacings = header.get("spacings")
    if spacings is not None:
        return bool(np.isfinite(float(spacings[i])))
    return True


def _voxel_size(header: dict[str, Any], spatial: list[int], path: Path
                ) -> tuple[list[float | None], str]:
    """Recorded voxel size per spatial axis (NRRD order; ``None`` where the header gives
    none) and its unit.

    The norms of the ``space directions`` give the spacing; the orientation (rotation,
    axis flips) is dropped because a ``Volume`` is axis-aligned.
    """
    directions = header.get("space directions")
    spacings = header.get("spacings")
    sizes = []
    for i in spatial:
        if directions is not None:
            v = float(np.linalg.norm(np.asarray(directions[i], dtype=float)))
        elif spacings is not None:
            v = abs(float(spacings[i]))
        else:
            v = None
        sizes.append(v)
    # 'space units' is per space dimension, 'units' per axis (used with 'spacings')
    units = header.get("space units")
    if units is None and header.get("units") is not None:
        units = [header["units"][i] for i in spatial]
    names = [str(u).strip() for u in (units or []) if str(u).strip()]
    if not names:
        return sizes, "micrometer"
    try:
        unit = normalize_unit(names[0])
        for other in names[1:]:
            if normalize_unit(other) != unit:
                raise InputError(f"{path}: NRRD axes use different space units {names}")
    except OptionError as exc:
        raise InputError(f"{path}: NRRD 'space units': {exc}") from None
    return sizes, unit


def _data_file(header: dict[str, Any], path: Path) -> Path:
    name = header.get("data file", header.get("datafile"))
    if name is None:
        return path
    name = str(name).strip()
    if name.upper().startswith("LIST") or len(name.split()) > 1:
        raise InputError(f"{path}: NRRD headers that split the data over several files "
                         f"('data file: {name}') are not supported")
    data = Path(name)
    return data if data.is_absolute() else path.parent / data


def _raw_offset(header: dict[str, Any], data_path: Path, start: int, nbytes: int,
                path: Path) -> int:
    """Byte position of the first voxel: after the header, ``line skip`` and ``byte skip``."""
    line_skip = int(header.get("line skip", header.get("lineskip", 0)))
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    offset = start
    if line_skip > 0:
        with open(data_path, "rb") as fh:
            fh.seek(start)
            for _ in range(line_skip):
                fh.readline()
            offset = fh.tell()
    size = data_path.stat().st_size
    if byte_skip == -1:  # the data are the last bytes of the file
        offset = size - nbytes
    elif byte_skip >= 0:
        offset += byte_skip
    else:
        raise InputError(f"{path}: invalid NRRD byte skip {byte_skip}")
    if offset < 0 or size < offset + nbytes:
        raise InputError(
            f"{path}: truncated NRRD data: the header describes {nbytes} bytes from byte "
            f"{max(offset, 0)} of {data_path.name} but that file has {size} bytes"
        )
    return offset


def read(path: Path, **_: object) -> Volume:
    """Open an NRRD file lazily.

    Parameters
    ----------
    path : Path
        An attached (``.nrrd``) or detached (``.nhdr``) NRRD header.

    Returns
    -------
    Volume
        ``yx``, ``zyx``, or with one non-spatial axis ``cyx``/``czyx`` (``tzyx`` for a
        ``time`` kind); voxel size from ``spacings`` or the ``space directions`` norms,
        unit from ``space units`` (micrometer when absent).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            header_end = fh.tell()  # read_header seeks to just after the blank line
    except (nrrd.NRRDError, ValueError, StopIteration, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a valid NRRD header ({str(exc) or 'empty file'})") from None
    for key in ("type", "dimension", "sizes", "encoding"):
        if key not in header:
            raise InputError(f"{path}: NRRD header lacks the required field {key!r}")
    sizes = [int(s) for s in header["sizes"]]
    if int(header["dimension"]) != len(sizes) or min(sizes, default=0) <= 0:
        raise InputError(f"{path}: NRRD 'sizes' {sizes} do not match "
                         f"'dimension: {header['dimension']}'")
    dtype = _dtype(header, path)
    spatial = [i for i in range(len(sizes)) if _is_spatial(header, i)]
    other = [i for i in range(len(sizes)) if i not in spatial]
    if len(spatial) not in (2, 3) or len(other) > 1 or (other and other[0] not in
                                                        (0, len(sizes) - 1)):
        raise InputError(
            f"{path}: unsupported NRRD layout: sizes {sizes} with spatial axes {spatial}; "
            "voxelmill reads 2D/3D images with at most one channel axis first or last"
        )
    voxel, unit = _voxel_size(header, spatial, path)
    spatial_axes = "zyx"[3 - len(spatial):]
    kind = str(header.get("kinds", ["list"] * len(sizes))[other[0]]).lower() if other else ""
    extra = "t" if kind == "time" else "c"
    # C order is NRRD order reversed: a fastest non-spatial axis lands last
    c_shape = tuple(reversed(sizes))
    c_axes = spatial_axes
    if other:
        c_axes = spatial_axes + extra if other[0] == 0 else extra + spatial_axes

    encoding = str(header["encoding"]).lower()
    if encoding == "raw":
        data_path = _data_file(header, path)
        if not data_path.exists():
            raise InputError(f"{path}: the NRRD data file {data_path} does not exist")
        start = header_end if data_path == path else 0
        nbytes = int(np.prod(c_shape)) * dtype.itemsize
        offset = _raw_offset(header, data_path, start, nbytes, path)
        source: Any = RawFileSource(str(data_path), offset, c_shape, dtype)
    elif encoding in COMPRESSED or encoding in ("ascii", "text", "txt", "hex"):
        # gzip/bzip2 streams (and text) cannot be read at an offset, so the whole array is
        # decompressed here; such files are meant for patches, not whole volumes.
        data_path = _data_file(header, path)
        if encoding in ("gzip", "gz") and data_path.exists():
            check_deflate(path, c_shape, dtype, data_path.stat().st_size)
        check_memory(path, c_shape, dtype, f"{encoding} NRRD data is decompressed whole")
        try:
            array, _ = nrrd.read(str(path), index_order="C")
        except (nrrd.NRRDError, ValueError, OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: cannot read the {encoding} NRRD data ({exc})") from None
        if array.shape != c_shape:
            raise InputError(f"{path}: NRRD data has shape {array.shape}, header says {c_shape}")
        source = InMemorySource(np.ascontiguousarray(array, dtype=dtype.newbyteorder("=")))
    else:
        raise InputError(f"{path}: unsupported NRRD encoding {header['encoding']!r}")

    order = list(range(len(c_axes)))
    if c_axes[-1] in "ct":  # interleaved channels: keep them together in each read chunk
        n = c_shape[-1]
        chunks = default_chunks(c_shape[:-1], spatial_axes, dtype.itemsize * n) + (n,)
        order = [order[-1], *order[:-1]]  # channels first: a view, not a dask operation
        c_axes = extra + spatial_axes
    else:
        chunks = default_chunks(c_shape, c_axes, dtype.itemsize)
    data = to_dask(view(source, order=order), c_axes, chunks=[chunks[i] for i in order],
                   name="nrrd")
    recorded = list(reversed(voxel))
    return Volume(data, c_axes, usable_sizes(recorded), unit, source=str(path),
                  voxel_size_problem=voxel_problem(recorded))


def _format_vector(values: Iterable[float]) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def write(volume: Volume, path: Path, slabs: Iterable[np.ndarray]) -> None:
    """Write a volume as an attached, raw, little-endian NRRD, streaming slabs.

    Parameters
    ----------
    volume : Volume
        ``yx``/``zyx`` with at most one leading ``c`` or ``t`` axis.
    path : Path
        Destination ``.nrrd`` file.
    slabs : iterable of numpy.ndarray
        Consecutive pieces of ``volume.data`` along axis 0.
    """
    path = Path(path)
    spatial = volume.spatial_axes
    extra = volume.axes[: len(volume.axes) - len(spatial)]
    if spatial not in ("yx", "zyx") or len(extra) > 1:
        raise InputError(f"{path}: NRRD export takes a 2D/3D image with at most one channel or "
                         f"time axis, not axes {volume.axes!r}")
    dtype = np.dtype(volume.dtype)
    if dtype == np.bool_:
        dtype = np.dtype("u1")
    elif dtype == np.float16:
        dtype = np.dtype("f4")
    if dtype.newbyteorder("=") not in WRITE_TYPES:
        raise InputError(f"{path}: NRRD cannot hold {dtype} voxels")
    out_dtype = dtype.newbyteorder("<")
    shape = volume.shape
    n = len(spatial)
    # NRRD order is C order reversed: x first, the leading channel/time axis last (slowest)
    sizes = list(reversed(shape))
    directions = []
    for i, v in enumerate(reversed(volume.voxel_size)):
        row = [0.0] * n
        row[i] = float(v)
        directions.append(_format_vector(row))
    kinds = ["domain"] * n
    if extra:
        directions.append("none")
        kinds.append("time" if extra == "t" else "list")
    unit = UNIT_WRITE[volume.unit]
    lines = [
        "NRRD0004",
        "# written by voxelmill",
        f"type: {WRITE_TYPES[dtype.newbyteorder('=')]}",
        f"dimension: {len(sizes)}",
        f"space dimension: {n}",
        "sizes: " + " ".join(str(s) for s in sizes),
        "space directions: " + " ".join(directions),
        "kinds: " + " ".join(kinds),
        "space units: " + " ".join(f'"{unit}"' for _ in range(n)),
        "space origin: " + _format_vector([0.0] * n),
        "endian: little",
        "encoding: raw",
    ]
    expected = int(np.prod(shape))
    written = 0
    with open(path, "wb") as fh:
        fh.write(("\n".join(lines) + "\n\n").encode("ascii"))
        for slab in slabs:
            piece = np.ascontiguousarray(np.asarray(slab).reshape((-1, *shape[1:])),
                                         dtype=out_dtype)
            fh.write(memoryview(piece).cast("B"))
            written += piece.size
    if written != expected:
        raise ValueError(f"{path}: slabs held {written} voxels, the volume has {expected}")
