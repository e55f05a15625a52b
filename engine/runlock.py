"""One writer per output: a lock file beside the destination, with stale-lock recovery.

Two runs writing one output at once would interleave their blocks and done-markers. Each
run therefore holds ``.NAME.lock`` next to the destination ``NAME`` while it works (created
with ``O_EXCL``, so exactly one run gets it, also on a shared file system). The lock names
its holder (host, pid, start time, command) and the holder refreshes its modification time
every ``stale_after / 4`` seconds. A lock is *stale* when its holder is a process on this
host that no longer exists, or when it has not been refreshed for ``stale_after`` seconds
(a holder on another host that died); a stale lock is taken over, saying so. A live lock
refuses the second run with a message naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.errors import DestinationError

STALE_AFTER = 300.0
"""Seconds without a refresh after which a lock held from another host counts as stale."""


def lock_path(dst: Path) -> Path:
    """The lock file of destination ``dst``: a hidden sibling ``.NAME.lock``."""
    return dst.parent / f".{dst.name}.lock"


def _holder() -> dict[str, Any]:
    from engine import events, provenance

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": events.now(),
            "command": provenance.command_line(), "token": uuid.uuid4().hex}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(path: Path, stale_after: float = STALE_AFTER) -> str | None:
    """Why the lock at ``path`` is stale, or None while its holder may still be working."""
    holder = _read(path)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "gone"
    if holder is None:
        # a lock being written right now is empty for an instant; an old unreadable one is junk
        return "unreadable" if age > 5 else None
    if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on {holder.get('host')} no longer exists"
    if age > stale_after:
        return f"not refreshed for {age:.0f} s"
    return None


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "another run"
    command = f" ({holder['command']})" if holder.get("command") else ""
    return (f"process {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}{command}")


@contextmanager
def output_lock(dst: str | Path, stale_after: float = STALE_AFTER,
                report: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the lock of output ``dst`` for the ``with`` block.

    Raises
    ------
    DestinationError
        When another live run holds it: the message names that run and the lock file.
    """
    dst = Path(dst)
    path = lock_path(dst)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            reason = stale_reason(path, stale_after)
            if reason is None:
                raise DestinationError(
                    f"{dst}: another voxelmill run is writing it: {_describe(_read(path))}. "
                    f"Wait for it to finish; if it is dead, remove {path}") from None
            if reason != "gone":
                report(f"taking over a stale lock on {dst} ({_describe(_read(path))}: "
                       f"{reason})")
                # renaming is atomic: of two runs recovering the same stale lock, one wins
                try:
                    path.rename(path.with_name(f"{path.name}.stale-{holder['token']}"))
                    path.with_name(f"{path.name}.stale-{holder['token']}").unlink()
                except FileNotFoundError:
                    pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(holder, f)
        break
    else:
        raise DestinationError(f"{dst}: could not take the lock {path}; is another run "
                               "starting at the same time?")
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(stale_after / 4):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    beat = threading.Thread(target=refresh, name="voxelmill-lock", daemon=True)
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join()
        if (_read(path) or {}).get("token") == holder["token"]:
            path.unlink(missing_ok=True)
