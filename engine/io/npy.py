"""NumPy ``.npy`` (memory-mapped) and ``.npz`` archives (a member memory-mapped when stored
uncompressed, else loaded: deflate is not seekable)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from engine.errors import InputError
from engine.io.axes import AXES_BY_NDIM, arrange, stored_axes, voxel_problem
from engine.io.budget import check_deflate, check_memory, declared_bytes
from engine.io.sources import InMemorySource, RawFileSource, default_chunks, view
from engine.volume import Volume


def _header(fh, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        fmt = np.lib.format
        major, _ = fmt.read_magic(fh)
        reader = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
        return reader(fh)  # (shape, fortran_order, dtype)
    except ValueError as exc:
        raise InputError(f"{path}: not a valid .npy array ({exc})") from None


def _volume(source, path: Path, fortran: bool, axes: str | None) -> Volume:
    shape = tuple(reversed(source.shape)) if fortran else tuple(source.shape)
    if axes is None and len(shape) not in AXES_BY_NDIM:
        raise InputError(f"{path}: {len(shape)}-dimensional array; expected 2 (yx) to 5 "
                         "(tczyx) axes, or name them with --axes")
    named = stored_axes(path, axes, AXES_BY_NDIM.get(len(shape)), shape)
    chunks = default_chunks(source.shape, named[::-1] if fortran else named,
                            source.dtype.itemsize)
    if fortran:  # stored x-fastest: the raw layout is the reversed C-order array
        source, chunks = view(source, order=range(len(shape))[::-1]), chunks[::-1]
    data, named = arrange(source, named, chunks, name="npy")
    n_spatial = len([a for a in named if a in "zyx"])
    # NumPy files carry no voxel size
    return Volume(data, named, (1.0,) * n_spatial, "micrometer", source=str(path),
                  voxel_size_problem=voxel_problem([None] * n_spatial))


def read(path: Path, key: str | None = None, axes: str | None = None,
         **_: object) -> Volume:
    """Open ``.npy`` lazily, or one array of an ``.npz`` (``key``, default the first).

    NumPy files carry no voxel size (``voxel_size_problem`` says so; convert needs
    ``--voxel-size`` or ``--assume-voxel-size``). Axes follow the number of dimensions
    (yx, zyx, czyx, tczyx) unless ``axes`` names each stored one (``--axes``).
    """
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as fh:
            shape, fortran, dtype = _header(fh, path)
            offset = fh.tell()
        expected = offset + int(np.prod(shape)) * dtype.itemsize
        if path.stat().st_size < expected:
            raise InputError(f"{path}: truncated .npy file ({path.stat().st_size} of "
                             f"{expected} bytes)")
        raw_shape = tuple(reversed(shape)) if fortran else tuple(shape)
        return _volume(RawFileSource(str(path), offset, raw_shape, dtype), path, fortran, axes)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a valid .npz archive ({exc})") from None
    with zf:
        names = [n for n in zf.namelist() if n.endswith(".npy")]
        if not names:
            raise InputError(f"{path}: .npz archive holds no arrays")
        member = names[0] if key is None else f"{key}.npy"
        if member not in names:
            raise InputError(f"{path}: no array {key!r}; arrays: "
                             + ", ".join(n[:-4] for n in names))
        info = zf.getinfo(member)
        with zf.open(member) as fh:
            shape, fortran, dtype = _header(fh, path)
            header_len = fh.tell() if info.compress_type == zipfile.ZIP_STORED else None
            if header_len is None:
                if info.compress_type == zipfile.ZIP_DEFLATED:
                    check_deflate(path, shape, dtype, info.compress_size)
                if declared_bytes(shape, dtype) > info.file_size:
                    raise InputError(f"{path}: array {member[:-4]!r} declares {shape} "
                                     f"{dtype.name} but its member holds {info.file_size} "
                                     "bytes")
                check_memory(path, shape, dtype, "a compressed .npz array is read whole")
                fh.seek(0)
                return _volume(InMemorySource(np.load(fh)), path, False, axes)
    # stored member: data starts after the local file header and the npy header
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header_len
    raw_shape = tuple(reversed(shape)) if fortran else tuple(shape)
    return _volume(RawFileSource(str(path), offset, raw_shape, dtype), path, fortran, axes)
