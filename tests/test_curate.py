"""``voxelmill curate sort|merge|take-all``: Allen Curator modes in batch.

References are independent: ground truth and cost maps computed here with plain numpy from
the arrays written as inputs, and every output read back with zarr / tifffile (not through
voxelmill's readers).
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
import zarr

from engine.curate import (
    MANIFEST,
    MANIFEST_COLUMNS,
    CurateOptions,
    curate,
    read_table,
)
from engine.errors import InputError
from tests.conftest import run_cli, write_mrc

SHAPE3 = (12, 20, 24)
SHAPE2 = (30, 40)
VOXEL_UM = (0.29, 0.108, 0.108)  # z, y, x in µm (Allen's typical spacing)


def _ome_tif(path: Path, data: np.ndarray, voxel_um=VOXEL_UM, axes="ZYX") -> Path:
    meta = {"axes": axes, "PhysicalSizeX": voxel_um[-1], "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": voxel_um[-2], "PhysicalSizeYUnit": "µm"}
    if "Z" in axes:
        meta |= {"PhysicalSizeZ": voxel_um[0], "PhysicalSizeZUnit": "µm"}
    tifffile.imwrite(path, data, ome=True, metadata=meta, photometric="minisblack")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Three 3D rows (TIFF image, NPY/MRC/TIFF segmentations, masks) and one 2D row."""
    d = tmp_path_factory.mktemp("curate_in")
    rng = np.random.default_rng(7)
    out: dict = {"dir": d}
    for i in range(3):
        img = rng.integers(0, 4000, SHAPE3, dtype=np.uint16)
        seg = rng.integers(0, 4, SHAPE3).astype(np.int32)  # instance-like labels 0..3
        seg2 = (rng.random(SHAPE3) > 0.6).astype(np.uint8) * 255  # Allen 0/255 mask style
        mask = np.zeros(SHAPE3, np.uint8)
        mask[2:7, 3 + i:11, 5:17] = 255
        _ome_tif(d / f"img{i}.tif", img)
        np.save(d / f"seg{i}.npy", seg)
        write_mrc(d / f"segB{i}.mrc", seg2.astype(np.int16))
        _ome_tif(d / f"mask{i}.tif", mask)
        out[i] = {"img": img, "seg": seg, "seg2": seg2, "mask": mask}
    img2 = rng.normal(size=SHAPE2).astype(np.float32)
    seg2d = (rng.random(SHAPE2) > 0.5).astype(np.float32) * 0.7  # a probability-like map
    mask2d = np.zeros(SHAPE2, np.uint8)
    mask2d[5:20, 10:30] = 1
    np.save(d / "slide.npy", img2)
    np.save(d / "slide_seg.npy", seg2d)
    np.save(d / "slide_mask.npy", mask2d)
    out["2d"] = {"img": img2, "seg": seg2d, "mask": mask2d}
    return out


def _table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _zarr_sample(path: Path) -> dict:
    """Image, gt, cost and metadata of one sample, read with zarr and json only."""
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    labels = json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"]
    out = {"meta": meta, "labels": labels["labels"],
           "image": zarr.open_array(str(path / "0"), mode="r")[...]}
    for name in ("gt", "cost"):
        out[name] = zarr.open_array(str(path / "labels" / name / "0"), mode="r")[...]
        out[name + "_meta"] = json.loads(
            (path / "labels" / name / "zarr.json").read_text())["attributes"]["ome"]
    return out


def _manifest(dst: Path) -> list[dict]:
    with open(dst / MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0]) == list(MANIFEST_COLUMNS)
    return rows


# ------------------------------------------------------------------------------ sort

@pytest.mark.parametrize("mask_means", ["exclude", "include"])
def test_sort_keeps_good_rows_with_cost_from_mask(data, tmp_path, mask_means):
    d = data["dir"]
    # relative paths (to the table's folder) and mixed-case verdicts
    table = _table(d / f"sort_{mask_means}.csv", ["Image", "segmentation", "verdict", "mask"], [
        ["img0.tif", "seg0.npy", "GOOD", "mask0.tif"],
        ["img1.tif", "seg1.npy", "bad", "mask1.tif"],
        ["slide.npy", "slide_seg.npy", "Good", ""],
        ["img2.tif", "seg2.npy", "good", "mask2.tif"],
    ])
    dst = tmp_path / "out"
    result = curate("sort", table, dst, CurateOptions(mask_means=mask_means), report=str)
    assert result.samples == ["sample_000", "sample_001", "sample_002"]
    assert result.skipped == 1
    assert sorted(p.name for p in dst.iterdir()) == sorted([
        MANIFEST, "sample_000.ome.zarr", "sample_001.ome.zarr", "sample_002.ome.zarr"])
    assert not (tmp_path / ".out.partial").exists()

    for name, src in (("sample_000", data[0]), ("sample_002", data[2])):
        s = _zarr_sample(dst / f"{name}.ome.zarr")
        np.testing.assert_array_equal(s["image"], src["img"])
        assert s["gt"].dtype == np.uint8 and s["cost"].dtype == np.uint8
        np.testing.assert_array_equal(s["gt"], (src["seg"] > 0).astype(np.uint8))
        inside = src["mask"] > 0
        want = np.where(inside, 0, 1) if mask_means == "exclude" else np.where(inside, 1, 0)
        np.testing.assert_array_equal(s["cost"], want)
        assert 0 < s["cost"].sum() < s["cost"].size  # the mask really cut something

    # 2D row without a mask: cost all 1; a float map binarized at > 0
    s = _zarr_sample(dst / "sample_001.ome.zarr")
    np.testing.assert_array_equal(s["image"], data["2d"]["img"])
    np.testing.assert_array_equal(s["gt"], (data["2d"]["seg"] > 0).astype(np.uint8))
    assert s["cost"].shape == SHAPE2 and (s["cost"] == 1).all()

    rows = _manifest(dst)
    assert [r["sample"] for r in rows] == result.samples
    assert [Path(r["image"]).name for r in rows] == ["img0.tif", "slide.npy", "img2.tif"]
    assert [r["table_line"] for r in rows] == ["2", "4", "5"]
    assert {r["mode"] for r in rows} == {"sort"} and {r["verdict"] for r in rows} == {"good"}
    assert rows[1]["mask"] == "" and Path(rows[0]["mask"]) == (d / "mask0.tif").absolute()
    assert {r["mask_means"] for r in rows} == {mask_means}


def test_allen_sorting_csv_is_accepted(data):
    d = data["dir"]
    # Allen's curator_sorting CSV: raw, seg, score (1/0), mask; empty mask cells
    table = _table(d / "allen_sort.csv", ["raw", "seg", "score", "mask"], [
        [str(d / "img0.tif"), str(d / "seg0.npy"), "1", ""],
        [str(d / "img1.tif"), str(d / "seg1.npy"), "0", str(d / "mask1.tif")],
    ])
    rows = read_table(table, "sort")
    assert [r.keep for r in rows] == [True, False]
    assert rows[0].mask is None and rows[1].mask == d / "mask1.tif"
    assert rows[0].image == d / "img0.tif" and rows[0].segmentation == d / "seg0.npy"


# ----------------------------------------------------------------------------- merge

def test_merge_takes_segmentation2_inside_mask(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "merge.csv",
                   ["image", "segmentation", "segmentation2", "mask", "cost_mask"], [
        [str(d / "img0.tif"), str(d / "seg0.npy"), str(d / "segB0.mrc"), str(d / "mask0.tif"),
         ""],
        [str(d / "img1.tif"), str(d / "seg1.npy"), str(d / "segB1.mrc"), str(d / "mask1.tif"),
         str(d / "mask2.tif")],
    ])
    dst = tmp_path / "merged"
    result = curate("merge", table, dst, report=str)
    assert result.samples == ["sample_000", "sample_001"]
    for i in (0, 1):
        src = data[i]
        # numpy reference: start from seg1, replace the voxels inside the mask by seg2
        ref = (src["seg"] > 0).astype(np.uint8)
        inside = src["mask"] > 0
        ref[inside] = (src["seg2"][inside] > 0).astype(np.uint8)
        s = _zarr_sample(dst / f"sample_{i:03d}.ome.zarr")
        np.testing.assert_array_equal(s["gt"], ref)
        # the merge really mixes both: differs from each segmentation alone
        assert (s["gt"] != (src["seg"] > 0)).any() and (s["gt"] != (src["seg2"] > 0)).any()
    s0 = _zarr_sample(dst / "sample_000.ome.zarr")
    assert (s0["cost"] == 1).all()
    s1 = _zarr_sample(dst / "sample_001.ome.zarr")
    np.testing.assert_array_equal(s1["cost"], (data[2]["mask"] == 0).astype(np.uint8))
    rows = _manifest(dst)
    assert Path(rows[0]["segmentation2"]).name == "segB0.mrc"
    assert {r["mode"] for r in rows} == {"merge"}


# -------------------------------------------------------------------------- take-all

def test_take_all_makes_every_row_a_sample(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "all.csv", ["image", "segmentation", "mask"], [
        [str(d / f"img{i}.tif"), str(d / f"seg{i}.npy"), str(d / f"mask{i}.tif") if i else ""]
        for i in range(3)
    ] + [[str(d / "slide.npy"), str(d / "slide_seg.npy"), str(d / "slide_mask.npy")]])
    dst = tmp_path / "all"
    result = curate("take-all", table, dst, report=str)
    assert result.samples == [f"sample_{i:03d}" for i in range(4)] and result.skipped == 0
    for i in range(3):
        s = _zarr_sample(dst / f"sample_{i:03d}.ome.zarr")
        np.testing.assert_array_equal(s["image"], data[i]["img"])
        np.testing.assert_array_equal(s["gt"], (data[i]["seg"] > 0).astype(np.uint8))
        want = np.ones(SHAPE3, np.uint8) if i == 0 else (data[i]["mask"] == 0).astype(np.uint8)
        np.testing.assert_array_equal(s["cost"], want)
    s = _zarr_sample(dst / "sample_003.ome.zarr")
    np.testing.assert_array_equal(s["cost"], (data["2d"]["mask"] == 0).astype(np.uint8))


# ------------------------------------------------------------------- formats written

def test_ome_zarr_sample_metadata(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "t.csv", ["image", "segmentation", "mask"],
                   [[str(d / "img0.tif"), str(d / "seg0.npy"), str(d / "mask0.tif")],
                    [str(d / "slide.npy"), str(d / "slide_seg.npy"), ""]])
    dst = tmp_path / "o"
    curate("take-all", table, dst, report=str)
    s = _zarr_sample(dst / "sample_000.ome.zarr")
    ms = s["meta"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    np.testing.assert_allclose(scale, VOXEL_UM)
    assert s["labels"] == ["gt", "cost"]
    for name in ("gt", "cost"):
        lms = s[name + "_meta"]["multiscales"][0]
        np.testing.assert_allclose(lms["datasets"][0]["coordinateTransformations"][0]["scale"],
                                   VOXEL_UM)
        assert s[name + "_meta"]["image-label"]["source"]["image"] == "../../"
    s2 = _zarr_sample(dst / "sample_001.ome.zarr")
    ms2 = s2["meta"]["multiscales"][0]
    assert [a["name"] for a in ms2["axes"]] == ["y", "x"]  # a 2D slide stays 2D
    assert s2["image"].dtype == np.float32 and s2["gt"].shape == SHAPE2


def _ome_sizes(path: Path) -> dict[str, float]:
    with tifffile.TiffFile(path) as tif:
        root = ET.fromstring(tif.ome_metadata)
    pixels = next(e for e in root.iter() if e.tag.endswith("Pixels"))
    return {ax: float(pixels.get(f"PhysicalSize{ax}")) for ax in "XYZ"
            if pixels.get(f"PhysicalSize{ax}") is not None}


def test_allen_tif_layout_via_cli(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "sort.csv", ["image", "segmentation", "verdict", "mask"], [
        [str(d / "img0.tif"), str(d / "seg0.npy"), "bad", ""],
        [str(d / "img1.tif"), str(d / "seg1.npy"), "good", str(d / "mask1.tif")],
        [str(d / "slide.npy"), str(d / "slide_seg.npy"), "good", ""],
    ])
    dst = tmp_path / "train"
    r = run_cli("curate", "sort", "--table", str(table), "--out", str(dst), "--allen-tif")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 sample(s)" in r.stdout
    names = sorted(p.name for p in dst.iterdir())
    assert names == sorted([MANIFEST, "sample_000.ome.zarr", "sample_001.ome.zarr",
                            "img_000.ome.tif", "img_000_GT.ome.tif", "img_000_CM.ome.tif",
                            "img_001.ome.tif", "img_001_GT.ome.tif", "img_001_CM.ome.tif"])
    img = tifffile.imread(dst / "img_000.ome.tif")
    gt = tifffile.imread(dst / "img_000_GT.ome.tif")
    cm = tifffile.imread(dst / "img_000_CM.ome.tif")
    assert img.dtype == np.uint16 and gt.dtype == np.uint8 and cm.dtype == np.float32
    np.testing.assert_array_equal(img, data[1]["img"])
    np.testing.assert_array_equal(gt, (data[1]["seg"] > 0).astype(np.uint8))
    np.testing.assert_array_equal(cm, (data[1]["mask"] == 0).astype(np.float32))
    for f in ("img_000.ome.tif", "img_000_GT.ome.tif", "img_000_CM.ome.tif"):
        sizes = _ome_sizes(dst / f)
        np.testing.assert_allclose([sizes["Z"], sizes["Y"], sizes["X"]], VOXEL_UM)
    # the 2D sample: YX tiffs, voxel size 1 µm (NPY carries none)
    gt2 = tifffile.imread(dst / "img_001_GT.ome.tif")
    np.testing.assert_array_equal(gt2, (data["2d"]["seg"] > 0).astype(np.uint8))
    assert tifffile.imread(dst / "img_001_CM.ome.tif").shape == SHAPE2
    assert _ome_sizes(dst / "img_001.ome.tif") == {"X": 1.0, "Y": 1.0}


@pytest.mark.parametrize("channel", [None, "1", "membrane"])
def test_multichannel_image(tmp_path, channel):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (2, *SHAPE3), dtype=np.uint8)
    seg = (rng.random(SHAPE3) > 0.5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "cells.ome.tif", img, ome=True, photometric="minisblack",
                     metadata={"axes": "CZYX", "Channel": {"Name": ["dna", "membrane"]},
                               "PhysicalSizeZ": 0.5, "PhysicalSizeY": 0.2,
                               "PhysicalSizeX": 0.2})
    np.save(tmp_path / "seg.npy", seg)
    table = _table(tmp_path / "t.csv", ["image", "segmentation"],
                   [["cells.ome.tif", "seg.npy"]])
    dst = tmp_path / "o"
    curate("take-all", table, dst, CurateOptions(channel=channel, allen_tif=True), report=str)
    s = _zarr_sample(dst / "sample_000.ome.zarr")
    axes = [a["name"] for a in s["meta"]["multiscales"][0]["axes"]]
    if channel is None:  # kept whole, as Allen's trainer reads CZYX
        assert axes == ["c", "z", "y", "x"]
        np.testing.assert_array_equal(s["image"], img)
        assert [c["label"] for c in s["meta"]["omero"]["channels"]] == ["dna", "membrane"]
    else:
        assert axes == ["z", "y", "x"]
        np.testing.assert_array_equal(s["image"], img[1])
    np.testing.assert_array_equal(tifffile.imread(dst / "img_000.ome.tif"),
                                  img if channel is None else img[1])
    np.testing.assert_array_equal(s["gt"], seg)


# ------------------------------------------------------------------------ bad input

def _bad_cases(d: Path, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name → (table header+rows as CSV lines, substrings the error must contain)."""
    bad = np.zeros((12, 20, 25), np.uint8)
    np.save(tmp / "wrong_shape.npy", bad)
    return {
        "verdict": (["image,segmentation,verdict",
                     f"{d / 'img0.tif'},{d / 'seg0.npy'},good",
                     "# a comment line",
                     f"{d / 'img1.tif'},{d / 'seg1.npy'},maybe"],
                    ["line 4", "maybe"]),
        "shape": (["image,segmentation,verdict",
                   f"{d / 'img0.tif'},{tmp / 'wrong_shape.npy'},good"],
                  ["wrong_shape.npy", "img0.tif", "(12, 20, 25)", "(12, 20, 24)"]),
        "missing": (["image,segmentation,verdict",
                     f"{d / 'img0.tif'},{d / 'seg0.npy'},good",
                     f"{d / 'img1.tif'},{tmp / 'nowhere.npy'},good"],
                    ["nowhere.npy", "no such file"]),
        "column": (["image,seg_path,verdict", f"{d / 'img0.tif'},{d / 'seg0.npy'},good"],
                   ["segmentation", "line 1"]),
    }


@pytest.mark.parametrize("case", ["verdict", "shape", "missing", "column"])
def test_bad_input_exits_2_and_writes_nothing(data, tmp_path, case):
    lines, needles = _bad_cases(data["dir"], tmp_path)[case]
    table = tmp_path / "t.csv"
    table.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out"
    r = run_cli("curate", "sort", "--table", str(table), "--out", str(dst))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    for needle in needles:
        assert needle in r.stderr.replace("\n", ""), (needle, r.stderr)
    assert not dst.exists() and not (tmp_path / ".out.partial").exists()


def test_existing_destination(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "t.csv", ["image", "segmentation"],
                   [[str(d / "img0.tif"), str(d / "seg0.npy")]])
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = run_cli("curate", "take-all", "--table", str(table), "--out", str(dst))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error:" in ln].__len__() == 1
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    # a folder voxelmill did not make is never deleted, even with --overwrite
    r = run_cli("curate", "take-all", "--table", str(table), "--out", str(dst), "--overwrite")
    assert r.returncode == 2 and "by hand" in r.stderr, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    (dst / MANIFEST).write_text("line\n")  # an earlier curate output: replaced
    r = run_cli("curate", "take-all", "--table", str(table), "--out", str(dst), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in dst.iterdir()) == sorted([MANIFEST, "sample_000.ome.zarr"])


def test_engine_errors(data, tmp_path):
    d = data["dir"]
    table = _table(tmp_path / "t.csv", ["image", "segmentation", "verdict"],
                   [[str(d / "img0.tif"), str(d / "seg0.npy"), "bad"]])
    with pytest.raises(InputError, match="no row is marked good"):
        curate("sort", table, tmp_path / "o", report=str)
    merge = _table(tmp_path / "m.csv", ["image", "segmentation", "segmentation2", "mask"],
                   [[str(d / "img0.tif"), str(d / "seg0.npy"), str(d / "segB0.mrc"), ""]])
    with pytest.raises(InputError, match="line 2: empty 'mask' cell"):
        curate("merge", merge, tmp_path / "o", report=str)
    # a mask that is a 2-channel image is refused, naming it
    two = np.zeros((2, *SHAPE3), np.uint8)
    np.save(tmp_path / "two.npy", two)
    t2 = _table(tmp_path / "t2.csv", ["image", "segmentation", "mask"],
                [[str(d / "img0.tif"), str(d / "seg0.npy"), str(tmp_path / "two.npy")]])
    with pytest.raises(InputError, match="two.npy"):
        curate("take-all", t2, tmp_path / "o", report=str)
    assert not (tmp_path / "o").exists()
    with mrcfile.open(d / "segB0.mrc") as m:  # inputs untouched
        assert m.data.shape == SHAPE3
