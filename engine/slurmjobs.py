"""SLURM worker jobs that end before their worker joins: noticed, and explained.

A worker job whose script fails at start (a ``module load`` that is not there, a Python
without voxelmill, a prologue that exits) ends in seconds, and nothing in dask notices:
dask-jobqueue keeps the job in the cluster's plan as if its worker were still coming, so
an ``--adaptive`` cluster never asks for another and a run waits forever, and a cluster of
fixed size waits ``--worker-timeout`` to say only that its jobs are no longer queued.
:class:`EndedJobs` notices when every job the cluster holds has left SLURM's queue
without a worker of it ever joining, and says why in one line: SLURM's verdict on the job
(state, exit code) and the last line the job wrote to its error or output file.

A job that fails at start while others of the same script have had their worker (a bad
node, a full local disk, a node failure) is no reason to stop, but dask-jobqueue never
replaces it either: the run goes on with fewer workers than asked for, and nobody is told.
:class:`FailedStarts` drops such a job from the cluster's plan, which makes the cluster's
``adapt`` submit another, and says so in one line.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: seconds between two questions to SLURM (``squeue``; a controller serves every user)
ASK_EVERY_S = 10.0
#: how much of a job's output file is read for its last line
TAIL_BYTES = 4096
#: seconds a cluster may be without a worker before what SLURM holds its jobs for is said
SAY_AFTER_S = 30.0


def queued(job_ids: Iterable[str]) -> dict[str, str] | None:
    """``{job id: "STATE (REASON)"}`` of the jobs ``squeue`` still lists (pending, running,
    completing); None when ``squeue`` cannot be asked (not found, failed, too slow), which
    must never be read as "every job ended"."""
    ids = sorted(set(job_ids))
    if not ids:
        return {}
    try:
        res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T (%r)"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    # squeue fails for a list of ids none of which it still knows: that is "none queued"
    if res.returncode != 0 and "Invalid job id" not in res.stderr:
        return None
    found: dict[str, str] = {}
    for line in res.stdout.splitlines():
        job, _, state = line.strip().partition(" ")
        if job:
            found[job] = state
    return found


def job_record(job_id: str) -> dict[str, str]:
    """SLURM's record of a job (``scontrol show job``: ``JobState``, ``ExitCode``,
    ``StdErr``, …), or ``{}`` once SLURM has forgotten it (``MinJobAge``, 300 s by
    default) or cannot be asked."""
    try:
        res = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout))


def output_path(pattern: str, record: dict[str, str]) -> Path | None:
    """A job's ``StdErr``/``StdOut`` with sbatch's filename patterns (``%j``, ``%J``,
    ``%x``, ``%u``, ``%N``, ``%%``) filled in from its ``record`` (older SLURM shows them
    unexpanded); None for no file."""
    if not pattern or pattern in ("(null)", "/dev/null"):
        return None
    fill = {"j": record.get("JobId", ""), "J": record.get("JobId", ""),
            "x": record.get("JobName", ""), "u": record.get("UserId", "").split("(")[0],
            "N": record.get("BatchHost", ""), "%": "%"}
    return Path(re.sub(r"%([jJxuN%])", lambda m: fill[m.group(1)], pattern))


def last_line(path: Path) -> str | None:
    """The last non-empty line of ``path`` (read from its end), or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else None


def why_ended(job_ids: list[str], when: str = "") -> str:
    """One line on how the first of ``job_ids`` ended: SLURM's state and exit code (then
    ``when``, e.g. " before its worker joined"), and the last line of its error file (else
    its output file), each where SLURM still has them."""
    first, more = job_ids[0], len(job_ids) - 1
    record = job_record(first)
    text = f"job {first}" + (f" (and {more} more)" if more else "")
    if record:
        text += f" ended {record.get('JobState', '?')}"
        if record.get("ExitCode", "0:0") != "0:0":
            text += f" (exit code {record['ExitCode']})"
        text += when
    else:
        text += f" ended{when} and is no longer known to SLURM" if when else \
            " is no longer known to SLURM"
    for key in ("StdErr", "StdOut"):
        path = output_path(record.get(key, ""), record)
        line = last_line(path) if path is not None else None
        if line is not None:
            return f"{text}; the last line of {path}: {line!r}"
    return text


def queue_summary(listed: dict[str, str]) -> str:
    """``queued()``'s answer in a few words: how many jobs in each state and reason, most
    first (``"2 PENDING (Priority), 1 RUNNING"``; squeue's reason of a running job is
    "None")."""
    counts = Counter(state.removesuffix(" (None)") for state in listed.values())
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items(),
                                                      key=lambda item: (-item[1], item[0])))


def job_names(names: Iterable[str]) -> set[str]:
    """The names of the jobs workers named ``names`` can belong to: a worker's own name,
    and for one ending in ``-i`` the name before it (a job of several worker processes)."""
    out: set[str] = set()
    for name in names:
        out.add(name)
        head, sep, tail = name.rpartition("-")
        if sep and tail.isdigit():
            out.add(head)
    return out


def _copied(read: Callable[[], list[Any]]) -> list[Any]:
    """``read()``, a copy of one of the cluster's dicts, tried again where the cluster's own
    thread changed the dict while it was copied (``RuntimeError``); empty after three tries."""
    for _ in range(3):
        try:
            return read()
        except RuntimeError:
            continue
    return []


class HeldJobs:
    """The jobs a dask-jobqueue ``cluster`` holds, and which of them a worker has joined
    from (as far as the workers seen so far tell)."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.joined: set[str] = set()

    def jobs(self) -> dict[str, str]:
        """``{name: job id}`` of the jobs the cluster holds (submitted ones only)."""
        held = _copied(lambda: list(self.cluster.workers.items()))
        return {str(name): str(job.job_id) for name, job in held
                if getattr(job, "job_id", None)}

    def planned(self) -> set[str]:
        """Names of the jobs in the cluster's plan (``worker_spec``): a job the cluster is
        already closing is held but no longer planned."""
        return {str(name) for name in _copied(lambda: list(self.cluster.worker_spec))}

    def see(self, workers: dict[str, Any]) -> dict[str, str]:
        """:meth:`jobs`, after noting the jobs that ``workers`` (the scheduler's) came from."""
        jobs = self.jobs()
        # a set intersection, not jobs × workers: asked every 2 s, on thousands of workers
        self.joined.update(jobs.keys() & job_names(str(w.get("name")) for w in workers.values()))
        return jobs


class EndedJobs:
    """A check for :func:`engine.stall.cluster_check` (called with the scheduler's
    workers every few seconds): a message once every job ``cluster`` holds has ended
    without a worker of it ever joining and no worker is left, for ``grace_s`` seconds
    (a job whose worker joined and left is dropped from the plan by distributed after its
    ``lost-worker-timeout``, and replaced); else None. Given ``report``, a cluster without
    a worker for :data:`SAY_AFTER_S` whose jobs SLURM still holds is one line saying what
    for (``PENDING (Priority)``: a run waiting on a busy cluster's queue is not hung), and
    another each time that changes.

    Parameters
    ----------
    cluster : dask_jobqueue.SLURMCluster
        Its ``workers`` are the jobs submitted (``job_id``) under their names.
    config : str, optional
        The jobqueue file the job script comes from (named in the message); None: dask's
        configuration.
    grace_s : float, optional
        Default: distributed's ``deploy.lost-worker-timeout`` plus 5 s.
    every_s : float
        Seconds between two questions to ``squeue``.
    report : callable, optional
        Called with the line on the queue (from the caller's thread).
    """

    def __init__(self, cluster: Any, config: str | None = None, grace_s: float | None = None,
                 every_s: float = ASK_EVERY_S,
                 report: Callable[[str], None] | None = None) -> None:
        if grace_s is None:
            import dask
            from dask.utils import parse_timedelta

            grace_s = float(parse_timedelta(
                dask.config.get("distributed.deploy.lost-worker-timeout", "15s"))) + 5.0
        self.held = HeldJobs(cluster)
        self.config = config
        self.grace_s = grace_s
        self.every_s = every_s
        self._asked = -float("inf")
        self._ended: frozenset[str] = frozenset()
        self._since: float | None = None
        self.report = report
        self._alone: float | None = None  # since when no worker is there
        self._said = ""

    @property
    def joined(self) -> set[str]:
        """Names of the jobs a worker has joined from."""
        return self.held.joined

    def jobs(self) -> dict[str, str]:
        """``{name: job id}`` of the jobs the cluster holds (submitted ones only)."""
        return self.held.jobs()

    def __call__(self, workers: dict[str, Any]) -> str | None:
        jobs = self.held.see(workers)
        now = time.monotonic()
        if workers or not jobs:
            self._since = self._alone = None
            self._said = ""
            return None
        if self._alone is None:
            self._alone = now
        if now - self._asked < self.every_s:
            return None
        self._asked = now
        listed = queued(jobs.values())
        if listed and now - self._alone >= SAY_AFTER_S:
            self._say(listed)
        never = frozenset(j for name, j in jobs.items() if name not in self.joined)
        if listed is None or listed or not never:
            self._since = None  # a job is queued or running, or every one had a worker
            return None
        if self._since is None or never != self._ended:
            self._since, self._ended = now, never
            return None
        if now - self._since < self.grace_s:
            return None
        where = self.config or "dask's jobqueue configuration"
        # "waits on": jobs whose worker joined and left are dropped from the plan by then
        return ("no worker is left, and every SLURM worker job the cluster waits on ended "
                f"before its worker joined ({why_ended(sorted(never, key=_numeric))}): the "
                "job script fails at start; see the job's output, and job-script-prologue, "
                f"python and worker-extra-args in {where}")

    def _say(self, listed: dict[str, str]) -> None:
        """The line on what SLURM holds the jobs for (``listed``, squeue's answer), unless
        it was the last one said."""
        summary = queue_summary(listed)
        if self.report is None or summary == self._said:
            return
        self._said = summary
        self.report(f"waiting for SLURM to start the worker jobs: {summary} (squeue)")


class FailedStarts:
    """A check for :func:`engine.stall.cluster_check` that never stops a run: once a worker
    of some job has joined (the job script works), each job that has left SLURM's queue
    without its worker ever joining is dropped from ``cluster``'s plan — the cluster's
    ``adapt`` (on for fixed-size clusters too) then submits another in its place — and one
    line says which job, how it ended and that it is replaced. At most ``most`` jobs are
    replaced in all; past that, one line says the run goes on with the workers it has.
    Before any worker has joined nothing is dropped: the script itself may be what fails,
    which :class:`EndedJobs` reports.

    Parameters
    ----------
    cluster : dask_jobqueue.SLURMCluster
        Its ``workers`` (the jobs, by name), ``worker_spec`` (the plan) and ``loop``.
    report : callable
        Called with each line (from the watch's thread).
    most : int
        How many jobs may be replaced in all (a node that fails every job sent to it must
        not make an endless stream of jobs).
    every_s : float, optional
        Seconds between two questions to ``squeue`` (only while a job has no worker yet);
        default :data:`ASK_EVERY_S`.
    """

    def __init__(self, cluster: Any, report: Callable[[str], None], most: int,
                 every_s: float | None = None) -> None:
        self.held = HeldJobs(cluster)
        self.report = report
        self.most = most
        self.every_s = ASK_EVERY_S if every_s is None else every_s
        self.replaced = 0
        self._dropped: set[str] = set()  # job ids
        self._asked = -float("inf")
        self._told_most = False

    def __call__(self, workers: dict[str, Any]) -> None:
        jobs = self.held.see(workers)
        if not self.held.joined or self._told_most:
            return None
        now = time.monotonic()
        if now - self._asked < self.every_s:
            return None
        planned = self.held.planned()  # not a job adapt is closing (scaled down)
        waiting = {name: job for name, job in jobs.items() if name in planned
                   and name not in self.held.joined and job not in self._dropped}
        if not waiting:
            return None
        self._asked = now
        listed = queued(waiting.values())
        if listed is None:
            return None
        for name, job in sorted(waiting.items(), key=lambda item: _numeric(item[1])):
            if job in listed:
                continue
            ended = f"SLURM worker {why_ended([job], ' before its worker joined')}"
            if self.replaced >= self.most:
                self._told_most = True
                self.report(f"{ended}; not replaced: {self.replaced} job(s) that failed at "
                            "start were replaced already (a node that fails every job sent to "
                            "it?); the run goes on with the workers it has")
                return None
            self._drop(name)
            self._dropped.add(job)
            self.replaced += 1
            self.report(f"{ended}; other jobs' workers joined (a node failed, not the job "
                        "script?): another job is asked for in its place (replacement "
                        f"{self.replaced} of at most {self.most})")
        return None

    def _drop(self, name: str) -> None:
        """Take the job ``name`` out of the cluster's plan and its jobs, as distributed does
        with a worker lost for good, on the cluster's event loop (where ``adapt`` reads
        them); ``adapt`` then finds the plan short and submits a job. Out of the jobs too:
        the new job may get the same name, and a name still held is not started again."""
        cluster = self.held.cluster

        async def drop() -> None:
            cluster.worker_spec.pop(name, None)
            job = cluster.workers.pop(name, None)
            if job is not None:
                await job.close()  # scancel of a job that ended: nothing to do, no error

        cluster.loop.add_callback(drop)


def _numeric(job_id: str) -> tuple[int, str]:
    return (int(job_id), "") if job_id.isdigit() else (0, job_id)
