"""A reader never gets a mix: a store replaced (``convert --overwrite``) while a command
reads it gives that command the complete old data, the complete new data, or exit 2 with
one message, never old and new chunks together; inputs stay read-only."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.errors import InputError
from engine.io import readguard
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.export import plan_export, run_export
from tests.conftest import run_cli, write_mrc

EXE = str(Path(sys.executable).parent / "voxelmill")
ONE = ["--workers", "1", "--threads-per-worker", "1"]
SHAPE = (128, 128, 128)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> tuple[Path, np.ndarray, Path, np.ndarray]:
    """Two sources of one shape whose values differ everywhere (old < 0 ≤ new)."""
    root = tmp_path_factory.mktemp("readmix")
    rng = np.random.default_rng(3)
    old = -1 - rng.random(SHAPE, dtype=np.float32)
    new = rng.random(SHAPE, dtype=np.float32)
    return (write_mrc(root / "old.mrc", old), old, write_mrc(root / "new.mrc", new), new)


def _swap_in(store: Path, replacement: Path) -> None:
    """Replace ``store`` the way another process's commit does: rename, rename, delete."""
    trash = store.with_name(f".{store.name}.old")
    store.rename(trash)
    replacement.rename(store)
    import shutil

    shutil.rmtree(trash)


def test_export_of_a_store_replaced_mid_read_is_refused(volumes, client, tmp_path):
    old_src, _, new_src, _ = volumes
    opts = ConvertOptions(chunks=(32,))
    store = convert(old_src, tmp_path / "a.ome.zarr", opts, client, report=lambda _: None)
    other = convert(new_src, tmp_path / "b.ome.zarr", opts, client,
                    report=lambda _: None).destination
    out = tmp_path / "out.tif"
    with readguard.watching():
        plan = plan_export(store.destination, out)
        _swap_in(store.destination, other)
        with pytest.raises(InputError, match="replaced .* while this command read it"):
            run_export(plan, client)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.ome.zarr"]  # no partial left
    # once the command is over nothing is watched: a new export reads the new store whole
    run_export(plan_export(store.destination, out), client)


def test_replacing_an_input_by_this_command_itself_is_no_mix(volumes, client, tmp_path):
    """A process that re-converts a store it read earlier has not read a mix."""
    old_src, _, new_src, new = volumes
    dst = tmp_path / "a.ome.zarr"
    opts = ConvertOptions(chunks=(64,))
    convert(old_src, dst, opts, client, report=lambda _: None)
    with readguard.watching():
        plan_export(dst, tmp_path / "x.tif")
        convert(new_src, dst, ConvertOptions(chunks=(64,), overwrite=True), client,
                report=lambda _: None)
        run_export(plan_export(dst, tmp_path / "y.tif"), client)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "y.tif"), new)


def _read_only(root: Path) -> list[tuple[str, int, int]]:
    """Make a tree read-only; return a listing (name, size, mtime) to compare later."""
    listing = []
    for p in sorted(root.rglob("*")):
        listing.append((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns))
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return listing


def _wait_reading(proc: subprocess.Popen, partial: Path, size: int, deadline: float) -> bool:
    """Wait until ``proc`` has written ``size`` bytes of its partial output (it is reading
    its input), then stop it with its cluster; False when it finished first."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if partial.stat().st_size >= size:
                os.killpg(proc.pid, signal.SIGSTOP)
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    pytest.fail("the export made no progress")


def test_export_during_convert_overwrite_never_mixes(volumes, tmp_path):
    """Real processes: an export is stopped part-way through reading the store, a full
    ``convert --overwrite`` replaces the store, then the export continues. It must refuse
    (exit 2, one message) and write nothing; an export alongside a running overwrite
    gives the old data, the new data or that refusal. The input folder is read-only."""
    old_src, old, new_src, new = volumes
    parent = tmp_path / "data"
    parent.mkdir()
    store = parent / "a.ome.zarr"
    res = run_cli("convert", str(old_src), str(store), "--chunks", "16", *ONE)
    assert res.returncode == 0, res.stderr
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    overlapped = 0
    deadline = time.monotonic() + 120
    for attempt in range(4):  # the export may finish before it can be stopped: retry
        out = out_dir / f"x{attempt}.tif"
        listing = _read_only(store)
        export = subprocess.Popen([EXE, "export", str(store), str(out), *ONE],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        stopped = _wait_reading(export, out_dir / f".{out.name}.partial.tif", 2**20, deadline)
        if stopped:
            _, want_new = (old, new) if attempt % 2 == 0 else (new, old)
            try:
                for p in [store, *store.rglob("*")]:  # the writer owns the store again
                    p.chmod(p.stat().st_mode | stat.S_IWUSR)
                res = run_cli("convert", str(new_src if attempt % 2 == 0 else old_src),
                              str(store), "--chunks", "16", "--overwrite", *ONE)
                assert res.returncode == 0, res.stderr
            finally:
                os.killpg(export.pid, signal.SIGCONT)
        _, stderr = export.communicate(timeout=120)
        if stopped:
            overlapped += 1
            assert export.returncode == 2, stderr
            assert "replaced" in stderr and "Traceback" not in stderr
            assert [ln for ln in stderr.splitlines() if "error" in ln.lower()] == [
                next(ln for ln in stderr.splitlines() if ln.startswith("error:"))], stderr
            assert not out.exists()
            break
        assert export.returncode == 0, stderr
        assert [(str(p.relative_to(store)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in sorted(store.rglob("*"))] == listing  # nothing written into it
        np.testing.assert_array_equal(tifffile.imread(out), old if attempt % 2 == 0 else new)
    assert overlapped == 1, "no export could be stopped part-way through its read"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"x{i}.tif" for i in range(attempt))  # the refused export left nothing


def test_own_partial_outputs_and_removed_paths_are_not_replacements(tmp_path):
    """What a command reads back from its own partial output moves with its commit; a path
    that names nothing any more was removed, not replaced (its read fails on its own)."""
    from engine.output import commit

    partial = tmp_path / ".a.partial"
    (partial / "work").mkdir(parents=True)
    (tmp_path / "gone").mkdir()
    with readguard.watching():
        readguard.hold(partial / "work")
        readguard.hold(tmp_path / "gone")
        (tmp_path / "gone").rmdir()
        commit(partial, tmp_path / "a")
        (partial / "work").mkdir(parents=True)  # a new folder where the read one was
        readguard.check()
    assert not readguard.replaced()
