"""User errors through the real ``voxelmill`` console script.

Every case checks what a person (or a script that parses the output) relies on: exit code 2,
exactly one ``error:`` line on stderr that names the file or the value at fault, no
traceback, nothing on stdout, no cluster started, and nothing written or touched — no
destination, no hidden ``.NAME.partial`` sibling, every file and folder of the working
directory (inputs included) byte for byte and mtime for mtime as it was.

Each case runs in its own folder; the subprocesses run a few at a time so that the file
stays fast (each one pays only for interpreter start-up and imports: a user error is
raised before any cluster starts).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from engine.errors import VoxelmillError
from engine.pipelines.convert import ConvertOptions, convert, plan_conversion
from tests.conftest import run_cli, write_mrc

SHAPE = (20, 30, 25)
PAST = time.time() - 3600


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (and ``root`` itself): kind, size, mtime and content hash."""
    out: dict[str, tuple] = {".": ("dir", root.stat().st_mtime_ns)}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir", st.st_mtime_ns)
        else:
            out[rel] = ("file", st.st_size, st.st_mtime_ns,
                        hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def age(root: Path) -> None:
    """Date every entry an hour back, so that any touch shows as a changed mtime."""
    for p in [*root.rglob("*"), root]:
        os.utime(p, (PAST, PAST), follow_symlinks=False)


def volume() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


# ------------------------------------------------------------------------- case set-ups

def put_mrc(d: Path) -> None:
    write_mrc(d / "vol.mrc", volume(), voxel_size=(2.0, 2.0, 4.0))


def put_xyz(d: Path) -> None:
    (d / "points.xyz").write_text("0 0 0\n1 1 1\n")


def put_truncated_mrc(d: Path) -> None:
    write_mrc(d / "cut.mrc", volume())
    full = (d / "cut.mrc").stat().st_size
    with open(d / "cut.mrc", "r+b") as fh:
        fh.truncate(full - 1000)
    with pytest.raises(ValueError):  # mrcfile itself refuses it: a real truncation
        mrcfile.open(d / "cut.mrc", permissive=False).close()


def put_corrupt_tiff(d: Path) -> None:
    (d / "slide.tif").write_bytes(np.random.default_rng(0).bytes(4096))


def put_existing_zarr_destination(d: Path) -> None:
    put_mrc(d)
    (d / "out.ome.zarr").mkdir()
    (d / "out.ome.zarr" / "keep.txt").write_text("an earlier result")


def put_mismatched_labels(d: Path) -> None:
    put_mrc(d)
    write_mrc(d / "seg.mrc", np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint16))


def put_zarr(d: Path, zarr_src: Path) -> None:
    shutil.copytree(zarr_src, d / "src.ome.zarr")


def put_zarr_and_existing_export(d: Path, zarr_src: Path) -> None:
    put_zarr(d, zarr_src)
    (d / "out.mrc").write_bytes(b"an earlier export")


def put_plain_tiff(d: Path) -> None:
    tifffile.imwrite(d / "plain.tif", volume().astype(np.uint16))  # no resolution, no unit


def put_npy(d: Path) -> None:
    np.save(d / "vol.npy", volume())


def put_zero_size_ome_tiff(d: Path) -> None:
    tifffile.imwrite(d / "zero.ome.tif", volume(), ome=True, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 0.0, "PhysicalSizeY": 0.5})


def put_nan_size_hdf5(d: Path) -> None:
    with h5py.File(d / "stack.h5", "w") as f:
        f["raw"] = volume()
        f["raw"].attrs["element_size_um"] = [1.0, float("nan"), 0.5]


def put_qqyx_tiff(d: Path) -> None:
    """Two channels of a 3D stack whose axes tifffile reports as QQYX."""
    data = np.zeros((SHAPE[0], 2, *SHAPE[1:]), np.uint8)
    tifffile.imwrite(d / "two.tif", data, metadata={"axes": "QQYX"})


def put_markup_hdf5(d: Path) -> None:
    with h5py.File(d / "s[b].h5", "w") as f:
        f["raw"] = volume()


@dataclass(frozen=True)
class Case:
    prepare: Callable[..., None] | None
    args: tuple[str, ...]
    names: tuple[str, ...]          # each must appear in the error line
    dst: str | None = None          # must not exist afterwards, nor its .partial sibling
    contains: str = ""              # further text the message must hold (lower case)
    needs_zarr: bool = False


CASES: dict[str, Case] = {
    "missing-input": Case(None, ("convert", "missing.mrc", "out.ome.zarr"),
                          ("missing.mrc",), "out.ome.zarr"),
    # a file name is data, not console markup: "scan[a].mrc" must be printed as it is
    "missing-input-brackets": Case(None, ("convert", "scan[a].mrc", "out.ome.zarr"),
                                   ("scan[a].mrc",), "out.ome.zarr"),
    "unknown-format": Case(put_xyz, ("convert", "points.xyz", "out.ome.zarr"),
                           ("points.xyz",), "out.ome.zarr"),
    "truncated-mrc": Case(put_truncated_mrc, ("convert", "cut.mrc", "out.ome.zarr"),
                          ("cut.mrc",), "out.ome.zarr", contains="truncated"),
    "corrupt-tiff": Case(put_corrupt_tiff, ("convert", "slide.tif", "out.ome.zarr"),
                         ("slide.tif",), "out.ome.zarr"),
    "destination-exists": Case(put_existing_zarr_destination,
                               ("convert", "vol.mrc", "out.ome.zarr"), ("out.ome.zarr",),
                               contains="--overwrite"),
    "voxel-size-zero": Case(put_mrc, ("convert", "vol.mrc", "out.ome.zarr", "--voxel-size", "0"),
                            ("0",), "out.ome.zarr", contains="voxel size"),
    "voxel-size-negative": Case(put_mrc, ("convert", "vol.mrc", "out.ome.zarr", "--voxel-size",
                                          "-1,1,1"), ("-1",), "out.ome.zarr",
                                contains="voxel size"),
    "voxel-size-text": Case(put_mrc, ("convert", "vol.mrc", "out.ome.zarr", "--voxel-size",
                                      "abc"), ("abc", "--voxel-size"), "out.ome.zarr"),
    "voxel-size-count": Case(put_mrc, ("convert", "vol.mrc", "out.ome.zarr", "--voxel-size",
                                       "1,2"), ("--voxel-size",), "out.ome.zarr"),
    "label-shape": Case(put_mismatched_labels, ("convert", "vol.mrc", "out.ome.zarr",
                                                "--labels", "cells=seg.mrc"),
                        ("seg.mrc",), "out.ome.zarr", contains="shape"),
    "roi-axes": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--roi", "0:5,0:5"),
                     ("0:5,0:5",), "out.mrc", needs_zarr=True),
    "roi-beyond": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--roi",
                                  "0:500,0:5,0:5"), ("0:500",), "out.mrc", needs_zarr=True),
    "roi-text": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--roi", "a:b,0:5,0:5"),
                     ("a:b",), "out.mrc", needs_zarr=True),
    "roi-empty": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--roi", "5:5,0:5,0:5"),
                      ("5:5",), "out.mrc", needs_zarr=True),
    "level-missing": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--level", "9"),
                          ("src.ome.zarr", "9"), "out.mrc", needs_zarr=True),
    "export-suffix": Case(put_zarr, ("export", "src.ome.zarr", "out.xyz"), ("out.xyz",),
                          "out.xyz", needs_zarr=True),
    "export-label": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--label", "nuclei"),
                         ("nuclei",), "out.mrc", needs_zarr=True),
    "export-channel": Case(put_zarr, ("export", "src.ome.zarr", "out.mrc", "--channel", "1"),
                           ("--channel",), "out.mrc", needs_zarr=True),
    "export-destination-exists": Case(put_zarr_and_existing_export,
                                      ("export", "src.ome.zarr", "out.mrc"), ("out.mrc",),
                                      contains="--overwrite", needs_zarr=True),
    "export-non-zarr": Case(put_mrc, ("export", "vol.mrc", "out.tif"), ("vol.mrc",), "out.tif"),
    # files that record no voxel size (or 0, NaN): refused, naming the file and both fixes
    "tiff-no-voxel-size": Case(put_plain_tiff, ("convert", "plain.tif", "out.ome.zarr"),
                               ("plain.tif", "--voxel-size", "--assume-voxel-size"),
                               "out.ome.zarr", contains="records no physical voxel size"),
    "npy-no-voxel-size": Case(put_npy, ("convert", "vol.npy", "out.ome.zarr", "--unit", "nm"),
                              ("vol.npy", "--voxel-size", "--assume-voxel-size"),
                              "out.ome.zarr", contains="1 nanometer"),
    "ome-tiff-voxel-size-zero": Case(put_zero_size_ome_tiff,
                                     ("convert", "zero.ome.tif", "out.ome.zarr"),
                                     ("zero.ome.tif", "--voxel-size", "--assume-voxel-size"),
                                     "out.ome.zarr", contains="invalid voxel size (0)"),
    "hdf5-voxel-size-nan": Case(put_nan_size_hdf5, ("convert", "stack.h5", "out.ome.zarr"),
                                ("stack.h5:raw", "--voxel-size", "--assume-voxel-size"),
                                "out.ome.zarr", contains="invalid voxel size (nan)"),
    # axes a file cannot tell: the refusal says how to name them
    "tiff-unknown-axes": Case(put_qqyx_tiff, ("convert", "two.tif", "out.ome.zarr",
                                              "--assume-voxel-size"),
                              ("two.tif", "'QQYX'", "--axes zcyx"), "out.ome.zarr"),
    "info-unknown-axes": Case(put_qqyx_tiff, ("info", "two.tif"), ("two.tif", "--axes")),
    "axes-letters": Case(put_npy, ("convert", "vol.npy", "out.ome.zarr", "--axes", "zqx"),
                         ("--axes", "zqx", "'q'"), "out.ome.zarr"),
    "axes-count": Case(put_npy, ("convert", "vol.npy", "out.ome.zarr", "--axes", "yx",
                                 "--assume-voxel-size"), ("vol.npy", "--axes yx", "(20, 30, 25)"),
                       "out.ome.zarr"),
    "axes-recorded": Case(put_zarr, ("info", "src.ome.zarr", "--axes", "zyx"),
                          ("--axes", "src.ome.zarr"), contains="records its axes",
                          needs_zarr=True),
    # user text is printed as it is: no rich markup, no emoji codes
    "markup-hdf5-dataset": Case(put_markup_hdf5, ("info", "s[b].h5:[b]x[/]:label:"),
                                ("s[b].h5", "'[b]x[/]:label:'")),
    "markup-missing-input": Case(None, ("convert", "[b]a[/]:label:.mrc", "out.ome.zarr"),
                                 ("[b]a[/]:label:.mrc",), "out.ome.zarr"),
}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    seconds: float
    before: dict[str, tuple]
    after: dict[str, tuple]
    workdir: Path


@pytest.fixture(scope="module")
def zarr_src(tmp_path_factory, client) -> Path:
    """A small OME-Zarr image (2 levels, one label image) to export from."""
    d = tmp_path_factory.mktemp("zsrc")
    rng = np.random.default_rng(1)
    lab = np.zeros(SHAPE, np.uint16)
    lab[2:10, 5:20, 3:15] = 4
    write_mrc(d / "img.mrc", rng.random(SHAPE, dtype=np.float32), voxel_size=1.0)
    write_mrc(d / "lab.mrc", lab, voxel_size=1.0)
    dst = d / "src.ome.zarr"
    opts = ConvertOptions(chunks=(16,), labels=(("cells", str(d / "lab.mrc")),))
    convert(d / "img.mrc", dst, opts, client, report=lambda _: None)
    return dst


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, zarr_src) -> dict[str, Outcome]:
    """Prepare every case in its own folder, then run them all, a few at a time."""
    dirs: dict[str, Path] = {}
    for name, case in CASES.items():
        d = tmp_path_factory.mktemp(name)
        if case.prepare is not None:
            case.prepare(*((d, zarr_src) if case.needs_zarr else (d,)))
        age(d)
        dirs[name] = d

    return run_all({name: (CASES[name].args, d, d) for name, d in dirs.items()})


def run_all(runs: dict[str, tuple[tuple[str, ...], Path, Path]],
            env: Callable[[Path], dict[str, str]] | None = None) -> dict[str, Outcome]:
    """Run each ``name: (args, cwd, watched folder)`` through the CLI, a few at a time,
    with a snapshot of the watched folder before and after (``env(folder)``: variables)."""
    def one(name: str) -> Outcome:
        args, cwd, root = runs[name]
        before = snapshot(root)
        t0 = time.monotonic()
        res = run_cli(*args, cwd=cwd, timeout=120, env=env(root) if env else None)
        return Outcome(res, time.monotonic() - t0, before, snapshot(root), root)

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(runs, pool.map(one, runs), strict=True))


def assert_refused(o: Outcome, names: tuple[str, ...], cluster: bool = False) -> str:
    """Exit 2 with one ``error:`` line naming each of ``names``, no traceback, nothing on
    stdout, no cluster started (unless ``cluster``: refused by the run), and the watched
    folder unchanged; the line. (Not timed: "before a cluster starts" is checked by what
    the command printed, which does not depend on the machine's load.)"""
    res = o.result
    everything = res.stdout + res.stderr
    assert "Traceback" not in everything, everything
    assert res.returncode == 2, (res.returncode, everything)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not (
        cluster and not ln.startswith("error:"))]  # a run's progress lines come first
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    for n in names:
        assert n in line, f"{n!r} not named in {line!r}"
    if not cluster:
        assert res.stdout.strip() == "", res.stdout
        assert "local cluster" not in everything and "dashboard" not in everything, everything
    # a refused run took (and dropped) its lock: folders' times change, not what they hold
    before, after = ({k: ("dir",) if v[0] == "dir" else v for k, v in s.items()}
                     if cluster else s for s in (o.before, o.after))
    assert after == before, "the working folder changed:\n" + "\n".join(
        f"  {k}: {before.get(k)} -> {after.get(k)}"
        for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k))
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_user_error(outcomes: dict[str, Outcome], name: str) -> None:
    case, o = CASES[name], outcomes[name]
    line = assert_refused(o, case.names)
    assert case.contains in line.lower(), line
    if case.dst is not None:
        d = o.workdir / case.dst
        assert not d.exists()
        assert not (d.parent / f".{d.name}.partial").exists()


def test_overwrite_replaces_destination(tmp_path: Path) -> None:
    """The refused destination of ``destination-exists`` is replaced with ``--overwrite``
    once it carries voxelmill's provenance record; a foreign folder is never deleted."""
    put_existing_zarr_destination(tmp_path)
    age(tmp_path)
    before = snapshot(tmp_path)
    src_before = before["vol.mrc"]
    res = run_cli("convert", "vol.mrc", "out.ome.zarr", "--overwrite", cwd=tmp_path)
    assert res.returncode == 2 and "by hand" in res.stderr, res.stderr
    assert snapshot(tmp_path) == before
    (tmp_path / "out.ome.zarr" / "zarr.json").write_text(json.dumps({
        "zarr_format": 3, "node_type": "group",
        "attributes": {"voxelmill": {"provenance": [{"op": "convert"}]}}}))
    res = run_cli("convert", "vol.mrc", "out.ome.zarr", "--overwrite", "--chunks", "16",
                  "--workers", "1", "--threads-per-worker", "1", cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    out = tmp_path / "out.ome.zarr"
    assert not (out / "keep.txt").exists()
    np.testing.assert_array_equal(zarr.open_array(str(out / "0"), mode="r")[...], volume())
    assert snapshot(tmp_path)["vol.mrc"] == src_before
    # no partial, no ".old" copy, no dask scratch folder left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ome.zarr", "vol.mrc"]


@pytest.mark.parametrize(("label", "why"), [
    (np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] - 1), np.uint16), "shape"),
    (np.zeros(SHAPE, np.float32), "integer"),
])
def test_bad_label_image(tmp_path: Path, label: np.ndarray, why: str) -> None:
    """A label image that does not fit the image is refused at planning, naming its file."""
    put_mrc(tmp_path)
    write_mrc(tmp_path / "seg.mrc", label)
    age(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(VoxelmillError) as info:
        plan_conversion(tmp_path / "vol.mrc", tmp_path / "out.ome.zarr",
                        ConvertOptions(labels=(("x", str(tmp_path / "seg.mrc")),)))
    assert "seg.mrc" in str(info.value)
    assert why in str(info.value)
    assert snapshot(tmp_path) == before


def test_embedded_workers_drop_the_heartbeat_traceback_of_a_closing_command():
    """A user error shuts the embedded cluster down; a worker's heartbeat in flight then
    logs a traceback after the command's one message. The embedded workers' filter drops
    it; workers of an external scheduler keep it (their logs are theirs)."""
    import logging

    from engine.cluster import QuietUserErrors

    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                               "Failed to communicate with scheduler during heartbeat.",
                               None, None)
    assert QuietUserErrors(embedded=True).filter(record) is False
    assert QuietUserErrors().filter(record) is True
