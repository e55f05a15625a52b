"""Fault tolerance on real processes: a worker killed mid-run, the CLI killed and re-run,
two runs on one output, damaged input chunks."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.errors import DestinationError
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.segment import SegmentOptions, segment
from engine.runlock import lock_path, output_lock
from tests.conftest import dask_processes, run_cli
from tests.segment_helpers import blobs
from tests.test_resume import finished_blocks

EXE = str(Path(sys.executable).parent / "voxelmill")
WORKFLOW = ("steps:\n"
            "  - {name: smooth, function: gaussian, parameters: {sigma: 1.5}}\n"
            "  - {name: mask, function: threshold, parameters: {method: otsu, factor: 1.2}}\n"
            "  - {name: cells, function: label}\n"
            "  - {name: big, function: size_filter, parameters: {min_size: 20}}\n")


@pytest.fixture(scope="module")
def image(tmp_path_factory, client) -> Path:
    """A 64³ OME-Zarr of blobs (16³ chunks) and a workflow file beside it."""
    folder = tmp_path_factory.mktemp("faults")
    vol = (blobs((64, 64, 64), 60, sigma=2.5) * 1000).astype(np.uint16)
    np.save(folder / "vol.npy", vol)
    (folder / "wf.yaml").write_text(WORKFLOW)
    return convert(folder / "vol.npy", folder / "vol.ome.zarr",
                   ConvertOptions(chunks=(16,), assume_voxel_size=True), client,
                   report=lambda _: None).destination


@pytest.fixture(scope="module")
def reference(image, client) -> np.ndarray:
    """The uninterrupted segmentation (in-process cluster)."""
    res = segment(image, SegmentOptions(str(image.parent / "wf.yaml"), "reference",
                                        block=(16, 16, 16)), client, report=lambda _: None)
    labels = zarr.open_array(str(res.destination / "0"), mode="r")[...]
    assert labels.max() > 30
    return labels


def _copy(image: Path, dst: Path) -> Path:
    shutil.copytree(image, dst, ignore=shutil.ignore_patterns("labels"))
    return dst


def test_worker_killed_mid_segmentation_gives_identical_output(image, reference, tmp_path):
    """SIGKILL one of two `dask worker` processes while blocks run: its nanny restarts it,
    the scheduler reruns its tasks, and the labels equal the uninterrupted run's."""
    from distributed import Client

    src = _copy(image, tmp_path / "vol.ome.zarr")
    partial = src / "labels" / ".cells.partial"
    with dask_processes(tmp_path, [[], []]) as address, Client(address) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        killed: dict[str, int] = {}

        def kill_when_busy() -> None:
            deadline = time.monotonic() + 120
            while finished_blocks(partial) < 12 and time.monotonic() < deadline:
                time.sleep(0.01)
            killed["at"] = finished_blocks(partial)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        result = segment(src, SegmentOptions(str(image.parent / "wf.yaml"), "cells",
                                             block=(16, 16, 16)), client,
                         report=lambda _: None)
        killer.join()
        after = client.run(os.getpid)
    total = sum(s["computed"] for s in result.stages)
    assert 12 <= killed["at"] < total  # killed in the middle of the run
    assert victim not in after.values() and len(after) == 2  # the nanny started a new one
    np.testing.assert_array_equal(zarr.open_array(str(result.destination / "0"))[...],
                                  reference)


@pytest.mark.parametrize("lost", ["workers", "scheduler"])
def test_a_lost_cluster_stops_with_exit_75_and_the_rerun_resumes(
        image, reference, tmp_path, monkeypatch, lost):
    """Mid-segmentation on `--scheduler`, the cluster is lost: its only worker (no nanny to
    restart it) on a scheduler configured to fail tasks after 2 s without workers (dask's
    ``no-workers-timeout``, what ``--cluster slurm`` sets from ``--worker-timeout``), or
    the scheduler itself (the client gives up reconnecting after 10 s). The command stops
    with one line and exit 75, no traceback, the partial labels and their finished blocks
    kept (before, it waited forever, or printed pages of tracebacks). On a cluster that
    works, the same command resumes them and the labels equal the uninterrupted run's."""
    from distributed import Client

    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT", "2s")
    src = _copy(image, tmp_path / "vol.ome.zarr")
    partial = src / "labels" / ".cells.partial"
    args = ("segment", str(src), "--workflow", str(image.parent / "wf.yaml"), "--name",
            "cells", "--block", "16,16,16")
    (tmp_path / "first").mkdir()
    workers = [["--no-nanny"]] if lost == "workers" else [[], []]
    with dask_processes(tmp_path / "first", workers) as address:
        with Client(address) as c:
            victim = (c.run_on_scheduler(os.getpid) if lost == "scheduler"
                      else next(iter(c.run(os.getpid).values())))
        proc = subprocess.Popen([EXE, *args, "--scheduler", address], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while finished_blocks(partial) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at = finished_blocks(partial)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        waited = time.monotonic() - t0
    assert proc.returncode == 75, stderr
    assert "Traceback" not in stderr and waited < 60, stderr
    line = " ".join(stderr.split())
    assert ("the cluster has had no worker for 2 s" if lost == "workers" else
            f"lost the connection to the scheduler at {address}") in line, stderr
    assert "run the same command again to resume" in line
    assert [s for s in stderr.splitlines() if s.startswith("error:")] == \
        [s for s in stderr.splitlines() if "error" in s.lower()], stderr  # one error line
    assert partial.is_dir() and finished_blocks(partial) >= killed_at >= 12
    assert not (src / "labels" / "cells").exists()

    (tmp_path / "again").mkdir()
    with dask_processes(tmp_path / "again", [[]]) as address:
        res = run_cli(*args, "--scheduler", address, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resuming an interrupted" in res.stderr
    np.testing.assert_array_equal(zarr.open_array(str(src / "labels" / "cells" / "0"))[...],
                                  reference)


def test_a_block_that_outgrows_its_worker_is_named_with_the_memory_limit(tmp_path,
                                                                          monkeypatch):
    """A block needing more memory than its worker may use: the nanny ends the worker
    each time (here the scheduler allows no retry), and the run stops with one
    :class:`ClusterLost` naming blocks the worker ran and its limit (was a
    ``KilledWorker`` traceback)."""
    from distributed import Client

    from engine.blocks import BlockGrid
    from engine.errors import ClusterLost
    from engine.runner import run_blocks

    def hog(block) -> None:
        if block.index == (2,):
            held = np.ones(600 * 2**20, dtype=np.uint8)  # touched: resident
            time.sleep(1.5)  # the nanny's monitor looks every 100 ms
            del held

    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
    with dask_processes(tmp_path, [["--memory-limit", "400MiB"]]) as address, \
            Client(address) as client:
        # every task on the dying worker fails (blocks 1 and 2 in one task, or block 3)
        with pytest.raises(ClusterLost, match=r"^hog: a worker running blocks? \(\d,\).* "
                           r"ended: most likely a block needs more memory than a worker "
                           r"may use \(400 MiB\); .*--memory-limit.*--block"):
            run_blocks(client, BlockGrid((4,), 1), hog, name="hog")
        # the nanny's new worker up before the processes stop (a nanny stopped while it
        # restarts its worker takes 20 s)
        client.wait_for_workers(1, timeout=60)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/small`` (needs root and ``mount``; skips without),
    unmounted after the test."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_mid_run_is_one_line_and_the_rerun_resumes(small_disk, tmp_path):
    """`convert` writing a 3.4 MiB image to a 2 MiB file system (the free-space check told
    otherwise, as another job filling the disk meanwhile would): one line naming the
    failure, exit 75, no traceback (was pages of worker logs and a traceback, exit 1), the
    partial output kept. With room made, the same command resumes and the image equals
    the input."""
    data = np.random.default_rng(0).random((96, 96, 96), dtype=np.float32)
    np.save(tmp_path / "in.npy", data)
    out = small_disk / "out.ome.zarr"
    args = ("convert", str(tmp_path / "in.npy"), str(out), "--chunks", "32",
            "--assume-voxel-size")
    env = {**os.environ, "VOXELMILL_FREE_DISK_MIB": "1000"}
    res = run_cli(*args, env=env)
    assert res.returncode == 75, res.stderr
    assert "Traceback" not in res.stderr and "Compute Failed" not in res.stderr, res.stderr
    line = " ".join(res.stderr.split())
    assert "No space left on device" in line and "free some space" in line, res.stderr
    assert [p.name for p in small_disk.iterdir()] == [".out.ome.zarr.partial"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    res = run_cli(*args, env=env)
    assert res.returncode == 0, res.stderr
    assert "resuming an interrupted" in res.stderr, res.stderr
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[...], data)


def test_a_value_lost_before_it_was_fetched_is_waited_for_again(tmp_path):
    """A worker dies after its task finished and before the client fetched the value: the
    scheduler reruns the task, and the runner waits for it instead of calling the block
    failed (its future comes out of ``as_completed`` lost or pending). The streaming
    sum counts every block once.

    Deterministic: the first task to start (the victim's) waits until the client is held
    in ``on_done`` for another block; it then returns and its worker exits a second later,
    while the client is still held; the block's second run takes seconds, so the runner
    sees the future only after the loss and before the rerun ends."""
    from distributed import Client

    from engine.blocks import BlockGrid
    from engine.runner import run_blocks

    flags = tmp_path / "flags"
    flags.mkdir()

    def task(block) -> int:
        i = block.index[0]
        (flags / f"ran-{i}-{os.getpid()}").touch()
        try:  # the first task anywhere makes its worker the victim
            os.close(os.open(flags / "victim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            # the victim's block, run again: still running when the client looks at it
            time.sleep(3.0 if (flags / "victim").read_text() == str(i) else 0.02)
            return i + 1
        (flags / "victim").write_text(str(i))
        deadline = time.monotonic() + 60
        while not (flags / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

        def die() -> None:
            time.sleep(1.0)  # the scheduler and the client have the task as finished
            (flags / "dying").touch()
            os._exit(1)

        threading.Thread(target=die, daemon=True).start()
        return i + 1

    held: list[int] = []

    def on_done(block) -> None:
        if held:
            return
        held.append(block.index[0])
        (flags / "release").touch()
        deadline = time.monotonic() + 60
        while not (flags / "dying").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)  # the worker's loss reaches the scheduler, then this client

    grid = BlockGrid((16,), 1)
    with dask_processes(tmp_path, [[], []]) as address, Client(address) as client:
        before = set(client.run(os.getpid).values())
        report = run_blocks(client, grid, task, name="lost", combine=lambda a, b: a + b,
                            max_in_flight=4, on_done=on_done)
        after = set(client.run(os.getpid).values())
    assert (flags / "dying").exists() and len(before - after) == 1  # the victim died
    victim = int((flags / "victim").read_text())
    assert held and held[0] != victim
    runs = [p.name for p in flags.glob(f"ran-{victim}-*")]
    assert len(runs) == 2  # finished, lost with its worker, run again
    assert report.computed == 16 and report.value == sum(range(1, 17))


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _wait_stopped(pid: int, timeout: float = 30) -> None:
    """Wait until process ``pid`` and all its descendants are stopped (SIGSTOP taken)."""
    import psutil

    deadline = time.monotonic() + timeout
    root = psutil.Process(pid)
    while True:
        try:
            procs = [root, *root.children(recursive=True)]
            if all(p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for p in procs):
                return
        except psutil.NoSuchProcess:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the frozen run's processes did not all stop")
        time.sleep(0.01)


SEGMENT = ["--workflow", "WF", "--name", "cells", "--block", "16,16,16", "--workers", "1",
           "--threads-per-worker", "1"]


def _segment_args(src: Path, wf: Path) -> list[str]:
    return ["segment", str(src), *[str(wf) if a == "WF" else a for a in SEGMENT]]


def _segmenting(image: Path, tmp_path: Path
                ) -> tuple[Path, Path, Path, subprocess.Popen]:
    """A copy of ``image``, its workflow, the partial labels and a `voxelmill segment` of
    it in its own process group, returned once 12 blocks are done."""
    src = _copy(image, tmp_path / "vol.ome.zarr")
    wf = image.parent / "wf.yaml"
    partial = src / "labels" / ".cells.partial"
    proc = _start(_segment_args(src, wf))
    try:
        _wait_for(lambda: finished_blocks(partial) >= 12, proc, "12 blocks were done")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return src, wf, partial, proc


def test_killed_cli_resumes_and_a_concurrent_run_is_refused(image, reference, tmp_path):
    """The whole `voxelmill segment` process group is frozen part-way (SIGSTOP) and a
    second run is refused (lock); then the first is SIGKILLed, and the re-run takes over
    the dead run's lock, skips the finished blocks, says how many, and its labels equal
    the uninterrupted run's."""
    src, wf, partial, first = _segmenting(image, tmp_path)
    try:
        os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run: alive, holding the lock
        _wait_stopped(first.pid)  # a signal is delivered later than killpg returns
        done = finished_blocks(partial)
        second = run_cli(*_segment_args(src, wf))
        assert second.returncode == 2, second.stderr
        assert "another voxelmill run is writing it" in second.stderr
        assert f"process {first.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert finished_blocks(partial) == done  # the refused run touched nothing
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = finished_blocks(partial)
    assert lock_path(src / "labels" / "cells").exists()  # left behind by the killed run

    res = run_cli(*_segment_args(src, wf))
    assert res.returncode == 0, res.stderr
    assert "taking over a stale lock" in res.stderr
    assert "resuming an interrupted segmentation" in res.stderr
    skipped = int(re.search(r"(\d+) skipped \(already done\)", res.stdout).group(1))
    assert skipped >= done - 2  # a marker torn by the kill is recomputed
    assert not lock_path(src / "labels" / "cells").exists()
    labels = zarr.open_array(str(src / "labels" / "cells" / "0"), mode="r")[...]
    np.testing.assert_array_equal(labels, reference)


def test_sigterm_stops_the_cli_as_ctrl_c_does_and_the_rerun_resumes(image, reference, tmp_path):
    """SIGTERM (a batch job's time limit, ``scancel``) to a running `voxelmill segment`: one
    line saying to rerun, exit 143, no traceback, its embedded workers gone and its lock
    released (the run cleaned up, where before the process just died); the rerun resumes
    the finished blocks and its labels equal the uninterrupted run's."""
    import psutil

    src, wf, partial, proc = _segmenting(image, tmp_path)
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the embedded cluster's processes
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM); run the same command again to resume" in " ".join(
        stderr.split())
    assert "Traceback" not in stderr, stderr
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    assert not lock_path(src / "labels" / "cells").exists()
    assert partial.is_dir() and finished_blocks(partial) >= 12

    res = run_cli(*_segment_args(src, wf))
    assert res.returncode == 0, res.stderr
    assert "resuming an interrupted segmentation" in res.stderr
    assert "stale lock" not in res.stderr
    np.testing.assert_array_equal(
        zarr.open_array(str(src / "labels" / "cells" / "0"), mode="r")[...], reference)


def test_lock_of_a_live_holder_elsewhere_is_respected_and_an_old_one_taken_over(tmp_path):
    dst = tmp_path / "out.ome.zarr"
    lock = lock_path(dst)
    lock.write_text(json.dumps({"host": "node17", "pid": 1, "started": "2026-11-25T00:00:00Z",
                                "command": "voxelmill convert a.mrc out.ome.zarr",
                                "token": "x"}))
    with pytest.raises(DestinationError, match=r"process 1 on node17.*voxelmill convert"):
        with output_lock(dst):
            pass
    old = time.time() - 3600
    os.utime(lock, (old, old))  # its holder stopped refreshing an hour ago
    lines: list[str] = []
    with output_lock(dst, report=lines.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "not refreshed for" in lines[0]
    assert not lock.exists()


def test_lock_is_refreshed_while_held(tmp_path):
    dst = tmp_path / "x"
    with output_lock(dst, stale_after=0.4):
        lock = lock_path(dst)
        old = time.time() - 3600
        os.utime(lock, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.stat().st_mtime < 1


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_input_chunk_stops_with_its_name(image, tmp_path, damage):
    src = _copy(image, tmp_path / "vol.ome.zarr")
    chunk = src / "0" / "c" / "2" / "3" / "1"
    assert chunk.is_file()
    if damage == "corrupt":
        chunk.write_bytes(chunk.read_bytes()[:40])  # truncated
    else:
        chunk.unlink()
    res = run_cli(*_segment_args(src, image.parent / "wf.yaml"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr + res.stdout
    message = " ".join(res.stderr.split())
    assert f"{src / '0'}: chunk (2, 3, 1)" in message
    assert ("is missing" if damage == "missing" else "cannot be read") in message
    # what wrote the image, from its provenance (convert, run from Python: no command line)
    assert "written by voxelmill's 'convert' operation" in message
    assert not (src / "labels" / "cells").exists()
    assert finished_blocks(src / "labels" / ".cells.partial") == 0  # nothing marked done


def test_a_damaged_chunk_names_the_command_that_wrote_its_array(tmp_path):
    """A damaged prediction is re-made by the predict command that wrote it (its group's
    provenance), not by a conversion; an array without provenance gets a general hint."""
    import zarr

    from engine.errors import InputError
    from engine.io.integrity import read_checked

    group = zarr.open_group(str(tmp_path / "p"), mode="w", zarr_format=3)
    arr = group.create_array("0", shape=(8, 8), chunks=(4, 4), dtype="f4")
    arr[:] = 1.0
    command = "voxelmill predict img.ome.zarr --checkpoint m.pt --name p"
    group.attrs["voxelmill"] = {"provenance": [{"op": "predict", "command": command}]}
    chunk = tmp_path / "p" / "0" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    ro = zarr.open_array(str(tmp_path / "p" / "0"), mode="r")
    with pytest.raises(InputError, match=f"chunk \\(1, 0\\).*written by `{command}`"):
        read_checked(ro, str(tmp_path / "p" / "0"), (slice(0, 8), slice(0, 8)))
    del group.attrs["voxelmill"]
    with pytest.raises(InputError, match="from its source"):
        read_checked(zarr.open_array(str(tmp_path / "p" / "0"), mode="r"),
                     str(tmp_path / "p" / "0"), (slice(0, 8), slice(0, 8)))
