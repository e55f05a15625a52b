"""Resume: a conversion killed part-way is re-run, skips its finished blocks, and the
result equals an uninterrupted run; changed options invalidate the done-markers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.pipelines.convert import ConvertOptions, convert
from engine.runner import marker_ranges
from tests.conftest import run_cli, write_mrc

EXE = str(Path(sys.executable).parent / "voxelmill")
ARGS = ["--chunks", "16", "--block-mib", "0.25", "--workers", "1", "--threads-per-worker", "1"]


def finished_blocks(partial: Path) -> int:
    """Blocks marked done so far, every pass together (a marker file names the blocks of
    one task as ranges of their indices; a retried task may name some of them again)."""
    state = partial / ".voxelmill"
    if not state.exists():
        return 0
    marked: dict[Path, set[int]] = {}  # per pass folder
    for p in state.rglob("*"):
        if p.is_file():
            marked.setdefault(p.parent, set()).update(
                i for start, stop in marker_ranges(p.name) for i in range(start, stop))
    return sum(len(blocks) for blocks in marked.values())


def interrupt_conversion(src: Path, dst: Path, extra: list[str], after: int) -> int:
    """Start a conversion, SIGKILL it (and its cluster) once ``after`` blocks are done."""
    proc = subprocess.Popen([EXE, "convert", str(src), str(dst), *ARGS, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    partial = dst.parent / f".{dst.name}.partial"
    deadline = time.monotonic() + 120
    try:
        while finished_blocks(partial) < after:
            if proc.poll() is not None:
                pytest.fail("the conversion finished before it could be interrupted")
            if time.monotonic() > deadline:
                pytest.fail("the conversion made no progress")
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return finished_blocks(partial)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, np.ndarray]:
    data = np.random.default_rng(7).normal(size=(128, 128, 128)).astype(np.float32)
    path = tmp_path_factory.mktemp("resume") / "tomo.mrc"
    return write_mrc(path, data, voxel_size=8.0), data


def test_killed_conversion_resumes_and_equals_uninterrupted_run(source, client, tmp_path):
    src, data = source
    dst = tmp_path / "tomo.ome.zarr"
    done_before = interrupt_conversion(src, dst, [], after=16)
    assert done_before >= 16
    assert not dst.exists()  # nothing half-written at the destination
    assert (tmp_path / ".tomo.ome.zarr.partial").exists()

    res = run_cli("convert", str(src), str(dst), *ARGS)
    assert res.returncode == 0, res.stderr
    assert "resuming" in res.stderr
    skipped = int(re.search(r"(\d+) skipped", res.stdout).group(1))
    computed = int(re.search(r"(\d+) computed", res.stdout).group(1))
    assert skipped >= done_before - 2  # markers written while being killed may be torn
    assert computed > 0
    assert not (tmp_path / ".tomo.ome.zarr.partial").exists()

    opts = ConvertOptions(chunks=(16,), block_mib=0.25)
    ref = convert(src, tmp_path / "ref.ome.zarr", opts, client, report=lambda _: None)
    assert skipped + computed == sum(r.total for r in ref.reports)
    got, want = zarr.open_group(str(dst), mode="r"), zarr.open_group(str(ref.destination), mode="r")
    np.testing.assert_array_equal(got["0"][...], data)
    for i in range(len(ref.levels)):
        np.testing.assert_array_equal(got[str(i)][...], want[str(i)][...])
    assert not (dst / ".voxelmill").exists()


def test_conversion_stopped_while_creating_its_arrays_resumes(client, tmp_path, monkeypatch):
    """A run that fails after recording its identity but before creating every level array
    (here: a crash creating level 1) leaves a partial output; the next run resumes it,
    creates what is missing and finishes (it failed on every block before)."""
    from engine.io import omezarr

    data = np.random.default_rng(3).normal(size=(32, 40, 36)).astype(np.float32)
    np.save(tmp_path / "v.npy", data)
    dst = tmp_path / "v.ome.zarr"
    opts = ConvertOptions(chunks=(8,), assume_voxel_size=True)
    real = omezarr.create_level

    def crash_at_level_1(group, name, *args, **kwargs):
        if name == "1":
            raise RuntimeError("killed")
        return real(group, name, *args, **kwargs)

    monkeypatch.setattr(omezarr, "create_level", crash_at_level_1)
    with pytest.raises(RuntimeError, match="killed"):
        convert(tmp_path / "v.npy", dst, opts, client, report=lambda _: None)
    assert (tmp_path / ".v.ome.zarr.partial" / "0").is_dir()
    monkeypatch.setattr(omezarr, "create_level", real)
    lines: list[str] = []
    result = convert(tmp_path / "v.npy", dst, opts, client, report=lines.append)
    assert any("resuming" in line for line in lines)
    np.testing.assert_array_equal(zarr.open_group(str(dst), mode="r")["0"][...], data)
    assert len(result.levels) > 1


def test_changed_option_invalidates_done_markers(source, tmp_path):
    src, data = source
    dst = tmp_path / "tomo.ome.zarr"
    assert interrupt_conversion(src, dst, [], after=8) >= 8
    res = run_cli("convert", str(src), str(dst), *ARGS, "--clevel", "3")
    assert res.returncode == 0, res.stderr
    assert "removing an unfinished conversion" in res.stderr
    assert re.search(r"\b0 skipped", res.stdout)
    np.testing.assert_array_equal(zarr.open_group(str(dst), mode="r")["0"][...], data)
