"""Patch files (every format, read back with the format's own library) and the merging of
Add/Remove/Ignore corrections (MemBrain-seg semantics, checked against numpy)."""

from __future__ import annotations

import filecmp
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import mrcfile
import nibabel as nib
import nrrd
import numpy as np
import pytest
import tifffile
import zarr

from engine.errors import DestinationError, InputError, OptionError
from engine.io.layouts import PATCH_FORMATS, patch_format, patch_stem, patch_suffix
from engine.patches.files import (
    read_patch,
    read_patch_header,
    unit_recorded,
    write_patch,
)
from engine.patches.merge import merge_corrections
from engine.volume import convert_length
from tests.conftest import run_cli

SHAPE = (24, 20, 22)
VOXEL_A = (13.48, 10.0, 7.5)  # z, y, x in ångström
ORIGIN_A = (80 * 13.48, -20.0, 5.5)


def _labels(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = (rng.random(shape) > 0.6).astype(np.uint8)
    lab[5:8, 6:9, 7:10] = 2  # an ignore region painted before: kept unless corrected
    return lab


def _box(z: slice, y: slice, x: slice, value: float = 1, dtype: str = "u1") -> np.ndarray:
    m = np.zeros(SHAPE, dtype=dtype)
    m[z, y, x] = value
    return m


def _in_unit(values, unit: str, to: str = "angstrom") -> np.ndarray:
    return np.array([convert_length(v, unit, to) for v in values])


# ------------------------------------------------------------------------------ patch files

def test_patch_format_stem_suffix():
    assert [patch_suffix(f) for f in PATCH_FORMATS] == [".nii.gz", ".nrrd", ".mrc", ".tif",
                                                       ".zarr"]
    cases = {"p1.nii.gz": ("nii.gz", "p1"), "P1.NII.GZ": ("nii.gz", "P1"),
             "a.b.nii": ("nii.gz", "a.b"), "Add1.nrrd": ("nrrd", "Add1"),
             "x.mrc": ("mrc", "x"), "x.tif": ("tif", "x"), "x.tiff": ("tif", "x"),
             "other_tomo_patch3.zarr": ("zarr", "other_tomo_patch3")}
    for name, (fmt, stem) in cases.items():
        assert patch_format(Path("d") / name) == fmt
        assert patch_stem(name) == stem
    with pytest.raises(OptionError, match=r"notes\.txt"):
        patch_format("notes.txt")
    with pytest.raises(OptionError, match="'nii'"):
        patch_suffix("nii")


def _independent_read(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Data (z, y, x), voxel size and origin (z, y, x) in Å, read with the format's library."""
    if fmt == "nii.gz":
        img = nib.load(str(path))
        assert img.header.get_xyzt_units()[0] == "micron"
        zooms = np.array(img.header.get_zooms()[:3], dtype=float)[::-1]
        origin = img.affine[:3, 3][::-1]
        return (np.asanyarray(img.dataobj).T, _in_unit(zooms, "um"), _in_unit(origin, "um"))
    if fmt == "nrrd":
        data, header = nrrd.read(str(path), index_order="C")
        unit = header["space units"][0]
        spacing = np.diag(np.asarray(header["space directions"], dtype=float))[::-1]
        return (data, _in_unit(spacing, unit),
                _in_unit(np.asarray(header["space origin"], dtype=float)[::-1], unit))
    if fmt == "mrc":
        with mrcfile.open(path, permissive=False) as mrc:
            vs, o = mrc.voxel_size, mrc.header.origin
            return (np.array(mrc.data), np.array([vs.z, vs.y, vs.x], dtype=float),
                    np.array([o.z, o.y, o.x], dtype=float))
    if fmt == "tif":
        with tifffile.TiffFile(path) as tif:
            data = tif.asarray()
            pixels = next(e for e in ET.fromstring(tif.ome_metadata).iter()
                          if e.tag.endswith("Pixels"))
        sizes = [float(pixels.get(f"PhysicalSize{a}")) for a in "ZYX"]
        assert {pixels.get(f"PhysicalSize{a}Unit") for a in "ZYX"} == {"µm"}
        return data, _in_unit(sizes, "um"), None
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    unit = meta["axes"][0]["unit"]
    transforms = {t["type"]: t for t in meta["datasets"][0]["coordinateTransformations"]}
    return (zarr.open_array(str(path / meta["datasets"][0]["path"]), mode="r")[...],
            _in_unit(transforms["scale"]["scale"], unit),
            _in_unit(transforms["translation"]["translation"], unit))


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("fmt", PATCH_FORMATS)
def test_write_read_roundtrip(tmp_path, fmt, dtype):
    rng = np.random.default_rng(3)
    data = (rng.random(SHAPE) * 200).astype(dtype)
    path = write_patch(tmp_path / "sub" / f"p{patch_suffix(fmt)}", data, VOXEL_A,
                       "angstrom", origin=ORIGIN_A)
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial left

    ref_data, ref_voxel, ref_origin = _independent_read(path, fmt)
    np.testing.assert_array_equal(ref_data, data)
    np.testing.assert_allclose(ref_voxel, VOXEL_A, rtol=1e-6)
    if fmt == "tif":
        assert ref_origin is None
    else:
        np.testing.assert_allclose(ref_origin, ORIGIN_A, rtol=1e-6, atol=1e-6)

    patch = read_patch(path)
    np.testing.assert_array_equal(patch.data, data)
    if not (fmt == "mrc" and dtype == "uint8"):  # MRC has no uint8 mode: stored as uint16
        assert patch.data.dtype == data.dtype
    assert patch.path == path
    np.testing.assert_allclose(_in_unit(patch.voxel_size, patch.unit), VOXEL_A, rtol=1e-6)
    if fmt == "tif":
        assert patch.origin is None
    else:
        np.testing.assert_allclose(_in_unit(patch.origin, patch.unit), ORIGIN_A, rtol=1e-6,
                                   atol=1e-6)
    header = read_patch_header(path)
    assert header.shape == SHAPE and header.dtype == patch.data.dtype
    assert unit_recorded(path)


def test_write_patch_replaces_and_refuses(tmp_path):
    path = tmp_path / "p.nrrd"
    write_patch(path, np.zeros(SHAPE, np.uint8), (1, 1, 1))
    write_patch(path, np.ones(SHAPE, np.uint8), (2, 2, 2), "nm")
    patch = read_patch(path)
    assert patch.data.min() == 1 and patch.voxel_size == (2.0, 2.0, 2.0)
    assert patch.unit == "nanometer" and patch.origin == (0.0, 0.0, 0.0)
    with pytest.raises(OptionError, match="3D"):
        write_patch(tmp_path / "q.nrrd", np.zeros((4, 5)), (1, 1, 1))
    with pytest.raises(OptionError, match="voxel size"):
        write_patch(tmp_path / "q.nrrd", np.zeros(SHAPE), (1, 0, 1))
    with pytest.raises(OptionError, match=r"q\.txt"):
        write_patch(tmp_path / "q.txt", np.zeros(SHAPE), (1, 1, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.nrrd"]


def test_read_patch_errors(tmp_path):
    with pytest.raises(InputError, match=r"missing\.nii\.gz.*no such file"):
        read_patch(tmp_path / "missing.nii.gz")
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((20, 22), np.uint8))
    with pytest.raises(InputError, match=r"flat\.tif.*3D"):
        read_patch(tmp_path / "flat.tif")
    (tmp_path / "junk.nrrd").write_bytes(b"not a header\x00\x01")
    with pytest.raises(InputError, match=r"junk\.nrrd"):
        read_patch(tmp_path / "junk.nrrd")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt"):
        read_patch(tmp_path / "notes.txt")


def _mitk_nrrd(path: Path, data: np.ndarray, spacing_mm, origin_ras_mm) -> Path:
    """An NRRD as ITK tools (MITK) save one: LPS space, flipped x/y directions, no units."""
    sz, sy, sx = spacing_mm
    ox, oy, oz = (origin_ras_mm[2], origin_ras_mm[1], origin_ras_mm[0])
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([-sx, -sy, sz]),
              "space origin": np.array([-ox, -oy, oz]), "kinds": ["domain"] * 3,
              "encoding": "gzip"}
    nrrd.write(str(path), data, header, index_order="C")
    return path


def test_read_lps_nrrd_origin(tmp_path):
    data = _labels(1)
    path = _mitk_nrrd(tmp_path / "Add1.nrrd", data, (3.0, 2.0, 1.5), (30.0, 20.0, 10.0))
    patch = read_patch(path)
    np.testing.assert_array_equal(patch.data, data)
    assert patch.voxel_size == (3.0, 2.0, 1.5)
    assert patch.origin == (30.0, 20.0, 10.0)  # LPS (-10, -20, 30) is RAS (10, 20, 30)
    assert not unit_recorded(path)


# ---------------------------------------------------------------------------------- merging

def _dataset(tmp_path: Path, labels: dict[str, np.ndarray], fmt: str = "nii.gz",
             voxel=VOXEL_A, origin=ORIGIN_A) -> tuple[Path, Path]:
    labels_dir, corr_dir = tmp_path / "labelsCorr", tmp_path / "corrections"
    corr_dir.mkdir(parents=True)
    for name, lab in labels.items():
        write_patch(labels_dir / f"{name}{patch_suffix(fmt)}", lab, voxel, "angstrom", origin)
    return labels_dir, corr_dir


def _correction(corr_dir: Path, patch: str, name: str, mask: np.ndarray, voxel=VOXEL_A,
                origin=ORIGIN_A) -> Path:
    return write_patch(corr_dir / patch / name, mask, voxel, "angstrom", origin)


def _shell(shape, border: int) -> np.ndarray:
    shell = np.ones(shape, bool)
    shell[border:-border, border:-border, border:-border] = False
    return shell


def test_merge_order_sum_case_and_border(tmp_path):
    lab = _labels(0)
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab})
    A = (slice(2, 12), slice(2, 12), slice(2, 12))
    B = (slice(15, 20), slice(3, 8), slice(14, 19))
    C = (slice(8, 16), slice(8, 16), slice(8, 16))   # overlaps A
    D = (slice(4, 7), slice(13, 17), slice(3, 6))
    E = (slice(10, 14), slice(5, 15), slice(6, 14))  # overlaps A and C
    _correction(corr_dir, "p1", "Remove1.nii.gz", _box(*A))
    _correction(corr_dir, "p1", "remove_2.nrrd", _box(*B, value=0.5, dtype="f4"))
    # 255 + 1 would wrap to 0 in a uint8 sum: a voxel marked in two files stays marked
    _correction(corr_dir, "p1", "Add1.nii.gz", _box(*C, value=255))
    _correction(corr_dir, "p1", "ADD2.nii.gz", _box(*C, value=1) + _box(*D, value=1))
    _correction(corr_dir, "p1", "add3.nii.gz", np.zeros(SHAPE, np.uint8))
    _correction(corr_dir, "p1", "Ignore.nii.gz", _box(*E))
    (corr_dir / "p1" / "notes.txt").write_text("checked twice")
    _correction(corr_dir, "p1", "prediction.nii.gz", np.ones(SHAPE, np.uint8))
    lines: list[str] = []
    out_dir = tmp_path / "merged"

    result = merge_corrections(labels_dir, corr_dir, out_dir, border=3, report=lines.append)

    expected = lab.copy()
    for region, value in ((A, 0), (B, 0), (C, 1), (D, 1), (E, 2)):
        mask = np.zeros(SHAPE, bool)
        mask[region] = True
        expected[mask] = value
    expected[_shell(SHAPE, 3)] = 2
    img = nib.load(str(out_dir / "p1.nii.gz"))
    got = np.asanyarray(img.dataobj).T
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == lab.dtype
    src = nib.load(str(labels_dir / "p1.nii.gz"))
    np.testing.assert_allclose(img.header.get_zooms(), src.header.get_zooms())
    np.testing.assert_allclose(img.affine, src.affine)
    assert (result.merged, result.copied, result.skipped, result.warnings) == (1, 0, 2, 0)
    skipped = [ln for ln in lines if ln.startswith("skipped")]
    assert len(skipped) == 2
    assert any("notes.txt" in ln for ln in skipped)
    assert any("prediction.nii.gz" in ln for ln in skipped)
    assert any(ln.startswith("merged p1.nii.gz: 6 correction files") for ln in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrections", "labelsCorr", "merged"]


def test_merge_border_zero_keeps_edges(tmp_path):
    lab = _labels(2)
    lab[0, :, :] = 1
    lab[:, -1, :] = 2
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab})
    _correction(corr_dir, "p1", "Remove.nii.gz", _box(slice(0, 1), slice(0, 4), slice(0, 22)))
    merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=0, report=lambda _: None)
    expected = lab.copy()
    expected[0:1, 0:4, :] = 0
    got = read_patch(tmp_path / "out" / "p1.nii.gz").data
    np.testing.assert_array_equal(got, expected)
    assert (got[:, -1, :] == 2).all()  # an edge painted as ignore stays; nothing else added


def test_merge_default_border_and_too_wide(tmp_path):
    big = (40, 36, 34)
    lab = _labels(4, big)
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab})
    add = np.zeros(big, np.uint8)
    add[18:22, 17:19, 16:18] = 1
    write_patch(corr_dir / "p1" / "Add.nii.gz", add, VOXEL_A)
    merge_corrections(labels_dir, corr_dir, tmp_path / "out", report=lambda _: None)
    expected = lab.copy()
    expected[add > 0] = 1
    expected[_shell(big, 16)] = 2
    np.testing.assert_array_equal(read_patch(tmp_path / "out" / "p1.nii.gz").data, expected)
    for border in (17, 18):  # 17 on the 34-voxel axis already leaves no editable voxel
        with pytest.raises(OptionError, match=rf"border {border} \(--border\) leaves no "
                           r"editable voxel of .*p1\.nii\.gz.*at most 16"):
            merge_corrections(labels_dir, corr_dir, tmp_path / "out2", border=border,
                              report=lambda _: None)
    assert not (tmp_path / "out2").exists()


def _manifest(folder: Path, borders: dict[str, tuple[int, int, int]]) -> Path:
    """A patches.csv as extraction writes it, for these patch names and borders."""
    import csv

    from engine.patches.extract import BORDER_COLUMNS, MANIFEST_COLUMNS

    path = folder / "patches.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, MANIFEST_COLUMNS + BORDER_COLUMNS, restval="0")
        w.writeheader()
        for name, border in borders.items():
            w.writerow({"name": name, **dict(zip(BORDER_COLUMNS, border, strict=True))})
    return path


def test_merge_uses_the_extraction_border(tmp_path):
    """32³ patches cut with border 4: the default 16 would make every voxel ignore (the
    correction lost); the manifest's border is used instead, per axis."""
    shape = (32, 32, 32)
    lab = _labels(6, shape)
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab})
    add = np.zeros(shape, np.uint8)
    add[10:20, 10:20, 10:20] = 1
    write_patch(corr_dir / "p1" / "Add.nii.gz", add, VOXEL_A)
    with pytest.raises(OptionError, match=r"border 16 \(the default border\) leaves no "
                       r"editable voxel.*at most 15"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", report=lambda _: None)
    assert not (tmp_path / "out").exists()
    manifest = _manifest(tmp_path, {"p1": (4, 3, 5)})
    lines: list[str] = []
    merge_corrections(labels_dir, corr_dir, tmp_path / "out", report=lines.append)
    expected = lab.copy()
    expected[add > 0] = 1
    inner = np.zeros(shape, bool)
    inner[4:28, 3:29, 5:27] = True
    expected[~inner] = 2
    got = read_patch(tmp_path / "out" / "p1.nii.gz").data
    np.testing.assert_array_equal(got, expected)
    assert (got == 1).sum() >= 1000  # the correction survives
    assert any(str(manifest) in ln for ln in lines) and any("(4, 3, 5)" in ln for ln in lines)
    # an explicit --border still wins over the manifest
    merge_corrections(labels_dir, corr_dir, tmp_path / "out2", border=2, report=lambda _: None)
    expected = lab.copy()
    expected[add > 0] = 1
    expected[_shell(shape, 2)] = 2
    np.testing.assert_array_equal(read_patch(tmp_path / "out2" / "p1.nii.gz").data, expected)
    # a recorded border that leaves nothing is refused, naming the manifest
    _manifest(tmp_path, {"p1": (16, 16, 16)})
    with pytest.raises(OptionError, match=r"border 16 \(the border recorded in .*patches\.csv"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out3", report=lambda _: None)
    assert not (tmp_path / "out3").exists()


@pytest.mark.parametrize("fmt", PATCH_FORMATS)
def test_merge_keeps_format_header_and_dtype(tmp_path, fmt):
    lab = _labels(5)
    labels_dir, corr_dir = _dataset(tmp_path, {"tomo_patch0": lab}, fmt=fmt)
    add = _box(slice(3, 9), slice(3, 9), slice(3, 9))
    _correction(corr_dir, "tomo_patch0", f"Add{patch_suffix(fmt)}", add)
    merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2, report=lambda _: None)
    expected = lab.copy()
    expected[add > 0] = 1
    expected[_shell(SHAPE, 2)] = 2
    out = tmp_path / "out" / f"tomo_patch0{patch_suffix(fmt)}"
    ref_data, ref_voxel, ref_origin = _independent_read(out, fmt)
    np.testing.assert_array_equal(ref_data, expected)
    assert ref_data.dtype == read_patch(labels_dir / out.name).data.dtype
    np.testing.assert_allclose(ref_voxel, VOXEL_A, rtol=1e-6)
    if ref_origin is not None:
        np.testing.assert_allclose(ref_origin, ORIGIN_A, rtol=1e-6, atol=1e-6)


def test_merge_nrrd_labels_and_mitk_corrections_on_nifti(tmp_path):
    lab1, lab2 = _labels(6), _labels(7)
    labels_dir, corr_dir = _dataset(tmp_path, {"a": lab1})
    write_patch(labels_dir / "b.nrrd", lab2, VOXEL_A, "angstrom", ORIGIN_A)
    rm = _box(slice(4, 20), slice(4, 16), slice(4, 18))
    ign = _box(slice(9, 12), slice(9, 12), slice(9, 12))
    # MITK opens a.nii.gz (micrometres), ITK turns that into millimetres, saves LPS NRRDs
    mm = tuple(convert_length(v, "angstrom", "mm") for v in VOXEL_A)
    origin_mm = tuple(convert_length(v, "angstrom", "mm") for v in ORIGIN_A)
    (corr_dir / "a").mkdir()
    _mitk_nrrd(corr_dir / "a" / "Remove_membrane.nrrd", rm, mm, origin_mm)
    _mitk_nrrd(corr_dir / "a" / "Ignore_edge.nrrd", ign, mm, origin_mm)
    _correction(corr_dir, "b", "Add.nrrd", ign)
    lines: list[str] = []
    result = merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=1,
                               report=lines.append)
    assert result.warnings == 0, lines
    exp1 = lab1.copy()
    exp1[rm > 0] = 0
    exp1[ign > 0] = 2
    exp1[_shell(SHAPE, 1)] = 2
    exp2 = lab2.copy()
    exp2[ign > 0] = 1
    exp2[_shell(SHAPE, 1)] = 2
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "out" / "a.nii.gz"))
                                                .dataobj).T, exp1)
    data, header = nrrd.read(str(tmp_path / "out" / "b.nrrd"), index_order="C")
    np.testing.assert_array_equal(data, exp2)
    assert data.dtype == np.uint8
    np.testing.assert_allclose(header["space origin"], ORIGIN_A[::-1])


def test_merge_warns_on_header_mismatch(tmp_path):
    lab = _labels(8)
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab})
    add = _box(slice(5, 9), slice(5, 9), slice(5, 9))
    _correction(corr_dir, "p1", "Add1.nrrd", add, voxel=(27.0, 20.0, 15.0))
    _correction(corr_dir, "p1", "Add2.mrc", add, origin=(0.0, 0.0, 0.0))
    _correction(corr_dir, "p1", "Add3.tif", add)  # no origin, same spacing: no warning
    lines: list[str] = []
    result = merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=0,
                               report=lines.append)
    warnings = [ln for ln in lines if ln.startswith("warning")]
    assert result.warnings == 2 and len(warnings) == 2
    assert "Add1.nrrd: voxel size" in warnings[0] and "p1.nii.gz" in warnings[0]
    assert "Add2.mrc: origin" in warnings[1]
    expected = lab.copy()
    expected[add > 0] = 1
    np.testing.assert_array_equal(read_patch(tmp_path / "out" / "p1.nii.gz").data, expected)


def test_merge_refuses_shape_mismatch(tmp_path):
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": _labels(9)})
    _correction(corr_dir, "p1", "Add1.nii.gz", np.ones((24, 20, 21), np.uint8))
    with pytest.raises(InputError) as info:
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=0,
                          report=lambda _: None)
    msg = str(info.value)
    assert "Add1.nii.gz" in msg and "p1.nii.gz" in msg
    assert "(24, 20, 21)" in msg and "(24, 20, 22)" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrections", "labelsCorr"]


def test_merge_copies_patch_without_folder(tmp_path):
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": _labels(10), "p2": _labels(11)})
    _correction(corr_dir, "p1", "Add.nii.gz", _box(slice(1, 3), slice(1, 3), slice(1, 3)))
    (corr_dir / "readme.md").write_text("corrections by A.B.")
    (labels_dir / ".p3.partial.nii.gz").write_bytes(b"left by a crash")
    lines: list[str] = []
    result = merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                               report=lines.append)
    assert filecmp.cmp(labels_dir / "p2.nii.gz", tmp_path / "out" / "p2.nii.gz", shallow=False)
    assert (result.merged, result.copied, result.skipped) == (1, 1, 2)
    assert any(ln.startswith("copied p2.nii.gz unchanged") for ln in lines)
    assert any("readme.md" in ln for ln in lines)
    assert any(".p3.partial.nii.gz: hidden" in ln for ln in lines)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p1.nii.gz", "p2.nii.gz"]


def test_merge_refuses_orphan_folder(tmp_path):
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": _labels(12)})
    _correction(corr_dir, "p1", "Add.nii.gz", _box(slice(1, 3), slice(1, 3), slice(1, 3)))
    _correction(corr_dir, "p1.nii", "Add.nii.gz", _box(slice(1, 3), slice(1, 3), slice(1, 3)))
    with pytest.raises(InputError, match=r"p1\.nii: corrections folder matches no label"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                          report=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrections", "labelsCorr"]


def test_merge_refuses_bad_labels_destination_and_unreadable(tmp_path):
    lab = _labels(13)
    lab[3, 3, 3] = 7
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": _labels(14), "p2": lab})
    _correction(corr_dir, "p2", "Add.nii.gz", _box(slice(1, 3), slice(1, 3), slice(1, 3)))
    with pytest.raises(InputError, match=r"p2\.nii\.gz: label patch values .* found 7"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                          report=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrections", "labelsCorr"]

    (labels_dir / "p2.nii.gz").unlink()
    (corr_dir / "p2" / "Add.nii.gz").rename(corr_dir / "p2" / "Add.nrrd.bak")
    (corr_dir / "p2").rename(corr_dir / "p1")
    with pytest.raises(InputError, match=r"Add\.nrrd\.bak: not a patch file"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                          report=lambda _: None)
    (corr_dir / "p1" / "Add.nrrd.bak").unlink()

    with pytest.raises(DestinationError, match="overlaps"):
        merge_corrections(labels_dir, corr_dir, labels_dir / "merged", border=2,
                          report=lambda _: None)
    (tmp_path / "out").mkdir()
    with pytest.raises(DestinationError, match="--overwrite"):
        merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                          report=lambda _: None)
    lines: list[str] = []
    result = merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=2,
                               report=lines.append, overwrite=True)
    assert result.merged == 1 and result.warnings == 1
    assert "no Add, Remove or Ignore files" in lines[0]
    expected = _labels(14)
    expected[_shell(SHAPE, 2)] = 2
    np.testing.assert_array_equal(read_patch(tmp_path / "out" / "p1.nii.gz").data, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrections", "labelsCorr", "out"]


# -------------------------------------------------------------------------------------- CLI

def test_cli_merge(tmp_path):
    lab = _labels(15)
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": lab, "p2": _labels(16)})
    rm = _box(slice(2, 22), slice(2, 18), slice(2, 20))
    _correction(corr_dir, "p1", "remove.nrrd", rm)
    out_dir = tmp_path / "merged"
    proc = run_cli("patches", "merge", "--labels-dir", str(labels_dir), "--corrections-dir",
                   str(corr_dir), "--out-dir", str(out_dir), "--border", "1")
    assert proc.returncode == 0, proc.stderr
    assert "merged p1.nii.gz" in proc.stdout and "copied p2.nii.gz" in proc.stdout
    assert "1 merged, 1 copied unchanged" in proc.stdout
    expected = lab.copy()
    expected[rm > 0] = 0
    expected[_shell(SHAPE, 1)] = 2
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out_dir / "p1.nii.gz"))
                                                .dataobj).T, expected)
    assert (out_dir / "p2.nii.gz").exists()


def test_cli_merge_bad_input(tmp_path):
    labels_dir, corr_dir = _dataset(tmp_path, {"p1": _labels(17)})
    _correction(corr_dir, "p9", "Add.nii.gz", np.ones(SHAPE, np.uint8))
    out_dir = tmp_path / "merged"
    proc = run_cli("patches", "merge", "--labels-dir", str(labels_dir), "--corrections-dir",
                   str(corr_dir), "--out-dir", str(out_dir))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "p9" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out_dir.exists()
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())


def test_merge_membrain_style_files(tmp_path):
    """Headerless float NIfTI labels as MemBrain-seg writes them (identity affine, no unit),
    corrected in MITK (LPS NRRD, 1 mm spacing): merged without warnings, float kept."""
    lab = _labels(18).astype(np.float32)
    labels_dir, corr_dir = tmp_path / "labelsCorr", tmp_path / "corrections"
    labels_dir.mkdir()
    nib.save(nib.Nifti1Image(lab.T, np.eye(4)), str(labels_dir / "ds_tomo_patch0.nii.gz"))
    (corr_dir / "ds_tomo_patch0").mkdir(parents=True)
    add = _box(slice(2, 9), slice(2, 9), slice(2, 9))
    _mitk_nrrd(corr_dir / "ds_tomo_patch0" / "Add1.nrrd", add, (1.0, 1.0, 1.0),
               (0.0, 0.0, 0.0))
    lines: list[str] = []
    result = merge_corrections(labels_dir, corr_dir, tmp_path / "out", border=4,
                               report=lines.append)
    assert result.warnings == 0, lines
    img = nib.load(str(tmp_path / "out" / "ds_tomo_patch0.nii.gz"))
    got = np.asanyarray(img.dataobj).T
    expected = lab.copy()
    expected[add > 0] = 1
    expected[_shell(SHAPE, 4)] = 2
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32
    # 1 voxel = 1 mm (NIfTI's meaning of "unknown"), now written in micrometres
    zooms_mm = [convert_length(z, img.header.get_xyzt_units()[0], "mm")
                for z in img.header.get_zooms()]
    np.testing.assert_allclose(zooms_mm, 1.0)
