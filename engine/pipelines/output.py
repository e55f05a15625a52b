"""Safe destinations: write to a hidden sibling, rename into place when complete."""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import DestinationError


def check_destination(dst: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse a destination that exists (without ``overwrite``) or that is the source."""
    if source is not None and dst.resolve() == Path(source).resolve():
        raise DestinationError(f"{dst}: destination is the source; choose another path")
    if dst.exists() and not overwrite:
        raise DestinationError(f"{dst}: destination exists; pass --overwrite to replace it")
    if not dst.parent.exists():
        try:
            dst.parent.mkdir(parents=True)
        except OSError as exc:
            raise DestinationError(f"{dst.parent}: cannot create folder ({exc.strerror})") from None


def partial_path(dst: Path) -> Path:
    """Where an unfinished output lives: a hidden sibling, so a crash leaves no ``dst``."""
    return dst.parent / f".{dst.name}.partial"


def commit(partial: Path, dst: Path) -> None:
    """Move a finished output into place, replacing ``dst`` only now that it is complete."""
    trash = None
    if dst.exists():
        trash = dst.parent / f".{dst.name}.old"
        if trash.exists():
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        dst.rename(trash)
    partial.rename(dst)
    if trash is not None:
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
