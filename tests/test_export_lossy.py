"""``export`` never changes values silently: a format's dtype (MRC: float32 for uint32,
int64, float64, complex) is used only when every value present survives it, checked slab
by slab, unless ``allow_lossy``; what was converted is reported."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest

from engine.errors import OptionError
from engine.pipelines.convert import ConvertOptions, convert
from engine.pipelines.export import Conversion, changed_values, plan_export, run_export

SHAPE = (12, 10, 9)


def _store(tmp_path: Path, client, data: np.ndarray) -> Path:
    np.save(tmp_path / "in.npy", data)
    dst = tmp_path / "in.ome.zarr"
    convert(tmp_path / "in.npy", dst, ConvertOptions(chunks=(4,), assume_voxel_size=True), client,
            report=lambda _: None)
    return dst


def test_exact_conversion_written_and_reported(tmp_path, client):
    labels = np.random.default_rng(0).integers(0, 2**24 + 1, SHAPE, dtype=np.uint32)
    labels[0, 0, 0] = 2**24  # the largest uint32 run of integers float32 holds exactly
    src = _store(tmp_path, client, labels)
    plan = plan_export(src, tmp_path / "out.mrc")
    run_export(plan, client)
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        assert mrc.data.dtype == np.float32
        np.testing.assert_array_equal(mrc.data.astype(np.uint32), labels)
    assert plan.conversion.summary() == "uint32 stored as float32, every value exact"


def test_lossy_conversion_refused_unless_allowed(tmp_path, client):
    data = np.zeros(SHAPE, np.int64)
    data[9, 2, 3] = 2**53 + 1
    data[1, 1, 1] = -(2**40) - 3
    src = _store(tmp_path, client, data)
    with pytest.raises(OptionError, match=r"out\.mrc: storing int64 voxels as float32.*"
                       r"at \(1, 1, 1\).*--allow-lossy"):
        run_export(plan_export(src, tmp_path / "out.mrc"), client)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "in.ome.zarr"]
    plan = plan_export(src, tmp_path / "out.mrc", allow_lossy=True)
    run_export(plan, client)
    with mrcfile.open(tmp_path / "out.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, data.astype(np.float32))
    reference = int((data.astype(np.float32).astype(np.int64) != data).sum())
    assert plan.conversion.changed == reference == 2
    assert "--allow-lossy" in plan.conversion.summary() and "2 values" in \
        plan.conversion.summary()


def test_changed_values_against_numpy():
    rng = np.random.default_rng(1)
    cplx = (rng.random(50) + 1j * (rng.random(50) > 0.5)).astype(np.complex128)
    got = changed_values(cplx, np.dtype("f4"))
    ref = (cplx.imag != 0) | (cplx.real.astype(np.float32).astype(np.float64) != cplx.real)
    np.testing.assert_array_equal(got, ref)
    floats = np.array([0.5, np.nan, np.inf, 1e300, 0.1])
    np.testing.assert_array_equal(changed_values(floats, np.dtype("f4")),
                                  [False, False, False, True, True])
    # widening is never checked; narrowing is
    assert not Conversion(np.dtype("u2"), np.dtype("f4"), False, Path("x")).needs_check
    assert Conversion(np.dtype("f8"), np.dtype("f4"), False, Path("x")).needs_check
