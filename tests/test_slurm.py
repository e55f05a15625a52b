"""voxelmill through real SLURM jobs: a single-node SLURM cluster with two fake GPUs
(``deploy/slurm/ci-cluster.sh start``, which ``.ci/run`` runs before the tests).

Convert, a segmentation workflow and inference with ``--gpus-per-job 1`` run on two worker
jobs and equal the embedded cluster's output; a worker job cancelled mid-run costs nothing;
``--adaptive`` jobs are gone after the run; the CLI with ``--tls`` works; bad SLURM input
is one line, exit 2, nothing written and no job left; jobs whose script fails at start are
one line, and one failing at start beside a working one is replaced; a wait on the queue
says what for. Where SLURM is not running the tests skip, saying why (under ``CI=true``
they fail instead).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from engine.cluster import ClusterOptions, connect, gpu_workers
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.segment import SegmentOptions, segment
from tests.conftest import free_port, run_cli, write_mrc

pytestmark = pytest.mark.slurm

START = "deploy/slurm/ci-cluster.sh start"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"SLURM is required under CI=true: {reason}")
    pytest.skip(f"SLURM not available: {reason} (run `{START}` as root)")


@functools.cache
def _slurm_partition() -> tuple[str | None, str]:
    """The default partition of a running SLURM whose node is idle (or partly used), or
    why there is none (asked once: sinfo takes seconds to give up on a missing slurmctld)."""
    if shutil.which("sinfo") is None:
        return None, "sinfo not found"
    res = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        return None, f"sinfo failed: {res.stderr.strip()}"
    rows = [line.split() for line in res.stdout.splitlines() if line.strip()]
    usable = [p for p, state in rows if state in ("idle", "mixed", "allocated")]
    if not usable:
        return None, f"no node is idle (sinfo: {res.stdout.strip() or 'nothing'})"
    default = [p for p in usable if p.endswith("*")]
    return (default or usable)[0].rstrip("*"), ""


@pytest.fixture(scope="session")
def partition() -> str:
    """The partition the worker jobs go to; skips (fails under CI=true) without SLURM."""
    name, reason = _slurm_partition()
    if name is None:
        _unavailable(reason)
    return name


def jobqueue(tmp: Path, partition: str, **extra: object) -> tuple[Path, str]:
    """A dask-jobqueue file for one-core, 2 GiB worker jobs under a name of their own."""
    import yaml

    name = f"vmtest-{uuid.uuid4().hex[:8]}"
    (tmp / "slurm-logs").mkdir(exist_ok=True)
    section = {"name": name, "cores": 1, "memory": "2GiB", "processes": 1,
               "queue": partition, "walltime": "00:20:00", "local-directory": str(tmp),
               "log-directory": str(tmp / "slurm-logs"), **extra}
    path = tmp / "jobqueue.yaml"
    path.write_text(yaml.safe_dump({"jobqueue": {"slurm": section}}))
    return path, name


def queued(name: str) -> list[str]:
    """Ids of the jobs named ``name`` that ``squeue`` still lists."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                         text=True, timeout=30).stdout
    return out.split()


def assert_no_jobs(name: str, wait: float = 30) -> None:
    """No job named ``name`` is left (jobs being cancelled may linger a moment)."""
    deadline = time.monotonic() + wait
    while queued(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert queued(name) == [], f"SLURM jobs left: {queued(name)}"


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A smooth random 64 × 96 × 96 float32 MRC: 18 blocks of 32³ at full resolution."""
    tmp = tmp_path_factory.mktemp("slurm-volume")
    rng = np.random.default_rng(3)
    data = ndimage.gaussian_filter(rng.normal(size=(64, 96, 96)), 2).astype(np.float32)
    return write_mrc(tmp / "vol.mrc", data, voxel_size=10.0)


CONVERT = ConvertOptions(chunks=(32, 32, 32))


def levels(path: Path, group: str = "") -> list[np.ndarray]:
    root = zarr.open_group(str(path / group) if group else str(path), mode="r")
    names = sorted((k for k in root.array_keys() if k.isdigit()), key=int)
    return [root[k][...] for k in names]


def assert_same(a: Path, b: Path, group: str = "") -> None:
    got, want = levels(a, group), levels(b, group)
    assert len(got) == len(want) > 0
    for x, y in zip(got, want, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


@pytest.fixture(scope="module")
def reference(volume, client, tmp_path_factory) -> Path:
    """Convert and segment on the embedded cluster: what every SLURM run must equal."""
    ref = tmp_path_factory.mktemp("slurm-ref") / "vol.ome.zarr"
    convert(volume, ref, CONVERT, client, report=lambda line: None)
    for name in ("objects", "again"):
        segment(ref, SegmentOptions("threshold", name, block=(32, 32, 32)), client,
                report=lambda line: None)
    return ref


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _executed(dask_worker) -> int:
    """Tasks the worker has run."""
    return dask_worker.state.executed_count


def _worker_settings() -> tuple[str | None, str]:
    """A job worker's allocator arenas and event-loop tick (what the job script exported)."""
    import dask

    return os.environ.get("MALLOC_ARENA_MAX"), dask.config.get("distributed.admin.tick.interval")


def _tiny_model(path: Path) -> Path:
    """A fixed random 3D U-Net checkpoint for one input channel (sigmoid output)."""
    import torch

    from engine.learn.checkpoint import save_checkpoint
    from engine.learn.unet import UNet, receptive_field

    torch.manual_seed(0)
    model = UNet(3, 1, 1, features=(4, 8), norm=None).eval()
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["c0"], "normalization": {"mode": "meanstd", "low": 1.0,
                                                            "high": 99.8},
                      "stats": [{"name": "x", "offset": [0.0], "scale": [1.0]}]},
            "target": {"kind": "binary", "classes": ["background", "foreground"],
                       "activation": "sigmoid"},
            "patch_shape": [16, 32, 32], "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model)), "voxel_size": [10.0] * 3,
            "unit": "angstrom"}
    save_checkpoint(path, model.state_dict(), meta)
    return path


def test_convert_segment_predict_on_two_gpu_jobs_and_a_cancelled_job(
        partition, volume, reference, client, tmp_path):
    """Two worker jobs with one fake GPU each: convert, segment and predict spread over both
    (each worker reports its own SLURM_JOB_ID and has the embedded cluster's allocator and
    event-loop settings), the outputs equal the embedded cluster's;
    then a worker job is cancelled with scancel while a segmentation runs on it, and the
    run still completes with identical labels."""
    from distributed import get_task_stream

    from engine.pipelines.predict import PredictOptions, predict

    config, name = jobqueue(tmp_path, partition)
    out = tmp_path / "vol.ome.zarr"
    opts = ClusterOptions(cluster="slurm", jobs=2, gpus_per_job=1, jobqueue_config=str(config),
                          dashboard_address="127.0.0.1:0")
    with connect(opts, report=lambda line: None) as c:
        c.wait_for_workers(2, timeout=120)
        jobs = c.run(_job_id)
        assert len(set(jobs.values())) == 2 and set(jobs.values()) == set(queued(name))
        # --gpus-per-job 1: every worker advertises GPU=1
        assert gpu_workers(c) == sorted(jobs)
        # the embedded cluster's worker settings reach the jobs' workers (one thread each)
        assert set(c.run(_worker_settings).values()) == {("1", "100ms")}

        with get_task_stream(c) as stream:
            convert(volume, out, CONVERT, c, report=lambda line: None)
            segment(out, SegmentOptions("threshold", "objects", block=(32, 32, 32)), c,
                    report=lambda line: None)
        ran = {t["worker"] for t in stream.data if str(t["key"]).startswith("image_pass0")}
        assert ran == set(jobs), "both worker jobs convert blocks"
        assert_same(out, reference)
        assert_same(out, reference, "labels/objects")

        # inference asks for GPU=1: here every worker has it, and the report says which ran
        ckpt = _tiny_model(tmp_path / "model.pt")
        popts = PredictOptions(ckpt, "slurm", block=(32, 32, 32), probabilities="float16",
                               device="cpu")
        res = predict(out, popts, c, report=lambda line: None)
        assert set(res.report["workers"]) <= set(gpu_workers(c))
        assert sum(w["blocks"] for w in res.report["workers"].values()) == 18

        # scancel one worker job while it runs blocks of a segmentation
        victim_worker, victim_job = sorted(jobs.items())[0]
        cancelled = threading.Event()

        before = c.run(_executed, workers=[victim_worker])[victim_worker]

        def cancel_when_busy() -> None:
            # a 32³ block takes milliseconds: a poll may fall between the victim's tasks,
            # so a task of this run finished there counts too
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if c.processing(workers=[victim_worker]).get(victim_worker) or \
                        c.run(_executed, workers=[victim_worker])[victim_worker] > before:
                    subprocess.run(["scancel", victim_job], check=True, timeout=30)
                    cancelled.set()
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=cancel_when_busy, daemon=True)
        killer.start()
        segment(out, SegmentOptions("threshold", "again", block=(32, 32, 32)), c,
                report=lambda line: None)
        killer.join(timeout=60)
        assert cancelled.is_set(), "the victim job never ran a block"
        assert victim_job not in queued(name)
    assert_same(out, reference, "labels/again")
    # the local run's predictions: the same network on the same blocks
    local = tmp_path / "local.ome.zarr"
    shutil.copytree(out, local, ignore=shutil.ignore_patterns("predictions", "labels"))
    predict(local, PredictOptions(ckpt, "slurm", block=(32, 32, 32), probabilities="float16",
                                  device="cpu"), client, report=lambda line: None)
    np.testing.assert_allclose(levels(out, "predictions/slurm")[0].astype(np.float32),
                               levels(local, "predictions/slurm")[0].astype(np.float32),
                               atol=1e-3)
    assert_no_jobs(name)


def test_adaptive_jobs_come_and_go(partition, volume, reference, tmp_path):
    """--adaptive: no job before the work, jobs during it, none after it."""
    config, name = jobqueue(tmp_path, partition)
    out = tmp_path / "vol.ome.zarr"
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(queued(name))
            time.sleep(0.2)

    opts = ClusterOptions(cluster="slurm", jobs=2, adaptive=True, jobqueue_config=str(config),
                          dashboard_address="127.0.0.1:0")
    with connect(opts, report=lambda line: None) as c:
        assert queued(name) == [] and not c.scheduler_info()["workers"]
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        convert(volume, out, CONVERT, c, report=lambda line: None)
        done.set()
        watcher.join()
    assert seen, "the adaptive cluster started no job"
    assert_same(out, reference)
    assert_no_jobs(name)


def test_cli_convert_on_slurm_with_tls(partition, volume, reference, tmp_path):
    """The command as a user types it, with TLS: `voxelmill --tls DIR --cluster slurm --jobs 2
    … convert`; both worker jobs register with the scheduler over tls://."""
    from engine.security import make_certificates

    certs = make_certificates(tmp_path / "certs")
    config, name = jobqueue(tmp_path, partition)
    out = tmp_path / "vol.ome.zarr"
    res = run_cli("--tls", str(certs.directory), "--cluster", "slurm", "--jobs", "2",
                  "--jobqueue-config", str(config), "--dashboard-address", "127.0.0.1:0",
                  "convert", str(volume), str(out), "--chunks", "32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "SLURM cluster: 2 job(s)" in res.stderr
    assert_same(out, reference)
    assert_no_jobs(name)
    logs = [p.read_text() for p in (tmp_path / "slurm-logs").glob(f"{name}-*.err")]
    assert len(logs) == 2 and all("Registered to:" in log for log in logs), logs
    assert all("tls://" in log.split("Registered to:", 1)[1].split()[0] for log in logs)


def test_segment_jobs_run_a_single_threaded_worker_per_core(partition, reference, tmp_path):
    """A 2-core job without ``processes`` runs segment (GIL-bound block tasks) on two
    single-threaded workers; with ``processes: 1`` on one of two threads, and one line says
    that is slower. Both label the volume as the embedded cluster did."""
    from engine.cluster import gil_threads_hint

    image = tmp_path / "vol.ome.zarr"
    shutil.copytree(reference, image, ignore=shutil.ignore_patterns("labels"))
    note = gil_threads_hint({"w": {"nthreads": 2}})
    for processes, shape in ((None, "of 2 worker(s) × 1 thread(s)"),
                             (1, "of 1 worker(s) × 2 thread(s)")):
        config, name = jobqueue(tmp_path, partition, cores=2, processes=processes)
        label = f"cells{processes or 0}"
        res = run_cli("--cluster", "slurm", "--jobs", "1", "--jobqueue-config", str(config),
                      "--dashboard-address", "127.0.0.1:0", "segment", str(image),
                      "--workflow", "threshold", "--name", label, "--block", "32,32,32",
                      cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert shape in res.stderr, res.stderr
        assert (note in res.stderr) == (processes == 1), res.stderr
        assert_same(image / "labels" / label, reference / "labels" / "objects")
        assert_no_jobs(name)
        logs = [p.read_text() for p in (tmp_path / "slurm-logs").glob(f"{name}-*.err")]
        assert len(logs) == 1, logs  # the job's own log: the workers it really started
        assert logs[0].count("Start worker at") == (processes or 2), logs[0]
        threads = [line.split()[-1] for line in logs[0].splitlines() if "Threads:" in line]
        assert threads == [str(2 // (processes or 2))] * (processes or 2), logs[0]


def _cancel_when_busy(c, worker: str, job: str, after: int = 3) -> threading.Thread:
    """A thread that scancels ``job`` once its ``worker`` has run ``after`` more tasks."""
    before = c.run(_executed, workers=[worker])[worker]

    def cancel() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if c.run(_executed, workers=[worker])[worker] >= before + after:
                subprocess.run(["scancel", job], check=True, timeout=30)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    return thread


def test_ended_jobs_are_replaced_and_a_cluster_left_without_any_stops_resumable(
        partition, client, tmp_path):
    """The one worker job of a fixed-size cluster is cancelled while a segmentation runs: a
    replacement job is submitted and the run completes. When the replacement cannot start
    either, the run stops after ``worker_timeout`` seconds without a worker with
    :class:`ClusterLost` (the CLI's exit 75) instead of waiting forever, its finished blocks
    kept; the same command on a cluster that works resumes them. Labels equal the embedded
    cluster's each time."""
    import dask

    from engine.errors import ClusterLost

    rng = np.random.default_rng(5)
    data = ndimage.gaussian_filter(rng.normal(size=(96, 160, 160)), 2).astype(np.float32)
    image = tmp_path / "big.ome.zarr"
    convert(write_mrc(tmp_path / "big.mrc", data, voxel_size=10.0), image, CONVERT, client,
            report=lambda line: None)
    ref = tmp_path / "ref.ome.zarr"
    shutil.copytree(image, ref)
    options = SegmentOptions("threshold", "cells", block=(32, 32, 32))
    segment(ref, options, client, report=lambda line: None)

    stop = tmp_path / "no-more-jobs"  # jobs started once it exists end at once
    config, name = jobqueue(tmp_path, partition, **{
        "job-script-prologue": [f"if [ -e {stop} ]; then exit 3; fi"]})
    opts = ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(config),
                          dashboard_address="127.0.0.1:0", worker_timeout=10)
    # distributed waits this long for a lost worker to come back before it counts it gone
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}), \
            connect(opts, report=lambda line: None) as c:
        c.wait_for_workers(1, timeout=60)
        [(worker, job)] = c.run(_job_id).items()
        killer = _cancel_when_busy(c, worker, job)
        segment(image, options, c, report=lambda line: None)
        killer.join(timeout=60)
        assert job not in queued(name)
        [(_, replacement)] = c.run(_job_id).items()
        assert replacement != job, "the run finished on the cancelled job"
        assert_same(image / "labels" / "cells", ref / "labels" / "cells")

        stop.touch()
        worker = next(iter(c.scheduler_info()["workers"]))
        killer = _cancel_when_busy(c, worker, replacement)
        lines: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(ClusterLost, match="no worker for 10 s") as lost:
            segment(image, SegmentOptions("threshold", "again", block=(32, 32, 32)), c,
                    report=lines.append)
        assert time.monotonic() - t0 < 60
        assert "run the same command again to resume" in str(lost.value)
        killer.join(timeout=60)
    assert_no_jobs(name)
    partial = image / "labels" / ".again.partial"
    assert partial.is_dir() and not (image / "labels" / "again").exists()

    stop.unlink()
    config, name = jobqueue(tmp_path, partition)
    with connect(ClusterOptions(cluster="slurm", jobs=1, jobqueue_config=str(config),
                                dashboard_address="127.0.0.1:0"),
                 report=lambda line: None) as c:
        lines = []
        res = segment(image, SegmentOptions("threshold", "again", block=(32, 32, 32)), c,
                      report=lines.append)
    assert any(line.startswith("resuming an interrupted") for line in lines), lines
    assert sum(s["skipped"] for s in res.stages) > 0, res.stages
    assert_same(image / "labels" / "again", ref / "labels" / "cells")
    assert_no_jobs(name)


def test_bad_slurm_input(partition, volume, tmp_path):
    """A partition that does not exist, workers that never start: one line naming the file
    or the jobs, exit 2, nothing written, no job left."""
    out = tmp_path / "out.ome.zarr"
    config, name = jobqueue(tmp_path, partition, queue="no-such-partition")
    res = run_cli("--cluster", "slurm", "--jobs", "2", "--jobqueue-config", str(config),
                  "convert", str(volume), str(out), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{config}: SLURM refuses the worker job" in res.stderr
    assert "invalid partition" in res.stderr.lower()
    assert not out.exists() and not list(tmp_path.glob(".out.ome.zarr*"))
    assert_no_jobs(name)

    # jobs that SLURM keeps pending (here: told to begin in an hour)
    config, name = jobqueue(tmp_path, partition, **{"job-extra-directives": ["--begin=now+1hour"]})
    res = run_cli("--cluster", "slurm", "--jobs", "2", "--jobqueue-config", str(config),
                  "--worker-timeout", "3", "convert", str(volume), str(out), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = " ".join(res.stderr.split())
    assert "no worker joined within 3 s (--worker-timeout)" in line and "PENDING" in line
    assert not out.exists() and not list(tmp_path.glob(".out.ome.zarr*"))
    assert_no_jobs(name)


def test_a_wait_on_the_queue_says_what_slurm_holds_the_jobs_for(partition, volume, tmp_path,
                                                                monkeypatch):
    """Jobs SLURM keeps pending (told to begin in an hour): while the command waits for its
    first worker, a line says what for, in squeue's words, before --worker-timeout ends
    the wait."""
    from engine import slurmjobs
    from engine.errors import OptionError

    monkeypatch.setattr(slurmjobs, "SAY_AFTER_S", 1.0)  # 30 s by default
    config, name = jobqueue(tmp_path, partition, **{"job-extra-directives": ["--begin=now+1hour"]})
    lines: list[str] = []
    opts = ClusterOptions(cluster="slurm", jobs=2, jobqueue_config=str(config),
                          dashboard_address="127.0.0.1:0", worker_timeout=6)
    with pytest.raises(OptionError, match="no worker joined within 6 s"):
        with connect(opts, report=lines.append):
            pass
    assert lines == ["waiting for SLURM to start the worker jobs: 2 PENDING (BeginTime) "
                     "(squeue)"], lines
    assert_no_jobs(name)


#: what the command says of jobs that ended before their worker joined
ENDED = ("no worker is left, and every SLURM worker job the cluster waits on ended before its "
         "worker joined")
#: a job script that fails at start, as a missing environment module makes it fail
FAILING = {"job-script-prologue": ["echo 'module: command not found: cuda/12.4' >&2", "exit 3"]}


def test_jobs_whose_script_fails_at_start_are_one_line_not_a_wait(partition, volume, tmp_path):
    """Worker jobs that end before their worker joins: a fixed-size cluster says so in
    seconds (it waited --worker-timeout to say only that the jobs were gone), exit 2,
    nothing written; an --adaptive one, which waited forever (dask-jobqueue counts the job
    as still coming and asks for no other), stops the run with exit 75 and its partial
    output kept. Both quote SLURM's state of the job and the line its script wrote last."""
    out = tmp_path / "out.ome.zarr"
    config, name = jobqueue(tmp_path, partition, **FAILING)
    t0 = time.monotonic()
    res = run_cli("--cluster", "slurm", "--jobs", "2", "--jobqueue-config", str(config),
                  "convert", str(volume), str(out), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert time.monotonic() - t0 < 60  # --worker-timeout is 120 s
    line = " ".join(res.stderr.split())
    assert ENDED in line
    assert "ended FAILED (exit code 3:0)" in line and f"in {config}" in line
    assert "'module: command not found: cuda/12.4'" in line
    assert not out.exists() and not list(tmp_path.glob(".out.ome.zarr*"))
    assert_no_jobs(name)

    config, name = jobqueue(tmp_path, partition, **FAILING)
    t0 = time.monotonic()
    res = run_cli("--cluster", "slurm", "--jobs", "2", "--adaptive", "--jobqueue-config",
                  str(config), "convert", str(volume), str(out), cwd=tmp_path, timeout=240,
                  env={"DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"})
    assert res.returncode == 75 and "Traceback" not in res.stderr, res.stderr
    assert time.monotonic() - t0 < 120
    line = " ".join(res.stderr.split())
    assert ENDED in line
    assert "'module: command not found: cuda/12.4'" in line
    assert "the finished blocks are kept for a rerun to resume" in line
    assert not out.exists() and (tmp_path / ".out.ome.zarr.partial").is_dir()
    assert_no_jobs(name)


def _sleep_on(block) -> frozenset[str]:
    """A block task of a fixed quarter second: the name of the worker it ran on."""
    from distributed import get_worker

    time.sleep(0.25)
    return frozenset({str(get_worker().name)})


def test_a_job_that_fails_at_start_beside_working_ones_is_replaced(partition, tmp_path,
                                                                   monkeypatch):
    """Of two worker jobs, the first to start fails in its prologue (a bad node) and the
    other's worker joins. The run went on with one worker, never told, and dask-jobqueue
    never replaced the job; now one line names the job, SLURM's state and its last words,
    and a new job is asked for: its worker runs blocks of the same run."""
    import operator

    from engine import slurmjobs
    from engine.blocks import BlockGrid
    from engine.runner import run_blocks

    # squeue asked every second, not every 10 s: the replacement's worker joins in a short run
    monkeypatch.setattr(slurmjobs, "ASK_EVERY_S", 1.0)
    first = tmp_path / "first-start"  # the first job to start makes it, and fails
    config, name = jobqueue(tmp_path, partition, **{"job-script-prologue": [
        f"if mkdir {first} 2>/dev/null; then echo 'bad node: /tmp is full' >&2; exit 3; fi"]})
    opts = ClusterOptions(cluster="slurm", jobs=2, jobqueue_config=str(config),
                          dashboard_address="127.0.0.1:0")
    lines: list[str] = []
    with connect(opts, report=lines.append) as c:
        report = run_blocks(c, BlockGrid((80,), 1), _sleep_on, name="sleep",
                            combine=operator.or_, max_in_flight=2)
        jobs = c.run(_job_id)
    said = [line for line in lines if "before its worker joined" in line]
    assert len(said) == 1, lines
    failed = said[0].split("SLURM worker job ", 1)[1].split()[0]
    assert said[0].startswith(f"SLURM worker job {failed} ended FAILED (exit code 3:0) before "
                              "its worker joined; the last line of "), said
    assert "'bad node: /tmp is full'" in said[0]
    assert "another job is asked for in its place (replacement 1 of at most 2)" in said[0]
    assert failed not in jobs.values() and len(set(jobs.values())) == 2, jobs
    assert len(report.value) == 2, f"the replacement's worker ran no block: {report.value}"
    assert report.computed == 80
    assert len(list((tmp_path / "slurm-logs").glob(f"{name}-*.err"))) == 3
    assert_no_jobs(name)


def test_refusing_scheduler_address(volume, tmp_path):
    """A scheduler address where nothing listens: one line naming it, exit 2, no output."""
    address = f"tcp://127.0.0.1:{free_port()}"
    out = tmp_path / "out.ome.zarr"
    res = run_cli("convert", str(volume), str(out), "--scheduler", address)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot reach the scheduler at {address}" in " ".join(res.stderr.split())
    assert not out.exists() and not list(tmp_path.glob(".out.ome.zarr*"))
