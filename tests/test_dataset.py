"""``voxelmill dataset split``: grouped, seeded, order-independent train / val / verify splits."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from engine.dataset import (
    SplitOptions,
    assign_groups,
    check_fractions,
    plan_split,
    split_dataset,
)
from engine.errors import DestinationError, InputError, OptionError
from engine.io.layouts import SPLIT_DIRS, SPLITS
from engine.patches.extract import MANIFEST_COLUMNS
from engine.patches.files import read_patch, write_patch
from tests.conftest import run_cli


def make_patches(root: Path, sizes: dict[str, int], ds: str = "ds", manifest: bool = True,
                 order_seed: int | None = None, suffix: str = ".nii.gz") -> Path:
    """A patch folder: ``sizes[token]`` patches per source volume, small files of distinct
    bytes; ``order_seed`` shuffles the order files are created and manifest rows written."""
    entries = [(token, i) for token in sorted(sizes) for i in range(sizes[token])]
    if order_seed is not None:
        entries = [entries[k] for k in np.random.default_rng(order_seed).permutation(
            len(entries))]
    (root / "imagesCorr").mkdir(parents=True)
    (root / "labelsCorr").mkdir()
    rows = []
    for token, i in entries:
        name = f"{ds}_{token}_patch{i}"
        (root / "imagesCorr" / f"{name}{suffix}").write_bytes(f"image {name}".encode())
        (root / "labelsCorr" / f"{name}{suffix}").write_bytes(f"labels {name}".encode())
        rows.append({"name": name, "image": f"/data/{token}.mrc",
                     "labels": f"/data/{token}_seg.mrc"})
    if manifest:
        with open(root / "patches.csv", "w", newline="") as f:
            w = csv.DictWriter(f, MANIFEST_COLUMNS, restval="0")
            w.writeheader()
            w.writerows(rows)
    return root


def read_split(dst: Path) -> list[dict[str, str]]:
    with open(dst / "split.csv", newline="") as f:
        return list(csv.DictReader(f))


def on_disk(dst: Path) -> dict[str, str]:
    """Split of each item name as found by listing the output folders (not split.csv)."""
    out = {}
    for split, (images, labels) in SPLIT_DIRS.items():
        names = {p.name.removesuffix(".nii.gz") for p in (dst / labels).iterdir()}
        assert {p.name.removesuffix("_0000.nii.gz") for p in (dst / images).iterdir()} == names
        out.update(dict.fromkeys(names, split))
    return out


def sizes_for(n_groups: int, seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    return {f"tomo{g:02d}": int(rng.integers(1, 10)) for g in range(n_groups)}


# --------------------------------------------------------------------------- assignment

@pytest.mark.parametrize("seed", range(6))
def test_groups_stay_whole_and_counts_near_fractions(tmp_path, seed):
    sizes = sizes_for(14, 100 + seed)
    src = make_patches(tmp_path / "src", sizes)
    fractions = (0.6, 0.25, 0.15)
    split_dataset([src], tmp_path / "out", SplitOptions(fractions, seed=seed))
    rows = read_split(tmp_path / "out")
    assert len(rows) == sum(sizes.values())
    assert {r["name"]: r["split"] for r in rows} == on_disk(tmp_path / "out")
    split_of_group: dict[str, set[str]] = {}
    for r in rows:
        split_of_group.setdefault(r["group"], set()).add(r["split"])
        assert r["group"] == f"/data/{r['name'].split('_')[1]}.mrc"
    assert all(len(s) == 1 for s in split_of_group.values())  # no volume in two splits
    # bound (module docstring): |n_split - fraction * n| < largest group
    n, m = sum(sizes.values()), max(sizes.values())
    for split, frac in zip(SPLITS, fractions, strict=True):
        n_split = sum(r["split"] == split for r in rows)
        assert n_split > 0
        assert abs(n_split - frac * n) < m, (split, n_split, frac * n, m)
    meta = json.loads((tmp_path / "out" / "split.json").read_text())
    assert meta["seed"] == seed
    assert meta["fractions"] == dict(zip(SPLITS, fractions, strict=True))
    assert sum(c["items"] for c in meta["counts"].values()) == n


def test_assign_groups_bound_many_random_cases():
    rng = np.random.default_rng(7)
    repaired = 0
    for _ in range(400):
        sizes = {f"g{i}": int(rng.integers(1, 40)) for i in range(int(rng.integers(3, 30)))}
        raw = rng.random(3) * (rng.random(3) > 0.3)
        raw[0] += 0.05
        fractions = tuple(float(v) for v in raw / raw.sum())
        got = assign_groups(sizes, fractions, int(rng.integers(0, 1000)))
        assert set(got) == set(sizes)
        n, m = sum(sizes.values()), max(sizes.values())
        groups = {s: sum(v == s for v in got.values()) for s in SPLITS}
        # every used split with 2+ groups: nothing was repaired, the greedy bound holds
        used = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0]
        bound = m if all(groups[s] >= 2 for s in used) else 2 * m
        repaired += bound == 2 * m
        for split, frac in zip(SPLITS, fractions, strict=True):
            n_split = sum(sizes[g] for g, s in got.items() if s == split)
            assert (n_split > 0) == (frac > 0)
            assert abs(n_split - frac * n) < bound
    assert repaired > 0  # the cases include uneven ones


def test_assign_groups_fills_an_empty_split():
    # greedy gives train 4, val 2, verify 0; one volume moves to verify, which one is
    # the move with the smallest total deviation: from train (4 -> 2, verify 0 -> 2)
    got = assign_groups({"a": 2, "b": 2, "c": 2}, (0.7, 0.2, 0.1), 0)
    assert sorted(got.values()) == ["train", "val", "verify"]
    got = assign_groups({"big": 10, "s1": 1, "s2": 1, "s3": 1}, (0.5, 0.3, 0.2), 0)
    assert got["big"] == "train"
    assert set(got.values()) == set(SPLITS)  # train 10, val and verify from the small ones


def test_assign_groups_zero_fraction_and_input_order():
    sizes = {f"g{i}": i % 4 + 1 for i in range(20)}
    got = assign_groups(sizes, (0.8, 0.2, 0.0), 3)
    assert set(got.values()) == {"train", "val"}
    reversed_sizes = dict(reversed(list(sizes.items())))
    assert assign_groups(reversed_sizes, (0.8, 0.2, 0.0), 3) == got


def test_seed_reproducible_and_different_seed_differs(tmp_path):
    src = make_patches(tmp_path / "src", sizes_for(16, 1))
    split_dataset([src], tmp_path / "a", SplitOptions(seed=5))
    split_dataset([src], tmp_path / "b", SplitOptions(seed=5))
    split_dataset([src], tmp_path / "c", SplitOptions(seed=6))
    text = (tmp_path / "a" / "split.csv").read_bytes()
    assert (tmp_path / "b" / "split.csv").read_bytes() == text
    assert on_disk(tmp_path / "a") == on_disk(tmp_path / "b")
    assert on_disk(tmp_path / "c") != on_disk(tmp_path / "a")


def test_independent_of_listing_and_manifest_order(tmp_path):
    sizes = sizes_for(12, 2)
    a = make_patches(tmp_path / "a", sizes, order_seed=None)
    b = make_patches(tmp_path / "b", sizes, order_seed=11)
    rows_b = (b / "patches.csv").read_text().splitlines()
    assert rows_b != (a / "patches.csv").read_text().splitlines()  # really shuffled
    split_dataset([a], tmp_path / "out_a", SplitOptions(seed=4))
    split_dataset([b], tmp_path / "out_b", SplitOptions(seed=4))
    key = [(r["name"], r["group"], r["split"]) for r in read_split(tmp_path / "out_a")]
    assert key == [(r["name"], r["group"], r["split"]) for r in read_split(tmp_path / "out_b")]


# ------------------------------------------------------------------------------- files

def test_copies_are_byte_identical_real_patches(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for t, token in enumerate(["a", "b", "c", "d"]):
        for i in range(2):
            name = f"other_{token}_patch{i}"
            write_patch(src / "imagesCorr" / f"{name}.nii.gz",
                        rng.random((6, 5, 4), dtype=np.float32), (2.0, 2.0, 2.0), "nm",
                        origin=(t, i, 0))
            write_patch(src / "labelsCorr" / f"{name}.nii.gz",
                        rng.integers(0, 3, (6, 5, 4), dtype=np.uint8), (2.0, 2.0, 2.0), "nm")
    split_dataset([src], tmp_path / "out", SplitOptions((0.5, 0.25, 0.25), seed=1))
    for r in read_split(tmp_path / "out"):
        for col, out_col in (("image", "out_image"), ("labels", "out_labels")):
            copy = tmp_path / "out" / r[out_col]
            assert not copy.is_symlink()
            assert copy.read_bytes() == Path(r[col]).read_bytes()
        image = nib.load(tmp_path / "out" / r["out_image"])  # a trainer reads it as before
        np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0),
                                      read_patch(r["image"]).data)
        assert r["out_image"].endswith(f"{r['name']}_0000.nii.gz")
        assert r["out_labels"].endswith(f"{r['name']}.nii.gz")


def test_link_makes_symlinks_to_sources(tmp_path):
    src = make_patches(tmp_path / "src", sizes_for(6, 3))
    split_dataset([src], tmp_path / "out", SplitOptions(seed=0, link=True))
    rows = read_split(tmp_path / "out")
    for r in rows:
        name = r["name"]
        for folder, col in (("imagesCorr", "out_image"), ("labelsCorr", "out_labels")):
            link = tmp_path / "out" / r[col]
            assert link.is_symlink()
            assert Path(os.readlink(link)) == (src / folder / f"{name}.nii.gz").resolve()
            assert link.read_bytes() == (src / folder / f"{name}.nii.gz").read_bytes()
    assert json.loads((tmp_path / "out" / "split.json").read_text())["mode"] == "link"


def test_zarr_patches_copied_as_trees(tmp_path):
    src = tmp_path / "src"
    data = {}
    for token in ["a", "b", "c"]:
        name = f"ds_{token}_patch0"
        data[name] = np.arange(60, dtype=np.float32).reshape(3, 4, 5) + ord(token)
        write_patch(src / "imagesCorr" / f"{name}.zarr", data[name], (1, 1, 1))
        write_patch(src / "labelsCorr" / f"{name}.zarr", (data[name] > 100).astype(np.uint8),
                    (1, 1, 1))
    split_dataset([src], tmp_path / "out", SplitOptions(seed=0))
    for r in read_split(tmp_path / "out"):
        out_image = tmp_path / "out" / r["out_image"]
        assert out_image.is_dir() and not out_image.is_symlink()
        assert out_image.name == f"{r['name']}_0000.zarr"
        np.testing.assert_array_equal(read_patch(out_image).data, data[r["name"]])
        np.testing.assert_array_equal(read_patch(tmp_path / "out" / r["out_labels"]).data,
                                      data[r["name"]] > 100)


def test_names_without_manifest_parsed_into_groups(tmp_path):
    sizes = {"tomo_1": 3, "tomoB": 4, "t3": 2, "t4": 5}  # a token with '_' stays whole
    src = make_patches(tmp_path / "src", sizes, ds="set", manifest=False)
    # MemBrain-seg training folders name images <name>_0000: found as well
    img = src / "imagesCorr" / "set_t3_patch1.nii.gz"
    img.rename(img.with_name("set_t3_patch1_0000.nii.gz"))
    split_dataset([src], tmp_path / "out", SplitOptions((0.5, 0.25, 0.25), seed=2))
    rows = read_split(tmp_path / "out")
    groups = {r["name"]: r["group"] for r in rows}
    assert groups["set_tomo_1_patch2"] == "set_tomo_1"
    assert {g for g in groups.values()} == {f"set_{t}" for t in sizes}
    for g in set(groups.values()):
        assert len({r["split"] for r in rows if r["group"] == g}) == 1
    assert on_disk(tmp_path / "out") == {r["name"]: r["split"] for r in rows}
    row = next(r for r in rows if r["name"] == "set_t3_patch1")
    assert row["out_image"].endswith("/set_t3_patch1_0000.nii.gz")  # not _0000_0000


def test_sources_merged_same_volume_one_group(tmp_path):
    a = make_patches(tmp_path / "a", {"t1": 3, "t2": 2, "t3": 2}, ds="round1")
    b = make_patches(tmp_path / "b", {"t1": 2, "t4": 3}, ds="round2")
    split_dataset([a, b], tmp_path / "out", SplitOptions(seed=0))
    rows = read_split(tmp_path / "out")
    assert len(rows) == 12
    t1 = {r["split"] for r in rows if r["group"] == "/data/t1.mrc"}
    assert len(t1) == 1
    assert len([r for r in rows if r["group"] == "/data/t1.mrc"]) == 5


def test_samples_folder(tmp_path):
    src = tmp_path / "curated"
    src.mkdir()
    rows = []
    for i in range(6):
        name = f"sample_{i:03d}"
        data = np.full((2, 3, 4), i, dtype=np.uint8)
        write_patch(src / f"{name}.ome.zarr", data, (1, 1, 1))
        # as 'voxelmill curate' writes it: sample without suffix, image = the source volume
        rows.append({"sample": name, "image": f"/raw/cells{i // 2}.tif", "mode": "take-all"})
    with open(src / "samples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["sample", "image", "segmentation", "mode"], restval="")
        w.writeheader()
        w.writerows(rows)
    split_dataset([src], tmp_path / "out", SplitOptions(seed=0))
    out_rows = read_split(tmp_path / "out")
    assert {r["split"] for r in out_rows} == set(SPLITS)  # 3 volumes, 3 splits
    for r in out_rows:
        copy = tmp_path / "out" / r["out_image"]
        assert copy.name == f"{r['name']}" and r["name"].endswith(".ome.zarr")
        assert r["labels"] == "" and r["out_labels"] == ""
        assert r["group"] == f"/raw/cells{int(r['name'][7:10]) // 2}.tif"
        np.testing.assert_array_equal(read_patch(copy).data, int(r["name"][7:10]))
        same = {x["split"] for x in out_rows if x["group"] == r["group"]}
        assert same == {r["split"]}
    split_dataset([src], tmp_path / "linked", SplitOptions(seed=0, link=True))
    for r in read_split(tmp_path / "linked"):
        assert (tmp_path / "linked" / r["out_image"]).is_symlink()


# -------------------------------------------------------------------------------- errors

def test_engine_errors(tmp_path):
    src = make_patches(tmp_path / "src", {"a": 2, "b": 1})
    for bad in [(0.5, 0.4), (0.7, 0.2, 0.2), (1.2, -0.2, 0.0), (0.5, 0.25, 0.25, 0.0)]:
        with pytest.raises(OptionError, match="--fractions"):
            check_fractions(bad)
    assert check_fractions((0.8, 0.2)) == (0.8, 0.2, 0.0)
    with pytest.raises(OptionError, match="2 source volume"):
        plan_split([src], tmp_path / "out", SplitOptions((0.5, 0.3, 0.2)))
    assert not (tmp_path / "out").exists()
    plan = plan_split([src], tmp_path / "out", SplitOptions((0.5, 0.5, 0.0)))
    assert sorted(plan.assignment.values()) == ["train", "val"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a patch folder"):
        plan_split([tmp_path / "empty"], tmp_path / "out2")
    with pytest.raises(OptionError, match="overlaps"):
        plan_split([src], src / "out")
    (src / "labelsCorr" / "ds_z_patch0.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="not in .*patches.csv"):
        plan_split([src], tmp_path / "out")
    (tmp_path / "dst").mkdir()
    with pytest.raises(DestinationError, match="exists"):
        split_dataset([make_patches(tmp_path / "ok", {"a": 1, "b": 1, "c": 1})],
                      tmp_path / "dst")


def test_uneven_groups_warn(tmp_path):
    src = make_patches(tmp_path / "src", {"big": 40, "s1": 1, "s2": 1})
    plan = plan_split([src], tmp_path / "out", SplitOptions(seed=0))
    assert plan.assignment == {"/data/big.mrc": "train", "/data/s1.mrc": "val",
                               "/data/s2.mrc": "verify"}
    assert len(plan.notes) == 2  # val 2% and verify 2% of the items, asked for 20%, 10%
    assert "the val split holds 2% of the items, asked for 20%" in plan.notes[0]
    assert not (tmp_path / "out").exists()


def test_cli_split(tmp_path):
    src = make_patches(tmp_path / "src", sizes_for(8, 4))
    dst = tmp_path / "out"
    proc = run_cli("dataset", "split", str(src), "--out", str(dst), "--fractions",
                   "0.5,0.3,0.2", "--seed", "9", "--link")
    assert proc.returncode == 0, proc.stderr
    assert "train:" in proc.stdout and "verify:" in proc.stdout
    meta = json.loads((dst / "split.json").read_text())
    assert meta["seed"] == 9 and meta["mode"] == "link"
    assert meta["fractions"] == {"train": 0.5, "val": 0.3, "verify": 0.2}
    assert all((dst / r["out_image"]).is_symlink() for r in read_split(dst))
    assert not list(tmp_path.glob(".*partial"))
    proc = run_cli("dataset", "split", str(src), "--out", str(dst), "--seed", "9",
                   "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not any((dst / r["out_image"]).is_symlink() for r in read_split(dst))


def _no_imagescorr(tmp_path: Path) -> list[str]:
    src = make_patches(tmp_path / "src", {"a": 1, "b": 1, "c": 1})
    for p in (src / "imagesCorr").iterdir():
        p.unlink()
    (src / "imagesCorr").rmdir()
    return [str(src)]


def _clash(tmp_path: Path) -> list[str]:
    a = make_patches(tmp_path / "a", {"a": 1, "b": 1, "c": 1})
    b = make_patches(tmp_path / "b", {"c": 1, "d": 1})  # ds_c_patch0 in both
    return [str(a), str(b)]


@pytest.mark.parametrize("case, extra, message", [
    ("fractions", ["--fractions", "0.7,0.2,0.2"], "sum to 1.1"),
    ("negative", ["--fractions", "1.1,-0.1,0"], ">= 0"),
    ("imagescorr", [], "no imagesCorr/"),
    ("clash", [], "two items named 'ds_c_patch0'"),
    ("few groups", [], "non-zero fractions"),
    ("exists", [], "destination exists"),
])
def test_cli_bad_input(tmp_path, case, extra, message):
    dst = tmp_path / "out"
    if case == "imagescorr":
        sources = _no_imagescorr(tmp_path)
    elif case == "clash":
        sources = _clash(tmp_path)
    elif case == "few groups":
        sources = [str(make_patches(tmp_path / "src", {"a": 3, "b": 3}))]
    else:
        sources = [str(make_patches(tmp_path / "src", {"a": 1, "b": 1, "c": 1}))]
    if case == "exists":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    proc = run_cli("dataset", "split", *sources, "--out", str(dst), *extra)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    if case == "clash":
        assert str(Path(sources[0]).resolve().name) in lines[0]
        assert "a/imagesCorr" in lines[0] and "b/imagesCorr" in lines[0]
    if case == "exists":
        assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    else:
        assert not dst.exists()
    assert not list(tmp_path.glob(".*partial"))


# ----------------------------------------------------------------------- PartSeg projects

def make_projects(root: Path, n: int) -> list[Path]:
    """``n`` small PartSeg projects (2D, ROI + a Trapalyzer-style "Labeling" map)."""
    from engine.io.partseg import write_project

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = rng.integers(0, 255, (16, 20)).astype(np.uint8)
        roi = np.zeros((16, 20), np.uint8)
        roi[2:8, 3:9] = 1
        roi[9:14, 10:18] = 2
        labeling = np.where(roi == 1, 1, np.where(roi == 2, 3, 0)).astype(np.uint8)
        out.append(write_project(root / f"field{i}.tgz", image, "yx", (0.5, 0.5), "micrometer",
                                 roi, alternative={"Labeling": labeling}))
    return out


def test_partseg_projects_split_whole_and_train_on_it(tmp_path):
    from engine.learn.data import IGNORE, SourceSpec, open_sources, split_folder_validation

    projects = make_projects(tmp_path / "projects", 6)
    extra = make_projects(tmp_path / "more", 1)[0].rename(tmp_path / "more" / "extra.tbz2")
    dst = tmp_path / "split"
    # a folder of projects and a single project file, merged
    split_dataset([tmp_path / "projects", extra], dst, SplitOptions(seed=1))
    rows = read_split(dst)
    assert sorted(r["name"] for r in rows) == sorted([p.name for p in projects] + [extra.name])
    assert len({r["group"] for r in rows}) == 7  # one group per project
    assert {r["split"] for r in rows} == set(SPLITS)
    for r in rows:
        images, labels = SPLIT_DIRS[r["split"]]
        assert r["out_image"] == f"{images}/{r['name']}" and r["out_labels"] == ""
        assert (dst / r["out_image"]).read_bytes() == Path(r["image"]).read_bytes()
    # training reads the split's train projects; its val projects validate
    spec = SourceSpec(dst, labels="Labeling", classes={1: 1, 3: "ignore"})
    train, val = open_sources([spec]), split_folder_validation([spec])
    names = {s: {r["name"] for r in rows if r["split"] == s} for s in SPLITS}
    assert {Path(v.name.split(":")[0]).name for v in train} == names["train"]
    assert {Path(v.name.split(":")[0]).name for v in val} == names["val"]
    groups = {r["name"]: r["group"] for r in rows}
    for v in train + val:
        assert v.group == groups[Path(v.name.split(":")[0]).name]
        label = v.label.compute()
        assert set(np.unique(label)) == {0, 1, IGNORE}
    # links point at the projects
    split_dataset([tmp_path / "projects"], tmp_path / "linked", SplitOptions(seed=1, link=True))
    assert all((tmp_path / "linked" / r["out_image"]).is_symlink()
               for r in read_split(tmp_path / "linked"))


def test_cli_split_partseg_projects(tmp_path):
    projects = make_projects(tmp_path / "projects", 3)
    proc = run_cli("dataset", "split", *map(str, projects), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    for split in SPLITS:  # three projects, three groups: one each
        assert f"{split}: 1 items from 1 source volumes" in proc.stdout
    assert sum(len(list((tmp_path / "out" / SPLIT_DIRS[s][0]).iterdir())) for s in SPLITS) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("dataset", "split", str(empty), "--out", str(tmp_path / "out2"))
    assert proc.returncode == 2 and "folder of PartSeg projects" in proc.stderr
