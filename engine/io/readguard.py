"""A reader never gets a mix: detect an input replaced while a command reads it.

voxelmill replaces an output only by renaming a complete new version into its place
(:func:`engine.output.commit`), so a store is never rewritten chunk by chunk; but a command
that opened the old version and reads its chunks by path would, after the swap, read the
new version's chunks for the rest of its blocks. To prevent a mixed result, every input a
command opens (:func:`hold`, called by the readers) keeps a read-only descriptor of the
file or folder, which pins its identity (device, inode: the inode cannot be reused while
it is held, so an old-new-old swap cannot go unseen). :func:`check` compares each held
identity with what the path names now; voxelmill calls it before committing any output,
so an output is never made from a replaced input: the command stops with one message
and removes its partial output instead.

Nothing is written into an input (a read-only folder stays readable) and no writer ever
waits for a reader, on any file system. Inputs are watched only inside :func:`watching`
(each CLI command runs in one), in the process that opened them (the client); dask workers
read by path and take none.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.errors import InputError


@dataclass(frozen=True)
class _Held:
    path: Path
    fd: int
    dev: int
    ino: int


_held: dict[Path, _Held] = {}
_lock = threading.Lock()
_depth = 0  # nesting of watching(): inputs are held only inside one


@contextmanager
def watching() -> Iterator[None]:
    """Watch the inputs opened inside the block (a command's run); release them after."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            outermost = _depth == 0
        if outermost:
            release()


def _in_worker() -> bool:
    """Whether this code runs inside a dask worker task (long-lived: it must hold nothing)."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def hold(path: str | Path) -> None:
    """Pin the identity of input ``path`` (a file or folder) until :func:`release`, when
    inside :func:`watching` (else nothing).

    Opening the same path again keeps the first identity, so a replacement between two
    opens of one command is detected too. Paths that cannot be opened are skipped (the
    reader reports them itself).
    """
    p = Path(path).absolute()
    if not _depth or _in_worker():
        return
    with _lock:
        _prune()
        if p in _held:
            return
        try:
            fd = os.open(p, os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0))
        except OSError:
            return
        st = os.fstat(fd)
        _held[p] = _Held(p, fd, st.st_dev, st.st_ino)


def _prune() -> None:
    """Close the descriptors of inputs that were deleted outright (not replaced), so a
    long-lived process does not accumulate them."""
    for p, h in list(_held.items()):
        if not os.path.lexists(p) and os.fstat(h.fd).st_nlink == 0:
            os.close(h.fd)
            del _held[p]


def replaced() -> list[Path]:
    """The held inputs whose path now names another file or folder than the one first
    opened (a path that names nothing, e.g. a partial output removed on failure, is not
    a replacement: a read of it fails on its own)."""
    out = []
    with _lock:
        for p, h in _held.items():
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (h.dev, h.ino):
                out.append(p)
    return out


def message(paths: list[Path]) -> str:
    """The one-line refusal for inputs replaced while being read."""
    names = ", ".join(str(p) for p in paths)
    return (f"{names}: replaced (e.g. by 'convert --overwrite') while this command read it; "
            "its result could mix the old and new data, so nothing was written: run the "
            "command again")


def check() -> None:
    """Raise :class:`InputError` naming every held input that was replaced since it was
    opened."""
    gone = replaced()
    if gone:
        raise InputError(message(gone))


def release(path: str | Path | None = None) -> None:
    """Stop watching ``path`` and every input inside it (all inputs when None): after this
    process replaced them itself, or when a command ends."""
    root = None if path is None else Path(path).absolute()
    with _lock:
        for p in list(_held):
            if root is None or p == root or p.is_relative_to(root):
                os.close(_held.pop(p).fd)
