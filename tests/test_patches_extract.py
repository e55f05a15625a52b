"""``voxelmill patches extract``: centres from CSV, patches with padding, MemBrain-seg layout.

References are independent: plain numpy slicing and ``np.pad`` on the whole array, and
the written files read back with mrcfile / nibabel as well as ``read_patch``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import mrcfile
import nibabel as nib
import numpy as np
import pytest

from engine.errors import DestinationError, InputError, OptionError
from engine.io.layouts import PATCH_FORMATS, patch_suffix
from engine.patches.coords import read_coords, read_coords_table, write_coords
from engine.patches.extract import (
    BORDER_COLUMNS,
    MANIFEST_COLUMNS,
    ExtractOptions,
    extract_patches,
    plan_extraction,
    reflect_indices,
    source_stem,
)
from engine.patches.files import read_patch
from engine.pipelines.convert import ConvertOptions, convert
from engine.volume import convert_length
from tests.conftest import run_cli, write_mrc

SHAPE = (40, 48, 44)
VOXEL = (5.0, 6.0, 7.0)  # z, y, x in Å: non-trivial and different per axis
S = 16  # patch size
B = 3  # label border


@pytest.fixture(scope="module")
def arrays() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    img = rng.normal(size=SHAPE).astype(np.float32)
    lab = (rng.random(SHAPE) > 0.7).astype(np.int8)
    lab[10:14, 5:9, 30:40] = 2  # an ignore region from an earlier correction round
    return img, lab


@pytest.fixture(scope="module")
def mrc_pair(arrays, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mrc")
    img, lab = arrays
    # mrcfile takes the voxel size as x, y, z
    im = write_mrc(d / "tomo.mrc", img, voxel_size=VOXEL[::-1])
    lb = write_mrc(d / "tomo_seg.mrc", lab, voxel_size=VOXEL[::-1])
    return im, lb


def expected(img: np.ndarray, lab: np.ndarray, centre, size=(S, S, S), border=(B, B, B)):
    """The reference: pad the whole arrays (image mirrored, labels 2), slice, shell = 2."""
    pad = max(size)
    start = [c - s // 2 for c, s in zip(centre, size, strict=True)]
    sl = tuple(slice(a + pad, a + pad + s) for a, s in zip(start, size, strict=True))
    e_img = np.pad(img, pad, mode="reflect")[sl].astype(np.float32)
    e_lab = np.pad(lab, pad, mode="constant", constant_values=2)[sl].astype(np.uint8)
    for ax, b in enumerate(border):
        idx = [slice(None)] * 3
        idx[ax] = slice(0, b)
        e_lab[tuple(idx)] = 2
        idx[ax] = slice(e_lab.shape[ax] - b, None)
        e_lab[tuple(idx)] = 2
    return e_img, e_lab, start


def in_angstrom(patch) -> tuple[float, ...]:
    """A read patch's voxel size (z, y, x) in Å, whatever unit its format records."""
    return tuple(convert_length(v, patch.unit, "angstrom") for v in patch.voxel_size)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- coords

def test_coords_header_any_order_extra_columns_comments(tmp_path):
    f = write_csv(tmp_path / "c.csv", "# picked in napari\n\nScore,Z,x,Y\n0.9,1,2,3\n"
                  "# a comment between rows\n0.1,4,5,6\n\n")
    zyx, lines = read_coords_table(f)
    np.testing.assert_array_equal(zyx, [[1, 3, 2], [4, 6, 5]])
    np.testing.assert_array_equal(lines, [4, 6])
    assert zyx.dtype == np.int64


def test_coords_without_header_orders_and_separators(tmp_path):
    f = write_csv(tmp_path / "c.csv", "10,20,30,0.5\n11,21,31\n")
    np.testing.assert_array_equal(read_coords(f), [[30, 20, 10], [31, 21, 11]])
    np.testing.assert_array_equal(read_coords(f, order="zyx"), [[10, 20, 30], [11, 21, 31]])
    g = write_csv(tmp_path / "c.txt", "10 20 30\n1\t2\t3\n4;5;6\n")
    np.testing.assert_array_equal(read_coords(g), [[30, 20, 10], [3, 2, 1], [6, 5, 4]])


def test_coords_floats_round_half_up(tmp_path):
    f = write_csv(tmp_path / "c.csv", "x,y,z\n2.5,3.5,-0.5\n2.49,3.51,0.5\n")
    # numpy's round would give 2, 4, -0 for the first row (half to even)
    np.testing.assert_array_equal(read_coords(f), [[0, 4, 3], [1, 4, 2]])


def test_coords_physical_units(tmp_path):
    # voxel 5 x 6 x 7 Å (z, y, x); a centre at voxel (z, y, x) = (3, 4, 10)
    f = write_csv(tmp_path / "a.csv", "x,y,z\n70,24,15\n")
    np.testing.assert_array_equal(
        read_coords(f, unit="angstrom", voxel_size=VOXEL, vox_unit="angstrom"), [[3, 4, 10]])
    g = write_csv(tmp_path / "n.csv", "x,y,z\n7.0,2.4,1.5\n")
    np.testing.assert_array_equal(
        read_coords(g, unit="nm", voxel_size=VOXEL, vox_unit="angstrom"), [[3, 4, 10]])
    # voxel size in nm, coordinates in Å
    np.testing.assert_array_equal(
        read_coords(f, unit="angstrom", voxel_size=(0.5, 0.6, 0.7), vox_unit="nm"),
        [[3, 4, 10]])
    with pytest.raises(OptionError, match="voxel size"):
        read_coords(f, unit="nm")
    with pytest.raises(OptionError, match="--coords-unit"):
        read_coords(f, unit="parsec", voxel_size=VOXEL)


def test_coords_errors_name_file_and_line(tmp_path):
    f = write_csv(tmp_path / "bad.csv", "x,y,z\n1,2,3\n# fine\n4,five,6\n")
    with pytest.raises(InputError, match=r"bad\.csv, line 4: .*4,five,6"):
        read_coords(f)
    g = write_csv(tmp_path / "short.csv", "1,2,3\n4,5\n")
    with pytest.raises(InputError, match=r"short\.csv, line 2: expected at least 3 columns"):
        read_coords(g)
    h = write_csv(tmp_path / "empty.csv", "# nothing\n\nx,y,z\n")
    with pytest.raises(InputError, match="no coordinates"):
        read_coords(h)
    k = write_csv(tmp_path / "hdr.csv", "x,y,score\n1,2,3\n")
    with pytest.raises(InputError, match=r"hdr\.csv, line 1: .*header with columns x, y, z"):
        read_coords(k)
    n = write_csv(tmp_path / "nan.csv", "1,2,nan\n")
    with pytest.raises(InputError, match="line 1: coordinates must be finite"):
        read_coords(n)
    with pytest.raises(InputError, match="no such coordinates file"):
        read_coords(tmp_path / "missing.csv")


def test_write_coords_roundtrip(tmp_path):
    zyx = np.array([[1, 2, 3], [40, 50, 60]])
    p = write_coords(tmp_path / "c.csv", zyx, scores=[0.5, 0.25])
    lines = p.read_text().splitlines()
    assert lines[0] == "x,y,z,score"
    assert lines[1] == "3,2,1,0.5"
    np.testing.assert_array_equal(read_coords(p), zyx)
    q = write_coords(tmp_path / "d.csv", zyx)
    assert q.read_text().splitlines()[0] == "x,y,z"
    np.testing.assert_array_equal(read_coords(q), zyx)


# ----------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_reflect_indices_match_numpy_pad(n):
    a = np.arange(n)
    pad = 3 * n + 2  # wider than the axis: numpy reflects repeatedly
    padded = np.pad(a, pad, mode="reflect")
    for start in range(-pad, n):
        for stop in (start + 1, start + n + 3, n + pad):
            if start < stop <= n + pad:
                np.testing.assert_array_equal(reflect_indices(start, stop, n),
                                              padded[start + pad:stop + pad])


def test_source_stem():
    assert source_stem("/x/tomo.ome.zarr") == "tomo"
    assert source_stem("/x/tomo.mrc") == "tomo"
    assert source_stem("run1.tomo.rec") == "run1.tomo"
    assert source_stem("seg.nii.gz") == "seg"


# --------------------------------------------------------------------------- extraction

def read_manifest(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mrc_interior_and_border_patches(arrays, mrc_pair, tmp_path, client):
    img, lab = arrays
    im, lb = mrc_pair
    # z, y, x centres: interior, near the low corner, near the high x/y faces, on a corner
    centres = [(20, 24, 22), (2, 5, 1), (30, 46, 43), (0, 0, 0), (39, 47, 43)]
    coords = write_coords(tmp_path / "c.csv", np.array(centres))
    opts = ExtractOptions(size=(S,), border=(B,), fmt="mrc")
    res = extract_patches(im, lb, coords, tmp_path / "out", opts, client)
    assert res.padded == 4 and len(res.jobs) == 5
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["imagesCorr", "labelsCorr", "patches.csv"]
    assert not (tmp_path / ".out.partial").exists()
    for i, c in enumerate(centres):
        name = f"other_tomo_patch{i}.mrc"
        e_img, e_lab, start = expected(img, lab, c)
        with mrcfile.open(out / "imagesCorr" / name, permissive=True) as m:
            got_img = np.array(m.data)
            vs = m.voxel_size
        with mrcfile.open(out / "labelsCorr" / name, permissive=True) as m:
            got_lab = np.array(m.data)
        # MRC has no uint8 mode: mrcfile stores uint8 as uint16; the values are what count
        assert got_img.dtype == np.float32 and got_lab.dtype.kind in "iu"
        np.testing.assert_array_equal(got_img, e_img)
        np.testing.assert_array_equal(got_lab, e_lab)
        assert (float(vs.z), float(vs.y), float(vs.x)) == pytest.approx(VOXEL)
        if i == 0:  # interior: exactly the plain slice of the volume
            sl = tuple(slice(a, a + S) for a in start)
            np.testing.assert_array_equal(got_img, img[sl])
            inner = (slice(B, S - B),) * 3
            np.testing.assert_array_equal(got_lab[inner], lab[sl][inner])
            assert set(np.unique(got_lab[:B])) == {2}
        p = read_patch(out / "imagesCorr" / name)
        np.testing.assert_array_equal(p.data, e_img)
        assert tuple(p.voxel_size) == pytest.approx(VOXEL)
        assert tuple(p.origin) == pytest.approx(tuple(a * v for a, v in zip(start, VOXEL,
                                                                             strict=True)))
    rows = read_manifest(out / "patches.csv")
    assert tuple(rows[0]) == MANIFEST_COLUMNS + BORDER_COLUMNS
    assert {tuple(int(r[c]) for c in BORDER_COLUMNS) for r in rows} == {(B,) * 3}
    assert [r["name"] for r in rows] == [f"other_tomo_patch{i}" for i in range(5)]
    r = rows[1]  # centre (2, 5, 1): bounds start below 0
    assert (int(r["centre_z"]), int(r["centre_y"]), int(r["centre_x"])) == (2, 5, 1)
    assert [int(r[k]) for k in ("z0", "z1", "y0", "y1", "x0", "x1")] == [-6, 10, -3, 13, -7, 9]
    assert (float(r["voxel_size_z"]), float(r["voxel_size_y"]), float(r["voxel_size_x"])
            ) == VOXEL
    assert r["unit"] == "angstrom"
    assert Path(r["image"]) == im.resolve() and Path(r["labels"]) == lb.resolve()


def test_anisotropic_size_tokens_index_and_physical_coords(arrays, mrc_pair, tmp_path, client):
    img, lab = arrays
    im, lb = mrc_pair
    size, border = (8, 12, 10), (1, 2, 3)
    # centre (z, y, x) = (3, 40, 20) in nm with voxel 0.5 x 0.6 x 0.7 nm
    coords = write_csv(tmp_path / "c.csv", "z,y,x\n1.5,24.0,14.0\n")
    opts = ExtractOptions(size=size, border=border, ds_token="ds7", token="myTomo",
                          index_start=12, coords_unit="nm", fmt="nii.gz")
    extract_patches(im, lb, coords, tmp_path / "out", opts, client)
    name = "ds7_myTomo_patch12.nii.gz"
    e_img, e_lab, start = expected(img, lab, (3, 40, 20), size, border)
    assert start == [-1, 34, 15]
    got = read_patch(tmp_path / "out" / "labelsCorr" / name)
    np.testing.assert_array_equal(got.data, e_lab)
    np.testing.assert_array_equal(read_patch(tmp_path / "out" / "imagesCorr" / name).data, e_img)
    assert in_angstrom(got) == pytest.approx(VOXEL)
    # independent reader: nibabel, data in x, y, z order, zooms the voxel size (x, y, z)
    nimg = nib.load(tmp_path / "out" / "imagesCorr" / name)
    np.testing.assert_array_equal(np.asarray(nimg.dataobj).transpose(2, 1, 0), e_img)
    zooms = nimg.header.get_zooms()[:3]
    scale = zooms[0] / VOXEL[2]  # whatever unit the header uses, the ratios are the voxel's
    assert tuple(z / scale for z in zooms) == pytest.approx(VOXEL[::-1])


@pytest.mark.parametrize("fmt", PATCH_FORMATS)
def test_every_format_reads_back(arrays, mrc_pair, tmp_path, client, fmt):
    img, lab = arrays
    im, lb = mrc_pair
    opts = ExtractOptions(size=(S,), border=(B,), fmt=fmt)
    extract_patches(im, lb, np.array([[38, 20, 3]]), tmp_path / "o", opts, client)
    e_img, e_lab, _ = expected(img, lab, (38, 20, 3))
    name = "other_tomo_patch0" + patch_suffix(fmt)
    a = read_patch(tmp_path / "o" / "imagesCorr" / name)
    b = read_patch(tmp_path / "o" / "labelsCorr" / name)
    np.testing.assert_allclose(a.data, e_img)
    np.testing.assert_array_equal(b.data, e_lab)
    assert in_angstrom(a) == pytest.approx(VOXEL, rel=1e-5)


def test_omezarr_input_equals_mrc_input(arrays, mrc_pair, tmp_path, client):
    img, lab = arrays
    im, lb = mrc_pair
    np.save(tmp_path / "tomo.npy", img)
    np.save(tmp_path / "seg.npy", lab.astype(np.uint8))
    copts = ConvertOptions(chunks=(16,), voxel_size=VOXEL, unit="angstrom",
                           labels=(("membranes", str(tmp_path / "seg.npy")),))
    zarr_path = tmp_path / "tomo.ome.zarr"
    convert(tmp_path / "tomo.npy", zarr_path, copts, client, report=lambda _line: None)
    centres = np.array([[20, 24, 22], [1, 46, 10]])
    opts = ExtractOptions(size=(S,), border=(B,), fmt="mrc")
    plan = plan_extraction(zarr_path, zarr_path / "labels" / "membranes", centres,
                           tmp_path / "z", opts)
    assert plan.image.reader == str(zarr_path / "0")  # workers read the level-0 array by path
    extract_patches(zarr_path, "membranes", centres, tmp_path / "z", opts, client)
    for i, c in enumerate(centres):
        e_img, e_lab, _ = expected(img, lab, tuple(c))
        name = f"other_tomo_patch{i}.mrc"
        with mrcfile.open(tmp_path / "z" / "imagesCorr" / name) as m:
            np.testing.assert_array_equal(m.data, e_img)
            assert float(m.voxel_size.x) == pytest.approx(VOXEL[2])
        with mrcfile.open(tmp_path / "z" / "labelsCorr" / name) as m:
            np.testing.assert_array_equal(m.data, e_lab)


def test_binarize_and_non_binary_refusal(arrays, mrc_pair, tmp_path, client):
    img, _ = arrays
    im, _ = mrc_pair
    inst = np.zeros(SHAPE, dtype=np.uint16)
    inst[15:25, 20:30, 18:26] = 7
    inst[18:22, 22:26, 20:24] = 300
    lb = write_mrc(tmp_path / "instances.mrc", inst, voxel_size=VOXEL[::-1])
    # only the fourth of seven patches sees the instances; the others are written first
    centres = np.array([[5, 5, 5], [35, 40, 38], [5, 40, 5], [20, 24, 22], [35, 5, 38],
                        [5, 5, 38], [35, 40, 5]])
    with pytest.raises(InputError, match=r"instances\.mrc: .*found 0, 7, 300 in patch "
                                         r"other_tomo_patch3.*--binarize"):
        extract_patches(im, lb, centres, tmp_path / "no",
                        ExtractOptions(size=(S,), border=(B,)), client)
    assert not (tmp_path / "no").exists() and not (tmp_path / ".no.partial").exists()
    extract_patches(im, lb, np.array([[20, 24, 22]]), tmp_path / "yes",
                    ExtractOptions(size=(S,), border=(B,), binarize=True), client)
    got = read_patch(tmp_path / "yes" / "labelsCorr" / "other_tomo_patch0.nii.gz").data
    _, e_lab, _ = expected(img, (inst > 0).astype(np.uint8), (20, 24, 22))
    np.testing.assert_array_equal(got, e_lab)
    assert set(np.unique(got)) == {0, 1, 2}


def test_validation_before_compute(arrays, mrc_pair, tmp_path):
    img, lab = arrays
    im, lb = mrc_pair
    other = write_mrc(tmp_path / "small.mrc", lab[:, :40], voxel_size=1.0)
    with pytest.raises(InputError, match=r"image .*tomo\.mrc is \(40, 48, 44\).*small\.mrc "
                                         r"are \(40, 40, 44\)"):
        plan_extraction(im, other, np.array([[1, 1, 1]]), tmp_path / "o")
    floats = write_mrc(tmp_path / "float.mrc", lab.astype(np.float32), voxel_size=1.0)
    with pytest.raises(InputError, match=r"float\.mrc: labels must have an integer dtype"):
        plan_extraction(im, floats, np.array([[1, 1, 1]]), tmp_path / "o")
    plan_extraction(im, floats, np.array([[1, 1, 1]]), tmp_path / "o",
                    ExtractOptions(binarize=True))  # float labels are fine when binarized
    with pytest.raises(OptionError, match="--border"):
        plan_extraction(im, lb, np.array([[1, 1, 1]]), tmp_path / "o",
                        ExtractOptions(size=(16,), border=(8,)))
    with pytest.raises(OptionError, match="--format"):
        plan_extraction(im, lb, np.array([[1, 1, 1]]), tmp_path / "o",
                        ExtractOptions(fmt="png"))
    # --max-outside lets a centre lie a little outside
    centres = np.array([[20, 24, 22], [-2, 24, 45]])
    with pytest.raises(InputError, match=r"centres, row 2: centre x=45, y=24, z=-2"):
        plan_extraction(im, lb, centres, tmp_path / "o", ExtractOptions(size=(S,), border=(B,)))
    plan = plan_extraction(im, lb, centres, tmp_path / "o",
                           ExtractOptions(size=(S,), border=(B,), max_outside=2))
    assert plan.jobs[1].start == (-10, 16, 37)
    (tmp_path / "exists").mkdir()
    with pytest.raises(DestinationError, match="--overwrite"):
        plan_extraction(im, lb, centres[:1], tmp_path / "exists")
    assert not list((tmp_path / "exists").iterdir())


def test_max_outside_patch_padded(arrays, mrc_pair, tmp_path, client):
    img, lab = arrays
    im, lb = mrc_pair
    extract_patches(im, lb, np.array([[-2, 24, 45]]), tmp_path / "o",
                    ExtractOptions(size=(S,), border=(0,), max_outside=2, fmt="mrc"), client)
    e_img, e_lab, _ = expected(img, lab, (-2, 24, 45), border=(0, 0, 0))
    with mrcfile.open(tmp_path / "o" / "imagesCorr" / "other_tomo_patch0.mrc") as m:
        np.testing.assert_array_equal(m.data, e_img)
    with mrcfile.open(tmp_path / "o" / "labelsCorr" / "other_tomo_patch0.mrc") as m:
        np.testing.assert_array_equal(m.data, e_lab)


# ---------------------------------------------------------------------------------- CLI

def test_cli_extract_and_user_errors(arrays, mrc_pair, tmp_path):
    img, lab = arrays
    im, lb = mrc_pair
    coords = write_csv(tmp_path / "c.csv", "x,y,z,score\n154,144,100,0.9\n7,30,2,0.1\n")
    out = tmp_path / "patches"
    res = run_cli("patches", "extract", str(im), str(lb), "--coords", str(coords),
                  "--coords-unit", "angstrom", "--out", str(out), "--size", "16",
                  "--border", "3", "--index-start", "3", "--ds-token", "set1",
                  "--workers", "1", "--threads-per-worker", "2")
    assert res.returncode == 0, res.stderr
    assert "wrote 2 patches (1 padded" in res.stdout
    names = sorted(p.name for p in (out / "imagesCorr").iterdir())
    assert names == ["set1_tomo_patch3.nii.gz", "set1_tomo_patch4.nii.gz"]
    assert names == sorted(p.name for p in (out / "labelsCorr").iterdir())
    e_img, e_lab, _ = expected(img, lab, (20, 24, 22))  # 100 Å / 5, 144 / 6, 154 / 7
    np.testing.assert_array_equal(read_patch(out / "imagesCorr" / names[0]).data, e_img)
    np.testing.assert_array_equal(read_patch(out / "labelsCorr" / names[0]).data, e_lab)

    # an existing destination is refused without --overwrite
    res = run_cli("patches", "extract", str(im), str(lb), "--coords", str(coords),
                  "--coords-unit", "angstrom", "--out", str(out))
    assert res.returncode == 2 and "--overwrite" in res.stderr

    # a centre outside the volume: the row is named, nothing written
    bad = write_csv(tmp_path / "bad.csv", "# x y z\n1,2,3\n44,2,3\n")
    res = run_cli("patches", "extract", str(im), str(lb), "--coords", str(bad),
                  "--out", str(tmp_path / "b"), "--size", "16", "--border", "3")
    assert res.returncode == 2
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error:"), res.stderr
    assert "bad.csv, line 3: centre x=44, y=2, z=3" in err_lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / ".b.partial").exists()

    # labels that are not 0/1/2: refused during the run, nothing left behind
    seg = lab.astype(np.int16) * 5
    seg5 = write_mrc(tmp_path / "seg5.mrc", seg, voxel_size=VOXEL[::-1])
    res = run_cli("patches", "extract", str(im), str(seg5), "--coords", str(coords),
                  "--coords-unit", "angstrom", "--out", str(tmp_path / "n"), "--size", "16",
                  "--border", "3",
                  "--workers", "1", "--threads-per-worker", "1")
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "seg5.mrc" in errors[0] and "0, 5" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "n").exists() and not (tmp_path / ".n.partial").exists()
