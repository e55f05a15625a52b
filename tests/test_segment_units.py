"""Step sizes in physical units, preset parameters, expressions and --param overrides."""

from __future__ import annotations

import re

import numpy as np
import pytest

from engine.errors import InputError
from engine.segment.expressions import evaluate
from engine.segment.params import Param
from engine.segment.units import in_voxels, voxel_size_um
from engine.segment.workflow import load_workflow, parse_overrides, parse_workflow
from tests.conftest import run_cli
from tests.segment_helpers import blobs


def _wf(*steps, parameters=None, overrides=None):
    data = {"steps": list(steps)}
    if parameters is not None:
        data["parameters"] = parameters
    return parse_workflow(data, "wf.yaml", overrides=overrides)


SMOOTH_UM = {"name": "smooth", "function": "gaussian", "parameters": {"sigma_um": 1.2}}
MASK = {"name": "mask", "function": "threshold"}


def test_lengths_become_voxels_per_axis_and_volumes_voxel_counts():
    wf = _wf(SMOOTH_UM, MASK,
             {"name": "big", "function": "size_filter", "parameters": {"min_size_um3": 10,
                                                                        "max_size_um3": 20}})
    assert wf.step("smooth").physical and "sigma" not in wf.step("smooth").params
    got = in_voxels(wf, (2.0, 0.3, 0.3), "micrometer")
    assert got.step("smooth").params["sigma"] == (0.6, 4.0, 4.0)
    assert got.step("big").params["min_size"] == round(10 / (2.0 * 0.09))  # 56 voxels
    assert got.step("big").params["max_size"] == 111
    assert not any(s.physical for s in got.steps)
    seeds = _wf(SMOOTH_UM,
                {"name": "s", "function": "spot", "parameters": {"scales_um": [[0.6, 0.1]],
                                                                 "slice_wise": True}},
                {"name": "seeds", "function": "label"},
                {"name": "ws", "function": "watershed", "inputs": ["smooth", "seeds"],
                 "parameters": {"halo_um": 3.0}})
    got = in_voxels(seeds, (2.0, 0.3, 0.3), "micrometer")
    # slice-wise: the sigma of the (y, x) axes only, one number when they agree
    assert got.step("s").params["scales"] == ((2.0, 0.1),)
    assert got.step("ws").params["halo"] == 10  # ceil of the largest, 3 / 0.3
    full = in_voxels(_wf({"name": "s", "function": "spot",
                          "parameters": {"scales_um": [[0.6, 0.1], [[1, 0.6, 0.6], 0.2]]}}),
                     (2.0, 0.3, 0.3), "micrometer")
    assert full.step("s").params["scales"] == (((0.3, 2.0, 2.0), 0.1),
                                               ((0.5, 2.0, 2.0), 0.2))
    # isotropic voxels in nanometres: one sigma, converted through the unit
    iso = in_voxels(_wf(SMOOTH_UM, MASK), (200.0, 200.0, 200.0), "nanometer")
    assert iso.step("smooth").params["sigma"] == pytest.approx(6.0)
    # nothing physical: the same workflow back
    plain = _wf({"name": "s", "function": "gaussian", "parameters": {"sigma": 1}}, MASK)
    assert in_voxels(plain, (1.0, 1.0), "pixel") is plain


def test_physical_sizes_are_checked_once_converted():
    # a min_size above max_size only shows in voxels
    wf = _wf(MASK, {"name": "f", "function": "fill_holes",
                    "parameters": {"min_size_um3": 8, "max_size": 2}})
    with pytest.raises(InputError, match=r"step 'f' \(fill_holes\), in voxels: parameter "
                                         r"'max_size' must be >= min_size = 8"):
        in_voxels(wf, (1.0, 1.0, 1.0), "micrometer")
    # one radius per axis on anisotropic voxels, one number on isotropic ones
    wf = _wf({"name": "s", "function": "unsharp_mask", "parameters": {"radius_um": 0.5}},
             MASK)
    assert in_voxels(wf, (2.0, 0.25, 0.25), "micrometer").step("s").params["radius"] == (
        0.25, 2.0, 2.0)
    assert in_voxels(wf, (0.25, 0.25), "micrometer").step("s").params["radius"] == 2.0
    with pytest.raises(ValueError, match="a length takes one of"):
        Param("r", "float", 1.0, unit="length")
    with pytest.raises(InputError, match=r"smooth.sigma_um given in physical units, but the "
                                         r"image's voxel size \(1, 1 pixel\) is not"):
        in_voxels(_wf(SMOOTH_UM, MASK), (1, 1), "pixel")
    with pytest.raises(InputError, match="convert the workflow with the image's voxel size"):
        _wf(SMOOTH_UM, MASK).step("smooth").make_op()
    assert voxel_size_um((10.0, 5.0), "angstrom") == pytest.approx((1e-3, 5e-4))


@pytest.mark.parametrize("params,message", [
    ({"sigma": 1, "sigma_um": 1}, "give 'sigma' (voxels) or 'sigma_um' (physical units), "
                                  "not both"),
    ({"sigma_um": -1}, "parameter 'sigma_um' must be > 0, got -1"),
    ({"sigma_nm": 1}, "unknown parameter 'sigma_nm' (did you mean 'sigma_um'?)"),
    ({}, "missing required parameter 'sigma' or 'sigma_um'"),
])
def test_physical_parameter_errors(params, message):
    with pytest.raises(InputError, match=re.escape(message)):
        _wf({"name": "s", "function": "gaussian", "parameters": params}, MASK)


def test_expressions_and_overrides():
    step = {"name": "smooth", "function": "gaussian",
            "parameters": {"sigma_um": "=0.25 * d", "truncate": "=max(3, d / 4)"}}
    wf = _wf(step, MASK, parameters={"d": 8})
    assert wf.step("smooth").params == {"sigma_um": 2.0, "truncate": 3.0, "mode": "nearest",
                                        "slice_wise": False}
    assert wf.parameters == {"d": 8}
    wf = _wf(step, MASK, parameters={"d": 8}, overrides={"d": 20, "smooth.mode": "reflect"})
    assert wf.step("smooth").params["sigma_um"] == 5.0
    assert wf.step("smooth").params["truncate"] == 5.0
    assert wf.step("smooth").params["mode"] == "reflect"
    assert parse_workflow(wf.to_dict(), "again").step("smooth") == wf.step("smooth")
    problems = {
        "--param dd: no such workflow parameter (did you mean 'd'?)": {"dd": 1},
        "--param nosuch.sigma: no step 'nosuch'": {"nosuch.sigma": 1},
        "--param d: must be a finite number, got 'big'": {"d": "big"},
    }
    for message, overrides in problems.items():
        with pytest.raises(InputError, match=re.escape(message)):
            _wf(step, MASK, parameters={"d": 8}, overrides=overrides)
    with pytest.raises(InputError, match=r"parameter 'sigma_um' must be > 0, got -2"):
        _wf(step, MASK, parameters={"d": -8})
    assert parse_overrides(["d=8", "smooth.sigma=[1, 2, 2]"]) == {"d": 8,
                                                                   "smooth.sigma": [1, 2, 2]}
    with pytest.raises(InputError, match="expected KEY=VALUE"):
        parse_overrides(["diameter_um"])


@pytest.mark.parametrize("text,message", [
    ("=__import__('os')", "only numbers, workflow parameters"),
    ("=d.real", "only numbers, workflow parameters"),
    ("=e * 2", "uses 'e', which is no workflow parameter"),
    ("=2 *", "is not valid arithmetic"),
    ("=d / 0", "cannot be evaluated"),
])
def test_expressions_are_arithmetic_only(text, message):
    with pytest.raises(ValueError, match=message):
        evaluate(text, {"d": 2.0})
    assert evaluate("=-d ** 2 + abs(-1) + 7 // 2 + 5 % 3", {"d": 2.0}) == -4 + 1 + 3 + 2


def test_nucleus3d_sizes_all_follow_the_diameter():
    small, big = (load_workflow("nucleus-3d", overrides={"diameter_um": d}) for d in (4, 8))
    voxels = (2.0, 0.5, 0.5)
    a, b = in_voxels(small, voxels, "micrometer"), in_voxels(big, voxels, "micrometer")
    for step in small.steps:
        for key, value in step.params.items():
            other = big.step(step.name).params[key]
            if key.endswith("_um3"):
                assert other == pytest.approx(8 * value)
            elif key.endswith("_um") or key == "min_value":
                assert other == pytest.approx(2 * value), (step.name, key)
            else:
                assert other == value, (step.name, key)
    assert a.step("smooth").params["sigma"] == (0.1, 0.4, 0.4)
    assert b.step("split").params["halo"] == 14  # ceil(0.85 * 8 / 0.5)
    assert b.step("nuclei").params["min_size"] == round(0.03 * 512 / 0.5)  # µm³ / voxel


def test_cli_param_errors_are_one_line_and_a_run_takes_them(tmp_path):
    import tifffile

    tif = tmp_path / "img.tif"
    tifffile.imwrite(tif, (blobs((8, 16, 16), 0) * 1000).astype(np.uint16))
    store = str(tmp_path / "img.ome.zarr")
    res = run_cli("convert", str(tif), store, "--voxel-size", "1,0.5,0.5", "--unit", "um")
    assert res.returncode == 0, res.stderr
    for args, message in [
        (["--param", "diameter=8"], "--param diameter: no such workflow parameter (did you "
                                    "mean 'diameter_um'?)"),
        (["--param", "diameter_um"], "--param 'diameter_um': expected KEY=VALUE"),
        (["--param", "diameter_um=-8"], "step 'smooth' (gaussian): parameter 'sigma_um' "
                                        "must be > 0, got -0.4"),
    ]:
        res = run_cli("segment", store, "--workflow", "nucleus-3d", "--name", "n", *args)
        assert res.returncode == 2, res.stderr
        assert message in " ".join(res.stderr.split()), res.stderr
        assert "Traceback" not in res.stderr
    res = run_cli("segment", store, "--workflow", "nucleus-3d", "--name", "n", "--param",
                  "diameter_um=4", "--param", "smooth.sigma_um=0.3", "--workers", "1",
                  "--threads-per-worker", "1")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
