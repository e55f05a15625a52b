"""Deleting big folders (work arrays, replaced outputs) on the cluster's workers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine import output
from engine.output import remove_tree, subtrees
from engine.pipelines.convert import ConvertOptions, convert


def _chunk_tree(root: Path, rows: int = 6, cols: int = 5, files: int = 4) -> None:
    """A zarr-like ``c/z/y/x`` tree of small files."""
    for z in range(rows):
        for y in range(cols):
            d = root / "c" / str(z) / str(y)
            d.mkdir(parents=True)
            for x in range(files):
                (d / str(x)).write_bytes(b"x")
    (root / "zarr.json").write_text("{}")


def test_subtrees_are_the_shallowest_level_with_enough_folders(tmp_path):
    _chunk_tree(tmp_path / "a")
    rows = sorted((tmp_path / "a" / "c" / str(z)) for z in range(6))
    assert sorted(subtrees(tmp_path / "a", 2)) == rows  # "c" alone is one: one level down
    assert sorted(subtrees(tmp_path / "a", 6)) == rows
    deep = subtrees(tmp_path / "a", 10)  # 6 rows are too few: one level down, 30 folders
    assert len(deep) == 30 and all(p.parent.parent.name == "c" for p in deep)
    assert len(subtrees(tmp_path / "a", 1000)) == 30  # the deepest level found
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "f").write_bytes(b"x")
    assert subtrees(tmp_path / "flat", 4) == []


def test_a_tree_is_deleted_on_the_workers(client, tmp_path, monkeypatch):
    """The subfolders go as tasks on the workers (when deleting them here would take
    longer than LOCAL_REMOVE_S: always, here); nothing is left."""
    from distributed import get_task_stream

    monkeypatch.setattr(output, "LOCAL_REMOVE_S", 0.0)
    _chunk_tree(tmp_path / "old")
    with get_task_stream(client) as ts:
        remove_tree(tmp_path / "old", client)
    assert not (tmp_path / "old").exists()
    removals = [t for t in ts.data if "remove_folders" in str(t["key"])]
    # 29 chunk rows (the first timed here) in at most 4 tasks per thread (the fixture's
    # cluster has 2 threads)
    assert len(removals) == 8


def test_a_small_tree_is_deleted_here(client, tmp_path):
    """A tree deleted here sooner than LOCAL_REMOVE_S (small files on a local disk) gives
    the workers no tasks."""
    from distributed import get_task_stream

    _chunk_tree(tmp_path / "old")
    with get_task_stream(client) as ts:
        remove_tree(tmp_path / "old", client)
    assert not (tmp_path / "old").exists()
    assert not [t for t in ts.data if "remove_folders" in str(t["key"])]


def test_links_are_removed_not_followed(client, tmp_path):
    """A symbolic link inside the deleted tree (to a folder, to a file) is removed; what
    it points to stays."""
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data").write_bytes(b"precious")
    tree = tmp_path / "old"
    _chunk_tree(tree)
    for z in range(3):
        os.symlink(keep, tree / "c" / str(z) / "link")
    os.symlink(keep / "data", tree / "c" / "0" / "0" / "filelink")
    os.symlink(keep, tree / "toplink")
    remove_tree(tree, client)
    assert not tree.exists()
    assert (keep / "data").read_bytes() == b"precious"


class _LostCluster:
    """A client whose cluster is gone: every call fails."""

    def nthreads(self):
        raise OSError("cluster lost")

    def map(self, *args, **kwargs):
        raise OSError("cluster lost")


def test_without_a_cluster_the_client_deletes_it(tmp_path):
    _chunk_tree(tmp_path / "old")
    remove_tree(tmp_path / "old", _LostCluster())
    assert not (tmp_path / "old").exists()
    (tmp_path / "file").write_bytes(b"x")
    remove_tree(tmp_path / "file", _LostCluster())
    assert not (tmp_path / "file").exists()
    remove_tree(tmp_path / "absent", None)  # nothing to delete: no error


def test_overwrite_deletes_the_replaced_output_on_the_workers(client, tmp_path, monkeypatch):
    """``convert --overwrite`` of a multi-chunk volume: the old output's chunk rows are
    deleted by worker tasks (as a big one's would be); the new output is whole and the old
    one gone."""
    from distributed import get_task_stream

    monkeypatch.setattr(output, "LOCAL_REMOVE_S", 0.0)

    vol = np.arange(48 * 40 * 40, dtype=np.uint16).reshape(48, 40, 40)
    np.save(tmp_path / "v.npy", vol)
    dst = tmp_path / "v.ome.zarr"
    opts = ConvertOptions(chunks=(8,), assume_voxel_size=True, max_levels=1)
    convert(tmp_path / "v.npy", dst, opts, client, report=lambda _: None)
    np.save(tmp_path / "v.npy", vol[::-1].copy())
    with get_task_stream(client) as ts:
        convert(tmp_path / "v.npy", dst, ConvertOptions(
            chunks=(8,), assume_voxel_size=True, max_levels=1, overwrite=True), client,
            report=lambda _: None)
    assert any("remove_folders" in str(t["key"]) for t in ts.data)
    np.testing.assert_array_equal(zarr.open_group(str(dst), mode="r")["0"][...], vol[::-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy", "v.ome.zarr"]


def test_overwrite_keeps_a_file_named_like_its_trash(client, tmp_path):
    """The replaced output goes into a fresh hidden folder: the user's own ``.NAME.old``
    (file or folder) beside the destination is neither deleted nor replaced."""
    vol = np.arange(16 * 16 * 16, dtype=np.uint16).reshape(16, 16, 16)
    np.save(tmp_path / "v.npy", vol)
    dst = tmp_path / "v.ome.zarr"
    opts = ConvertOptions(chunks=(8,), assume_voxel_size=True, max_levels=1)
    convert(tmp_path / "v.npy", dst, opts, client, report=lambda _: None)
    (tmp_path / ".v.ome.zarr.old").write_text("mine")
    (tmp_path / ".v.ome.zarr.old-x").mkdir()
    (tmp_path / ".v.ome.zarr.old-x" / "notes").write_text("mine too")
    np.save(tmp_path / "v.npy", vol + 1)
    convert(tmp_path / "v.npy", dst, ConvertOptions(
        chunks=(8,), assume_voxel_size=True, max_levels=1, overwrite=True), client,
        report=lambda _: None)
    np.testing.assert_array_equal(zarr.open_group(str(dst), mode="r")["0"][...], vol + 1)
    assert (tmp_path / ".v.ome.zarr.old").read_text() == "mine"
    assert (tmp_path / ".v.ome.zarr.old-x" / "notes").read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".v.ome.zarr.old", ".v.ome.zarr.old-x", "v.npy", "v.ome.zarr"]


def test_overwrite_deletes_what_a_killed_replacement_left(client, tmp_path):
    """A replacement killed between moving the old output aside and deleting it leaves a
    hidden ``.NAME.old-XXXXXXXX``: the next replacement deletes it (and an empty one), but
    not one holding anything else, nor a name of another pattern."""
    vol = np.arange(16 * 16 * 16, dtype=np.uint16).reshape(16, 16, 16)
    np.save(tmp_path / "v.npy", vol)
    dst = tmp_path / "v.ome.zarr"
    opts = ConvertOptions(chunks=(8,), assume_voxel_size=True, max_levels=1)
    convert(tmp_path / "v.npy", dst, opts, client, report=lambda _: None)
    killed = tmp_path / ".v.ome.zarr.old-k1ll_3d0"
    killed.mkdir()
    os.rename(dst, killed / "v.ome.zarr")  # as commit() moves it, then the kill
    (tmp_path / ".v.ome.zarr.old-empty000").mkdir()
    for name in (".v.ome.zarr.old-mine0000", ".v.ome.zarr.old-x"):
        (tmp_path / name / "v.ome.zarr").mkdir(parents=True)
    (tmp_path / ".v.ome.zarr.old-mine0000" / "notes").write_text("mine")
    for overwrite in (False, True):
        convert(tmp_path / "v.npy", dst, ConvertOptions(
            chunks=(8,), assume_voxel_size=True, max_levels=1, overwrite=overwrite), client,
            report=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".v.ome.zarr.old-mine0000", ".v.ome.zarr.old-x", "v.npy", "v.ome.zarr"]
    assert (tmp_path / ".v.ome.zarr.old-mine0000" / "notes").read_text() == "mine"


def test_a_replacement_that_cannot_move_the_old_output_leaves_nothing(tmp_path, monkeypatch):
    """When the old output cannot be moved aside, the commit fails with both outputs where
    they were and no empty hidden folder beside them."""
    dst, partial = tmp_path / "v.ome.zarr", tmp_path / ".v.ome.zarr.partial"
    dst.mkdir()
    (dst / "zarr.json").write_text("{}")
    partial.mkdir()
    real_rename = Path.rename

    def refuse(self, target):
        if self == dst:
            raise PermissionError(13, "Permission denied")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(PermissionError):
        output.commit(partial, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v.ome.zarr.partial", "v.ome.zarr"]
