"""``voxelmill patches apply``: merged patches back into OME-Zarr labels, provenance, undo.

References are independent: the original numpy array with each patch's values written
where they are not 2 (clipped to the volume), the pyramid recomputed from that array with
``downsample_mode``, and the zarr arrays, chunk files and attributes read back directly.
"""

from __future__ import annotations

import csv
import hashlib
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import zarr

from engine.errors import InputError
from engine.patches.apply import UNDO_DIR, apply_patches, read_log, undo_patch
from engine.patches.extract import ExtractOptions, extract_patches
from engine.patches.files import read_patch, write_patch
from engine.patches.merge import merge_corrections
from engine.pipelines.convert import ConvertOptions, convert
from engine.pyramid import downsample_mode, plan_levels
from tests.conftest import run_cli

SHAPE = (40, 48, 44)
VOXEL = (5.0, 6.0, 7.0)
S = 16  # patch size
B = 2  # label border
CHUNK = 16
NAME = "membranes"


def _quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(5)
    return (rng.random(SHAPE) > 0.6).astype(np.uint8)


@pytest.fixture(scope="module")
def pristine(labels, tmp_path_factory, client) -> Path:
    """A converted image with binary labels, and a second label image of instance ids."""
    d = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(6)
    np.save(d / "tomo.npy", rng.normal(size=SHAPE).astype(np.float32))
    np.save(d / "seg.npy", labels)
    np.save(d / "cells.npy", rng.integers(0, 5, SHAPE).astype(np.uint16))
    copts = ConvertOptions(chunks=(CHUNK,), voxel_size=VOXEL, unit="angstrom",
                           labels=((NAME, str(d / "seg.npy")), ("cells", str(d / "cells.npy"))))
    convert(d / "tomo.npy", d / "tomo.ome.zarr", copts, client, report=_quiet)
    return d / "tomo.ome.zarr"


@pytest.fixture
def image(pristine, tmp_path) -> Path:
    dst = tmp_path / "tomo.ome.zarr"
    shutil.copytree(pristine, dst)
    return dst


def level(image: Path, i: int = 0, name: str = NAME) -> np.ndarray:
    return np.asarray(zarr.open_array(str(image / "labels" / name / str(i)), mode="r")[...])


def extract(image: Path, centres, out: Path, client, fmt: str = "nii.gz") -> Path:
    opts = ExtractOptions(size=(S,), border=(B,), fmt=fmt)
    extract_patches(image, NAME, np.array(centres), out, opts, client)
    return out


def manifest_rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def reference(original: np.ndarray, merged: Path, manifest: Path, value: int = 1
              ) -> np.ndarray:
    """Write each patch (manifest order) where it is not 2, clipped to the volume."""
    out = original.copy()
    for row in manifest_rows(manifest):
        files = list(merged.glob(row["name"] + ".*"))
        if not files:
            continue
        patch = read_patch(files[0]).data
        z0, y0, x0 = int(row["z0"]), int(row["y0"]), int(row["x0"])
        pad = S
        big = np.pad(out, pad, mode="constant")
        sl = (slice(z0 + pad, z0 + pad + S), slice(y0 + pad, y0 + pad + S),
              slice(x0 + pad, x0 + pad + S))
        view = big[sl]
        keep = patch != 2
        view[keep] = np.where(patch[keep] == 1, value, 0)
        out = big[pad:-pad, pad:-pad, pad:-pad]
    return out


def check_pyramid(image: Path, level0: np.ndarray, name: str = NAME) -> None:
    """Every lower level equals downsample_mode of the expected level 0, level by level."""
    levels = plan_levels(SHAPE, "zyx", VOXEL, (CHUNK,) * 3)
    expect = level0
    assert len(levels) > 2
    for i, lv in enumerate(levels[1:], start=1):
        expect = downsample_mode(expect, lv.factors)
        np.testing.assert_array_equal(level(image, i, name), expect)


def chunk_files(image: Path) -> dict[str, int]:
    root = image / "labels" / NAME / "0" / "c"
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns
            for p in root.rglob("*") if p.is_file()}


def touched_chunks(manifest: Path, merged: Path) -> set[str]:
    out = set()
    for row in manifest_rows(manifest):
        if not list(merged.glob(row["name"] + ".*")):
            continue
        lo = [max(int(row[k]), 0) // CHUNK for k in ("z0", "y0", "x0")]
        hi = [(min(int(row[k]), n) - 1) // CHUNK for k, n in zip(("z1", "y1", "x1"), SHAPE,
                                                                  strict=True)]
        for z in range(lo[0], hi[0] + 1):
            for y in range(lo[1], hi[1] + 1):
                for x in range(lo[2], hi[2] + 1):
                    out.add(f"{z}/{y}/{x}")
    return out


def _box(shape, lo, hi, value=1, dtype=np.uint8) -> np.ndarray:
    a = np.zeros(shape, dtype=dtype)
    a[tuple(slice(a0, b0) for a0, b0 in zip(lo, hi, strict=True))] = value
    return a


# ------------------------------------------------------------------------------- core

def test_extract_merge_apply_equals_numpy(image, labels, tmp_path, client):
    out = extract(image, [[20, 24, 22], [8, 8, 8], [30, 40, 36]], tmp_path / "p", client)
    corr = tmp_path / "corr"
    for name, lo, hi in (("other_tomo_patch0", (3, 3, 3), (9, 12, 10)),
                         ("other_tomo_patch1", (5, 2, 2), (12, 14, 6))):
        (corr / name).mkdir(parents=True)
        write_patch(corr / name / "Add1.nii.gz", _box((S,) * 3, lo, hi), VOXEL, "angstrom")
        write_patch(corr / name / "Remove1.nii.gz", _box((S,) * 3, (8, 0, 0), (16, 16, 5)),
                    VOXEL, "angstrom")
        write_patch(corr / name / "Ignore1.nii.gz", _box((S,) * 3, (0, 0, 12), (4, 4, 16)),
                    VOXEL, "angstrom")
    merged = tmp_path / "merged"
    merge_corrections(out / "labelsCorr", corr, merged, border=B, report=_quiet)
    manifest = out / "patches.csv"
    (merged / "other_tomo_patch2.nii.gz").unlink()  # a row without file: skipped
    before = chunk_files(image)
    lines: list[str] = []
    result = apply_patches(merged, manifest, image, NAME, client, report=lines.append)
    assert lines == [f"no file for patch other_tomo_patch2 in {merged}; skipped"]

    expect = reference(labels, merged, manifest)
    assert not np.array_equal(expect, labels)  # the corrections changed something
    got = level(image)
    np.testing.assert_array_equal(got, expect)
    assert result.voxels == sum(int((read_patch(p).data != 2).sum())
                                for p in merged.glob("*.nii.gz"))
    check_pyramid(image, expect)

    # only chunks touched by the patches were rewritten
    after = chunk_files(image)
    touched = touched_chunks(manifest, merged)
    assert result.chunks == len(touched)
    for key, mtime in before.items():
        if key not in touched:
            assert after.get(key) == mtime, key

    # provenance: one entry per applied patch, in manifest order
    log = read_log(image / "labels" / NAME)
    assert [e["patch"] for e in log] == ["other_tomo_patch0", "other_tomo_patch1"]
    rows = {r["name"]: r for r in manifest_rows(manifest)}
    for e in log:
        f = merged / f"{e['patch']}.nii.gz"
        assert e["action"] == "apply"
        assert e["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
        assert Path(e["file"]) == f.resolve()
        assert Path(e["manifest"]) == manifest.resolve()
        r = rows[e["patch"]]
        assert e["bounds"] == [[int(r["z0"]), int(r["z1"])], [int(r["y0"]), int(r["y1"])],
                               [int(r["x0"]), int(r["x1"])]]
        assert datetime.fromisoformat(e["time"]).utcoffset().total_seconds() == 0
        assert (image / "labels" / NAME / e["undo"] / "before.npy").exists()
        assert e["undo"].startswith(UNDO_DIR)
    assert len({e["id"] for e in log}) == 2


def test_overlapping_patches_share_chunks_later_wins(image, labels, tmp_path, client):
    out = extract(image, [[20, 24, 22], [24, 28, 26]], tmp_path / "p", client, fmt="mrc")
    merged = tmp_path / "merged"
    merged.mkdir()
    first = np.ones((S,) * 3, np.uint8)
    first[:, :, :3] = 2
    second = np.zeros((S,) * 3, np.uint8)
    second[:, :4] = 2
    write_patch(merged / "other_tomo_patch0.mrc", first, VOXEL, "angstrom")
    write_patch(merged / "other_tomo_patch1.mrc", second, VOXEL, "angstrom")
    apply_patches(merged, out / "patches.csv", image, NAME, client)
    got = level(image)
    expect = labels.copy()
    expect[12:28, 16:32, 17:30] = 1  # patch0 at 12:28, 16:32, 14:30 without x < 17
    expect[16:32, 24:36, 18:34] = 0  # patch1 at 16:32, 20:36, 18:34 without y < 24
    np.testing.assert_array_equal(got, expect)
    assert got[20, 26, 20] == 0 and got[20, 22, 20] == 1  # overlap: the later one wins
    check_pyramid(image, expect)

    # the undo record of the later patch holds the earlier one's values of the same run
    undo_patch(image, NAME, "other_tomo_patch1", client)
    only_first = labels.copy()
    only_first[12:28, 16:32, 17:30] = 1
    np.testing.assert_array_equal(level(image), only_first)
    undo_patch(image, NAME, "other_tomo_patch0", client)
    np.testing.assert_array_equal(level(image), labels)
    check_pyramid(image, labels)


def test_interrupted_run_is_rolled_back(image, labels, tmp_path, client, monkeypatch):
    import engine.patches.apply as apply_mod

    out = extract(image, [[20, 24, 22], [24, 28, 26]], tmp_path / "p", client)
    merged = tmp_path / "m"
    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S,) * 3, np.uint8), VOXEL,
                "angstrom")
    write_patch(merged / "other_tomo_patch1.nii.gz", np.zeros((S,) * 3, np.uint8), VOXEL,
                "angstrom")

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(apply_mod.provenance, "append", interrupted)
    with pytest.raises(KeyboardInterrupt):  # voxels written, log not
        apply_patches(merged, out / "patches.csv", image, NAME, client)
    assert not np.array_equal(level(image), labels)
    monkeypatch.undo()
    assert (image / "labels" / NAME / UNDO_DIR / "pending.json").exists()
    with pytest.raises(InputError, match="never applied"):  # after rolling back
        undo_patch(image, NAME, "other_tomo_patch0", client)
    np.testing.assert_array_equal(level(image), labels)
    check_pyramid(image, labels)
    assert not (image / "labels" / NAME / UNDO_DIR / "pending.json").exists()
    assert read_log(image / "labels" / NAME) == []


def test_border_patches_drop_the_padding(image, labels, tmp_path, client):
    out = extract(image, [[1, 46, 10], [38, 2, 42]], tmp_path / "p", client, fmt="nrrd")
    rows = manifest_rows(out / "patches.csv")
    assert int(rows[0]["z0"]) < 0 and int(rows[0]["y1"]) > SHAPE[1]  # padded
    merged = tmp_path / "merged"
    merged.mkdir()
    rng = np.random.default_rng(3)
    for r in rows:
        patch = rng.integers(0, 3, (S,) * 3).astype(np.uint8)
        write_patch(merged / f"{r['name']}.nrrd", patch, VOXEL, "angstrom")
    apply_patches(merged, out / "patches.csv", image, NAME, client)
    p0 = read_patch(merged / "other_tomo_patch0.nrrd").data
    expect = labels.copy()
    # patch 0 spans z -7:9, y 38:54, x 2:18: inside z 0:9, y 38:48
    inside = p0[7:, :10, :]
    view = expect[0:9, 38:48, 2:18]
    view[inside != 2] = inside[inside != 2]
    p1 = read_patch(merged / "other_tomo_patch1.nrrd").data
    inside = p1[:10, 6:, :10]  # z 30:46, y -6:10, x 34:50 -> z 30:40, y 0:10, x 34:44
    view = expect[30:40, 0:10, 34:44]
    view[inside != 2] = inside[inside != 2]
    np.testing.assert_array_equal(level(image), expect)
    np.testing.assert_array_equal(level(image), reference(labels, merged, out / "patches.csv"))


def test_undo_restores_exactly_and_refuses_clobbering(image, labels, tmp_path, client):
    out = extract(image, [[20, 24, 22], [24, 28, 26], [8, 8, 36]], tmp_path / "p", client)
    manifest = out / "patches.csv"
    ones = np.ones((S,) * 3, np.uint8)
    zeros = np.zeros((S,) * 3, np.uint8)
    run1, run2 = tmp_path / "m1", tmp_path / "m2"
    write_patch(run1 / "other_tomo_patch0.nii.gz", ones, VOXEL, "angstrom")
    write_patch(run2 / "other_tomo_patch1.nii.gz", zeros, VOXEL, "angstrom")
    write_patch(run2 / "other_tomo_patch2.nii.gz", ones, VOXEL, "angstrom")
    apply_patches(run1, manifest, image, NAME, client)
    after1 = level(image)
    apply_patches(run2, manifest, image, NAME, client)
    after2 = level(image)
    assert not np.array_equal(after1, after2)

    with pytest.raises(InputError, match="later patches wrote some of its voxels: "
                                         "other_tomo_patch1; undo them first"):
        undo_patch(image, NAME, "other_tomo_patch0", client)
    np.testing.assert_array_equal(level(image), after2)  # refused: nothing changed

    # patch2 overlaps nothing: undone alone
    undo_patch(image, NAME, "other_tomo_patch2", client)
    expect = after2.copy()
    expect[0:16, 0:16, 28:44] = labels[0:16, 0:16, 28:44]
    np.testing.assert_array_equal(level(image), expect)
    undo_patch(image, NAME, "other_tomo_patch1", client)
    np.testing.assert_array_equal(level(image), after1)
    undo_patch(image, NAME, "other_tomo_patch0", client)
    np.testing.assert_array_equal(level(image), labels)
    check_pyramid(image, labels)

    log = read_log(image / "labels" / NAME)
    applies = {e["id"]: e["patch"] for e in log if e["action"] == "apply"}
    undos = [(e["patch"], applies[e["undoes"]]) for e in log if e["action"] == "undo"]
    assert undos == [("other_tomo_patch2",) * 2, ("other_tomo_patch1",) * 2,
                     ("other_tomo_patch0",) * 2]
    assert [e["restored"] for e in log if e["action"] == "undo"][0] == S ** 3
    with pytest.raises(InputError, match="no application left to undo"):
        undo_patch(image, NAME, "other_tomo_patch0", client)


def test_instance_labels_with_value(image, tmp_path, client):
    out = extract(image, [[20, 24, 22]], tmp_path / "p", client)
    merged = tmp_path / "m"
    patch = np.full((S,) * 3, 2, np.uint8)
    patch[4:8, 4:8, 4:8] = 1
    patch[8:10] = 0
    write_patch(merged / "other_tomo_patch0.nii.gz", patch, VOXEL, "angstrom")
    cells = level(image, 0, "cells")
    with pytest.raises(InputError, match="not binary .*--value"):
        apply_patches(merged, out / "patches.csv", image, "cells", client)
    apply_patches(merged, out / "patches.csv", image, "cells", client, value=9)
    expect = cells.copy()
    expect[16:20, 20:24, 18:22] = 9
    expect[20:22, 16:32, 14:30] = 0
    np.testing.assert_array_equal(level(image, 0, "cells"), expect)
    check_pyramid(image, expect, "cells")
    meta = zarr.open_group(str(image / "labels" / "cells"), mode="r").attrs["ome"]["image-label"]
    assert 9 in [c["label-value"] for c in meta["colors"]]  # the new value got a colour


# ------------------------------------------------------------------------------- errors

def _cli_error(image: Path, *args: str) -> str:
    before = {n: level(image, 0, n) for n in (NAME, "cells")}
    res = run_cli("patches", "apply", *args)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, res.stderr
    for n, arr in before.items():
        np.testing.assert_array_equal(level(image, 0, n), arr)
    assert not (image / "labels" / NAME / UNDO_DIR).exists()
    return res.stderr


def test_cli_bad_inputs(image, tmp_path, client):
    out = extract(image, [[20, 24, 22]], tmp_path / "p", client)
    manifest = str(out / "patches.csv")
    merged = tmp_path / "m"
    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S,) * 3, np.uint8), VOXEL,
                "angstrom")
    base = ("--manifest", manifest, "--into", str(image))

    stray = merged / "stray_patch9.nii.gz"
    write_patch(stray, np.ones((S,) * 3, np.uint8), VOXEL, "angstrom")
    msg = _cli_error(image, str(merged), *base, "--labels", NAME)
    assert "stray_patch9" in msg and "no row" in msg
    stray.unlink()

    msg = _cli_error(image, str(merged), *base, "--labels", "nuclei")
    assert "nuclei" in msg and NAME in msg

    msg = _cli_error(image, str(merged), *base, "--labels", "cells")
    assert "--value" in msg

    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S, S, S - 1), np.uint8), VOXEL,
                "angstrom")
    msg = _cli_error(image, str(merged), *base, "--labels", NAME)
    assert "other_tomo_patch0" in msg and "(16, 16, 15)" in msg

    # the CLI end to end: a good patch lands, then --undo restores
    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S,) * 3, np.uint8), VOXEL,
                "angstrom")
    original = level(image)
    res = run_cli("patches", "apply", str(merged), *base, "--labels", NAME, "--workers", "1",
                  "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    assert (level(image)[12:28, 16:32, 14:30] == 1).all()
    res = run_cli("patches", "apply", "--into", str(image), "--labels", NAME,
                  "--undo", "other_tomo_patch0", "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(level(image), original)


def test_voxel_size_and_manifest_checks(image, tmp_path, client):
    out = extract(image, [[20, 24, 22]], tmp_path / "p", client)
    merged = tmp_path / "m"
    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S,) * 3, np.uint8), VOXEL,
                "angstrom")
    text = (out / "patches.csv").read_text()
    bad = tmp_path / "other.csv"
    bad.write_text(text.replace(",5.0,6.0,7.0,", ",5.0,6.0,8.0,"))
    with pytest.raises(InputError, match="voxel size .* cut from another image"):
        apply_patches(merged, bad, image, NAME, client)
    values = np.full((S,) * 3, 3, np.uint8)
    write_patch(merged / "other_tomo_patch0.nii.gz", values, VOXEL, "angstrom")
    with pytest.raises(InputError, match="0, 1 or 2"):
        apply_patches(merged, out / "patches.csv", image, NAME, client)
    assert read_log(image / "labels" / NAME) == []


@pytest.mark.parametrize("evil", ["../../outside", "/tmp/abs", ".hidden", ""])
def test_manifest_names_cannot_escape_the_output(image, tmp_path, client, evil):
    """A patch name from the manifest becomes part of an undo-record path: a name with a
    separator or a leading dot is refused before anything is written."""
    out = extract(image, [[20, 24, 22]], tmp_path / "p", client)
    merged = tmp_path / "m"
    write_patch(merged / "other_tomo_patch0.nii.gz", np.ones((S,) * 3, np.uint8), VOXEL,
                "angstrom")
    bad = tmp_path / "evil.csv"
    bad.write_text((out / "patches.csv").read_text().replace("other_tomo_patch0,",
                                                            f"{evil},"))
    before = level(image)
    with pytest.raises(InputError, match=r"evil.csv, line 2: name .* not a plain file name"):
        apply_patches(merged, bad, image, NAME, client)
    np.testing.assert_array_equal(level(image), before)
    assert not (image / "labels" / NAME / UNDO_DIR).exists()
