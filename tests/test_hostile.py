"""Hostile input through the real CLI: bad options and unsafe destinations, every command.

Each case runs ``voxelmill`` (:func:`tests.conftest.run_cli`) in its own copy of a small
working folder of valid inputs, with ``HOME`` and ``TMPDIR`` inside it, and must end with
exit code 2, one ``error:`` line naming the option, value or path, no traceback, no
cluster started, and the folder exactly as it was (nothing new, nothing changed, nothing
lost). The cases are counted per category; :func:`test_counts` prints the counts and checks
that every command and every category is covered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.patches.files import write_patch
from engine.pipelines.convert import ConvertOptions, convert
from tests.conftest import run_cli, write_mrc
from tests.test_cli_errors import age, snapshot

SHAPE = (16, 16, 16)
#: an option error costs interpreter start-up and imports only, never a cluster start
FAST_S = 30.0


@dataclass(frozen=True)
class Case:
    """One hostile command line and what its one error line must hold."""

    category: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # each must appear in the error line
    prepare: str | None = None  # a key of PREPARE: extra files this case needs


#: A valid command line of each command; an option case appends ``OPTION VALUE``.
BASE: dict[str, tuple[str, ...]] = {
    "convert": ("convert", "vol.mrc", "out.ome.zarr"),
    "export": ("export", "src.ome.zarr", "out.tif"),
    "segment": ("segment", "src.ome.zarr", "--workflow", "threshold", "--name", "seg"),
    "predict": ("predict", "src.ome.zarr", "--model", "model.pt", "--name", "pred"),
    "instances": ("instances", "src.ome.zarr", "--predictions", "pred", "--name", "inst"),
    "preprocess": ("preprocess", "src.ome.zarr", "pre.ome.zarr"),
    "patches extract": ("patches", "extract", "src.ome.zarr", "cells", "--coords",
                        "centres.csv", "--out", "patches"),
    "patches suggest": ("patches", "suggest", "src.ome.zarr", "--n", "3", "--out", "s.csv"),
    "patches merge": ("patches", "merge", "--labels-dir", "labelsCorr", "--corrections-dir",
                      "corrections", "--out-dir", "merged"),
    "patches apply": ("patches", "apply", "labelsCorr", "--into", "src.ome.zarr", "--labels",
                      "cells"),
    "cutter markers": ("cutter", "markers", "src.ome.zarr", "--name", "marks"),
    "cutter train": ("cutter", "train", "src.ome.zarr", "--markers", "marks", "--mask",
                     "cells", "--output", "run"),
    "cutter predict": ("cutter", "predict", "src.ome.zarr", "--model", "model.pt",
                       "--markers", "marks", "--mask", "cells", "--name", "cut"),
    "cutter watershed": ("cutter", "watershed", "src.ome.zarr", "--markers", "marks",
                         "--mask", "cells", "--name", "ws"),
    "dataset split": ("dataset", "split", "labelsCorr", "--out", "split"),
    "train": ("train", "--data", "src.ome.zarr", "--labels", "cells", "--output", "run"),
    "demo": ("demo", "--out", "demo"),
    "cluster certs": ("cluster", "certs", "certs"),
    "(global)": ("convert", "vol.mrc", "out.ome.zarr"),  # options go before the command
}

NON_NUMERIC, NON_FINITE, RANGE, MEMORY, USAGE, DESTINATION = (
    "non-numeric", "non-finite", "out-of-range", "memory-size", "usage", "destination")

#: (command, option, value, category): each becomes ``BASE[command] + (option, value)``.
OPTION_CASES: list[tuple[str, str, str, str]] = [
    ("convert", "--block-mib", "nan", NON_FINITE), ("convert", "--block-mib", "inf", NON_FINITE),
    ("convert", "--block-mib", "-inf", NON_FINITE), ("convert", "--block-mib", "0", RANGE),
    ("convert", "--block-mib", "-1", RANGE), ("convert", "--block-mib", "lots", NON_NUMERIC),
    ("convert", "--chunks", "0", RANGE), ("convert", "--chunks", "nan", NON_FINITE),
    ("convert", "--chunks", "16,banana", NON_NUMERIC), ("convert", "--shards", "-4", RANGE),
    ("convert", "--chunks", "1e999", NON_FINITE), ("convert", "--voxel-size", "nan", NON_FINITE),
    ("convert", "--voxel-size", "1,inf,1", NON_FINITE), ("convert", "--max-levels", "0", RANGE),
    ("convert", "--workers", "0", RANGE), ("convert", "--threads-per-worker", "-1", RANGE),
    ("convert", "--memory-limit", "banana", MEMORY), ("convert", "--memory-limit", "-5GB", MEMORY),
    ("convert", "--memory-limit", "4 parsecs", MEMORY),
    ("convert", "--memory-limit", "0", MEMORY), ("convert", "--memory-limit", "nanGB", MEMORY),
    ("export", "--level", "-1", RANGE), ("export", "--channel", "-2", RANGE),
    ("export", "--memory-limit", "1.5.5GiB", MEMORY),
    ("segment", "--block", "0", RANGE), ("segment", "--block", "banana", NON_NUMERIC),
    ("segment", "--workers", "-3", RANGE),
    ("predict", "--tile", "0", RANGE), ("predict", "--tile", "100000", RANGE),
    ("predict", "--tile", "64,nan,64", NON_FINITE), ("predict", "--overlap", "1.5", RANGE),
    ("predict", "--overlap", "1", RANGE), ("predict", "--overlap", "-0.1", RANGE),
    ("predict", "--overlap", "nan", NON_FINITE), ("predict", "--batch", "0", RANGE),
    ("predict", "--threshold", "2", RANGE), ("predict", "--threshold", "nan", NON_FINITE),
    ("predict", "--block", "-16", RANGE),
    ("instances", "--confidence", "1.5", RANGE), ("instances", "--confidence", "inf", NON_FINITE),
    ("instances", "--min-size", "-1", RANGE), ("instances", "--connectivity", "4", RANGE),
    ("instances", "--background-class", "-1", RANGE), ("instances", "--block", "0", RANGE),
    ("preprocess", "--scale", "nan", NON_FINITE), ("preprocess", "--object-width", "0", RANGE),
    ("preprocess", "--object-width", "inf", NON_FINITE),
    ("preprocess", "--target-width", "-3", RANGE), ("preprocess", "--block", "0", RANGE),
    ("patches extract", "--size", "100000", RANGE), ("patches extract", "--size", "0", RANGE),
    ("patches extract", "--size", "nan", NON_FINITE),
    ("patches extract", "--border", "-1", RANGE),
    ("patches extract", "--index-start", "-1", RANGE),
    ("patches extract", "--max-outside", "-2", RANGE),
    ("patches suggest", "--size", "0", RANGE), ("patches suggest", "--stride", "0", RANGE),
    ("patches suggest", "--weight", "-1", RANGE),
    ("patches suggest", "--weight", "nan", NON_FINITE),
    ("patches suggest", "--min-distance", "-1", RANGE),
    ("patches suggest", "--level", "-1", RANGE), ("patches suggest", "--block", "0", RANGE),
    ("patches merge", "--border", "-1", RANGE),
    ("patches merge", "--border", "wide", NON_NUMERIC),
    ("patches apply", "--value", "-1", RANGE),
    ("cutter markers", "--sigma", "0", RANGE), ("cutter markers", "--sigma", "nan", NON_FINITE),
    ("cutter markers", "--diameter", "-1", RANGE),
    ("cutter markers", "--threshold", "-1", RANGE),
    ("cutter markers", "--min-distance", "-1", RANGE),
    ("cutter train", "--crop", "0", RANGE), ("cutter train", "--iterations", "0", RANGE),
    ("cutter train", "--lr", "0", RANGE), ("cutter train", "--lr", "nan", NON_FINITE),
    ("cutter train", "--threads", "0", RANGE),
    ("cutter train", "--overlap-weight", "-1", RANGE),
    ("cutter train", "--outside-weight", "inf", NON_FINITE),
    ("cutter predict", "--threshold", "1.5", RANGE), ("cutter predict", "--batch", "0", RANGE),
    ("cutter watershed", "--halo", "-1", RANGE),
    ("cutter watershed", "--compactness", "nan", NON_FINITE),
    ("cutter watershed", "--compactness", "-1", RANGE),
    ("dataset split", "--fractions", "nan,0.5,0.5", NON_FINITE),
    ("dataset split", "--seed", "-1", RANGE),
    ("train", "--patch-shape", "0", RANGE), ("train", "--patch-shape", "100000", RANGE),
    ("train", "--iterations", "0", RANGE), ("train", "--batch-size", "0", RANGE),
    ("train", "--lr", "-1", RANGE), ("train", "--lr", "nan", NON_FINITE),
    ("demo", "--size", "4", RANGE), ("demo", "--train-iterations", "0", RANGE),
    ("cluster certs", "--days", "0", RANGE),
    ("(global)", "--jobs", "0", RANGE), ("(global)", "--gpus-per-job", "-1", RANGE),
    ("(global)", "--gpus", "many", NON_NUMERIC),
]


def _option_case(command: str, option: str, value: str, category: str) -> Case:
    base = BASE[command]
    args = (option, value, *base) if command == "(global)" else (*base, option, value)
    return Case(category, args, (option,))


def _usage(command: str, *extra: str, names: tuple[str, ...]) -> Case:
    return Case(USAGE, (*BASE[command], *extra), names)


CASES: dict[str, Case] = {
    f"{c}{o}={v}": _option_case(c, o, v, cat) for c, o, v, cat in OPTION_CASES}
CASES.update({
    # options typer parses itself: one line too, never a box or a traceback
    "usage-int-text": _usage("convert", "--workers", "two", names=("--workers",)),
    "usage-float-text": _usage("predict", "--overlap", "half", names=("--overlap",)),
    "usage-unknown-option": _usage("convert", "--wrkers", "2", names=("--wrkers",)),
    "usage-missing-value": _usage("export", "--level", names=("--level",)),
    "usage-missing-argument": Case(USAGE, ("convert", "vol.mrc"), ("dst",)),
    "usage-unknown-command": Case(USAGE, ("convrt", "vol.mrc", "x.ome.zarr"), ("convrt",)),
    # --overwrite replaces only what voxelmill made, and never an input or the working folder
    "dest-foreign-folder": Case(DESTINATION, ("convert", "vol.mrc", "mine", "--overwrite"),
                                ("mine", "by hand"), "foreign"),
    "dest-holds-source": Case(DESTINATION, ("convert", "sub/vol.mrc", "sub", "--overwrite"),
                              ("sub", "holds the input"), "sub"),
    "dest-is-cwd": Case(DESTINATION, ("convert", "vol.mrc", ".", "--overwrite"),
                        ("choose another path",)),
    "dest-holds-cwd": Case(DESTINATION, ("convert", "../vol.mrc", "..", "--overwrite"),
                           ("choose another path",)),
    "dest-symlink": Case(DESTINATION, ("convert", "vol.mrc", "link.ome.zarr", "--overwrite"),
                         ("link.ome.zarr", "symbolic link"), "symlink"),
    "dest-file-for-folder": Case(DESTINATION, ("convert", "vol.mrc", "f.ome.zarr",
                                               "--overwrite"), ("f.ome.zarr", "is a file"),
                                 "file"),
    "dest-is-source": Case(DESTINATION, ("convert", "vol.mrc", "vol.mrc", "--overwrite"),
                           ("vol.mrc", "is the source")),
    "dest-export-folder": Case(DESTINATION, ("export", "src.ome.zarr", "mine.tif",
                                             "--overwrite"), ("mine.tif", "folder"), "foreign"),
    "dest-foreign-label": Case(DESTINATION, (*BASE["segment"][:4], "--name", "handmade",
                                             "--overwrite"), ("handmade", "by hand")),
    "dest-report-folder": Case(DESTINATION, ("report", "src.ome.zarr", "--out", "mine.html",
                                             "--overwrite"), ("mine.html", "folder"),
                               "foreign"),
    "dest-model-folder": Case(DESTINATION, ("model", "export", "model.pt", "mine.pt",
                                            "--overwrite"), ("mine.pt", "folder"), "foreign"),
    "dest-merge-foreign": Case(DESTINATION, (*BASE["patches merge"][:6], "--out-dir", "mine",
                                             "--overwrite"), ("mine", "by hand"), "foreign"),
    "dest-merge-inputs": Case(DESTINATION, (*BASE["patches merge"][:6], "--out-dir",
                                            "labelsCorr", "--overwrite"), ("labelsCorr",)),
    "dest-extract-foreign": Case(DESTINATION, (*BASE["patches extract"][:6], "--out", "mine",
                                               "--overwrite"), ("mine", "by hand"), "foreign"),
    "dest-suggest-folder": Case(DESTINATION, (*BASE["patches suggest"][:5], "--size", "8",
                                              "--out", "mine.csv", "--overwrite"),
                                ("mine.csv", "folder"), "foreign"),
    "dest-exists": Case(DESTINATION, ("convert", "vol.mrc", "mine"), ("mine", "--overwrite"),
                        "foreign"),
})


def _foreign(d: Path) -> None:
    for name in ("mine", "mine.tif", "mine.html", "mine.pt", "mine.csv"):
        (d / name).mkdir()
        (d / name / "thesis.txt").write_text("four years of work")


def _sub(d: Path) -> None:
    (d / "sub").mkdir()
    shutil.copy2(d / "vol.mrc", d / "sub" / "vol.mrc")


def _symlink(d: Path) -> None:
    shutil.copytree(d / "src.ome.zarr", d / "made.ome.zarr")  # voxelmill's, behind a link
    (d / "link.ome.zarr").symlink_to("made.ome.zarr")


def _file(d: Path) -> None:
    (d / "f.ome.zarr").write_text("a file, not a store")


PREPARE = {"foreign": _foreign, "sub": _sub, "symlink": _symlink, "file": _file}


@pytest.fixture(scope="module")
def world(tmp_path_factory, client) -> Path:
    """Valid inputs for every command: an MRC, an OME-Zarr image (made by voxelmill) with a
    label image ``cells`` and a foreign one ``handmade``, patch folders, coordinates."""
    d = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(3)
    write_mrc(d / "vol.mrc", rng.random(SHAPE, dtype=np.float32))
    lab = np.zeros(SHAPE, np.uint16)
    lab[2:10, 4:12, 3:9] = 1
    write_mrc(d / "lab.mrc", lab)
    convert(d / "vol.mrc", d / "src.ome.zarr", ConvertOptions(
        chunks=(8,), labels=(("cells", str(d / "lab.mrc")),)), client, report=lambda _: None)
    hand = d / "src.ome.zarr" / "labels" / "handmade"
    shutil.copytree(d / "src.ome.zarr" / "labels" / "cells", hand)
    meta = json.loads((hand / "zarr.json").read_text())
    meta["attributes"].pop("voxelmill", None)  # made by another tool: no provenance record
    (hand / "zarr.json").write_text(json.dumps(meta))
    (d / "centres.csv").write_text("x,y,z\n8,8,8\n")
    (d / "model.pt").write_bytes(b"not a checkpoint")
    (d / "labelsCorr").mkdir()
    write_patch(d / "labelsCorr" / "p1.nii.gz", np.zeros((40, 40, 40), np.uint8), (1.0,) * 3)
    (d / "corrections" / "p1").mkdir(parents=True)
    write_patch(d / "corrections" / "p1" / "Add.nii.gz", np.ones((40, 40, 40), np.uint8),
                (1.0,) * 3)
    (d / "lab.mrc").unlink()
    return d


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    seconds: float
    before: dict[str, tuple]
    after: dict[str, tuple]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, world) -> dict[str, Outcome]:
    """Every case in its own copy of the world (cwd = ``work/`` inside it, so ``..`` is
    the case's folder too), run a few at a time."""
    dirs: dict[str, Path] = {}
    for name, case in CASES.items():
        root = tmp_path_factory.mktemp("case")
        work = root / "work"
        shutil.copytree(world, work, symlinks=True)
        shutil.copy2(world / "vol.mrc", root / "vol.mrc")  # for ``../vol.mrc``
        for extra in ("home", "tmp"):
            (root / extra).mkdir()
        if case.prepare is not None:
            PREPARE[case.prepare](work)
        age(root)
        dirs[name] = root

    def one(name: str) -> Outcome:
        root = dirs[name]
        before = snapshot(root)
        t0 = time.monotonic()
        res = run_cli(*CASES[name].args, cwd=root / "work", timeout=120,
                      env={"HOME": str(root / "home"), "TMPDIR": str(root / "tmp")})
        return Outcome(res, time.monotonic() - t0, before, snapshot(root))

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(outcomes: dict[str, Outcome], name: str) -> None:
    case, o = CASES[name], outcomes[name]
    res = o.result
    everything = res.stdout + res.stderr
    assert "Traceback" not in everything, everything
    assert res.returncode == 2, (res.returncode, everything)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{res.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    for n in case.names:
        assert n in lines[0], f"{n!r} not named in {lines[0]!r}"
    assert "local cluster" not in everything, "refused only after the cluster started"
    assert o.seconds < FAST_S, f"a refusal took {o.seconds:.1f} s"
    assert o.after == o.before, "the case folder changed:\n" + "\n".join(
        f"  {k}: {o.before.get(k)} -> {o.after.get(k)}"
        for k in sorted(set(o.before) | set(o.after)) if o.before.get(k) != o.after.get(k))


def test_counts(outcomes: dict[str, Outcome]) -> None:
    """Every command and every category has cases; the counts are printed with the passes."""
    from typer.main import get_command

    from cli.main import app

    def commands(cmd, path: str = "") -> list[str]:
        subs = getattr(cmd, "commands", None)
        if subs is None:
            return [path.strip()]
        return [c for n, s in subs.items() for c in commands(s, f"{path} {n}")]

    covered = {" ".join(c.args[:2]) for c in CASES.values()} | \
        {c.args[0] for c in CASES.values()}
    # info and model info only read and take no numeric option or destination
    missing = [c for c in commands(get_command(app)) if c not in covered
               and c not in ("info", "model info", "curate sort", "curate merge",
                             "curate take-all")]
    assert not missing, f"commands without a hostile case: {missing}"
    per = Counter(c.category for c in CASES.values())
    passed = Counter(c.category for n, c in CASES.items()
                     if outcomes[n].result.returncode == 2 and outcomes[n].after ==
                     outcomes[n].before and "Traceback" not in outcomes[n].result.stderr)
    print("\nhostile cases per category (passed/total):")
    for cat in (NON_NUMERIC, NON_FINITE, RANGE, MEMORY, USAGE, DESTINATION):
        print(f"  {cat:13s} {passed[cat]:3d}/{per[cat]}")
    print(f"  {'total':13s} {sum(passed.values()):3d}/{len(CASES)}")
    assert set(per) == {NON_NUMERIC, NON_FINITE, RANGE, MEMORY, USAGE, DESTINATION}
    assert min(per.values()) >= 5, per
    assert passed == per, {k: f"{passed[k]}/{per[k]}" for k in per}
