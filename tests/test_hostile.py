"""Hostile input through the real CLI: bad options and unsafe destinations, every command.

Each case runs ``voxelmill`` (:func:`tests.conftest.run_cli`) in its own copy of a small
working folder of valid inputs, with ``HOME`` and ``TMPDIR`` inside it, and must end with
exit code 2, one ``error:`` line naming the option, value or path, no traceback, no
cluster started, and the folder exactly as it was (nothing new, nothing changed, nothing
lost). Option values refused while the command line is parsed run through the console
script's ``main()`` in this process (:func:`run_in_process`: same checks, without an
interpreter start-up each); every other case runs ``voxelmill`` as a subprocess. The
cases are counted per category; :func:`test_counts` prints the counts and checks that
every command and every category is covered.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine.patches.files import write_patch
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.predict import PredictOptions, predict
from tests.conftest import write_mrc
from tests.test_cli_errors import Outcome, age, assert_refused, run_all, snapshot

#: the module's first test sets up every case (~170 command lines): more than the default
#: 600 s per test on a loaded 2-core machine
pytestmark = pytest.mark.timeout(1500)

SHAPE = (16, 16, 16)


@dataclass(frozen=True)
class Case:
    """One hostile command line and what its one error line must hold."""

    category: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # each must appear in the error line
    prepare: str | None = None  # a key of PREPARE: extra files this case needs
    cluster: bool = False  # refused by the run (after the cluster started), not the plan
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables of the run
    in_process: bool = False  # refused while parsing: run through the CLI's main() here


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

NON_NUMERIC, NON_FINITE, RANGE, MEMORY, USAGE, DESTINATION, WORKFLOW, HEADER = (
    "non-numeric", "non-finite", "out-of-range", "memory-size", "usage", "destination",
    "workflow", "declared-size")
DAMAGED, METADATA_PATH, LOSS = "damaged-chunk", "metadata-path", "silent-loss"
OUTPUT = "output-size"
CATEGORIES = (NON_NUMERIC, NON_FINITE, RANGE, MEMORY, USAGE, DESTINATION, WORKFLOW, HEADER,
              DAMAGED, METADATA_PATH, LOSS, OUTPUT)

#: Bad values per command and option, ``COMMAND: OPTION VALUE...; OPTION VALUE...``: each
#: value is one case, ``BASE[command] + (OPTION, VALUE)``, in the category
#: :func:`_category` gives it.
OPTION_TABLE = """
convert: --block-mib nan inf -inf 0 -1 lots; --chunks 0 nan 16,banana 1e999; --shards -4
convert: --voxel-size nan 1,inf,1; --max-levels 0; --workers 0; --threads-per-worker -1
convert: --memory-limit banana -5GB 4parsecs 0 nanGB
export: --level -1; --channel -2; --memory-limit 1.5.5GiB
segment: --block 0 banana; --workers -3
predict: --tile 0 100000 64,nan,64; --overlap 1.5 1 -0.1 nan; --batch 0; --threshold 2 nan
predict: --block -16
instances: --confidence 1.5 inf; --min-size -1; --connectivity 4; --background-class -1
instances: --block 0
preprocess: --scale nan; --object-width 0 inf; --target-width -3; --block 0
patches extract: --size 100000 0 nan; --border -1; --index-start -1; --max-outside -2
patches suggest: --size 0; --stride 0; --weight -1 nan; --min-distance -1; --level -1
patches suggest: --block 0
patches merge: --border -1 wide
patches apply: --value -1
cutter markers: --sigma 0 nan; --diameter -1; --threshold -1; --min-distance -1
cutter train: --crop 0; --iterations 0; --lr 0 nan; --threads 0; --overlap-weight -1
cutter train: --outside-weight inf
cutter predict: --threshold 1.5; --batch 0
cutter watershed: --halo -1; --compactness nan -1
dataset split: --fractions nan,0.5,0.5; --seed -1
train: --patch-shape 0 100000; --iterations 0; --batch-size 0; --lr -1 nan
demo: --size 4; --train-iterations 0
cluster certs: --days 0
(global): --jobs 0; --gpus-per-job -1; --gpus many
"""


def _category(option: str, value: str) -> str:
    if option == "--memory-limit":
        return MEMORY
    words = value.replace(",", " ").split()
    if any(w.lstrip("-") in ("nan", "inf") or w == "1e999" for w in words):
        return NON_FINITE
    if any(not w.lstrip("-").replace(".", "", 1).replace("e", "", 1).isdigit() for w in words):
        return NON_NUMERIC
    return RANGE


def _option_cases() -> dict[str, Case]:
    cases = {}
    for row in OPTION_TABLE.strip().splitlines():
        command, _, rest = row.partition(": ")
        for group in rest.split("; "):
            option, *values = group.split()
            for value in values:
                base = BASE[command]
                args = (option, value, *base) if command == "(global)" else \
                    (*base, option, value)
                cases[f"{command}{option}={value}"] = Case(_category(option, value), args,
                                                           (option,), in_process=True)
    return cases


def _usage(command: str, *extra: str, names: tuple[str, ...]) -> Case:
    return Case(USAGE, (*BASE[command], *extra), names)


#: a valid prediction (a tiny random U-Net), a short training and markers of a 2D slide
GOOD_PREDICT = ("predict", "src.ome.zarr", "--model", "good.pt", "--name", "p2", "--tile", "8",
                "--device", "cpu")
TRAIN = (*BASE["train"], "--iterations", "1", "--patch-shape", "8,8,8", "--batch-size", "1",
         "--device", "cpu")
MARKERS = ("cutter", "markers", "slide.ome.zarr", "--name", "marks", "--channel", "0",
           "--diameter", "4")
#: a free disk and a memory budget of 1 KiB: less than any output of the world
DISK = (("VOXELMILL_FREE_DISK_MIB", "0.001"),)
HELD = (("VOXELMILL_READ_BUDGET_MIB", "0.001"),)

#: damage per kind: the chunk index, its key under ``0/c/`` and a word of the message
CHUNK = {"missing": ("(1, 0, 1)", "1/0/1", "missing"),
         "corrupt": ("(0, 1, 0)", "0/1/0", "corrupt")}


#: a write into the label group (undoing a patch) that opens it as every write-back does
UNDO = ("patches", "apply", "--into", "src.ome.zarr", "--labels", "cells", "--undo", "p1")
CASES: dict[str, Case] = _option_cases()
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
    # workflow parameters: a halo no worker can hold is refused before any block runs
    "workflow-sigma-huge": Case(WORKFLOW, (*BASE["segment"][:2], "--workflow", "huge.yaml",
                                           "--name", "seg", "--workers", "1"),
                                ("huge.yaml", "sigma: 1e+09", "halo", "too large")),
    "workflow-sigma-nan": Case(WORKFLOW, (*BASE["segment"][:2], "--workflow", "nan.yaml",
                                          "--name", "seg"), ("nan.yaml", "sigma")),
    "workflow-sigma-negative": Case(WORKFLOW, (*BASE["segment"][:2], "--workflow", "neg.yaml",
                                               "--name", "seg"), ("neg.yaml", "sigma")),
    # a 138-byte TIFF whose header declares 2·10⁹ × 2·10⁹ pixels: refused, not allocated
    "tiff-huge-strip": Case(HEADER, ("convert", "huge.tif", "out.ome.zarr"),
                            ("huge.tif", "ImageWidth 2000000000")),
    "tiff-short-data": Case(HEADER, ("convert", "short.tif", "out.ome.zarr"),
                            ("short.tif", "stores 16 bytes")),
    "tiff-huge-info": Case(HEADER, ("info", "huge.tif"), ("huge.tif",)),
    # options that size an output: checked against the disk (the real one, or a small
    # VOXELMILL_FREE_DISK_MIB) and what a plan holds whole against the memory budget
    # (VOXELMILL_READ_BUDGET_MIB), before anything is written or a cluster starts
    "preprocess-scale-huge": Case(OUTPUT, (*BASE["preprocess"], "--scale", "100000"),
                                  ("--scale 100000", "bytes free")),
    "preprocess-width-huge": Case(OUTPUT, (*BASE["preprocess"], "--object-width", "1",
                                           "--target-width", "1e9"),
                                  ("--object-width 1 --target-width 1e+09", "bytes free")),
    "out-convert-disk": Case(OUTPUT, BASE["convert"], ("vol.mrc (16×16×16 float32",
                                                       "out.ome.zarr", "bytes free"), env=DISK),
    "out-convert-shards": Case(OUTPUT, (*BASE["convert"], "--chunks", "8", "--shards", "16"),
                               ("--shards 16", "whole shard", "memory budget"), env=HELD),
    "out-export-disk": Case(OUTPUT, BASE["export"], ("--level 0", "out.tif", "bytes free"),
                            env=DISK),
    "out-export-partseg": Case(OUTPUT, ("export", "src.ome.zarr", "out.tgz", "--label",
                                        "cells", "--roi", "0:16,0:16,0:16"),
                               ("--level 0 --roi 0:16,0:16,0:16", "PartSeg",
                                "memory budget"), env=HELD),
    "out-extract-disk": Case(OUTPUT, (*BASE["patches extract"], "--size", "40"),
                             ("--size 40 × 1 patch", "patches", "bytes free"), env=DISK),
    "out-extract-memory": Case(OUTPUT, (*BASE["patches extract"], "--size", "64"),
                               ("--size 64", "whole patch", "memory budget"), env=HELD),
    "out-predict-disk": Case(OUTPUT, GOOD_PREDICT, ("--probabilities uint8 × 2 model outputs",
                                                    "bytes free"), env=DISK),
    "out-predict-block": Case(OUTPUT, GOOD_PREDICT, ("--block 16,16,16", "memory budget"),
                              env=HELD),
    "out-instances": Case(OUTPUT, BASE["instances"], ("--predictions pred", "bytes free"),
                          env=DISK),
    "out-segment": Case(OUTPUT, (*BASE["segment"], "--keep", "smooth"),
                        ("--workflow threshold", "--keep smooth", "bytes free"), env=DISK),
    "out-split-copy": Case(OUTPUT, ("dataset", "split", "pd", "--out", "split", "--fractions",
                                    "1,0,0"), ("--copy of 1 item", "split", "bytes free"),
                           "patchdir", env=(("VOXELMILL_FREE_DISK_MIB", "0.0001"),)),
    "out-train-batch": Case(OUTPUT, (*BASE["train"], "--iterations", "1", "--patch-shape",
                                     "8,8,8", "--batch-size", "100000000"),
                            ("train.batch_size 100000000 × data.patch_shape [8, 8, 8]",
                             "memory budget"), cluster=True),
    "out-demo-memory": Case(OUTPUT, (*BASE["demo"], "--size", "100000"),
                            ("--size 100000", "memory budget")),
    "out-demo-disk": Case(OUTPUT, BASE["demo"], ("--size 192", "demo", "bytes free"),
                          env=DISK),
    # compressed streams that declare more than deflate can expand to (at most 1032:1)
    "nrrd-gzip-huge": Case(HEADER, ("convert", "huge.nrrd", "out.ome.zarr"),
                           ("huge.nrrd", "100000×100000×100000", "can hold at most")),
    "npz-deflate-huge": Case(HEADER, ("convert", "huge.npz", "out.ome.zarr"),
                             ("huge.npz", "100000×100000×100000", "can hold at most")),
    "nifti-gz-huge": Case(HEADER, ("info", "huge.nii.gz"),
                          ("huge.nii.gz", "30000×30000×30000", "can hold at most")),
    "dest-exists": Case(DESTINATION, ("convert", "vol.mrc", "mine"), ("mine", "--overwrite"),
                        "foreign"),

    # a damaged store, read by any command: the array, the chunk and its file are named,
    # and the run leaves nothing behind (the refusal comes from the run, on the cluster)
    **{f"chunk-{kind}-{command.replace(' ', '-')}": Case(
        DAMAGED, args, (f"src.ome.zarr/0: chunk {CHUNK[kind][0]}", f"src.ome.zarr/0/c/"
                        f"{CHUNK[kind][1]}", CHUNK[kind][2]), kind, cluster=True)
       for kind, command, args in (
           ("missing", "export", BASE["export"]), ("corrupt", "export", BASE["export"]),
           ("missing", "convert", ("convert", "src.ome.zarr", "out.ome.zarr")),
           ("missing", "segment", BASE["segment"]),
           ("corrupt", "preprocess", BASE["preprocess"]),
           ("corrupt", "report", ("report", "src.ome.zarr", "--out", "r.html")),
           ("missing", "predict", GOOD_PREDICT), ("corrupt", "predict", GOOD_PREDICT),
           ("missing", "train", TRAIN), ("corrupt", "train", TRAIN))},
    # the same in a prediction (read by instances) and in a 2D slide (read by cutter)
    **{f"chunk-{kind}-{command.replace(' ', '-')}": Case(
        DAMAGED, args, (f"{store}/0: chunk {index}", f"{store}/0/c/{key}", kind),
        f"{kind}-{where}", cluster=True)
       for kind, command, args, where, store, index, key in (
           ("missing", "instances", BASE["instances"], "pred", "predictions/pred",
            "(0, 1, 0, 1)", "0/1/0/1"),
           ("corrupt", "instances", BASE["instances"], "pred", "predictions/pred",
            "(0, 0, 1, 0)", "0/0/1/0"),
           ("missing", "cutter markers", MARKERS, "slide", "slide.ome.zarr", "(1, 0)", "1/0"),
           ("corrupt", "cutter markers", MARKERS, "slide", "slide.ome.zarr", "(0, 1)", "0/1"))},
    # paths from zarr metadata stay inside their store, for writing and for reading
    "meta-apply-traversal": Case(METADATA_PATH, UNDO,
                                 ("'../../../victim_arr'", "outside"), "traversal"),
    "meta-export-label-traversal": Case(METADATA_PATH, (*BASE["export"], "--label", "cells"),
                                        ("'../../../victim_arr'", "outside"), "traversal"),
    "meta-image-absolute": Case(METADATA_PATH, BASE["segment"], ("'/etc'", "outside"),
                                "absolute"),
    "meta-image-absolute-export": Case(METADATA_PATH, BASE["export"], ("'/etc'", "outside"),
                                       "absolute"),
    "meta-labels-list": Case(METADATA_PATH, BASE["export"], ("'labels' list", "../victim"),
                             "labels-list"),
    "meta-label-symlink": Case(METADATA_PATH, UNDO,
                               ("cells", "outside the store"), "label-link"),
    # conversions and borders that would lose data without saying so
    "loss-merge-border": Case(LOSS, (*BASE["patches merge"], "--border", "20"),
                              ("border 20", "no editable voxel", "p1.nii.gz")),
    "loss-export-uint32-mrc": Case(LOSS, ("export", "u32.ome.zarr", "out.mrc"),
                                   ("out.mrc", "uint32", "16777217", "--allow-lossy"),
                                   cluster=True),
    "loss-export-int64-mrc": Case(LOSS, ("export", "i64.ome.zarr", "out.mrc", "--roi",
                                         "0:8,0:16,0:16"),
                                  ("out.mrc", "int64", "--allow-lossy"), cluster=True),
    "loss-convert-complex": Case(LOSS, ("convert", "c64.npy", "out.ome.zarr"),
                                 ("c64.npy", "complex64")),
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


def _patchdir(d: Path) -> None:
    for sub in ("imagesCorr", "labelsCorr"):
        (d / "pd" / sub).mkdir(parents=True)
        shutil.copy2(d / "labelsCorr" / "p1.nii.gz", d / "pd" / sub / "ds_t_patch1.nii.gz")


def _file(d: Path) -> None:
    (d / "f.ome.zarr").write_text("a file, not a store")


def _missing(d: Path) -> None:
    (d / "src.ome.zarr" / "0" / "c" / "1" / "0" / "1").unlink()


def _corrupt(d: Path) -> None:
    chunk = d / "src.ome.zarr" / "0" / "c" / "0" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])


def _damage(kind: str, array: str, key: str):
    def prepare(d: Path) -> None:
        chunk = d / array / "c" / key
        if kind == "missing":
            chunk.unlink()
        else:
            chunk.write_bytes(chunk.read_bytes()[:20])
    return prepare


def _edit_ome(group: Path, edit) -> None:
    meta = json.loads((group / "zarr.json").read_text())
    edit(meta["attributes"]["ome"])
    (group / "zarr.json").write_text(json.dumps(meta))


def _set_path(path: str):
    def edit(ome: dict) -> None:
        ome["multiscales"][0]["datasets"][0]["path"] = path
    return edit


def _traversal(d: Path) -> None:
    """The label group's level 0 points three folders up, at an array outside the store
    that a write-back would otherwise change."""
    shutil.copytree(d / "src.ome.zarr" / "labels" / "cells" / "0", d / "victim_arr")
    _edit_ome(d / "src.ome.zarr" / "labels" / "cells", _set_path("../../../victim_arr"))


def _absolute(d: Path) -> None:
    _edit_ome(d / "src.ome.zarr", _set_path("/etc"))


def _labels_list(d: Path) -> None:
    (d / "victim").mkdir()
    _edit_ome(d / "src.ome.zarr" / "labels",
              lambda ome: ome.__setitem__("labels", ["cells", "../victim"]))


def _label_link(d: Path) -> None:
    labels = d / "src.ome.zarr" / "labels"
    shutil.move(labels / "cells", d / "outside_cells")
    (labels / "cells").symlink_to(d / "outside_cells")


PREPARE = {"foreign": _foreign, "patchdir": _patchdir, "sub": _sub, "symlink": _symlink,
           "file": _file,
           "missing": _missing, "corrupt": _corrupt, "traversal": _traversal,
           "absolute": _absolute, "labels-list": _labels_list, "label-link": _label_link,
           "missing-pred": _damage("missing", "src.ome.zarr/predictions/pred/0", "0/1/0/1"),
           "corrupt-pred": _damage("corrupt", "src.ome.zarr/predictions/pred/0", "0/0/1/0"),
           "missing-slide": _damage("missing", "slide.ome.zarr/0", "1/0"),
           "corrupt-slide": _damage("corrupt", "slide.ome.zarr/0", "0/1")}


def _hostile_tiff(path: Path, width: int, length: int) -> None:
    """A minimal uncompressed 8-bit TIFF whose one strip holds 16 bytes, whatever its
    ImageWidth and ImageLength tags declare."""
    data_at = 8 + 2 + 12 * 9 + 4
    tags = [(256, 4, width), (257, 4, length), (258, 3, 8), (259, 3, 1), (262, 3, 1),
            (273, 4, data_at), (277, 3, 1), (278, 4, length), (279, 4, 16)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(16))


def _hostile_compressed(d: Path) -> None:
    """A gzip NRRD, a deflated .npz member and a .nii.gz whose headers declare 10¹³ voxels
    or more over a few dozen compressed bytes."""
    import gzip
    import io
    import zipfile

    import nibabel as nib

    (d / "huge.nrrd").write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 100000 100000 100000\n"
        b"encoding: gzip\n\n" + gzip.compress(bytes(64)))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (100000,) * 3})
    with zipfile.ZipFile(d / "huge.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.npy", buf.getvalue() + bytes(64))
    header = nib.Nifti1Header()
    header.set_data_shape((30000,) * 3)
    header.set_data_dtype(np.uint8)
    (d / "huge.nii.gz").write_bytes(gzip.compress(header.binaryblock + bytes(4 + 64)))


def _good_model(path: Path) -> None:
    """A tiny 3D U-Net checkpoint, one channel in, two classes out (random weights), as
    ``train`` saves it."""
    import torch

    from engine.learn.checkpoint import save_checkpoint
    from engine.learn.unet import UNet, receptive_field

    torch.manual_seed(0)
    model = UNet(3, 1, 2, features=(4, 8), norm=None).eval()
    meta = {"arch": {"name": "unet", **model.arch()},
            "input": {"channels": ["vol"], "normalization": {"mode": "meanstd", "low": 1.0,
                                                             "high": 99.8},
                      "stats": [{"name": "x", "offset": [0.0], "scale": [1.0]}]},
            "target": {"kind": "classes", "classes": ["background", "cell"],
                       "activation": "softmax"},
            "patch_shape": [8, 8, 8], "divisor": list(model.divisor),
            "receptive_field": list(receptive_field(model))}
    save_checkpoint(path, model.state_dict(), meta)


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
    for name, sigma in (("huge", "1e9"), ("nan", ".nan"), ("neg", "-2")):
        (d / f"{name}.yaml").write_text(
            "steps:\n  - name: smooth\n    function: gaussian\n    parameters:\n"
            f"      sigma: {sigma}\n  - {{name: mask, function: threshold, inputs: [smooth]}}\n")
    # values a float32 MRC cannot hold: 2^24 + 1 (uint32), 2^53 + 1 (int64); complex input
    for name, dtype, value in (("u32", np.uint32, 2**24 + 1), ("i64", np.int64, 2**53 + 1)):
        big = np.zeros(SHAPE, dtype)
        big[3, 4, 5] = value
        np.save(d / f"{name}.npy", big)
        convert(d / f"{name}.npy", d / f"{name}.ome.zarr", ConvertOptions(chunks=(8,),
                assume_voxel_size=True), client, report=lambda _: None)
        (d / f"{name}.npy").unlink()
    np.save(d / "c64.npy", np.full(SHAPE, 1 + 2j, np.complex64))
    np.save(d / "slide.npy", rng.random((32, 32), dtype=np.float32))
    convert(d / "slide.npy", d / "slide.ome.zarr", ConvertOptions(
        chunks=(16,), axes="yx", assume_voxel_size=True), client, report=lambda _: None)
    (d / "slide.npy").unlink()
    _hostile_tiff(d / "huge.tif", 2_000_000_000, 2_000_000_000)
    _hostile_compressed(d)
    _hostile_tiff(d / "short.tif", 2_000_000_000, 1)
    (d / "centres.csv").write_text("x,y,z\n8,8,8\n")
    (d / "model.pt").write_bytes(b"not a checkpoint")
    _good_model(d / "good.pt")
    predict(d / "src.ome.zarr", PredictOptions(model=str(d / "good.pt"), name="pred",
                                               tile=(8,), device="cpu"), client,
            report=lambda _: None)
    (d / "labelsCorr").mkdir()
    write_patch(d / "labelsCorr" / "p1.nii.gz", np.zeros((40, 40, 40), np.uint8), (1.0,) * 3)
    (d / "corrections" / "p1").mkdir(parents=True)
    write_patch(d / "corrections" / "p1" / "Add.nii.gz", np.ones((40, 40, 40), np.uint8),
                (1.0,) * 3)
    (d / "lab.mrc").unlink()
    return d


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

    def env(d: Path) -> dict[str, str]:
        return {"HOME": str(d / "home"), "TMPDIR": str(d / "tmp"), **dict(CASES[names[d]].env)}

    names = {d: name for name, d in dirs.items()}
    # option values refused while the command line is parsed: in this process, one by one
    # (an interpreter start-up each would cost most of this file's time)
    done = {name: run_in_process(CASES[name].args, d / "work", d, env(d))
            for name, d in dirs.items() if CASES[name].in_process}
    return done | run_all({name: (CASES[name].args, d / "work", d) for name, d in dirs.items()
                           if name not in done}, env=env)


def run_in_process(args: tuple[str, ...], cwd: Path, root: Path, env: dict[str, str]
                   ) -> Outcome:
    """``voxelmill ARGS`` through the console script's own ``main()`` in this process, in
    ``cwd`` with ``env`` set, its output captured; an exception that escapes ``main()`` is
    printed as the traceback a user would see, so it fails the case as a subprocess's
    would. Only for command lines refused before any command body runs."""
    from cli.main import main

    before, out, err = snapshot(root), io.StringIO(), io.StringIO()
    saved = (os.getcwd(), sys.argv, {k: os.environ.get(k) for k in (*env, "COLUMNS")})
    t0 = time.monotonic()
    try:
        os.chdir(cwd)
        sys.argv = ["voxelmill", *args]
        os.environ.update({**env, "COLUMNS": "200"})
        tempfile.tempdir = None  # TMPDIR is read again: anything written there is seen
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - what a user would see: a traceback
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved[0])
        sys.argv = saved[1]
        for k, v in saved[2].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tempfile.tempdir = None
    res = subprocess.CompletedProcess(["voxelmill", *args], code, out.getvalue(),
                                      err.getvalue())
    return Outcome(res, time.monotonic() - t0, before, snapshot(root), root)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile(outcomes: dict[str, Outcome], name: str) -> None:
    case = CASES[name]
    assert_refused(outcomes[name], case.names, case.cluster)


def _passes(o: Outcome, case: Case) -> bool:
    try:
        assert_refused(o, case.names, case.cluster)
    except AssertionError:
        return False
    return True


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
    passed = Counter(c.category for n, c in CASES.items() if _passes(outcomes[n], c))
    print("\nhostile cases per category (passed/total):")
    for cat in CATEGORIES:
        print(f"  {cat:13s} {passed[cat]:3d}/{per[cat]}")
    print(f"  {'total':13s} {sum(passed.values()):3d}/{len(CASES)}")
    assert set(per) == set(CATEGORIES)
    assert min(per.values()) >= 3, per
    assert passed == per, {k: f"{passed[k]}/{per[k]}" for k in per}
