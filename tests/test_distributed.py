"""A real distributed run: `dask scheduler` and two `dask worker` processes on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import dask_processes, free_port, run_cli, write_mrc

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A scheduler and two single-threaded workers as subprocesses; yields the address."""
    with dask_processes(tmp_path_factory.mktemp("dask-logs"), [[], []]) as address:
        yield address


def test_convert_on_external_cluster_equals_local_run(scheduler, client, tmp_path):
    from distributed import Client

    rng = np.random.default_rng(3)
    data = rng.normal(size=(40, 96, 80)).astype(np.float32)
    src = write_mrc(tmp_path / "tomo.mrc", data, voxel_size=(3.0, 3.0, 6.0))

    with Client(scheduler) as c:
        before = c.run(lambda dask_worker: dask_worker.state.executed_count)

    res = run_cli("convert", str(src), str(tmp_path / "remote.ome.zarr"), "--chunks", "16",
                  "--scheduler", scheduler)
    assert res.returncode == 0, res.stderr
    assert f"connected to scheduler {scheduler}" in res.stderr
    assert "dashboard" in res.stderr
    # workers started by hand without the allocator settings: one line says so
    assert "started without MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_" in res.stderr

    with Client(scheduler) as c:
        after = c.run(lambda dask_worker: dask_worker.state.executed_count)
    ran = {w: after[w] - before.get(w, 0) for w in after}
    assert len(ran) == 2 and all(n > 0 for n in ran.values()), ran  # both workers took blocks

    local = convert(src, tmp_path / "local.ome.zarr", ConvertOptions(chunks=(16,)), client,
                    report=lambda _: None)
    remote = zarr.open_group(str(tmp_path / "remote.ome.zarr"), mode="r")
    here = zarr.open_group(str(local.destination), mode="r")
    assert len(local.levels) > 1
    for i in range(len(local.levels)):
        np.testing.assert_array_equal(remote[str(i)][...], here[str(i)][...])
    np.testing.assert_array_equal(remote["0"][...], data)
    def metadata(group):  # provenance differs: one run came from the CLI, one from Python
        return {k: v for k, v in group.attrs.asdict().items() if k != "voxelmill"}

    assert metadata(remote) == metadata(here)

    # the workers run in another folder: paths typed relative to this one are sent absolute
    mask = (data > 0).astype(np.int16)
    write_mrc(tmp_path / "mask.mrc", mask, voxel_size=(3.0, 3.0, 6.0))
    res = run_cli("convert", "tomo.mrc", "rel.ome.zarr", "--chunks", "16", "--labels",
                  "mask=mask.mrc", "--scheduler", scheduler, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rel = zarr.open_group(str(tmp_path / "rel.ome.zarr"), mode="r")
    np.testing.assert_array_equal(rel["0"][...], data)
    np.testing.assert_array_equal(rel["labels/mask/0"][...], mask)


def test_unreachable_scheduler_is_a_user_error(tmp_path):
    src = write_mrc(tmp_path / "a.mrc", np.zeros((4, 8, 8), np.float32))
    res = run_cli("convert", str(src), str(tmp_path / "a.ome.zarr"),
                  "--scheduler", f"tcp://127.0.0.1:{free_port()}", timeout=120)
    assert res.returncode == 2
    assert "cannot reach the scheduler" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "a.ome.zarr").exists()


def test_segment_on_external_cluster_equals_local_run(scheduler, client, tmp_path):
    from skimage import filters, measure

    from engine.pipelines.segment import SegmentOptions, segment
    from tests.segment_helpers import blobs

    vol = (blobs((36, 64, 48), 31, sigma=2.5) * 1000).astype(np.uint16)
    np.save(tmp_path / "vol.npy", vol)
    src = convert(tmp_path / "vol.npy", tmp_path / "vol.ome.zarr",
                  ConvertOptions(chunks=(16,), assume_voxel_size=True), client,
                  report=lambda _: None).destination
    wf = tmp_path / "mo.yaml"
    wf.write_text("steps:\n"
                  "  - {name: mo, function: masked_object,\n"
                  "     parameters: {global_method: triangle, object_min_size: 30}}\n"
                  "  - {name: cells, function: label}\n"
                  "  - {name: big, function: size_filter, parameters: {min_size: 8}}\n")
    res = run_cli("segment", str(src), "--workflow", str(wf), "--name", "remote",
                  "--block", "16,32,32", "--scheduler", scheduler)
    assert res.returncode == 0, res.stderr
    assert "hold the GIL" not in res.stderr  # single-threaded workers: no note
    local = segment(src, SegmentOptions(str(wf), "local", block=(32, 64, 48)), client,
                    report=lambda _: None)
    remote = zarr.open_array(str(src / "labels" / "remote" / "0"), mode="r")[...]
    here = zarr.open_array(str(local.destination / "0"), mode="r")[...]
    np.testing.assert_array_equal(remote, here)
    # and both equal the whole-array masked-object thresholding
    low = vol > filters.threshold_triangle(vol)
    lab = measure.label(low, connectivity=1)
    lab = measure.label((np.bincount(lab.ravel())[lab] >= 30) & low, connectivity=1)
    high = np.zeros(vol.shape, bool)
    for i in range(1, lab.max() + 1):
        obj = lab == i
        high |= obj & (vol > filters.threshold_otsu(vol[obj]) * 0.98)
    ref = measure.label(high)
    np.testing.assert_array_equal(remote, np.where(np.bincount(ref.ravel())[ref] >= 8, ref, 0))
    assert remote.max() > 3


def test_gil_bound_command_on_threaded_workers_says_so(tmp_path):
    """segment on a worker of two threads: one line says a single-threaded worker per core
    runs it faster; convert (reads, compression and writes release the GIL) says nothing."""
    from engine.cluster import gil_threads_hint
    from tests.segment_helpers import blobs

    vol = (blobs((24, 32, 32), 5, sigma=2.0) * 1000).astype(np.uint16)
    np.save(tmp_path / "vol.npy", vol)
    wf = tmp_path / "wf.yaml"
    wf.write_text("steps:\n  - {name: mask, function: threshold, parameters: {method: otsu}}\n"
                  "  - {name: cells, function: label}\n")
    with dask_processes(tmp_path, [["--nthreads", "2"]]) as address:
        res = run_cli("convert", str(tmp_path / "vol.npy"), str(tmp_path / "vol.ome.zarr"),
                      "--assume-voxel-size", "--scheduler", address)
        assert res.returncode == 0, res.stderr
        assert "hold the GIL" not in res.stderr
        res = run_cli("segment", str(tmp_path / "vol.ome.zarr"), "--workflow", str(wf),
                      "--name", "cells", "--scheduler", address)
    assert res.returncode == 0, res.stderr
    note = gil_threads_hint({"w0": {"nthreads": 2}})
    assert note is not None and note in res.stderr, res.stderr
    assert res.stderr.count("hold the GIL") == 1


def _isolated_worker(address: str, hidden: Path, read_only: Path, logs: Path
                     ) -> subprocess.Popen:
    """A ``dask worker`` in its own mount namespace, where ``hidden`` is an empty tmpfs and
    ``read_only`` a read-only bind of itself: a worker on another machine that lacks a
    mount, or mounts it read-only."""
    script = (f"mount -t tmpfs none {hidden} && mount --bind {read_only} {read_only} && "
              f"mount -o remount,ro,bind {read_only} && exec {BIN / 'dask'} worker {address} "
              f"--host 127.0.0.1 --nthreads 1 --no-dashboard --local-directory {logs}")
    return subprocess.Popen(["unshare", "-m", "sh", "-c", script],
                            stdout=open(logs / "isolated.log", "w"), stderr=subprocess.STDOUT)


def test_paths_a_worker_does_not_see_are_one_line_before_anything_is_written(tmp_path):
    """A worker that lacks the input's mount or may not write where the output goes: the
    command stops before it writes anything, naming the path and the worker, exit 2 (it
    failed every block after retries, with a traceback, leaving a partial output)."""
    from distributed import Client

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not allowed here (it needs root)")
    hidden, read_only, logs = (tmp_path / d for d in ("hidden", "ro", "logs"))
    for d in (hidden, read_only, logs):
        d.mkdir()
    np.save(hidden / "vol.npy", np.arange(24 * 32 * 32, dtype=np.uint16).reshape(24, 32, 32))
    np.save(hidden / "seg.npy", np.ones((24, 32, 32), np.uint8))
    np.save(tmp_path / "vol.npy", np.zeros((8, 16, 16), np.uint16))
    res = run_cli("convert", str(hidden / "vol.npy"), str(hidden / "vol.ome.zarr"),
                  "--assume-voxel-size", "--labels", f"seg={hidden / 'seg.npy'}")
    assert res.returncode == 0, res.stderr  # on the embedded cluster: no question asked
    coords = tmp_path / "c.csv"
    coords.write_text("x,y,z\n16,16,12\n")
    wf = tmp_path / "wf.yaml"
    wf.write_text("steps:\n  - {name: mask, function: threshold, parameters: {method: otsu}}\n"
                  "  - {name: cells, function: label}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "logs" not in p.parts)
    with dask_processes(logs, []) as address:
        worker = _isolated_worker(address, hidden, read_only, logs)
        try:
            with Client(address) as c:
                c.wait_for_workers(1, timeout=60)
                (addr,) = c.scheduler_info()["workers"]
            cases = [  # command, the path named, what is wrong
                (["segment", str(hidden / "vol.ome.zarr"), "--workflow", str(wf), "--name",
                  "cells"], hidden / "vol.ome.zarr", "does not see it"),
                (["convert", str(hidden / "vol.npy"), str(tmp_path / "out.ome.zarr"),
                  "--assume-voxel-size"], hidden / "vol.npy", "does not see it"),
                (["convert", str(tmp_path / "vol.npy"), str(read_only / "out.ome.zarr"),
                  "--assume-voxel-size"], read_only, "cannot write into it"),
                (["patches", "extract", str(hidden / "vol.ome.zarr"), "seg", "--coords",
                  str(coords), "--out", str(tmp_path / "patches"), "--size", "8",
                  "--border", "2"],
                 hidden / "vol.ome.zarr", "does not see it")]
            for args, path, problem in cases:
                res = run_cli(*args, "--scheduler", address)
                assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
                line = " ".join(res.stderr.split())
                assert f"{path}: the worker {addr} {problem}, though this machine can" in line
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "logs" not in p.parts)
    assert after == before  # nothing written, nothing left


@pytest.mark.parametrize(("preload", "message"), [
    ('import sys\nsys.modules["engine"] = None\n',
     "cannot import voxelmill (ModuleNotFoundError: "),
    ('import engine\nengine.__version__ = "9.9.9"\n', "runs voxelmill 9.9.9, this machine "),
])
def test_workers_without_this_voxelmill_are_one_line(tmp_path, preload, message):
    """A worker that cannot import voxelmill (started from another environment) or imports
    another version: one line naming it, exit 2, nothing written. Before, a worker that
    could not import voxelmill closed on the first task and the command waited forever."""
    from distributed import Client

    (tmp_path / "logs").mkdir()
    script = tmp_path / "preload.py"
    script.write_text(preload)
    np.save(tmp_path / "vol.npy", np.zeros((8, 16, 16), np.uint16))
    with dask_processes(tmp_path / "logs", [["--preload", str(script)]]) as address:
        with Client(address) as c:
            (worker,) = c.scheduler_info()["workers"]
        res = run_cli("convert", str(tmp_path / "vol.npy"), str(tmp_path / "out.ome.zarr"),
                      "--assume-voxel-size", "--scheduler", address, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = " ".join(res.stderr.split())
    assert f"--scheduler {address}: the worker {worker} {message}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "preload.py", "vol.npy"]


def test_patches_extract_on_external_cluster_equals_local_run(scheduler, client, tmp_path):
    from engine.patches.extract import ExtractOptions, extract_patches
    from engine.patches.files import read_patch

    rng = np.random.default_rng(5)
    np.save(tmp_path / "tomo.npy", rng.normal(size=(32, 40, 36)).astype(np.float32))
    np.save(tmp_path / "seg.npy", (rng.random((32, 40, 36)) > 0.6).astype(np.uint8))
    src = tmp_path / "tomo.ome.zarr"
    convert(tmp_path / "tomo.npy", src, ConvertOptions(
        chunks=(16,), voxel_size=(4.0, 5.0, 6.0), unit="angstrom",
        labels=(("membranes", str(tmp_path / "seg.npy")),)), client, report=lambda _: None)
    coords = tmp_path / "c.csv"
    coords.write_text("x,y,z\n18,20,16\n1,38,30\n35,0,2\n")
    res = run_cli("patches", "extract", str(src), "membranes", "--coords", str(coords),
                  "--out", str(tmp_path / "remote"), "--size", "12", "--border", "2",
                  "--scheduler", scheduler)
    assert res.returncode == 0, res.stderr
    assert f"connected to scheduler {scheduler}" in res.stderr
    extract_patches(src, "membranes", coords, tmp_path / "local",
                    ExtractOptions(size=(12,), border=(2,)), client)
    for sub in ("imagesCorr", "labelsCorr"):
        names = sorted(p.name for p in (tmp_path / "local" / sub).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "remote" / sub).iterdir())
        assert len(names) == 3
        for name in names:
            a = read_patch(tmp_path / "remote" / sub / name)
            b = read_patch(tmp_path / "local" / sub / name)
            np.testing.assert_array_equal(a.data, b.data)
            assert a.voxel_size == b.voxel_size and a.origin == b.origin
    assert ((tmp_path / "remote" / "patches.csv").read_text()
            == (tmp_path / "local" / "patches.csv").read_text())


def _corrupt_chunks_outside(array: Path, keep: set[tuple[int, ...]]) -> int:
    """Overwrite every stored chunk of a zarr v3 array whose index is not in ``keep``."""
    spoiled = 0
    for f in (array / "c").rglob("*"):
        if f.is_file():
            index = tuple(int(p) for p in f.relative_to(array / "c").parts)
            if index not in keep:
                f.write_bytes(b"not a chunk")
                spoiled += 1
    return spoiled


def test_patches_extract_on_a_cluster_reads_only_the_chunks_it_needs(scheduler, client,
                                                                      tmp_path):
    from itertools import product

    from engine.patches.files import read_patch

    rng = np.random.default_rng(8)
    vol = rng.normal(size=(48, 48, 48)).astype(np.float32)
    seg = (rng.random((48, 48, 48)) > 0.5).astype(np.uint8)
    np.save(tmp_path / "tomo.npy", vol)
    np.save(tmp_path / "seg.npy", seg)
    src = tmp_path / "tomo.ome.zarr"
    convert(tmp_path / "tomo.npy", src, ConvertOptions(
        chunks=(16,), labels=(("membranes", str(tmp_path / "seg.npy")),),
        assume_voxel_size=True), client,
        report=lambda _: None)
    centres = [(8, 9, 10), (30, 36, 25)]  # z, y, x; patches of 12 stay inside the volume
    keep: set[tuple[int, ...]] = set()
    for c in centres:
        axes = [range((v - 6) // 16, (v + 5) // 16 + 1) for v in c]
        keep.update(product(*axes))
    spoiled = sum(_corrupt_chunks_outside(src / sub, keep) for sub in ("0", "labels/membranes/0"))
    assert spoiled >= 2 * (27 - len(keep))
    with pytest.raises(Exception):  # noqa: B017 - the spoiled chunks really cannot be read
        zarr.open_array(str(src / "0"), mode="r")[...]
    coords = tmp_path / "c.csv"
    coords.write_text("z,y,x\n" + "".join(f"{z},{y},{x}\n" for z, y, x in centres))
    res = run_cli("patches", "extract", str(src), "membranes", "--coords", str(coords),
                  "--out", str(tmp_path / "out"), "--size", "12", "--border", "2",
                  "--scheduler", scheduler)
    assert res.returncode == 0, res.stderr
    for i, (z, y, x) in enumerate(centres):
        region = (slice(z - 6, z + 6), slice(y - 6, y + 6), slice(x - 6, x + 6))
        name = f"other_tomo_patch{i}.nii.gz"
        image = read_patch(tmp_path / "out" / "imagesCorr" / name).data
        labels = read_patch(tmp_path / "out" / "labelsCorr" / name).data
        np.testing.assert_array_equal(image, vol[region])
        expected = seg[region].copy()
        inner = expected[2:-2, 2:-2, 2:-2].copy()
        expected[...] = 2
        expected[2:-2, 2:-2, 2:-2] = inner
        np.testing.assert_array_equal(labels, expected)
