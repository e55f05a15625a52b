"""Names that come from files (CSV tables, manifests, folder listings) and become paths.

A name read from a table is data, not a path: ``../../etc/x`` or ``/abs`` in a manifest
must never make voxelmill write outside its output folder. Names are refused, not
rewritten, so two distinct names never collide after cleaning.
"""

from __future__ import annotations

from engine.errors import InputError, VoxelmillError

MAX_NAME = 200  # below every file system's 255-byte limit, leaving room for suffixes


def safe_name(value: str, origin: str, error: type[VoxelmillError] = InputError) -> str:
    """Return ``value`` if it is a plain file name, else raise ``error`` naming ``origin``.

    A plain name is non-empty, at most :data:`MAX_NAME` characters, holds no path
    separator (``/`` or ``\\``) or NUL, and does not start with ``.`` (which also rules
    out ``.`` and ``..`` and voxelmill's hidden work folders).

    Parameters
    ----------
    value : str
        The name as read.
    origin : str
        Where it was read, for the message: ``"patches.csv, line 4"`` or ``"--token"``.
    """
    bad = (not value or value.startswith(".") or len(value) > MAX_NAME
           or any(c in value for c in "/\\\0"))
    if bad:
        raise error(f"{origin}: name {value!r} is not a plain file name (no '/', '\\', "
                    f"leading '.', at most {MAX_NAME} characters); it would be used as a "
                    "path")
    return value
