"""Workers paused at their memory limit: relief on the workers, a watch on the run.

dask pauses a worker whose process memory passes a share of its memory limit
(``distributed.worker.memory.pause``, 80 % by default) and lets it run tasks again once
below. A worker whose own memory stays above that share (its imports, its chunk cache, the
freed buffers glibc keeps) never runs another task: a ``segment`` of 128³ blocks on two
workers of 250 MiB sat at 3 of 27 blocks for five minutes without a word (both paused at
206-222 MiB). :func:`register_pause_relief` makes a paused worker drop what it can
make again (decoded chunks) and hand glibc's freed memory back while paused: that run
then took 4.5-4.8 s (three runs). Where that is not enough, :class:`StallWatch` notices
the stalled cluster and says so, with the figures that explain it.

A cluster can stall in ways only its deployment sees (SLURM jobs that end before their
worker joins: :mod:`engine.slurmjobs`); the deployment adds a check of its own for the
runs on its client (:func:`cluster_check`), and the same watch stops the run with its
message.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from engine.errors import OptionError

#: how long every worker may stay paused, with nothing running and no block finishing,
#: before the run stops (seconds; ``VOXELMILL_STALL_S`` overrides it)
STALL_S = 120.0
STALL_ENV = "VOXELMILL_STALL_S"
#: how often the scheduler is asked about its workers (one round trip)
POLL_S = 2.0


#: a check of a cluster's own: the scheduler's workers in, a reason to stop the run or None
Check = Callable[[dict[str, Any]], "str | None"]
#: the checks of the clients whose context (:func:`cluster_check`) is entered, by id
_CHECKS: dict[int, list[Check]] = {}


@contextmanager
def cluster_check(client: Any, check: Check) -> Iterator[None]:
    """While entered, every :class:`StallWatch` on ``client`` also calls ``check`` with the
    scheduler's workers (``scheduler_info()["workers"]``) at each look; a message it
    returns stops the run with that message. A check that raises is not asked again."""
    checks = _CHECKS.setdefault(id(client), [])
    checks.append(check)
    try:
        yield
    finally:
        checks.remove(check)
        if not checks:
            del _CHECKS[id(client)]


def stall_seconds() -> float:
    """:data:`STALL_S`, or ``VOXELMILL_STALL_S`` when set (a positive number of seconds)."""
    text = os.environ.get(STALL_ENV)
    if text is None:
        return STALL_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise OptionError(f"{STALL_ENV}={text!r}: expected a positive number of seconds")
    return value


def _trim_heap() -> None:
    """Give the memory glibc holds freed back to the system (``malloc_trim``; the embedded
    and deployed workers let it keep up to 256 MiB, for speed); nothing elsewhere."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def register_pause_relief(client: Any, every_s: float = 0.25) -> None:
    """Install on every worker of ``client``'s cluster (also those that join later) a check
    every ``every_s`` seconds: while paused, a worker empties its chunk cache and trims its
    heap, so that its memory can fall back under dask's pause share. A scheduler refusing
    plugins only goes without."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class PauseRelief(WorkerPlugin):
        name = "voxelmill-pause-relief"

        def setup(self, worker: Any) -> None:
            from distributed.core import Status
            from tornado.ioloop import PeriodicCallback

            from engine.io import chunkcache

            def check() -> None:
                # again at every check while paused: a task that ends meanwhile frees its
                # buffers, which glibc keeps until trimmed
                if worker.status == Status.paused:
                    chunkcache.clear()
                    _trim_heap()

            callback = PeriodicCallback(check, every_s * 1000)
            worker.periodic_callbacks[self.name] = callback
            callback.start()

        def teardown(self, worker: Any) -> None:
            callback = worker.periodic_callbacks.pop(self.name, None)
            if callback is not None:
                callback.stop()

    try:
        client.register_plugin(PauseRelief())
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def mib(nbytes: float) -> str:
    """``nbytes`` as whole MiB, for messages (``"250 MiB"``)."""
    return f"{nbytes / 2**20:.0f} MiB"


def all_paused(workers: dict[str, Any]) -> str | None:
    """When every worker of ``workers`` (``scheduler_info()["workers"]``) is paused and none
    runs a task, their memory against their limits (``"220 MiB of 250 MiB"``, the fullest
    worker's); else None (no worker at all is not a stall: see ``no-workers-timeout``)."""
    if not workers or any(w.get("status") != "paused" for w in workers.values()):
        return None
    if any(w.get("metrics", {}).get("task_counts", {}).get("executing", 0)
           for w in workers.values()):
        return None
    fullest = max(workers.values(), key=lambda w: w.get("metrics", {}).get("memory", 0))
    memory = fullest.get("metrics", {}).get("memory", 0)
    limit = fullest.get("memory_limit") or 0
    return f"{mib(memory)} of {mib(limit)}" if limit else mib(memory)


class StallWatch:
    """Watches a run from a thread of its own while it is entered: once every worker has
    been paused (:func:`all_paused`) for ``stall_s`` seconds with no block finishing
    (:meth:`progress` not called), or once a check of the cluster's own
    (:func:`cluster_check`) gives a reason, it sets :attr:`message` and calls ``wake``
    (which must make the run's waiting loop look at it). A failed poll (a scheduler going
    away) is left to the run.

    Parameters
    ----------
    client : distributed.Client
        The run's cluster.
    wake : callable
        Called once, from the watch's thread, when the run should stop.
    stall_s : float, optional
        Default :func:`stall_seconds`.
    poll_s : float
        Seconds between two looks at the workers.
    """

    def __init__(self, client: Any, wake: Callable[[], None], stall_s: float | None = None,
                 poll_s: float = POLL_S) -> None:
        self.client = client
        self.wake = wake
        self.stall_s = stall_seconds() if stall_s is None else stall_s
        self.poll_s = poll_s
        self.message: str | None = None
        self._last = time.monotonic()
        self._paused_since: float | None = None
        self._broken: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="voxelmill-stall-watch",
                                        daemon=True)

    def progress(self) -> None:
        """A block finished: the run is not stalled."""
        self._last = time.monotonic()

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 30)

    def _stop_with(self, message: str) -> None:
        self.message = message
        self.wake()

    def _checked(self, workers: dict[str, Any]) -> str | None:
        """The first reason a cluster check of this client gives; a check that raised is
        dropped (a bug in it must not stop a run that is going well)."""
        for check in list(_CHECKS.get(id(self.client), ())):
            if id(check) in self._broken:
                continue
            try:
                message = check(workers)
            except Exception:  # noqa: BLE001 - see the docstring
                self._broken.add(id(check))
                continue
            if message is not None:
                return message
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                workers = self.client.scheduler_info()["workers"]
            except Exception:  # noqa: BLE001 - a lost scheduler: the run reports that
                return
            if (message := self._checked(workers)) is not None:
                self._stop_with(message)
                return
            memory = all_paused(workers)
            now = time.monotonic()
            if memory is None:
                self._paused_since = None
                continue
            if self._paused_since is None:
                self._paused_since = now
            since = max(self._paused_since, self._last)
            if now - since >= self.stall_s:
                self._stop_with(
                    f"every worker has been paused at its memory limit for {now - since:.0f} s "
                    f"with no block finishing ({memory}; dask pauses a worker near its limit "
                    "and it never came back under): give the workers more memory "
                    "(--memory-limit, or a SLURM job's memory for fewer workers) or use a "
                    "smaller --block")
                return
