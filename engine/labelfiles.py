"""The labelling's per-block work files: small arrays in one flat file.

Shared by the labelling passes (:mod:`engine.labels`) and the face graph's merge tree
(:mod:`engine.facegraph`), which read what the first pass stored of every block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

SHIFT = np.uint64(32)  # component id = block_id << 32 | local label


def block_file(work: str | Path, bid: int) -> Path:
    """The file of block ``bid`` (raveled grid index): its local labels' sizes and
    first-voxel keys, its face components and its boundary planes."""
    return Path(work) / "blocks" / f"{bid}.bin"


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Small arrays in one flat file: a JSON line of names, dtypes and shapes, then their
    bytes, each padded to 8. For a 64³ block's files ``np.savez`` took ~2× longer to
    write and, through its zip directory and per-member headers, 4–10× longer to read
    (0.14–0.36 ms against 0.03): a face task reads up to 20 of them."""
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()])
    head = header.encode() + b"\n"
    with open(path, "wb") as f:
        f.write(head + b" " * (-len(head) % 8))
        for a in arrays.values():
            data = np.ascontiguousarray(a).tobytes()
            f.write(data + b"\0" * (-len(data) % 8))


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a :func:`save_arrays` file (read-only views of one read)."""
    raw = path.read_bytes()
    end = raw.index(b"\n") + 1
    pos = end + (-end % 8)
    out = {}
    for name, dtype, shape in json.loads(raw[:end]):
        dt, count = np.dtype(dtype), math.prod(shape)
        out[name] = np.frombuffer(raw, dt, count=count, offset=pos).reshape(shape)
        pos += -(-count * dt.itemsize // 8) * 8
    return out
