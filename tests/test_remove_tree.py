"""Deleting big folders (work arrays, replaced outputs) on the cluster's workers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine import output
from engine.output import pieces, remove_pieces, remove_tree
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


def _unlinks_here(monkeypatch) -> list[str]:
    """The files this thread unlinks from now on (the fixture's workers are threads)."""
    here: list[str] = []
    unlink = os.unlink

    def recording(path, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            here.append(str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording)
    return here


def test_pieces_cover_the_tree_at_the_shallowest_level_with_enough(tmp_path):
    """Folders are expanded breadth first until there are enough pieces; the files met on
    the way are pieces too, as shares of their folder (counted, never listed)."""
    _chunk_tree(tmp_path / "a")
    a = str(tmp_path / "a")
    rows = [str(tmp_path / "a" / "c" / str(z)) for z in range(6)]
    assert sorted(pieces(tmp_path / "a", 2), key=str) == sorted(
        [(a, 0, 1), str(tmp_path / "a" / "c")], key=str)
    assert sorted(pieces(tmp_path / "a", 7), key=str) == sorted([(a, 0, 1), *rows], key=str)
    deep = pieces(tmp_path / "a", 10)  # 7 are too few: one level down, 30 folders
    assert len(deep) == 31 and (a, 0, 1) in deep
    assert all(Path(p).parent.parent.name == "c" for p in deep if isinstance(p, str))
    every = pieces(tmp_path / "a", 1000)  # the bottom: every row's files, one share each
    with_files = [str(p) for p in (tmp_path / "a").rglob("*")
                  if p.is_dir() and any(q.is_file() for q in p.iterdir())]
    assert sorted(every) == sorted((d, 0, 1) for d in [a, *with_files])
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "f").write_bytes(b"x")
    assert pieces(tmp_path / "flat", 4) == [(str(tmp_path / "flat"), 0, 1)]
    assert pieces(tmp_path / "flat" / "f", 4) == []  # not a folder: nothing to split


def test_shares_of_a_folders_files_are_disjoint_and_cover_them(tmp_path):
    """A folder of many files splits into shares (about FILES_PER_SHARE files each, at
    most ``want``); each share deletes its files only, the shares together all of them,
    and never a subfolder's."""
    folder = tmp_path / "blocks"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep").write_bytes(b"x")
    names = [f"{i}.bin" for i in range(1000)]
    for name in names:
        (folder / name).write_bytes(b"x")
    parts = pieces(folder, 8)  # 2 are too few: "sub" expanded too, its file a share
    shares = [p for p in parts if isinstance(p, tuple) and p[0] == str(folder)]
    assert len(shares) == -(-1000 // output.FILES_PER_SHARE)
    assert (str(folder / "sub"), 0, 1) in parts
    assert sorted(pieces(folder, 2), key=str) == sorted(  # the shares are capped at `want`
        [(str(folder), 0, 2), (str(folder), 1, 2), str(folder / "sub")], key=str)
    left = set(names)
    for share in shares:
        remove_pieces([share])
        now = {p.name for p in folder.iterdir() if p.is_file()}
        assert now < left  # this share deleted some files, and only files
        left = now
    assert left == set() and (folder / "sub" / "keep").exists()


def test_loose_files_beside_chunk_trees_go_to_the_workers(client, tmp_path, monkeypatch):
    """A work folder's files per block (beside its chunk trees) are deleted by the
    workers too, not left to this process."""
    from distributed import get_task_stream

    monkeypatch.setattr(output, "TASK_S", 0.0)
    monkeypatch.setattr(output, "FILES_PER_SHARE", 8)
    work = tmp_path / "work"
    _chunk_tree(work / "arr")
    (work / "blocks").mkdir()
    for i in range(40):
        (work / "blocks" / f"{i}.bin").write_bytes(b"x")
    here = _unlinks_here(monkeypatch)
    with get_task_stream(client) as ts:
        remove_tree(work, client)
    assert not work.exists()
    assert any("remove_pieces" in str(t["key"]) for t in ts.data)
    # here: the timed sample (an eighth of the pieces at most; a piece is a share of
    # about 8 files), then the empty folders; not the 40 files
    assert sum("blocks/" in p for p in here) <= 16


def test_the_sample_deletes_a_part_of_a_share_here(client, tmp_path, monkeypatch):
    """The pace is timed on a sixteenth of a share, not on a whole one (hundreds of files
    deleted here while every worker waits); the workers delete the rest of it."""
    monkeypatch.setattr(output, "TASK_S", 0.0)
    folder = tmp_path / "blocks"
    folder.mkdir()
    for i in range(4096):  # 2 threads: 8 shares of 512 files; parts[0] is sampled
        (folder / f"{i}.npz").write_bytes(b"x")
    here = _unlinks_here(monkeypatch)
    remove_tree(folder, client)
    assert not folder.exists()
    # about 4096 / (8 · 16) = 32 files, the names whose CRC-32 is 0 modulo 128
    assert 0 < len(here) <= 64


def test_a_tree_is_deleted_on_the_workers(client, tmp_path, monkeypatch):
    """The subfolders go as tasks on the workers (when the workers would be done sooner:
    always, with tasks that cost nothing); nothing is left."""
    from distributed import get_task_stream

    monkeypatch.setattr(output, "TASK_S", 0.0)
    _chunk_tree(tmp_path / "old")
    with get_task_stream(client) as ts:
        remove_tree(tmp_path / "old", client)
    assert not (tmp_path / "old").exists()
    removals = [t for t in ts.data if "remove_pieces" in str(t["key"])]
    # 31 pieces (30 chunk rows, the top folder's file; a sample of them timed here) in a
    # task per thread (the fixture's cluster has 2 threads)
    assert len(removals) == 2


def test_a_small_tree_is_deleted_here(client, tmp_path, monkeypatch):
    """A tree deleted here sooner than the workers' tasks would cost (small files on a
    local disk) gives the workers no tasks. A task is said to cost a second here: the
    rule's 3 ms lost to a sample timed on a loaded machine (a CI run with every core busy
    sampled the 120 files slowly enough to hand them out)."""
    from distributed import get_task_stream

    monkeypatch.setattr(output, "TASK_S", 1.0)
    _chunk_tree(tmp_path / "old")
    with get_task_stream(client) as ts:
        remove_tree(tmp_path / "old", client)
    assert not (tmp_path / "old").exists()
    assert not [t for t in ts.data if "remove_pieces" in str(t["key"])]


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

    monkeypatch.setattr(output, "TASK_S", 0.0)

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
    assert any("remove_pieces" in str(t["key"]) for t in ts.data)
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
