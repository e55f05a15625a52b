"""What every ``voxelmill`` command shares: the consoles, option parsing, user-error
handling, the cluster a command runs on and its progress display.

``cli.main`` and each command module import these; this module imports no command.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from engine import events
from engine.errors import (
    EXIT_STOPPED,
    EXIT_TERMINATED,
    RunStopped,
    Terminated,
    VoxelmillError,
    disk_full,
)


def plain_console(stderr: bool = False) -> Console:
    """A console that prints text as it is: no markup (``[b]`` in a path stays), no emoji
    codes (``:label:`` stays), no highlighting. Messages carry file names, dataset and
    label names a user chose, so nothing printed is ever parsed; styles are given
    explicitly (``style=``, :class:`rich.text.Text`)."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False, soft_wrap=True)


err = plain_console(stderr=True)
out = plain_console()


def say_error(message: str) -> None:
    """Print ``error: MESSAGE`` on stderr, the prefix in bold red, the message as it is."""
    err.print(Text.assemble(("error:", "bold red"), " ", message))


def floats(text: str | None, what: str) -> tuple[float, ...] | None:
    """Numbers separated by commas (or ``x``), e.g. ``--voxel-size 1,0.5,0.5``."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise VoxelmillError(f"{what} {text!r}: expected numbers separated by commas") from None
    if not all(math.isfinite(v) for v in values):
        raise VoxelmillError(f"{what} {text!r}: expected finite numbers (no nan or inf)")
    return values


def ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """Whole numbers separated by commas (or ``x``), e.g. ``--block 64,128,128``."""
    values = floats(text, what)
    if values is None:
        return None
    if any(v != int(v) for v in values):
        raise VoxelmillError(f"{what} {text!r}: expected whole numbers")
    return tuple(int(v) for v in values)


def named_paths(items: list[str], what: str, absolute: bool = False
                ) -> tuple[tuple[str, str], ...]:
    """``NAME=VALUE`` options as ``(name, value)`` pairs; ``absolute``: each value a path,
    made absolute (for workers started in another folder, which open it in theirs)."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VoxelmillError(f"{what} {item!r}: expected NAME=PATH, e.g. cells=cells.tif")
        out.append((name, str(Path(path).absolute()) if absolute else path))
    return tuple(out)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn user errors into one message and exit code 2; a run stopped by its cluster or a
    full disk into one message and exit code 75 (its partial outputs kept); Ctrl-C and
    SIGTERM into a resume hint (exit codes 130 and 143).

    The command's inputs are watched while it runs (:mod:`engine.io.readguard`): a failure
    caused by an input replaced under it (its chunks gone) gets the same one-line refusal
    as a replacement found before committing.
    """
    from engine.io import readguard
    from engine.output import remove_made_folders

    with readguard.watching():
        try:
            yield
        except VoxelmillError as exc:
            message = readguard.message(gone) if (gone := readguard.replaced()) else str(exc)
            # a plan refused after its destination's folders were made leaves none behind
            remove_made_folders()
            _fail(message, 2)
        except RunStopped as exc:  # not the user's input: the partial outputs stay
            _fail(str(exc), EXIT_STOPPED)
        except Terminated:
            events.emit("error", message="terminated", exit_code=EXIT_TERMINATED)
            err.print("terminated (SIGTERM); run the same command again to resume where it "
                      "stopped")
            raise typer.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            events.emit("error", message="interrupted", exit_code=130)
            err.print("interrupted; run the same command again to resume where it stopped")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if gone := readguard.replaced():
                _fail(readguard.message(gone), 2)
            if (full := disk_full(exc)) is not None:  # the command's own writes
                _fail(str(full), EXIT_STOPPED)
            raise


def _fail(message: str, code: int) -> None:
    events.emit("error", message=message, exit_code=code)
    say_error(message)
    raise typer.Exit(code) from None


#: cluster options given before the command (``voxelmill --cluster slurm --jobs 4 segment …``)
_cluster_spec: dict[str, Any] = {}


def set_cluster_options(**spec: Any) -> None:
    """Remember the cluster options given before the command, for :func:`cluster`."""
    _cluster_spec.update(spec)


@contextmanager
def cluster(scheduler: str | None, workers: int | None, threads: int | None,
            memory_limit: str | None, *, gil_bound: bool = False) -> Iterator[Any]:
    """The client a command runs on, from its options and the global cluster options;
    ``gil_bound`` for commands whose block tasks hold the GIL (the embedded cluster's
    default shape, :func:`engine.cluster.local_cluster_shape`)."""
    from engine.cluster import ClusterOptions, connect

    opts = ClusterOptions(scheduler, workers, threads, memory_limit,
                          **{"gil_bound": gil_bound, **_cluster_spec})
    with connect(opts, report=lambda line: err.print(line)) as client:
        yield client


def block_summary(stages: list[dict[str, Any]]) -> str:
    """``blocks: N computed, M skipped (already done)`` over a run's passes."""
    computed = sum(s["computed"] for s in stages)
    skipped = sum(s["skipped"] for s in stages)
    return f"blocks: {computed} computed, {skipped} skipped (already done)"


def progress_factory() -> Callable[[], Any]:
    """What makes a pass's progress display (imported late: rich loads only when used)."""
    from engine.progress import default_progress

    return default_progress
