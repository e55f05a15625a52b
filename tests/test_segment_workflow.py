"""The segmentation workflow layer: catalogue, YAML loader, validation and presets."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import yaml

from engine.errors import InputError, VoxelmillError
from engine.segment.params import REQUIRED, Param
from engine.segment.workflow import (
    PRESETS,
    RAW,
    STEPS,
    Workflow,
    describe_steps,
    load_workflow,
    parse_workflow,
    preset_path,
)

GOOD = """\
name: nuclei
description: a test workflow
steps:
  - name: norm
    function: normalize
    parameters: {scaling: [2.5, 7.5]}
    inputs: [raw]
  - name: smooth
    function: gaussian
    parameters: {sigma: 1}
  - name: mask
    function: threshold
    parameters: {method: multiotsu, classes: 4, level: 2}
  - name: label
    function: label
  - name: seeds
    function: size_filter
    parameters: {min_size: 10, relabel: true}
  - name: cells
    function: watershed
    inputs: [smooth, seeds, mask]
output: cells
"""


def write(tmp_path: Path, text: str, name: str = "workflow.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    """The message of the InputError that loading ``text`` raises."""
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_workflow(path)
    message = str(info.value)
    for line in message.splitlines():  # every problem names the file
        assert line.startswith(f"{path}: "), line
    return message


def steps_yaml(*steps: str, extra: str = "") -> str:
    """A workflow whose steps are the given one-line flow mappings."""
    return "steps:\n" + "".join(f"  - {s}\n" for s in steps) + extra


# --------------------------------------------------------------------------- catalogue


def test_catalogue_is_complete_and_documented():
    assert list(STEPS) == [
        "normalize", "clip_percentiles", "gaussian", "edge_preserving", "spot", "filament",
        "threshold", "masked_object", "label", "size_filter", "fill_holes", "watershed",
        "distance_transform", "local_maxima", "h_maxima", "graph_cut", "combine", "invert",
        "gamma", "unsharp_mask", "shape_index"]
    for spec in STEPS.values():
        assert spec.doc and spec.output in ("image", "mask", "labels", "same")
        for param in spec.params.values():
            assert param.doc, (spec.id, param.name)
            if not param.required:  # defaults pass their own check, unchanged
                assert param.check(param.default) == param.default
        if all(not p.required for p in spec.params.values()):
            defaults = {n: p.default for n, p in spec.params.items()}
            assert spec.check(defaults) == [], spec.id
    text = describe_steps()
    for spec in STEPS.values():
        assert f"{spec.id}:" in text
    assert "watershed: image, labels[, mask] -> labels" in text
    assert "combine: mask, mask, ... -> mask" in text


def test_param_check_types_and_normalization():
    f = Param("x", "float", 1.0, minimum=0, exclusive_minimum=True)
    assert f.check(2) == 2.0 and isinstance(f.check(2), float)
    with pytest.raises(ValueError, match=r"'x' must be a number, got true"):
        f.check(True)
    with pytest.raises(ValueError, match=r"'x' must be > 0, got 0"):
        f.check(0)
    with pytest.raises(ValueError, match=r"finite"):
        f.check(float("nan"))
    i = Param("n", "int", 1, minimum=1, maximum=3)
    with pytest.raises(ValueError, match=r"'n' must be an integer, got 2\.5"):
        i.check(2.5)
    with pytest.raises(ValueError, match=r"'n' must be an integer, got false"):
        i.check(False)
    with pytest.raises(ValueError, match=r"'n' must be in \[1, 3\], got 4"):
        i.check(4)
    fl = Param("s", "floats", [0], lengths=(1, 2, 4))
    assert fl.default == (0.0,)
    assert fl.check([1, 2]) == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"a list of 1, 2 or 4 numbers, got 3"):
        fl.check([1, 2, 3])
    with pytest.raises(ValueError, match=r"'s' item 2 must be a number, got 'a'"):
        fl.check([1, "a"])
    sc = Param("scales", "scales")
    assert sc.required and sc.default is REQUIRED
    assert sc.check([[1, 0.04], [2, 0]]) == ((1.0, 0.04), (2.0, 0.0))
    with pytest.raises(ValueError, match=r"item 1 must be a \[sigma, cutoff\] pair"):
        sc.check([1, 0.04])
    with pytest.raises(ValueError, match=r"item 2: sigma must be > 0, got 0"):
        sc.check([[1, 0.04], [0, 0.1]])
    ff = Param("sigma", "float_or_floats", minimum=0, exclusive_minimum=True)
    assert ff.check(1) == 1.0 and ff.check([1, 2, 2]) == (1.0, 2.0, 2.0)
    with pytest.raises(ValueError, match=r"'sigma' item 3 must be > 0, got -1"):
        ff.check([1, 2, -1])
    nullable = Param("v", "int", None, nullable=True)
    assert nullable.check(None) is None
    with pytest.raises(ValueError, match=r"'b' must be true or false, got 'yes'"):
        Param("b", "bool", False).check("yes")


# --------------------------------------------------------------------------- loading


def test_presets_load_and_output_labels():
    assert {p.stem for p in preset_path("spot").parent.glob("*.yaml")} == set(PRESETS)
    for name, description in PRESETS.items():
        wf = load_workflow(name)
        assert wf.source == name and wf.name == name
        assert wf.description == description
        assert wf.kind(wf.output) == "labels"
        assert parse_workflow(wf.to_dict(), name) == wf
    membrane = load_workflow("membrane")
    assert membrane.steps[0].function == "invert"
    assert membrane.step("sheets").params["slice_wise"] is True
    threshold = load_workflow("threshold")
    assert [s.function for s in threshold.steps] == [
        "gaussian", "threshold", "label", "size_filter"]
    assert threshold.step("objects").params["min_size"] == 10


def test_good_workflow_round_trips(tmp_path):
    wf = load_workflow(write(tmp_path, GOOD))
    assert isinstance(wf, Workflow)
    assert wf.name == "nuclei" and wf.output == "cells"
    norm = wf.step("norm")
    assert norm.params == {"scaling": (2.5, 7.5)} and norm.kind == "image"
    assert wf.step("smooth").params == {"sigma": 1.0, "truncate": 4.0, "mode": "nearest",
                                        "slice_wise": False}
    assert wf.step("seeds").kind == "labels" and wf.kind("mask") == "mask"
    assert wf.kind(RAW) == "image"
    assert wf.step("cells").inputs == ("smooth", "seeds", "mask")
    assert wf.consumers("smooth") == ("mask", "cells")
    # through a dict and through YAML text on disk
    again = parse_workflow(wf.to_dict(), wf.source)
    assert again == wf
    dumped = write(tmp_path, wf.to_yaml(), "dumped.yaml")
    assert load_workflow(dumped).steps == wf.steps
    assert yaml.safe_load(wf.to_yaml()) == wf.to_dict()
    with pytest.raises(KeyError):
        wf.step("nope")
    assert pickle.loads(pickle.dumps(wf)) == wf  # executors may ship it to workers


def test_default_inputs_are_the_previous_step(tmp_path):
    wf = load_workflow(write(tmp_path, steps_yaml(
        "{name: a, function: gaussian, parameters: {sigma: 1}}",
        "{name: b, function: threshold}",
        "{name: c, function: label}")))
    assert [s.inputs for s in wf.steps] == [(RAW,), ("a",), ("b",)]
    assert wf.output == "c" and wf.name == "workflow"


def test_topological_order_is_stable(tmp_path):
    wf = load_workflow(write(tmp_path, steps_yaml(
        "{name: out, function: combine, parameters: {op: or}, inputs: [m2, m1]}",
        "{name: m1, function: threshold, inputs: [s1]}",
        "{name: s1, function: gaussian, parameters: {sigma: 1}, inputs: [raw]}",
        "{name: s2, function: gaussian, parameters: {sigma: 2}, inputs: [raw]}",
        "{name: m2, function: threshold, inputs: [s2]}",
        extra="output: out\n")))
    assert [s.name for s in wf.steps] == ["s1", "m1", "s2", "m2", "out"]
    assert parse_workflow(wf.to_dict(), "x").steps == wf.steps


def test_scientific_notation_is_a_float(tmp_path):
    wf = load_workflow(write(tmp_path, steps_yaml(
        "{name: m, function: threshold, parameters: {method: absolute, value: 1e-3}}")))
    assert wf.step("m").params["value"] == 0.001


def test_unknown_spec_lists_presets(tmp_path):
    with pytest.raises(InputError, match=r"neither a workflow file nor a preset "
                                         r"\(did you mean 'nucleus'\?\); presets: membrane"):
        load_workflow("nucleos")
    with pytest.raises(InputError, match=r"missing\.yaml: workflow file not found"):
        load_workflow(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match=r"not a directory"):
        load_workflow(tmp_path)
    with pytest.raises(InputError, match=r"unknown workflow preset 'x'"):
        preset_path("x")
    assert issubclass(InputError, VoxelmillError)


# --------------------------------------------------------------------------- validation

SMOOTH = "{name: smooth, function: gaussian, parameters: {sigma: 1}}"
MASK = "{name: mask, function: threshold}"
LABEL = "{name: label, function: label}"

CASES = {
    "syntax": ("steps:\n  - name: a\n   function: b\n", ["YAML syntax error at line 3"]),
    "duplicate key": (
        "steps:\n  - {name: m, function: threshold}\nsteps: []\n",
        ["found duplicate key 'steps' (first at line 1)", "line 3"]),
    "empty file": ("# nothing\n", ["the workflow is empty"]),
    "top level list": ("- a\n- b\n", ["the top level must be a mapping", "got a list"]),
    "unknown top-level key": (
        steps_yaml(MASK, extra="ouput: mask\n"),
        ["unknown top-level key 'ouput' (did you mean 'output'?)"]),
    "steps missing": ("name: x\n", ["missing 'steps'"]),
    "steps empty": ("steps: []\n", ["'steps' is empty"]),
    "steps not a list": ("steps: {a: 1}\n", ["'steps' must be a list of steps, got a mapping"]),
    "step not a mapping": (steps_yaml("gaussian"), ["step #1: must be a mapping"]),
    "unknown step key": (
        steps_yaml("{name: mask, function: threshold, params: {}}"),
        ["step 'mask' (threshold): unknown key 'params' (did you mean 'parameters'?)"]),
    "missing name": (steps_yaml("{function: threshold}"), ["step #1 (threshold): missing 'name'"]),
    "bad name": (
        steps_yaml("{name: 'my step', function: threshold}"),
        ["step 'my step' (threshold): name must be letters, digits"]),
    "raw name": (steps_yaml("{name: raw, function: threshold}"), ["'raw' is reserved"]),
    "missing function": (steps_yaml("{name: m}"), ["step 'm': missing 'function'"]),
    "unknown function": (
        steps_yaml("{name: smooth, function: gausian, parameters: {sigma: 1}}", MASK),
        ["step 'smooth' (gausian): unknown function 'gausian' (did you mean 'gaussian'?)"]),
    "unknown parameter": (
        steps_yaml("{name: smooth, function: gaussian, parameters: {sigma: 1, sigm: 2}}",
                   MASK),
        ["step 'smooth' (gaussian): unknown parameter 'sigm' (did you mean 'sigma'?)"]),
    "parameters not a mapping": (
        steps_yaml("{name: smooth, function: gaussian, parameters: [1]}", MASK),
        ["step 'smooth' (gaussian): 'parameters' must be a mapping"]),
    "missing required parameter": (
        steps_yaml("{name: smooth, function: gaussian}", MASK),
        ["step 'smooth' (gaussian): missing required parameter 'sigma'"]),
    "out of range": (
        steps_yaml("{name: smooth, function: gaussian, parameters: {sigma: -1}}", MASK),
        ["workflow.yaml: step 'smooth' (gaussian): parameter 'sigma' must be > 0, got -1"]),
    "range in brackets": (
        steps_yaml("{name: f, function: filament, parameters: {scales: [[1, 0.1]], tau: 0}}"),
        ["step 'f' (filament): parameter 'tau' must be in (0, 1], got 0"]),
    "float where int expected": (
        steps_yaml(MASK, "{name: label, function: label, parameters: {connectivity: 1.5}}"),
        ["step 'label' (label): parameter 'connectivity' must be an integer or null, "
         "got 1.5 (a number)"]),
    "bool is not an int": (
        steps_yaml(MASK, "{name: s, function: size_filter, parameters: {min_size: true}}"),
        ["step 's' (size_filter): parameter 'min_size' must be an integer, got true"]),
    "string where float expected": (
        steps_yaml("{name: m, function: threshold, parameters: {factor: 'big'}}"),
        ["step 'm' (threshold): parameter 'factor' must be a number, got 'big' (a string)"]),
    "list length": (
        steps_yaml("{name: n, function: normalize, parameters: {scaling: [1, 2, 3]}}", MASK),
        ["step 'n' (normalize): parameter 'scaling' must be a list of 1, 2 or 4 numbers, "
         "got 3"]),
    "scales not pairs": (
        steps_yaml("{name: s, function: spot, parameters: {scales: [1, 0.04]}}"),
        ["step 's' (spot): parameter 'scales' item 1 must be a [sigma, cutoff] pair"]),
    "enum": (
        steps_yaml("{name: m, function: threshold, parameters: {method: otsuu}}"),
        ["step 'm' (threshold): parameter 'method' must be one of 'absolute', 'otsu'",
         "got 'otsuu' (did you mean 'otsu'?)"]),
    "absolute needs value": (
        steps_yaml("{name: m, function: threshold, parameters: {method: absolute}}"),
        ["step 'm' (threshold): parameter 'value' is required when method is 'absolute'"]),
    "value only with absolute": (
        steps_yaml("{name: m, function: threshold, parameters: {value: 3}}"),
        ["step 'm' (threshold): parameter 'value' is only used with method 'absolute'"]),
    "multiotsu level": (
        steps_yaml("{name: m, function: threshold, "
                   "parameters: {method: multiotsu, classes: 3, level: 3}}"),
        ["step 'm' (threshold): parameter 'level' must be <= classes - 1 = 2, got 3"]),
    "percentiles order": (
        steps_yaml("{name: c, function: clip_percentiles, parameters: {low: 99, high: 1}}",
                   MASK),
        ["step 'c' (clip_percentiles): parameter 'low' must be < 'high', got low=99, "
         "high=1"]),
    "normalize c < d": (
        steps_yaml("{name: n, function: normalize, parameters: {scaling: [1, 1, 5, 2]}}",
                   MASK),
        ["step 'n' (normalize): parameter 'scaling' [a, b, c, d] needs c < d"]),
    "normalize a, b >= 0": (
        steps_yaml("{name: n, function: normalize, parameters: {scaling: [-1, 1]}}", MASK),
        ["step 'n' (normalize): parameter 'scaling' [a, b, ...] needs a >= 0 and b >= 0"]),
    "max_size < min_size": (
        steps_yaml(MASK, "{name: f, function: fill_holes, "
                         "parameters: {min_size: 10, max_size: 5}}"),
        ["step 'f' (fill_holes): parameter 'max_size' must be >= min_size = 10, got 5"]),
    "relabel on a mask": (
        steps_yaml(MASK, "{name: s, function: size_filter, parameters: {relabel: true}}"),
        ["step 's' (size_filter): parameter 'relabel' applies to labels input only"]),
    "duplicate step names": (
        steps_yaml(SMOOTH, SMOOTH, MASK),
        ["step 'smooth' (gaussian): duplicate step name 'smooth' (also step #1)"]),
    "missing parent": (
        steps_yaml(SMOOTH, "{name: mask, function: threshold, inputs: [smooht]}"),
        ["step 'mask' (threshold): input 'smooht' names no step (did you mean 'smooth'?)"]),
    "cycle": (
        steps_yaml("{name: a, function: gaussian, parameters: {sigma: 1}, inputs: [c]}",
                   "{name: b, function: gaussian, parameters: {sigma: 1}, inputs: [a]}",
                   "{name: c, function: gaussian, parameters: {sigma: 1}, inputs: [b]}",
                   "{name: m, function: threshold, inputs: [c]}"),
        ["the step inputs form a cycle: a -> b -> c -> a"]),
    "self cycle": (
        steps_yaml("{name: m, function: invert, inputs: [m]}"),
        ["the step inputs form a cycle: m -> m"]),
    "too many inputs": (
        steps_yaml(MASK, "{name: label, function: label, inputs: [mask, mask]}"),
        ["step 'label' (label): takes 1 input (mask), got 2: ['mask', 'mask']"]),
    "too few inputs": (
        steps_yaml(MASK, "{name: both, function: combine, parameters: {op: or}}"),
        ["step 'both' (combine): takes at least 2 inputs (mask, mask, ...), got 1"]),
    "input kind": (
        steps_yaml(SMOOTH, LABEL),
        ["step 'label' (label): input 1 'smooth' is an image, but label expects a mask "
         "there"]),
    "watershed markers kind": (
        steps_yaml(SMOOTH, MASK,
                   "{name: ws, function: watershed, inputs: [smooth, mask]}"),
        ["step 'ws' (watershed): input 2 'mask' is a mask, but watershed expects labels"]),
    "output is an image": (
        steps_yaml(SMOOTH),
        ["the output 'smooth' (gaussian) produces an image; the output must produce a "
         "mask or labels"]),
    "output unknown": (
        steps_yaml(SMOOTH, MASK, extra="output: mask2\n"),
        ["'output' names an unknown step 'mask2' (did you mean 'mask'?)"]),
    "output raw": (steps_yaml(MASK, extra="output: raw\n"), ["'raw' is the input image"]),
    "unused step": (
        steps_yaml(SMOOTH, MASK, "{name: extra, function: gaussian, parameters: {sigma: 2}, "
                                 "inputs: [raw]}", extra="output: mask\n"),
        ["step 'extra' (gaussian): not used by the output 'mask'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_problem_is_reported(tmp_path, case):
    text, expected = CASES[case]
    message = error_of(tmp_path, text)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"


def test_one_problem_one_line_without_echoes(tmp_path):
    # a misspelt input is one problem: no "not used" echo for the step it meant
    message = error_of(tmp_path, steps_yaml(
        SMOOTH, "{name: mask, function: threshold, inputs: [smoth]}"))
    assert len(message.splitlines()) == 1


def test_all_problems_in_one_error(tmp_path):
    message = error_of(tmp_path, """\
        name: broken
        colour: blue
        steps:
          - name: smooth
            function: gaussian
            parameters: {sigma: -1, mode: reflekt}
          - name: mask
            function: treshold
          - name: smooth
            function: size_filter
            parameters: {min_size: 1.5}
          - name: label
            function: label
            inputs: [mask, nowhere]
        """)
    lines = message.splitlines()
    expected = [
        "unknown top-level key 'colour'",
        "step 'smooth' (gaussian): parameter 'sigma' must be > 0, got -1",
        "step 'smooth' (gaussian): parameter 'mode' must be one of",
        "step 'mask' (treshold): unknown function 'treshold' (did you mean 'threshold'?)",
        "step 'smooth' (size_filter): parameter 'min_size' must be an integer, got 1.5",
        "step 'smooth' (size_filter): duplicate step name 'smooth'",
        "step 'label' (label): takes 1 input (mask), got 2",
        "step 'label' (label): input 'nowhere' names no step",
    ]
    assert len(lines) == len(expected), message
    for part in expected:
        assert sum(part in line for line in lines) == 1, f"{part!r} not once in:\n{message}"
    # top level first, then step by step in file order
    assert [next(i for i, line in enumerate(lines) if part in line)
            for part in expected] == list(range(len(expected)))
