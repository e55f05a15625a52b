"""One declaration per step: the parameters declared on an op's fields drive the workflow
validation, ``--list-steps`` and the executor's construction of the op."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import InputError, OptionError
from engine.segment import execute
from engine.segment.execute import EXECUTORS, Context, Moments
from engine.segment.filters import EdgePreservingStats, FilamentStats, Gaussian
from engine.segment.graphcut import GraphCut
from engine.segment.params import (
    Param,
    build,
    declared,
    field_names,
    param,
    show,
    undeclared_fields,
)
from engine.segment.refs import Pointwise, Stored
from engine.segment.workflow import STEPS, describe_steps, parse_workflow

OP_STEPS = [spec.id for spec in STEPS.values() if spec.op is not None]

# values for the parameters that have no default
REQUIRED_VALUES = {"sigma": 1.5, "scales": [[1.0, 0.1], [2.0, 0.05]], "max_distance_um": 3.0,
                   "h": 0.1}


def _required(function: str) -> dict[str, Any]:
    """Values of the required parameters of ``function``, by parameter name."""
    return {k: REQUIRED_VALUES[k] for k, p in STEPS[function].params.items() if p.required}


def test_the_ops_are_registered():
    assert OP_STEPS == ["gaussian", "edge_preserving", "spot", "filament", "watershed",
                        "distance_transform", "local_maxima", "h_maxima", "graph_cut",
                        "gamma", "unsharp_mask", "shape_index"]


@pytest.mark.parametrize("function", OP_STEPS)
def test_every_op_field_is_a_declared_parameter_or_computed(function):
    op = STEPS[function].op
    assert undeclared_fields(op) == []
    assert STEPS[function].params == declared(op)
    # the op accepts exactly its fields: no constructor argument escapes the declaration
    assert set(inspect.signature(op).parameters) == {f.name for f in dataclasses.fields(op)}
    assert set(field_names(op)) == set(STEPS[function].params)


def test_a_field_added_without_declaration_is_found():
    @dataclasses.dataclass(frozen=True)
    class Planted(Gaussian):
        order: int = 0

    assert undeclared_fields(Planted) == ["order"]
    assert "order" not in declared(Planted)


def _workflow(function: str, params: dict[str, Any]) -> Any:
    """A validated workflow whose step ``s`` runs ``function`` with ``params``."""
    steps: list[dict[str, Any]] = []
    inputs = ["raw"]
    if function == "watershed":
        steps = [{"name": "t", "function": "threshold"},
                 {"name": "m", "function": "label", "inputs": ["t"]}]
        inputs = ["raw", "m"]
    if function == "distance_transform":  # takes a mask
        steps = [{"name": "t", "function": "threshold"}]
        inputs = ["t"]
    steps.append({"name": "s", "function": function, "parameters": params, "inputs": inputs})
    return parse_workflow({"steps": steps, "output": "s"}, "wf.yaml", image_output=True)


def _other_value(p: Param) -> Any:
    """A valid value of ``p`` that is not its default (the required values for those
    without one), as a workflow file would write it."""
    if p.required:
        return REQUIRED_VALUES[p.name]
    if p.type == "bool":
        return not p.default
    if p.type == "str":
        return next(c for c in p.choices if c != p.default)
    if p.type == "floats":
        return [2 * v for v in p.default]
    if p.default is None:  # nullable, unset by default
        return 1.0
    step = 1 if p.type == "int" else (p.default / 2 if p.default else 1.0)
    value = p.default + step
    return value if p.maximum is None or value <= p.maximum else p.default - step


def _section(text: str, function: str) -> str:
    """The lines of ``--list-steps`` about ``function`` (up to the next step's header)."""
    return re.search(rf"^{function}: .*?(?=^\S|\Z)", text, re.MULTILINE | re.DOTALL)[0]


def _executed_op(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, function: str,
                 step: Any) -> Any:
    """The op that the executor of ``step`` builds, its passes replaced by stand-ins."""
    built: list[Any] = []
    statistics = {Moments: ({"min": 0.0, "max": 1.0}, {}), EdgePreservingStats: 0.25}

    def run_op(ctx: Context, name: str, op: Any, inputs: Any) -> Any:
        built.append(op)
        return inputs[0]

    def run_reduce(ctx: Context, name: str, op: Any, inputs: Any) -> Any:
        if isinstance(op, FilamentStats):
            return (-1.0,) * len(op.scales)
        return statistics[type(op)]

    monkeypatch.setattr(execute, "run_op", run_op)
    monkeypatch.setattr(execute, "run_reduce", run_reduce)
    ctx = Context(client=None, work=tmp_path, block_shape=(8, 8, 8))
    image = Stored(str(tmp_path / "image"), (8, 16, 16), (8, 8, 8), np.dtype(np.float32))
    labels = Stored(str(tmp_path / "labels"), (8, 16, 16), (8, 8, 8), np.dtype(np.uint32))
    result = EXECUTORS[function](ctx, step, *([image, labels][:len(step.inputs)]))
    if isinstance(result, Pointwise):  # a voxel-wise op runs as a view
        built.append(result.fn)
    assert len(built) == 1
    return built[0]


@pytest.mark.parametrize("function", OP_STEPS)
def test_list_steps_shows_and_validation_fills_the_declared_defaults(function):
    text = _section(describe_steps(), function)
    params = _workflow(function, _required(function)).step("s").params
    for name, p in STEPS[function].params.items():
        if p.required:
            assert re.search(rf"^  - {name}: .*; required$", text, re.MULTILINE), name
        else:
            assert re.search(rf"^  - {name}: .*; default {re.escape(show(p.default))}$",
                             text, re.MULTILINE), name
            assert params[name] == p.default


@pytest.mark.parametrize("function", OP_STEPS)
def test_the_executor_builds_the_op_from_the_validated_values(function, monkeypatch,
                                                                tmp_path):
    spec = STEPS[function]
    given = {name: _other_value(p) for name, p in spec.params.items()}
    step = _workflow(function, given).step("s")
    op = _executed_op(monkeypatch, tmp_path, function, step)
    assert type(op) is spec.op
    for name, p in spec.params.items():
        value = getattr(op, field_names(spec.op)[name])
        assert value == step.params[name] == p.check(given[name]), (function, name)
        assert value != p.default, (function, name)  # so no field default stood in


def _bad_value(p: Param) -> Any:
    """A value that breaks the declaration ``p``."""
    if p.type == "bool":
        return "yes"
    if p.type == "str":
        return "nonsense"
    if p.type == "scales":
        return [[0, 0.1]]
    if p.minimum is not None:
        return p.minimum if p.exclusive_minimum else p.minimum - 1
    return math.inf if p.type != "int" else 1.5


@pytest.mark.parametrize("function", OP_STEPS)
def test_the_op_and_the_workflow_refuse_the_same_values(function):
    op = STEPS[function].op
    fields = field_names(op)
    base = {fields[k]: v for k, v in _required(function).items()}
    for name, p in STEPS[function].params.items():
        bad = _bad_value(p)
        with pytest.raises(OptionError, match=fields[name]):
            op(**{**base, fields[name]: bad})
        entry = {"name": "s", "function": function,
                 "parameters": {**_required(function), name: bad}}
        with pytest.raises(InputError, match=f"parameter '{name}'"):
            parse_workflow({"steps": [entry]}, "wf.yaml", image_output=True)


def test_python_and_step_defaults_may_differ_where_declared():
    # cellcutter's max_weight for Python callers; the workflow step keeps its own
    assert GraphCut().max_weight == 5.0
    assert STEPS["graph_cut"].params["max_weight"].default == 20.0
    op = build(GraphCut, {"halo": 4, "max_weight": 20.0})
    assert (op.halo_size, op.max_weight) == (4, 20.0)


def test_declared_fields_normalize_like_the_workflow():
    @dataclasses.dataclass(frozen=True)
    class Scaled(Gaussian):
        sigmas: tuple[float, ...] = param("floats", [1, 2], minimum=0, doc="Scales.")

    op = Scaled(np.float32(2), sigmas=np.array([1, 3]))
    assert op.sigma == 2.0 and type(op.sigma) is float
    assert op.sigmas == (1.0, 3.0) and Scaled.__dataclass_fields__["sigmas"].default == (1.0,
                                                                                         2.0)
    with pytest.raises(OptionError, match=r"scaled sigmas item 2 must be a finite number "
                                          r">= 0, got -1"):
        Scaled(1, sigmas=[1, -1])
