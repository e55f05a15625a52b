"""Resume identity is content-based: a source rewritten with the same size and its
modification time restored after a kill is never resumed into a mix of old and new data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from engine.io import sources
from engine.io.sources import file_identity
from tests.conftest import run_cli, write_mrc
from tests.test_resume import ARGS, interrupt_conversion


def _rewrite_keeping_stat(path: Path, change: int) -> None:
    """Flip the byte at offset ``change``, then restore size and mtime as a copy tool would."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(change)
        byte = f.read(1)
        f.seek(change)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_identity_changes_with_content_of_a_small_file(tmp_path):
    path = tmp_path / "a.raw"
    path.write_bytes(bytes(range(256)) * 64)
    before = file_identity(path)
    assert before["content"].startswith("sha256:")
    assert file_identity(path) == before  # stable while nothing changes
    _rewrite_keeping_stat(path, 5000)
    after = file_identity(path)
    assert after["content"] != before["content"]
    assert {k: v for k, v in after.items() if k not in ("content", "ctime_ns")} == \
        {k: v for k, v in before.items() if k not in ("content", "ctime_ns")}


def test_identity_of_a_large_file_samples_and_keeps_ctime(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CONTENT_HASH_BYTES", 1024)
    path = tmp_path / "big.raw"
    path.write_bytes(np.random.default_rng(0).bytes(4 * 2**20))
    before = file_identity(path)
    assert before["content"].startswith("sampled-sha256:")
    _rewrite_keeping_stat(path, 0)  # the head is always sampled
    assert file_identity(path)["content"] != before["content"]
    # a byte between samples is not hashed, but its rewrite moved the status-change time
    # (which no user can set back), so the identity still changes
    sampled = file_identity(path)
    gap = (path.stat().st_size - sources.SAMPLE_BYTES) // (sources.SAMPLES - 1) // 2
    ctime = path.stat().st_ctime_ns
    while path.stat().st_ctime_ns == ctime:  # coarse ctime clocks: wait for a new tick
        _rewrite_keeping_stat(path, gap)
    after = file_identity(path)
    assert after["ctime_ns"] != sampled["ctime_ns"]
    assert after != sampled


def test_folder_identity_covers_each_file(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        (folder / f"z{i:03d}.tif").write_bytes(bytes([i]) * 1000)
    before = file_identity(folder)
    _rewrite_keeping_stat(folder / "z001.tif", 10)
    assert file_identity(folder)["content"] != before["content"]


def test_source_rewritten_after_a_kill_is_redone_not_mixed(tmp_path):
    rng = np.random.default_rng(11)
    old = rng.normal(size=(128, 128, 128)).astype(np.float32)
    new = rng.normal(size=(128, 128, 128)).astype(np.float32)
    src = write_mrc(tmp_path / "tomo.mrc", old, voxel_size=8.0)
    dst = tmp_path / "tomo.ome.zarr"
    assert interrupt_conversion(src, dst, [], after=8) >= 8
    st = src.stat()
    write_mrc(src, new, voxel_size=8.0)  # same shape, so the same size
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    res = run_cli("convert", str(src), str(dst), *ARGS)
    assert res.returncode == 0, res.stderr
    assert "removing an unfinished conversion" in res.stderr
    assert "resuming" not in res.stderr
    np.testing.assert_array_equal(zarr.open_group(str(dst), mode="r")["0"][...], new)
