"""SLURM worker jobs that end before their worker joins (``engine.slurmjobs``): the rule
that says a run can no longer get a worker, and the one that replaces a job failing at
start beside working ones, read against a cluster and a queue given here; sbatch's file
patterns and the job's last line. Real jobs whose script fails at start are in
``test_slurm``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import slurmjobs
from engine.slurmjobs import EndedJobs, FailedStarts, last_line, output_path, why_ended


@dataclass
class Job:
    job_id: str | None
    closed: list[str] = field(default_factory=list)

    async def close(self) -> None:
        self.closed.append(str(self.job_id))


class Loop:
    """The cluster's event loop: a callback runs at once (a coroutine to its end)."""

    def add_callback(self, fn, *args) -> None:
        out = fn(*args)
        if asyncio.iscoroutine(out):
            asyncio.run(out)


class Cluster:
    """What :mod:`engine.slurmjobs` reads of a dask-jobqueue cluster: its jobs by name,
    its plan (``worker_spec``) and its loop."""

    def __init__(self, jobs: dict[str, str | None]) -> None:
        self.workers = {name: Job(job) for name, job in jobs.items()}
        self.worker_spec = {name: {"cls": "Job"} for name in jobs}
        self.loop = Loop()


class Queue:
    """``squeue`` as the test sets it: the ids still listed, or None for a failed call."""

    def __init__(self) -> None:
        self.listed: dict[str, str] | None = {}
        self.asked = 0

    def __call__(self, ids) -> dict[str, str] | None:
        self.asked += 1
        return None if self.listed is None else {
            j: s for j, s in self.listed.items() if j in set(ids)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim(monkeypatch):
    queue, clock = Queue(), Clock()
    monkeypatch.setattr(slurmjobs, "queued", queue)
    monkeypatch.setattr(slurmjobs.time, "monotonic", clock)
    monkeypatch.setattr(slurmjobs, "job_record", lambda job: {
        "JobId": job, "JobState": "FAILED", "ExitCode": "3:0"})
    return queue, clock


def looks(check: EndedJobs, clock: Clock, seconds: float, workers=None, step: float = 2.0
          ) -> list[str | None]:
    """What ``check`` says at every watch poll (``step`` seconds apart) for ``seconds``."""
    said = []
    for _ in range(int(seconds / step)):
        clock.now += step
        said.append(check(workers or {}))
    return said


def test_jobs_that_all_ended_without_a_worker_stop_the_run_after_the_grace(sim):
    queue, clock = sim
    check = EndedJobs(Cluster({"vm-0": "11", "vm-1": "12"}), "jq.yaml", grace_s=20,
                      every_s=10)
    queue.listed = {"11": "RUNNING (None)", "12": "PENDING (Resources)"}
    assert looks(check, clock, 60) == [None] * 30  # queued or running: wait, however long
    queue.listed = {"12": "PENDING (Resources)"}
    assert looks(check, clock, 60) == [None] * 30  # one is still to come
    queue.listed = {}
    said = looks(check, clock, 40)
    stop = [i for i, s in enumerate(said) if s is not None]
    # the first look that sees none queued starts the grace; the one after it ends it
    assert 20 / 2 <= stop[0] <= (20 + 10 + 10) / 2, said
    message = said[stop[0]]
    assert message.startswith("no worker is left, and every SLURM worker job the cluster waits "
                              "on ended before its worker joined (job 11 (and 1 more) ended "
                              "FAILED (exit code 3:0))")
    assert message.endswith("worker-extra-args in jq.yaml")
    assert queue.asked < 30, "squeue asked at every poll instead of every 10 s"


def test_a_worker_present_or_a_job_that_had_one_is_no_reason_to_stop(sim):
    queue, clock = sim
    check = EndedJobs(Cluster({"vm-0": "11", "vm-1": "12"}), grace_s=0, every_s=0)
    # a job of two worker processes: its workers are named vm-0-0 and vm-0-1
    assert looks(check, clock, 20, {"tcp://a": {"name": "vm-0-1"}}) == [None] * 10
    queue.listed = {}
    # vm-0 had its worker: distributed drops it from the plan and a new job replaces it;
    # vm-1 never had one, but a worker is there: the run goes on
    assert looks(check, clock, 20, {"tcp://b": {"name": "vm-10"}}) == [None] * 10
    assert check.joined == {"vm-0"}
    said = looks(check, clock, 10)
    assert said[-1] is not None and "(job 12 ended FAILED" in said[-1], said
    assert "in dask's jobqueue configuration" in said[-1]


@pytest.mark.parametrize("jobs", [{}, {"vm-0": None}])
def test_no_job_submitted_is_an_adaptive_cluster_without_work(sim, jobs):
    _, clock = sim
    assert looks(EndedJobs(Cluster(jobs), grace_s=0, every_s=0), clock, 20) == [None] * 10


def test_squeue_that_cannot_be_asked_never_reads_as_every_job_ended(sim):
    queue, clock = sim
    queue.listed = None
    check = EndedJobs(Cluster({"vm-0": "11"}), grace_s=0, every_s=0)
    assert looks(check, clock, 20) == [None] * 10


def test_the_set_of_ended_jobs_changing_restarts_the_grace(sim):
    """A job replaced meanwhile (a new id) is a new wait, not the old one's end."""
    queue, clock = sim
    cluster = Cluster({"vm-0": "11"})
    check = EndedJobs(cluster, grace_s=10, every_s=0)
    queue.listed = {}
    assert looks(check, clock, 8) == [None] * 4
    cluster.workers = {"vm-1": Job("13")}
    assert looks(check, clock, 8) == [None] * 4
    assert looks(check, clock, 4)[-1] is not None


@pytest.mark.parametrize(("pattern", "want"), [
    ("/logs/vm-%J.err", "/logs/vm-42.err"), ("/logs/%x-%j.out", "/logs/vmjob-42.out"),
    ("/logs/%u/%N/100%%-%j", "/logs/alice/node7/100%-42"), ("/logs/plain.out", "/logs/plain.out"),
])
def test_sbatch_file_patterns_are_filled_from_the_job_record(pattern, want):
    record = {"JobId": "42", "JobName": "vmjob", "UserId": "alice(1000)", "BatchHost": "node7"}
    assert output_path(pattern, record) == Path(want)


@pytest.mark.parametrize("pattern", ["", "(null)", "/dev/null"])
def test_no_output_file(pattern):
    assert output_path(pattern, {"JobId": "1"}) is None


def test_the_last_line_of_a_long_output_is_read_from_its_end(tmp_path):
    path = tmp_path / "job.err"
    path.write_text("x" * 100_000 + "\nTraceback …\nModuleNotFoundError: No module named "
                    "'distributed'\n\n  \n")
    assert last_line(path) == "ModuleNotFoundError: No module named 'distributed'"
    assert last_line(tmp_path / "missing.err") is None
    (tmp_path / "empty.err").write_text("")
    assert last_line(tmp_path / "empty.err") is None


def test_why_a_job_ended_quotes_its_error_file_else_its_output(tmp_path, monkeypatch):
    (tmp_path / "vm-7.out").write_text("starting\nmodule: command not found\n")
    record = {"JobId": "7", "JobState": "FAILED", "ExitCode": "1:0",
              "StdErr": str(tmp_path / "vm-%j.err"), "StdOut": str(tmp_path / "vm-%j.out")}
    monkeypatch.setattr(slurmjobs, "job_record", lambda job: record)
    assert why_ended(["7"]) == (f"job 7 ended FAILED (exit code 1:0); the last line of "
                                f"{tmp_path / 'vm-7.out'}: 'module: command not found'")
    (tmp_path / "vm-7.err").write_text("ImportError: libcudart.so.12\n")
    assert why_ended(["7", "8"]).endswith("vm-7.err: 'ImportError: libcudart.so.12'")
    monkeypatch.setattr(slurmjobs, "job_record", lambda job: {})  # forgotten by SLURM
    assert why_ended(["7"]) == "job 7 is no longer known to SLURM"
    assert why_ended(["7"], " before its worker joined") == (
        "job 7 ended before its worker joined and is no longer known to SLURM")


def test_the_jobs_workers_belong_to_are_read_off_their_names():
    """A job's single worker has its name; a job of several, its name and ``-i``."""
    from engine.slurmjobs import job_names

    assert job_names(["vm-0-1", "vm-10", "tcp"]) == {"vm-0-1", "vm-0", "vm-10", "vm", "tcp"}
    assert {"vm-0", "vm-1"} & job_names(["vm-0-1", "vm-10"]) == {"vm-0"}


def test_a_job_failing_at_start_beside_a_working_one_is_dropped_from_the_plan(sim):
    """Once a worker joined, a job that ended without its worker joining is taken out of
    the plan and the jobs (closed) — adapt then submits another — with one line; jobs
    still queued, jobs whose worker joined and jobs adapt is closing are left alone."""
    queue, clock = sim
    cluster = Cluster({"vm-0": "11", "vm-1": "12", "vm-2": "13", "vm-3": "14"})
    del cluster.worker_spec["vm-3"]  # scaled down by adapt: closing, not ours to replace
    lines: list[str] = []
    check = FailedStarts(cluster, lines.append, most=4, every_s=10)
    queue.listed = {"13": "PENDING (Resources)"}
    # no worker yet: the script itself may be what fails (EndedJobs' case), nothing dropped
    assert looks(check, clock, 20) == [None] * 10
    assert lines == [] and queue.asked == 0 and len(cluster.worker_spec) == 3
    job = cluster.workers["vm-1"]
    assert looks(check, clock, 20, {"tcp://a": {"name": "vm-0"}}) == [None] * 10
    assert set(cluster.worker_spec) == {"vm-0", "vm-2"}
    assert set(cluster.workers) == {"vm-0", "vm-2", "vm-3"} and job.closed == ["12"]
    assert lines == ["SLURM worker job 12 ended FAILED (exit code 3:0) before its worker "
                     "joined; other jobs' workers joined (a node failed, not the job script?): "
                     "another job is asked for in its place (replacement 1 of at most 4)"]
    assert queue.asked <= 3, "squeue asked at every poll instead of every 10 s"
    # the pending job leaves the queue without a worker too: replaced in its turn
    queue.listed = {}
    looks(check, clock, 20, {"tcp://a": {"name": "vm-0"}})
    assert set(cluster.worker_spec) == {"vm-0"} and check.replaced == 2
    assert "job 13 ended FAILED" in lines[-1] and "(replacement 2 of at most 4)" in lines[-1]


def test_replacements_stop_at_most_and_a_failed_squeue_drops_nothing(sim):
    queue, clock = sim
    cluster = Cluster({"vm-0": "11", "vm-1": "12", "vm-2": "13"})
    lines: list[str] = []
    check = FailedStarts(cluster, lines.append, most=1, every_s=0)
    workers = {"tcp://a": {"name": "vm-0"}}
    queue.listed = None  # squeue could not be asked: never read as "ended"
    looks(check, clock, 10, workers)
    assert lines == [] and len(cluster.worker_spec) == 3
    queue.listed = {}
    looks(check, clock, 10, workers)
    assert set(cluster.worker_spec) == {"vm-0", "vm-2"} and len(lines) == 2
    assert "(replacement 1 of at most 1)" in lines[0]
    assert lines[1].startswith("SLURM worker job 13 ended FAILED (exit code 3:0) before its "
                               "worker joined; not replaced: 1 job(s) that failed at start "
                               "were replaced already")
    asked = queue.asked
    cluster.workers["vm-3"] = Job("15")  # the replacement fails too: nothing more is said
    cluster.worker_spec["vm-3"] = {}
    looks(check, clock, 10, workers)
    assert len(lines) == 2 and queue.asked == asked


def test_a_cluster_without_a_worker_says_what_slurm_holds_its_jobs_for(sim):
    """After :data:`SAY_AFTER_S` without a worker, one line on the queue, again only when
    it changes; a worker joining starts the count afresh."""
    from engine.slurmjobs import SAY_AFTER_S, queue_summary

    queue, clock = sim
    lines: list[str] = []
    check = EndedJobs(Cluster({"vm-0": "11", "vm-1": "12", "vm-2": "13"}), every_s=10,
                      report=lines.append)
    queue.listed = {"11": "PENDING (Priority)", "12": "PENDING (Priority)",
                    "13": "RUNNING (None)"}
    looks(check, clock, SAY_AFTER_S - 4)
    assert lines == []
    looks(check, clock, 60)
    assert lines == ["waiting for SLURM to start the worker jobs: 2 PENDING (Priority), "
                     "1 RUNNING (squeue)"]
    queue.listed = {"11": "PENDING (Priority)", "12": "RUNNING (None)", "13": "RUNNING (None)"}
    looks(check, clock, 60)
    assert lines[1:] == ["waiting for SLURM to start the worker jobs: 2 RUNNING, "
                         "1 PENDING (Priority) (squeue)"]
    looks(check, clock, 10, {"tcp://a": {"name": "vm-1"}})
    looks(check, clock, SAY_AFTER_S - 4)
    assert len(lines) == 2
    assert queue_summary({}) == ""
