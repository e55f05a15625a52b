"""Obtaining a ``distributed.Client``: an embedded ``LocalCluster`` or an existing scheduler."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import ClusterLost, OptionError, VoxelmillError
from engine.slurmjobs import EndedJobs, FailedStarts, queued
from engine.stall import cluster_check, register_pause_relief


@dataclass(frozen=True)
class ClusterOptions:
    """How to get workers.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://HOST:PORT``); when given, no local
        cluster is started and the other fields are ignored.
    workers : int, optional
        Worker processes of the embedded cluster (default: one per 4 cores, at least 1, or
        one per core with ``gil_bound``; with ``threads_per_worker`` alone, as many as fill
        the cores; see :func:`local_cluster_shape`).
    threads_per_worker : int, optional
        Threads per worker (default: the cores divided among the workers).
    memory_limit : str, optional
        Memory limit per worker, e.g. ``"4GiB"`` (default: dask's share of the RAM).
    cluster : {"local", "slurm"}
        ``slurm``: workers are SLURM jobs (dask-jobqueue's ``SLURMCluster``), configured by
        ``jobqueue_config``.
    jobs : int, optional
        SLURM jobs to start (with ``adaptive``: the most to scale up to).
    gpus_per_job : int
        GPUs per SLURM job: ``--gres=gpu:K`` and K workers in the job, each with
        ``--resources GPU=1``.
    jobqueue_config : str, optional
        YAML file in dask-jobqueue's configuration layout (``jobqueue: slurm: {...}``).
    adaptive : bool
        Scale the SLURM jobs between 0 and ``jobs`` with the work.
    tls : str, optional
        Folder made by ``voxelmill cluster certs`` (see :mod:`engine.security`): every
        connection between client, scheduler and workers uses TLS with mutual
        authentication. ``scheduler`` must then be a ``tls://`` address; the embedded cluster
        and the SLURM workers listen on ``tls://``.
    dashboard_address : str
        Where the embedded cluster's dashboard listens; the default binds to this machine
        only (``0.0.0.0:8787`` opens it to the network).
    gpus : str, optional
        ``N`` or ``auto`` (every GPU this machine has): the embedded cluster starts one GPU
        worker per device beside the CPU workers, each seeing its device alone
        (``CUDA_VISIBLE_DEVICES``) and advertising ``GPU=1``.
    worker_timeout : float
        Seconds to wait for the first SLURM worker to join before giving up (its jobs are
        cancelled), and the longest a run waits with no worker at all once started (jobs
        that ended are replaced meanwhile; see :func:`no_workers_timeout`); 0 waits
        forever. Not applied with ``adaptive`` (jobs start with work).
    insecure_dashboard : bool
        Allow a ``dashboard_address`` beyond this machine without ``tls`` (plain HTTP that
        anyone on the network can read).
    cpu_gpu_workers : bool
        With ``gpus``: the ``GPU=1`` workers hold no device (``CUDA_VISIBLE_DEVICES`` empty)
        and ``N`` is not checked against the devices: ``voxelmill train --gpus N --device
        cpu``, N data-parallel ranks on the CPU (gloo).
    gil_bound : bool
        The command's block tasks hold the GIL for much of their work (classic
        segmentation and filters): the embedded cluster's default is then one
        single-threaded worker per core instead of a few workers with several threads.
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None
    cluster: str = "local"
    jobs: int | None = None
    gpus_per_job: int = 0
    jobqueue_config: str | None = None
    adaptive: bool = False
    tls: str | None = None
    dashboard_address: str = "127.0.0.1:8787"
    gpus: str | None = None
    worker_timeout: float = 120.0
    insecure_dashboard: bool = False
    cpu_gpu_workers: bool = False
    gil_bound: bool = False


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def local_cluster_shape(options: ClusterOptions, cores: int | None = None
                        ) -> tuple[int, int]:
    """Workers and threads per worker for the embedded cluster on ``cores`` cores (default:
    this process's).

    Unless the options say otherwise: one worker per four cores (at least one), the cores
    shared out as its threads; with ``gil_bound``, one single-threaded worker per core.
    Given only ``threads_per_worker``, as many workers as fill the cores.

    Classic segmentation's block tasks hold the GIL for much of their work, so threads of
    one worker wait for each other: on two cores ``segment`` 384³ in 64³ blocks ran at
    17.2 Mvox/s with 2 × 1 against 13.1 with 1 × 2 (``bench_scale.py``). Threads suit
    torch, whose kernels use every thread of their worker (a prediction of one block on two
    cores: 0.39 Mvox/s with 1 × 2, 0.29 with 2 × 1), and conversion, whose reads,
    compression and writes release the GIL (1024³: 1 × 2 2.61 and 2.65 times ome-zarr-py,
    2 × 1 2.43 and 2.56).
    """
    cores = cores or _cores()
    if options.workers:
        workers = options.workers
    elif options.threads_per_worker:
        workers = max(1, cores // options.threads_per_worker)
    elif options.gil_bound:
        workers = cores
    else:
        workers = max(1, cores // 4)
    threads = options.threads_per_worker or max(1, cores // workers)
    if workers < 1 or threads < 1:
        raise OptionError(f"--workers ({workers}) and --threads-per-worker ({threads}) must be ≥ 1")
    return workers, threads


#: worker threads of an embedded GPU worker: the blocks it holds at once
GPU_WORKER_THREADS = 3


def gpu_count(gpus: str | None) -> int:
    """The GPU workers ``--gpus`` asks for: ``auto`` is every visible CUDA device (0
    without torch or CUDA); ``N`` must not exceed them."""
    if gpus in (None, "", "0"):
        return 0
    try:
        import torch

        available = torch.cuda.device_count()
    except ImportError:
        available = 0
    if gpus == "auto":
        return available
    try:
        n = int(str(gpus))
    except ValueError:
        raise OptionError(f"--gpus {gpus!r}: a number of GPUs or auto") from None
    if n < 0:
        raise OptionError(f"--gpus {n}: must be ≥ 0 (or auto)")
    if n > available:
        raise OptionError(f"--gpus {n}: this machine has {available} CUDA device(s)"
                          + ("" if available else " (or torch has no CUDA support)"))
    return n


def _cpu_ranks(gpus: str | None) -> int:
    """``--gpus N`` for ``GPU=1`` workers without a device (see ``cpu_gpu_workers``)."""
    if gpus in (None, ""):
        return 0
    try:
        n = int(str(gpus))
    except ValueError:
        raise OptionError(f"--gpus {gpus!r}: a number of workers with --device cpu") from None
    if n < 0:
        raise OptionError(f"--gpus {n}: must be ≥ 0")
    return n


NO_DASHBOARD = "none"
"""``--dashboard-address none``: run without a dashboard (nor its bokeh import)."""


def dashboard_listen(address: str) -> str | None:
    """What distributed takes as ``dashboard_address``: None for :data:`NO_DASHBOARD`."""
    return None if address.strip().lower() == NO_DASHBOARD else address


def _embedded(workers: int, threads: int, gpus: int, kwargs: dict[str, object],
              dashboard_address: str, devices: bool = True) -> object:
    """A ``LocalCluster``, or with ``gpus`` a ``SpecCluster`` of the same CPU workers plus
    one GPU worker per device."""
    from distributed import LocalCluster

    dashboard = dashboard_listen(dashboard_address)
    if not gpus:
        return LocalCluster(
            n_workers=workers, threads_per_worker=threads, processes=True, host="127.0.0.1",
            dashboard_address=dashboard, silence_logs=40, **kwargs,
        )
    from distributed import Nanny, Scheduler, SpecCluster

    security = kwargs.get("security")
    common: dict[str, object] = {"host": "127.0.0.1", "silence_logs": 40}
    if security is not None:
        common.update(security=security, protocol="tls://")
    for key in ("memory_limit", "local_directory"):
        if key in kwargs:
            common[key] = kwargs[key]
    specs: dict[str, dict[str, object]] = {
        f"cpu{i}": {"cls": Nanny, "options": {**common, "nthreads": threads}}
        for i in range(workers)}
    for i in range(gpus):
        specs[f"gpu{i}"] = {"cls": Nanny, "options": {
            **common, "nthreads": GPU_WORKER_THREADS, "resources": {"GPU": 1},
            "env": {"CUDA_VISIBLE_DEVICES": str(i) if devices else ""}}}
    scheduler = {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "dashboard_address": dashboard,
        **({"security": security, "protocol": "tls://"} if security is not None else {})}}
    return SpecCluster(workers=specs, scheduler=scheduler, security=security,
                       silence_logs=40)


def _user_error_names() -> tuple[str, ...]:
    found, todo = [], [VoxelmillError]
    while todo:
        cls = todo.pop()
        found.append(f"{cls.__name__}(")
        todo.extend(cls.__subclasses__())
    return tuple(found)


class QuietUserErrors(logging.Filter):
    """Drops a worker's "Compute Failed" log record (with its traceback) for a user error
    (:class:`~engine.errors.VoxelmillError`): the command reports it as its one message,
    a stack trace of bad input is noise. On the embedded cluster's workers (``embedded``)
    it also drops the heartbeat failure logged when the command ends while a heartbeat is
    in flight. Other failures are logged as before."""

    def __init__(self, embedded: bool = False) -> None:
        super().__init__()
        self.embedded = embedded

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if self.embedded and msg.startswith("Failed to communicate with scheduler"):
            # an embedded cluster's scheduler lives in the command's process: losing it
            # means the command is ending (a user error shuts the cluster down while a
            # heartbeat is in flight), and its traceback would follow the one message
            return False
        if not msg.startswith("Compute Failed") or not isinstance(record.args, tuple):
            return True
        text = str(record.args[3]) if len(record.args) > 3 else ""
        return not text.startswith(_user_error_names())


class QuietLostScheduler(logging.Filter):
    """Drops what ``distributed.client`` logs when it gives up on a lost scheduler (its
    "Failed to reconnect" line and the tracebacks of the tasks its closing cancels): the
    command reports the loss as its one message (:class:`~engine.errors.ClusterLost`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        if str(record.msg).startswith("Failed to reconnect to scheduler"):
            return False
        return not (record.exc_info and record.exc_info[0] is not None
                    and issubclass(record.exc_info[0], asyncio.CancelledError))


def _worker_plugins(client: Any, embedded: bool = False) -> None:
    """What every cluster's workers get: quiet user errors, relief when paused."""
    _quiet_worker_logs(client, embedded)
    register_pause_relief(client)


def _quiet_worker_logs(client: Any, embedded: bool = False) -> None:
    """Install :class:`QuietUserErrors` on every worker, also those that join later
    (``embedded``: the command's own local workers, whose logs reach its console)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class _Plugin(WorkerPlugin):
        name = "voxelmill-quiet-user-errors"

        def setup(self, worker: Any) -> None:
            logger = logging.getLogger("distributed.worker")
            if not any(isinstance(f, QuietUserErrors) for f in logger.filters):
                logger.addFilter(QuietUserErrors(embedded))

    try:
        client.register_plugin(_Plugin())
    except Exception:  # noqa: BLE001 - a scheduler refusing plugins only keeps the noise
        pass


@contextmanager
def connect(
    options: ClusterOptions | None = None,
    report: Callable[[str], None] | None = None,
) -> Iterator[object]:
    """Yield a ``distributed.Client`` for the duration of a command.

    Prints the dashboard link through ``report`` (stderr by default), so a user can
    watch the run in the Dask dashboard. While the client lives, the objects this process
    held when it connected are left out of full garbage collections (:func:`frozen_heap`).
    """
    import dask
    from distributed import Client

    options = options or ClusterOptions()
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    if options.cluster not in CLUSTER_KINDS:
        raise OptionError(f"--cluster {options.cluster!r}: expected one of "
                          f"{', '.join(CLUSTER_KINDS)}")
    security = None
    if options.tls:
        from engine.security import load_security

        if options.scheduler and not options.scheduler.startswith("tls://"):
            raise OptionError(
                f"--scheduler {options.scheduler!r}: with --tls the scheduler address must "
                "start with tls:// (a scheduler started with --tls-ca-file/--tls-cert/--tls-key)"
            )
        # the embedded cluster (and the SLURM scheduler running here) needs the scheduler's
        # and the workers' certificates too; a client of a remote scheduler only its own
        embedded = options.cluster == "slurm" or not options.scheduler
        security = load_security(Path(options.tls), "client",
                                 require=("scheduler", "worker") if embedded else ())
    if options.cluster == "slurm":
        check_dashboard_address(options)
        with dask.config.set(_dashboard_tls(options, security)), \
                slurm_client(options, security, report) as client:
            check_worker_versions(client, f"--jobqueue-config {options.jobqueue_config}")
            hint = _gil_hint(client, options)  # the jobqueue file's processes: N
            if hint:
                report(hint)
            _worker_plugins(client)
            prompt_sends(client)
            with frozen_heap():
                yield client
        return
    if options.scheduler:
        if not options.scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            raise OptionError(
                f"--scheduler {options.scheduler!r} is not a scheduler address; "
                "expected something like tcp://10.0.0.5:8786"
            )
        try:
            client = Client(options.scheduler, timeout="10s", security=security)
        except OSError as exc:
            raise OptionError(
                f"cannot reach the scheduler at {options.scheduler}: {exc}"
            ) from None
        report(f"connected to scheduler {options.scheduler}; dashboard: {client.dashboard_link}")
        try:
            check_worker_versions(client, f"--scheduler {options.scheduler}")
        except OptionError:
            client.close()
            raise
        for hint in (worker_settings_hint(client), _gil_hint(client, options)):
            if hint:
                report(hint)
        _worker_plugins(client)
        prompt_sends(client)
        quiet = QuietLostScheduler()
        client_log = logging.getLogger("distributed.client")
        client_log.addFilter(quiet)
        try:
            with frozen_heap():
                yield client
        except Exception as exc:
            if isinstance(exc, VoxelmillError) or client.status == "running":
                raise
            # the scheduler is gone (killed, restarted, its machine down) and the client
            # gave up reconnecting: every task with it; what the workers finished stays
            raise ClusterLost(
                f"lost the connection to the scheduler at {options.scheduler}; the finished "
                "blocks are kept: run the same command again to resume once it is back"
            ) from None
        finally:
            client.close()
            client_log.removeFilter(quiet)
        return

    check_dashboard_address(options)
    # the dashboard's TLS settings stay set while the client lives: its link says https
    with dask.config.set(_dashboard_tls(options, security)), \
            _local_client(options, security, report) as client:
        _worker_plugins(client, embedded=True)
        prompt_sends(client)
        with frozen_heap():  # the scheduler's and the nannies' heap, after their start
            yield client


#: distributed keeps, "for developers", the last N transitions, events per topic and message
#: batches of every connection (``distributed.admin.low-level-log-length``, default 1000);
#: the embedded scheduler and this client live in this process, where the batches of task
#: messages and key releases that a long pass sends held tens of MiB (issue 17's grid soak)
LOW_LEVEL_LOG_LENGTH = 50

#: samples of the system monitor (CPU, memory, network every 500 ms) kept for the
#: dashboard's history (``distributed.admin.system-monitor.log-length``, default 7200: an
#: hour, which the embedded scheduler's process held whatever the run's length): 6 minutes
SYSTEM_MONITOR_SAMPLES = 720

#: distributed's event loops "tick" every 20 ms (to warn of a loop blocked for seconds) and
#: each worker samples its threads for the dashboard's profile every 10 ms: both take the
#: GIL from a running task, and the client process (scheduler and nannies) woke ~190 times a
#: second doing nothing. Measured on 2 cores with both at 100 ms: a GIL-bound task 5-7 %
#: faster, segment 384³ on one worker 6.5 % faster (2 workers: 1 %), the idle client at
#: 0.02 instead of 0.05 CPU-seconds a second (the warning still fires; the profile keeps
#: 10 samples a second). Set where the configuration keeps distributed's defaults.
LIGHTER_LOOPS = {"distributed.admin.tick.interval": ("20ms", "100ms"),
                 "distributed.worker.profile.interval": ("10ms", "100ms")}

#: The periodic callbacks every distributed server runs that an embedded cluster's nannies
#: only repeat: they share this process and its event loop with the scheduler, whose own
#: ``monitor`` (this process's CPU, memory, file descriptors, host network and disk
#: counters, every 500 ms), ``tick``/``ticks`` (the loop's latency and its "unresponsive"
#: warning) and ``shift_counters`` measure the same process and loop. Sixteen nannies ran
#: 16 copies of each: stopped, the client process of 16 workers × 1 thread used 0.068
#: instead of 0.088 CPU-seconds a second idle, and 1.53-1.65 instead of 1.70-1.78
#: CPU-seconds during a 384³ ``segment`` (2 cores). The nannies' ``memory_monitor`` (each
#: restarts its worker past the terminate threshold) keeps running.
NANNY_DUPLICATES = ("monitor", "tick", "ticks", "shift_counters")

#: distributed batches what a connection sends: the client's messages to the scheduler wait
#: up to 10 ms after its last send (hard-coded in ``Client``), the scheduler's to each worker
#: up to 5 ms. Between two passes that is latency every thread waits through: the last
#: results are released and the next pass submitted within a few milliseconds, so its
#: tasks reached the scheduler 13 ms after ``Client.map`` (2 workers, idle) and their
#: workers later still. Sent at most every 2 ms (a worker's own interval to the scheduler),
#: a 512³ ``segment`` spent 0.59 s instead of 0.72 s with no task running anywhere on one
#: worker, 0.33 s instead of 0.37 s on two (``bench_scale.py`` ``idle_s``, 2 cores).
SEND_INTERVAL_S = 0.002

#: dask's ``key_split`` (task key -> prefix, called by the scheduler for every new task)
#: keeps its last 100,000 keys in an ``lru_cache``: in the embedded scheduler's process
#: that held every task key of a pass, ~0.3 KiB each with the heap they pinned (issue 17's
#: grid soak grew by it up to 10⁵ tasks); emptied this often (seconds), it holds the keys
#: of the last few seconds' tasks
KEY_CACHE_CLEAR_S = 2.0


def lighter_loops() -> dict[str, str]:
    """The :data:`LIGHTER_LOOPS` settings whose configured value is distributed's
    default (a value the user configured is kept), for ``dask.config.set``."""
    import dask
    import distributed  # noqa: F401 - its configuration defaults are read here
    from dask.utils import parse_timedelta

    return {key: ours for key, (default, ours) in LIGHTER_LOOPS.items()
            if parse_timedelta(dask.config.get(key)) == parse_timedelta(default)}


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects alive now out of the garbage collector's full collections
    (``gc.freeze``) while the block runs; put them back afterwards.

    The command's process holds the scheduler and the nannies of an embedded cluster
    (~180,000 objects after one ``segment``: imports, the dashboard): a full collection
    walked them all, ~120 ms with every task message waiting (both workers idled through
    it on 2 cores; 17 ms frozen). Reference counting still frees them; only cycles among
    them wait for the end of the block, when they are collected as before."""
    import gc

    frozen = gc.get_freeze_count() == 0  # an outer block froze them already
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


def bound_key_cache(scheduler: Any, every_s: float = KEY_CACHE_CLEAR_S) -> Any:
    """Empty dask's ``key_split`` cache every ``every_s`` seconds on ``scheduler``'s
    event loop, for as long as the scheduler runs (it stops its periodic callbacks when
    it closes). Its result is a cache: emptying it changes no prefix, only what is kept.

    Returns
    -------
    tornado.ioloop.PeriodicCallback
        The callback (started on the scheduler's loop).
    """
    from dask.utils import key_split
    from tornado.ioloop import PeriodicCallback

    callback = PeriodicCallback(key_split.cache_clear, every_s * 1000)
    scheduler.periodic_callbacks["voxelmill-key-split-cache"] = callback
    scheduler.loop.add_callback(callback.start)  # a PeriodicCallback starts on its loop
    return callback


def quiet_nannies(cluster: Any) -> None:
    """Stop the :data:`NANNY_DUPLICATES` callbacks of an embedded cluster's nannies (which
    live in this process), on the cluster's event loop. A nanny started later (a replaced
    worker) keeps its own: they cost, they do no harm."""
    from distributed import Nanny
    from distributed.utils import sync

    callbacks = [pc for nanny in cluster.workers.values() if isinstance(nanny, Nanny)
                 for name, pc in nanny.periodic_callbacks.items() if name in NANNY_DUPLICATES]

    async def stop() -> None:  # a PeriodicCallback is stopped on its own loop
        for pc in callbacks:
            pc.stop()

    sync(cluster.loop, stop)


def prompt_sends(client: Any, interval: float = SEND_INTERVAL_S) -> None:
    """Let ``client``'s messages to the scheduler go out at most ``interval`` seconds apart
    (:data:`SEND_INTERVAL_S`), and, when its scheduler runs in this process (the embedded
    cluster, a SLURM cluster's scheduler), the scheduler's to its workers, those that join
    later too (a scheduler plugin). A client that reconnects batches as distributed does
    again."""
    from distributed.diagnostics.plugin import SchedulerPlugin
    from distributed.utils import sync

    if client.scheduler_comm is not None:
        client.scheduler_comm.interval = interval
    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "stream_comms"):
        return  # a remote scheduler: not ours to tune

    class PromptSends(SchedulerPlugin):  # here: distributed is imported when it is used
        name = "voxelmill-prompt-sends"

        def add_worker(self, scheduler: Any, worker: str) -> None:
            stream = scheduler.stream_comms.get(worker)
            if stream is not None:
                stream.interval = interval

    async def install() -> None:  # on the scheduler's loop, where its streams are used
        plugin = PromptSends()
        scheduler.add_plugin(plugin)
        for worker in list(scheduler.stream_comms):
            plugin.add_worker(scheduler, worker)

    sync(scheduler.loop, install)


@contextmanager
def _worker_environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment while the embedded cluster spawns its
    workers (a variable the user set is kept), as before afterwards.

    distributed takes a pre-spawn variable from the environment before its configuration,
    and each nanny writes its variables into the environment: without the restore the
    first cluster's values would be every later cluster's in this process."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if before[k] is None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def allocator_environ(threads: int) -> dict[str, str]:
    """glibc's allocator settings of an embedded worker process with ``threads`` task
    threads (environment variables, read when a process starts).

    distributed's default ``MALLOC_TRIM_THRESHOLD_`` also pins glibc's mmap threshold low,
    so every block-sized buffer is fresh memory faulted in page by page; a high threshold
    lets glibc reuse it (measured: ~1.4× faster conversion, ~200 MiB more per worker).
    glibc gives each thread that allocates its own arena (zarr's decoding threads, the
    event loop's), each keeping its own freed buffers: one arena per task thread shares
    them (measured on segment 384³: ~130 MiB less touched per worker, ~10 % faster)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
            "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
            "MALLOC_ARENA_MAX": str(threads)}


def cache_environ(memory_limit: str | None, threads: int) -> dict[str, str]:
    """The chunk cache size of the embedded cluster's workers (``VOXELMILL_CHUNK_CACHE_MIB``,
    :func:`engine.io.chunkcache.cache_mib_for` of their memory limit: ``memory_limit``, or
    distributed's ``auto`` share for ``threads`` threads); none when this process's
    environment sets it already (the workers inherit it)."""
    from dask.utils import parse_bytes
    from distributed.system import MEMORY_LIMIT

    from engine.io.chunkcache import CACHE_ENV, cache_mib_for

    if CACHE_ENV in os.environ:
        return {}
    if memory_limit:
        limit = parse_bytes(memory_limit) or None  # "0": no limit
    else:  # distributed's "auto": the machine's memory shared by threads
        limit = int(MEMORY_LIMIT * min(1.0, threads / _cores()))
    return {CACHE_ENV: f"{cache_mib_for(limit):g}"}


@contextmanager
def _local_client(options: ClusterOptions, security: object | None,
                  report: Callable[[str], None]) -> Iterator[object]:
    """A client of the embedded cluster, which lives as long as the client."""
    import dask
    from distributed import Client

    workers, threads = local_cluster_shape(options)
    gpus = _cpu_ranks(options.gpus) if options.cpu_gpu_workers else gpu_count(options.gpus)
    # the workers' scratch (spill files, their locks) in a folder of this run, removed with
    # the cluster: dask's default, $TMPDIR/dask-scratch-space, stays behind after every run
    # (the name keeps "dask-scratch-space" so distributed uses the folder as it is)
    scratch = tempfile.mkdtemp(prefix="voxelmill-", suffix="-dask-scratch-space")
    kwargs: dict[str, object] = {"local_directory": scratch}
    if options.memory_limit:
        kwargs["memory_limit"] = options.memory_limit
    if security is not None:
        kwargs.update(protocol="tls://", security=security)
    worker_env = {**allocator_environ(max(threads, GPU_WORKER_THREADS if gpus else 1)),
                  **cache_environ(options.memory_limit, threads)}
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **worker_env}
    try:
        caps = {"distributed.admin.low-level-log-length": LOW_LEVEL_LOG_LENGTH,
                "distributed.admin.system-monitor.log-length": SYSTEM_MONITOR_SAMPLES,
                **lighter_loops()}
        with _worker_environ(worker_env), \
                dask.config.set({"distributed.nanny.pre-spawn-environ": environ,
                                 "temporary-directory": scratch, **caps}), \
                warnings.catch_warnings():
            # port 8787 taken (another cluster): distributed picks a free one; the link
            # says which
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
            # listen on this machine only: scheduler, workers and (by default) the dashboard
            cluster = _embedded(workers, threads, gpus, kwargs, options.dashboard_address,
                                devices=not options.cpu_gpu_workers)
        try:
            bound_key_cache(cluster.scheduler)
            quiet_nannies(cluster)
            with dask.config.set(caps):  # the client's own connection keeps its batches too
                client = Client(cluster, security=kwargs.get("security"))
            if gpus:
                client.wait_for_workers(workers + gpus)
            report(f"local cluster: {workers} worker(s) × {threads} thread(s)"
                   + (f" and {gpus} GPU worker(s)" if gpus else "")
                   + (f"; dashboard: {client.dashboard_link}"
                      if dashboard_listen(options.dashboard_address) else "; no dashboard"))
            try:
                yield client
            finally:
                client.close()
        finally:
            cluster.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def gpu_workers(client: object) -> list[str]:
    """Addresses of the workers that advertise ``GPU`` resources (``dask worker --resources
    GPU=1``)."""
    info = client.scheduler_info()["workers"]  # type: ignore[attr-defined]
    return sorted(a for a, w in info.items() if w.get("resources", {}).get("GPU", 0) >= 1)


CLUSTER_KINDS = ("local", "slurm")
#: fields a SLURM configuration must give (dask-jobqueue cannot guess them)
SLURM_REQUIRED = ("cores", "memory")


def slurm_settings(options: ClusterOptions) -> dict[str, object]:
    """``SLURMCluster`` keyword arguments from the jobqueue YAML plus the GPU options.

    Without ``processes`` in the file, a job's cores are shared out as the embedded
    cluster's would be (:func:`local_cluster_shape`): one single-threaded worker per core
    for a ``gil_bound`` command, else one worker per four cores; ``--gpus-per-job K``
    makes K workers.

    The file follows dask-jobqueue's configuration layout::

        jobqueue:
          slurm:
            cores: 8
            memory: 32GiB
            queue: gpu
            account: mylab
            walltime: "04:00:00"
            job_extra_directives: ["--constraint=a100"]

    Raises
    ------
    OptionError
        For a missing or unreadable file, a missing ``jobqueue.slurm`` section or required
        field, or no ``--jobs``.
    """
    from engine.errors import InputError
    from engine.yamlfile import read_yaml

    if not options.jobqueue_config:
        raise OptionError("--cluster slurm needs --jobqueue-config FILE.yaml (dask-jobqueue's "
                          "layout: jobqueue: slurm: {cores, memory, queue, account, walltime})")
    if not options.jobs or options.jobs < 1:
        raise OptionError("--cluster slurm needs --jobs N (N ≥ 1): the number of SLURM jobs")
    path = Path(options.jobqueue_config)
    if not path.is_file():
        raise OptionError(f"--jobqueue-config {path}: no such file")
    try:
        raw = read_yaml(path, str(path), "jobqueue configuration")
    except InputError as exc:
        raise OptionError(str(exc)) from None
    section = (raw or {}).get("jobqueue", {}).get("slurm") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise OptionError(f"{path}: no jobqueue: slurm: section (dask-jobqueue's layout)")
    missing = [k for k in SLURM_REQUIRED if section.get(k) in (None, "")]
    if missing:
        raise OptionError(f"{path}: jobqueue.slurm needs {', '.join(missing)}")
    settings = {k.replace("-", "_"): v for k, v in section.items()}
    if "name" in settings:  # the job's name in dask-jobqueue's file (its keyword: job_name)
        settings["job_name"] = settings.pop("name")
    directives = list(settings.pop("job_extra_directives", None) or [])
    worker_args = list(settings.pop("worker_extra_args", None) or [])
    cores = _count(path, settings, "cores")
    if options.gpus_per_job:
        # one worker per GPU, each GPU=1 (it picks its device by its index in the job, see
        # engine.predict.workers.worker_gpu_index): --gpus means the same everywhere
        if options.gpus_per_job > cores:
            raise OptionError(f"--gpus-per-job {options.gpus_per_job}: more than the "
                              f"{cores} cores of a job in {path} (a worker per GPU, each "
                              "needs a core)")
        directives.append(f"--gres=gpu:{options.gpus_per_job}")
        worker_args += ["--resources", "GPU=1"]
        settings["processes"] = options.gpus_per_job
    elif settings.get("processes") is None:
        # the embedded cluster's shape for the job's cores (dask-jobqueue's own default,
        # about √cores threads a worker, leaves GIL-bound block tasks waiting on each other)
        settings["processes"] = local_cluster_shape(
            ClusterOptions(gil_bound=options.gil_bound), cores)[0]
    elif _count(path, settings, "processes") > cores:
        raise OptionError(f"{path}: jobqueue.slurm processes ({settings['processes']}) is more "
                          f"than cores ({cores}): each worker needs a core")
    settings["job_extra_directives"] = directives
    settings["worker_extra_args"] = worker_args
    threads = job_shape(settings)[1]
    # the embedded cluster's worker settings, exported by the job script where the job's
    # environment does not set them already (a variable beats distributed's configuration)
    prologue = list(settings.pop("job_script_prologue", None) or [])
    settings["job_script_prologue"] = prologue + [
        f'export {name}="${{{name}:-{value}}}"'
        for name, value in job_worker_environ(threads).items()]
    return settings


def job_shape(settings: dict[str, object]) -> tuple[int, int]:
    """``(workers, threads each)`` of a job of :func:`slurm_settings` (dask-jobqueue's
    ``cores // processes`` threads)."""
    processes = int(str(settings["processes"]))
    return processes, max(1, int(str(settings["cores"])) // processes)


def _count(path: Path, settings: dict[str, object], key: str) -> int:
    """``settings[key]`` as a whole number ≥ 1 (an int, or digits in a string), else the
    one-line error naming the file."""
    value = settings[key]
    if isinstance(value, bool) or not (isinstance(value, int) or (
            isinstance(value, str) and value.strip().isdigit())) or int(value) < 1:
        raise OptionError(f"{path}: jobqueue.slurm {key} {value!r}: expected a whole number "
                          "≥ 1")
    return int(value)


def _jobqueue() -> Any:
    """The ``dask_jobqueue`` module, or the one-line error that says how to install it."""
    try:
        import dask_jobqueue
    except ImportError:
        raise OptionError("--cluster slurm needs dask-jobqueue: pip install dask-jobqueue"
                          ) from None
    return dask_jobqueue


def missing_worker_settings() -> list[str]:
    """On a worker: the allocator variables of :func:`allocator_environ` that its
    environment lacks (none where glibc is not the C library: they mean nothing there)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        return []
    return [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX") if k not in os.environ]


def check_worker_versions(client: Any, where: str) -> None:
    """Refuse a cluster whose workers cannot import voxelmill, or import another version.

    Asked before anything of voxelmill's is sent to them: a worker that cannot unpickle a
    voxelmill task or plugin closed on the first one, and the command then waited forever
    for a worker. ``where`` names the cluster in the message (``--scheduler tcp://…``).

    Raises
    ------
    OptionError
        Naming the first such worker and what it imports.
    """
    from engine import __version__

    def probe() -> str:  # a local function: sent by value, so the worker needs no voxelmill
        import engine

        return str(engine.__version__)

    try:
        found = client.run(probe, on_error="return")
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer: left to the run
        return
    for worker, got in sorted(found.items()):
        if isinstance(got, BaseException):
            raise OptionError(f"{where}: the worker {worker} cannot import voxelmill "
                              f"({type(got).__name__}: {got}); start the workers from an "
                              f"environment with voxelmill {__version__} installed")
        if got != __version__:
            raise OptionError(f"{where}: the worker {worker} runs voxelmill {got}, this "
                              f"machine {__version__}: every worker must import the same "
                              "version")


def _gil_hint(client: Any, options: ClusterOptions) -> str | None:
    """:func:`gil_threads_hint` for the workers that joined (none yet: no hint)."""
    if not options.gil_bound:
        return None
    try:
        return gil_threads_hint(client.scheduler_info()["workers"])
    except Exception:  # noqa: BLE001 - a scheduler that cannot answer only loses the hint
        return None


def worker_settings_hint(client: Any) -> str | None:
    """One line for a cluster whose workers were started without the allocator settings
    that the embedded cluster and the SLURM jobs give theirs, else None."""
    try:
        found = client.run(missing_worker_settings)
    except Exception:  # noqa: BLE001 - a worker that cannot answer only loses the hint
        return None
    missing = sorted({k for names in found.values() for k in names})
    if not missing:
        return None
    return (f"note: the workers were started without {', '.join(missing)} in their "
            "environment; started as the README says (Commands: workers you start yourself), "
            "segment ran ~1.7x faster on SLURM workers")


def gil_threads_hint(workers: dict[str, Any]) -> str | None:
    """One line for a GIL-bound command (``ClusterOptions.gil_bound``) given CPU workers
    with several threads (``workers``: ``Client.scheduler_info()["workers"]``), else None.

    Their threads mostly wait for each other's GIL: on two cores ``segment`` 384³ ran at
    15.2 Mvox/s as 2 × 1 and 12.0 as 1 × 2, and a worker of eight threads would keep little
    more than one core busy. GPU workers (``GPU`` resources) are left out.
    """
    threads = [int(w.get("nthreads", 1)) for w in workers.values()
               if not w.get("resources", {}).get("GPU")]
    if not threads or max(threads) < 2:
        return None
    return (f"note: this command's block tasks hold the GIL for much of their work and the "
            f"workers run {max(threads)} threads each, which mostly wait for each other: one "
            "single-threaded worker per core runs it faster (dask worker --nworkers CORES "
            "--nthreads 1; in a jobqueue file, leave processes out)")


def job_worker_environ(threads: int) -> dict[str, str]:
    """Environment variables that give worker processes started by a job script, with
    ``threads`` task threads each, what the embedded cluster gives its workers:
    :func:`allocator_environ`, and :data:`LIGHTER_LOOPS` where this process's dask
    configuration keeps distributed's defaults (as ``DASK_…`` configuration variables).

    A SLURM job's workers got neither: glibc's allocator as distributed sets it (every
    block-sized buffer faulted in afresh: ~1.4× slower conversion on the embedded cluster)
    and event loops waking every 10-20 ms."""
    env = dict(allocator_environ(threads))
    for key, value in lighter_loops().items():
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = value
    return env


def slurm_cluster(options: ClusterOptions, security: object | None = None,
                  settings: dict[str, object] | None = None) -> object:
    """A dask-jobqueue ``SLURMCluster`` (its scheduler runs here; workers are SLURM jobs).

    With ``security`` (a ``distributed.Security``) the scheduler and the workers use TLS with
    mutual authentication; the certificate folder must be on a file system the nodes see
    under the same path (the job script passes its files to ``dask worker``). ``settings``:
    :func:`slurm_settings`'s, when already read.
    """
    import dataclasses

    import dask

    settings = dict(settings or slurm_settings(options))
    if security is not None:
        settings.update(security=security, protocol="tls://")
    SLURMCluster = _jobqueue().SLURMCluster  # noqa: N806 - the class, as dask-jobqueue names it
    # the scheduler runs here: its dashboard follows --dashboard-address (this machine only
    # by default) unless the file or dask's configuration names one, which is checked too
    scheduler_options = {**(dask.config.get("jobqueue.slurm.scheduler-options", None) or {}),
                         **(settings.pop("scheduler_options", None) or {})}
    scheduler_options.setdefault("dashboard_address", options.dashboard_address)
    check_dashboard_address(dataclasses.replace(
        options, dashboard_address=str(scheduler_options["dashboard_address"])))
    if isinstance(scheduler_options["dashboard_address"], str):
        scheduler_options["dashboard_address"] = dashboard_listen(
            scheduler_options["dashboard_address"])
    settings["scheduler_options"] = scheduler_options
    try:
        return SLURMCluster(**settings)
    except (TypeError, ValueError) as exc:
        raise OptionError(f"{options.jobqueue_config}: {exc}") from None


def _is_loopback(address: str) -> bool:
    """Whether a ``HOST:PORT`` listening address binds to this machine only (``:8787`` and
    ``0.0.0.0:8787`` bind to every interface)."""
    import ipaddress

    host = address.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    if host.startswith("["):  # [::1]:8787
        host = host[1:host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1 or host.isdigit():
        host = host.rsplit(":", 1)[0] if ":" in host else ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface: reachable from elsewhere


def check_dashboard_address(options: ClusterOptions) -> None:
    """Refuse a dashboard open to the network in plain HTTP.

    The dashboard shows the cluster's tasks, logs and call stacks and needs no login; beyond
    this machine it is allowed with ``tls`` (served over HTTPS with the scheduler's
    certificate) or when the user accepts it with ``insecure_dashboard``.

    Raises
    ------
    OptionError
        For a non-loopback ``dashboard_address`` without either.
    """
    address = options.dashboard_address
    if (dashboard_listen(address) is None or _is_loopback(address) or options.tls
            or options.insecure_dashboard):
        return
    raise OptionError(
        f"--dashboard-address {address}: opens the dashboard (tasks, logs, call stacks; no "
        "login) to the network over plain HTTP; add --tls DIR to serve it over HTTPS, or "
        "--insecure-dashboard to accept that")


def dashboard_link(client: object, options: ClusterOptions) -> str:
    """The dashboard's URL as this machine reaches it: dask names the scheduler's host
    (reachable by the SLURM nodes), where a loopback-only dashboard does not answer."""
    from urllib.parse import urlsplit, urlunsplit

    if dashboard_listen(options.dashboard_address) is None:
        return "none"
    link = str(client.dashboard_link)  # type: ignore[attr-defined]
    if not _is_loopback(options.dashboard_address):
        return link
    parts = urlsplit(link)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{parts.port}")) if parts.port else link


def _dashboard_tls(options: ClusterOptions, security: object | None) -> dict[str, object]:
    """Dask settings that serve a dashboard opened beyond this machine over HTTPS, with the
    scheduler's certificate of ``--tls`` (none otherwise)."""
    if security is None or _is_loopback(options.dashboard_address):
        return {}
    prefix = "distributed.scheduler.dashboard.tls."
    return {prefix + "cert": security.tls_scheduler_cert,  # type: ignore[attr-defined]
            prefix + "key": security.tls_scheduler_key,  # type: ignore[attr-defined]
            prefix + "ca-file": security.tls_ca_file}  # type: ignore[attr-defined]


def check_slurm_submission(cluster: object, config: str) -> None:
    """Ask SLURM whether it would accept the worker job (``sbatch --test-only``), so a wrong
    partition, account, memory or GRES request is one clear error before any job exists.

    Raises
    ------
    OptionError
        Naming ``config`` and quoting SLURM's reason; or when ``sbatch`` is not on the PATH.
    """
    import subprocess

    if shutil.which("sbatch") is None:
        raise OptionError("--cluster slurm: sbatch is not on the PATH (run voxelmill where "
                          "SLURM jobs can be submitted, e.g. a login node)")
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="voxelmill-job-") as script:
        script.write(cluster.job_script())  # type: ignore[attr-defined]
        script.flush()
        try:
            res = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise OptionError(f"--cluster slurm: sbatch --test-only failed: {exc}") from None
    if res.returncode != 0:
        lines = [ln.removeprefix("sbatch: error: ").strip()
                 for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        reason = "; ".join(lines[-2:]) or f"exit code {res.returncode}"
        raise OptionError(f"{config}: SLURM refuses the worker job: {reason}")


def wait_for_slurm_workers(client: object, cluster: object, timeout: float,
                           config: str | None = None,
                           report: Callable[[str], None] | None = None) -> None:
    """Wait until the first SLURM worker joins (the others join as their jobs start);
    ``report`` is told what SLURM holds the jobs for when that takes a while.

    Raises
    ------
    OptionError
        When none joined within ``timeout`` seconds (0: wait forever), naming the jobs and
        why SLURM holds them; at once when every job has ended before its worker joined
        (a job script that fails at start), with SLURM's state of the job and the last
        line it wrote (``config``: the jobqueue file, named as where to look).
    """
    import time

    ended = EndedJobs(cluster, config, grace_s=0.0, every_s=2.0, report=report)
    deadline = time.monotonic() + timeout if timeout > 0 else float("inf")
    while not (workers := client.scheduler_info()["workers"]):  # type: ignore[attr-defined]
        if (why := ended(workers)) is not None:
            raise OptionError(f"--cluster slurm: {why}")
        if time.monotonic() > deadline:
            jobs = list(ended.jobs().values())
            states = queued(jobs) or {}
            raise OptionError(
                f"--cluster slurm: no worker joined within {timeout:g} s (--worker-timeout); "
                + (f"jobs: {', '.join(f'{j} {s}' for j, s in states.items())}" if states else
                   f"jobs {', '.join(jobs) or '(none submitted)'} no longer queued")
                + "; cancelled them")
        time.sleep(0.5)


def no_workers_timeout(options: ClusterOptions) -> dict[str, str]:
    """The scheduler setting that fails a run's waiting tasks once the cluster has had no
    worker for ``options.worker_timeout`` seconds (the runner turns that into
    :class:`~engine.errors.ClusterLost`: one line, the finished blocks kept), for a SLURM
    cluster of fixed size; none with ``adaptive`` (no job while there is no work, and jobs
    that wait in the queue once there is), with ``worker_timeout`` 0, or where dask's
    configuration already sets one."""
    import dask

    if (options.adaptive or options.worker_timeout <= 0
            or dask.config.get("distributed.scheduler.no-workers-timeout", None) is not None):
        return {}
    return {"distributed.scheduler.no-workers-timeout": f"{options.worker_timeout:g}s"}


@contextmanager
def slurm_client(options: ClusterOptions, security: object | None,
                 report: Callable[[str], None]) -> Iterator[object]:
    """A client of a ``SLURMCluster`` whose scheduler runs here and whose workers are SLURM
    jobs; every job it submitted is cancelled when it ends, on error too."""
    import dask
    from distributed import Client

    settings = slurm_settings(options)
    processes, threads = job_shape(settings)
    with dask.config.set(no_workers_timeout(options)):  # read by the scheduler it starts
        cluster = slurm_cluster(options, security=security, settings=settings)
    try:
        check_slurm_submission(cluster, str(options.jobqueue_config))
        if options.adaptive:
            cluster.adapt(minimum_jobs=0, maximum_jobs=options.jobs)  # type: ignore
        else:
            cluster.scale(jobs=options.jobs)  # type: ignore[attr-defined]
            # a job that ends (its walltime, scancel, a failed node) is replaced: dask-jobqueue
            # submits none of its own, and a run that lost every job waited forever
            cluster.adapt(minimum_jobs=options.jobs, maximum_jobs=options.jobs)  # type: ignore
        client = Client(cluster, security=security)
        try:
            if not options.adaptive:
                wait_for_slurm_workers(client, cluster, options.worker_timeout,
                                       options.jobqueue_config, report)
            report(f"SLURM cluster: {options.jobs} job(s)"
                   f"{' (adaptive)' if options.adaptive else ''} of {processes} worker(s) × "
                   f"{threads} thread(s), {options.gpus_per_job} GPU(s) per job; dashboard: "
                   f"{dashboard_link(client, options)}")
            # dask-jobqueue never replaces a job that ends before its worker joins: every
            # such job ended, a run stops on it; some, once a worker joined, are replaced
            with cluster_check(client, EndedJobs(cluster, options.jobqueue_config,
                                                 report=report)), \
                    cluster_check(client, FailedStarts(cluster, report, most=options.jobs)):
                yield client
        finally:
            client.close()
    finally:
        cluster.close()  # type: ignore[attr-defined]
