"""Whether a cluster's workers see this machine's paths.

Block tasks open the input and write the output by path on the workers. On a cluster of
other machines (``--scheduler``, SLURM jobs) a path that only this machine has (a local
disk, a mount the compute nodes lack, another mount point in a container) made every block
task fail after its retries, with a ``FileNotFoundError`` traceback and a partial output
left to resume. :func:`check_workers_see` asks every worker once, before anything is
written, and refuses with one line naming the path and the worker.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import InputError
from engine.io.budget import nearest_existing


def _unseen(read: list[str], write: list[str], relative: Sequence[str] = (),
            cwd: str = "") -> list[tuple[str, str]]:
    """On a worker: ``(path, problem)`` for each of ``read`` it does not see and each
    folder of ``write`` it does not see or cannot write into; and for each of
    ``relative`` (paths as given, relative to this machine's ``cwd``), ``"in FOLDER"``
    when the worker runs in another folder, where it would open them."""
    problems = [(p, "missing") for p in read if not os.path.exists(p)]
    for folder in write:
        if not os.path.isdir(folder):
            problems.append((folder, "missing"))
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append((folder, "not writable"))
    here = os.getcwd()
    if relative and not _same_folder(here, cwd):
        problems += [(p, f"in {here}") for p in relative]
    return problems


def _same_folder(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one folder (a link to it included); False where ``b``
    does not exist here."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def nearest_folder(path: Path) -> Path:
    """The nearest existing folder at or above ``path``'s parent (where an output that does
    not exist yet will be made), as this machine sees it."""
    return nearest_existing(path.absolute().parent)


def _is_embedded(client: Any) -> bool:
    """Whether ``client``'s workers are this machine's own processes (the embedded cluster)."""
    try:
        from distributed import LocalCluster
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(getattr(client, "cluster", None), LocalCluster)


def check_workers_see(client: Any, inputs: Sequence[Path] = (),
                      outputs: Sequence[Path] = ()) -> None:
    """Refuse a run whose workers do not see ``inputs`` or cannot write where ``outputs``
    will be made (the nearest existing folder above each).

    Nothing is asked of the embedded cluster (its workers are this machine's processes) or
    of no cluster; a worker that cannot answer is left to the run.

    Raises
    ------
    InputError
        Naming the path, the worker's address and what is wrong, for the first such path;
        for a relative path, when a worker runs in another folder than this process (it
        would open the path there).
    """
    if client is None or _is_embedded(client):
        return
    paths = [*inputs, *outputs]
    relative = [str(p) for p in paths if not Path(p).is_absolute()]
    read = [str(Path(p).absolute()) for p in inputs]
    write = sorted({str(nearest_folder(Path(p))) for p in outputs})
    cwd = os.getcwd()
    try:
        found = client.run(_unseen, read, write, relative, cwd)
    except Exception:  # noqa: BLE001 - a worker that cannot answer is the run's to report
        return
    here = set(_unseen(read, write))  # what this machine lacks too is not the cluster's
    bad = {w: kept for w, problems in sorted(found.items())
           if (kept := [tuple(p) for p in problems if tuple(p) not in here])}
    if bad:
        worker, (path, problem) = next((w, p[0]) for w, p in bad.items())
        others = f" ({len(bad) - 1} other worker(s) too)" if len(bad) > 1 else ""
        if problem.startswith("in "):
            raise InputError(
                f"{path}: a relative path, but the worker {worker}{others} runs "
                f"{problem} (this command in {cwd}) and would open it there: give the "
                "absolute path")
        what = "does not see it" if problem == "missing" else "cannot write into it"
        raise InputError(
            f"{path}: the worker {worker}{others} {what}, though this machine can: every "
            "worker must see the inputs and outputs under the same path (a shared file "
            "system; in containers, the same mounts at the same place)")
