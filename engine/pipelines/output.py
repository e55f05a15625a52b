"""Safe destinations: write to a hidden sibling, rename into place when complete."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine import provenance
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


def check_output_name(name: str, example: str) -> None:
    """Refuse a ``--name`` that is not a plain file-system name (it becomes a folder)."""
    from engine.errors import OptionError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise OptionError(f"--name {name!r}: use a plain name such as {example!r} (letters, "
                          "digits, '_', '-', '.')")


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


def commit_recorded(outputs: Sequence[tuple[Path, Path]], entry: dict[str, Any]) -> None:
    """Store the run's provenance ``entry`` in every finished ``(partial, dst)`` group, then
    move them all into place (provenance first, so no output is ever seen without it)."""
    for partial, _ in outputs:
        provenance.append(partial, [entry])
    for partial, dst in outputs:
        commit(partial, dst)


def write_multiscale(client: Any, data: Any, group: Path, name: str, axes: str, unit: str,
                     chunks: Sequence[int], levels: Sequence[Any], ngff: str, method: str,
                     progress: Callable[[], Any] | None = None) -> None:
    """Write the lazy level-0 ``data`` and its pyramid (``levels`` from
    :func:`engine.pyramid.plan_levels`) as an NGFF multiscale image ``group``, blockwise."""
    from engine.io import omezarr
    from engine.pyramid import build_pyramid

    group.mkdir(parents=True, exist_ok=True)
    for i, lv in enumerate(levels):
        level_chunks = [min(c, s) for c, s in zip(chunks, lv.shape, strict=True)]
        omezarr.create_level(group, str(i), lv.shape, level_chunks, data.dtype, axes, ngff,
                             every_chunk_written=method != "mode")
    metas = [omezarr.LevelMeta(str(i), lv.scale, lv.translation) for i, lv in enumerate(levels)]
    omezarr.write_group_attrs(group, {"multiscales": [omezarr.multiscales(
        axes, unit, metas, name, ngff, method)]}, ngff)
    build_pyramid(client, data, group, list(levels), chunks, method=method, progress=progress,
                  name=f"{name}-pyramid")
