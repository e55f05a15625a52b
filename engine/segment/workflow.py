"""Segmentation workflows: the step catalogue, the YAML loader and the presets.

A *workflow* is a small DAG of steps read from YAML::

    name: nuclei                # optional
    description: ...            # optional
    steps:
      - name: norm              # unique, [A-Za-z0-9_-]+, not "raw"
        function: normalize     # a step id of the catalogue (STEPS)
        parameters: {scaling: [2.5, 7.5]}   # optional; defaults are filled in
        inputs: [raw]           # optional; default: the previous step ([raw] for the first)
      - name: smooth
        function: gaussian
        parameters: {sigma: 1.0}
    output: smooth              # optional; default: the last step

``raw`` is the root of the DAG: the input image. Every value flowing along an edge has a
*kind*: ``image`` (float intensities), ``mask`` (bool) or ``labels`` (unsigned integers);
each step declares the kinds it accepts per input and the kind it produces.

This module only describes and validates: :func:`load_workflow` checks a file completely
(syntax, step ids, parameter types and ranges, cross-parameter rules, the graph and the
kinds along its edges) before anything is computed, and reports every problem of the file
in a single :class:`~engine.errors.InputError`, one problem per line. The executors, keyed
by the step ``function`` id, live elsewhere.

A step that runs a block operation names its op class in the catalogue: its parameters
are declared on the op's fields (:mod:`engine.segment.params`), and the executor builds the
op from the validated values (:meth:`Step.make_op`).
"""

from __future__ import annotations

import inspect
import math
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from engine.errors import InputError
from engine.segment.blockops import BlockOp
from engine.segment.distance import DistanceTransform
from engine.segment.expressions import substitute
from engine.segment.filters import (
    EdgePreserving,
    Filament,
    Gamma,
    Gaussian,
    ShapeIndex,
    Spot,
    UnsharpMask,
)
from engine.segment.graphcut import GraphCut
from engine.segment.params import (
    REQUIRED,
    Param,
    build,
    declared,
    physical_name,
    show,
    slice_wise_doc,
    suggest,
    type_name,
)
from engine.segment.seeds import HMaxima, LocalMaxima
from engine.segment.watershed import SeededWatershed
from engine.yamlfile import parse_yaml, read_yaml

__all__ = [
    "KINDS",
    "PRESETS",
    "RAW",
    "STEPS",
    "Step",
    "StepSpec",
    "Workflow",
    "describe_steps",
    "load_workflow",
    "parse_overrides",
    "parse_workflow",
    "preset_path",
]

RAW = "raw"
"""Name of the root of every workflow: the input image."""

KINDS = ("image", "mask", "labels")
"""Kinds of the values flowing between steps: float image, bool mask, unsigned labels."""

TOP_LEVEL_KEYS = ("name", "description", "parameters", "steps", "output")
STEP_KEYS = ("name", "function", "parameters", "inputs")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_PRESET_DIR = Path(__file__).resolve().parent / "presets"


# --------------------------------------------------------------------------- formatting


def _kind_phrase(kind: str) -> str:
    return {"image": "an image", "mask": "a mask", "labels": "labels"}.get(kind, repr(kind))


def _kinds_phrase(kinds: Sequence[str]) -> str:
    return " or ".join(_kind_phrase(k) for k in kinds)


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively: a value YAML's safe dumper writes as a plain list."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- StepSpec


Rule = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class StepSpec:
    """Schema of one step of the catalogue.

    Attributes
    ----------
    id : str
        The ``function`` id used in workflow files and by the executors.
    doc : str
        What the step computes (first line: a one-line summary).
    params : dict of str to Param
        The parameters, in documentation order: declared on the fields of :attr:`op`
        when the step runs one.
    inputs : tuple of tuple of str
        Kinds accepted at each input position. Positions beyond the last one (when
        :attr:`max_inputs` allows them) accept the kinds of the last position.
    output : str
        Kind produced: ``"image"``, ``"mask"``, ``"labels"`` or ``"same"`` (the kind of
        the first input).
    min_inputs : int
        Fewest inputs.
    max_inputs : int or None
        Most inputs; ``None``: unbounded.
    rules : callable or None
        Cross-parameter rules: takes the validated parameters (defaults filled), returns
        one message per violated rule.
    op : type or None
        The block operation the executor builds from the parameters
        (:meth:`Step.make_op`); ``None`` for steps that are global passes or views.
    """

    id: str
    doc: str
    params: dict[str, Param]
    inputs: tuple[tuple[str, ...], ...]
    output: str
    min_inputs: int
    max_inputs: int | None
    rules: Rule | None = field(default=None, repr=False, compare=False)
    op: type[BlockOp] | None = None

    def accepts(self, position: int) -> tuple[str, ...]:
        """Kinds accepted by input ``position`` (0-based)."""
        return self.inputs[min(position, len(self.inputs) - 1)]

    def output_kind(self, input_kinds: Sequence[str | None]) -> str | None:
        """Kind produced from inputs of ``input_kinds`` (``None`` when it is unknown)."""
        if self.output != "same":
            return self.output
        return input_kinds[0] if input_kinds else None

    def inputs_text(self) -> str:
        """The accepted inputs in words, e.g. ``"image, labels[, mask]"``."""
        parts = ["|".join(kinds) for kinds in self.inputs]
        required = parts[: self.min_inputs]
        if self.max_inputs is None:
            if len(required) < self.min_inputs:
                required += [parts[-1]] * (self.min_inputs - len(required))
            return ", ".join(required) + ", ..."
        text = ", ".join(required)
        optional = [parts[min(i, len(parts) - 1)]
                    for i in range(self.min_inputs, self.max_inputs)]
        return text + "".join(f"[, {p}]" for p in optional)

    def count_text(self) -> str:
        """How many inputs the step takes, in words."""
        lo, hi = self.min_inputs, self.max_inputs
        noun = "input" if (hi or lo) == 1 and hi == lo else "inputs"
        if hi is None:
            return f"at least {lo} {noun}"
        if lo == hi:
            return f"{lo} {noun}"
        return f"{lo} to {hi} {noun}"

    def check(self, params: Mapping[str, Any]) -> list[str]:
        """Cross-parameter rules on validated parameters; one message per violation."""
        return list(self.rules(params)) if self.rules is not None else []


_AS_MANY = -1  # max_inputs of _spec: as many as positions declared


def _spec(id: str, doc: str, params: Sequence[Param] | type[BlockOp],
          inputs: Sequence[Sequence[str]], output: str, *, min_inputs: int | None = None,
          max_inputs: int | None = _AS_MANY, rules: Rule | None = None) -> StepSpec:
    """A catalogue entry; ``params`` is a list, or the op class that declares them."""
    n = len(inputs)
    op = params if isinstance(params, type) else None
    return StepSpec(
        id=id, doc=inspect.cleandoc(doc),
        params=declared(op) if op is not None else {p.name: p for p in params},
        inputs=tuple(tuple(k) for k in inputs), output=output,
        min_inputs=n if min_inputs is None else min_inputs,
        max_inputs=n if max_inputs == _AS_MANY else max_inputs, rules=rules, op=op)


# --------------------------------------------------------------------------- rules


def _normalize_rules(p: Mapping[str, Any]) -> list[str]:
    s = p["scaling"]
    out = []
    if len(s) == 1 and s[0] < 0:
        out.append(f"parameter 'scaling' [u] needs u >= 0 (0: plain min-max), got {show(s)}")
    if len(s) in (2, 4) and (s[0] < 0 or s[1] < 0):
        out.append("parameter 'scaling' [a, b, ...] needs a >= 0 and b >= 0 (numbers of "
                   f"standard deviations), got {show(s)}")
    if len(s) == 4 and not s[2] < s[3]:
        out.append(f"parameter 'scaling' [a, b, c, d] needs c < d, got {show(s)}")
    return out


def _clip_rules(p: Mapping[str, Any]) -> list[str]:
    if p["low"] < p["high"]:
        return []
    return [f"parameter 'low' must be < 'high', got low={show(p['low'])}, "
            f"high={show(p['high'])}"]


def _threshold_rules(p: Mapping[str, Any]) -> list[str]:
    out = []
    if p["method"] == "absolute" and p["value"] is None:
        out.append("parameter 'value' is required when method is 'absolute'")
    if p["method"] != "absolute" and p["value"] is not None:
        out.append(f"parameter 'value' is only used with method 'absolute' (method is "
                   f"{p['method']!r}), got {show(p['value'])}")
    if p["method"] == "multiotsu" and p["level"] > p["classes"] - 1:
        out.append(f"parameter 'level' must be <= classes - 1 = {p['classes'] - 1}, got "
                   f"{p['level']}")
    return out


def _size_rules(p: Mapping[str, Any]) -> list[str]:
    if p["max_size"] is None or p["max_size"] >= p["min_size"]:
        return []
    return [f"parameter 'max_size' must be >= min_size = {p['min_size']}, got "
            f"{p['max_size']}"]


# --------------------------------------------------------------------------- catalogue


def _slice_wise(what: str, note: str = "") -> Param:
    return Param("slice_wise", "bool", False, doc=slice_wise_doc(what, note))


def _connectivity(doc: str) -> Param:
    return Param("connectivity", "int", 1, minimum=1, maximum=3, doc=doc)


_STEP_LIST = [
    _spec(
        "normalize",
        """
        Intensity normalization, the Allen Cell Structure Segmenter's
        ``intensity_scaling_param``; the result is min-max scaled to [0, 1].

        ``[0]``: plain min-max. ``[u]`` with u > 0: voxels above u (an absolute intensity)
        are reset to the image minimum first (removes very bright artefacts). ``[a, b]``:
        clip to mean - a*std .. mean + b*std of the whole image (clamped to the image
        range). ``[a, b, c, d]``: mean and std are computed from the voxels with
        c < v < d only, and the image is clipped to c - a*std .. d + b*std (clamped).
        """,
        [Param("scaling", "floats", [0], lengths=(1, 2, 4),
               doc="[0], [u], [a, b] or [a, b, c, d] (see above); a and b are numbers of "
                   "standard deviations: raise b to keep more of the bright tail.")],
        [("image",)], "image", rules=_normalize_rules),
    _spec(
        "clip_percentiles",
        """
        Clip intensities to the [low, high] percentiles of the whole image, then
        (optionally) rescale to [0, 1].
        """,
        [Param("low", "float", 0.5, minimum=0, maximum=100,
               doc="Lower percentile (0 to 100)."),
         Param("high", "float", 99.5, minimum=0, maximum=100,
               doc="Upper percentile (0 to 100), greater than low."),
         Param("rescale", "bool", True, doc="Rescale the clipped range to [0, 1].")],
        [("image",)], "image", rules=_clip_rules),
    _spec(
        "gaussian",
        "Gaussian smoothing (scipy.ndimage.gaussian_filter).",
        Gaussian,
        [("image",)], "image"),
    _spec(
        "edge_preserving",
        """
        Edge-preserving smoothing: anisotropic (Perona-Malik) diffusion, as the Allen
        segmenter's ``edge_preserving_smoothing_3d``; smooths flat regions and keeps edges.
        """,
        EdgePreserving,
        [("image",)], "image"),
    _spec(
        "spot",
        """
        Spot (dot) filter: scale-normalized negative Laplacian of Gaussian, thresholded per
        scale, as the Allen segmenter's ``dot_3d``/``dot_2d_slice_by_slice`` wrappers. For
        puncta, vesicles and other round bright objects.
        """,
        Spot,
        [("image",)], "mask"),
    _spec(
        "filament",
        """
        Filament (vesselness) filter: Hessian-based tubeness, thresholded per scale, as the
        Allen segmenter's ``vesselness3D``/``filament_2d`` wrappers. For fibres in 3D; with
        slice_wise, sheets (membranes) appear as curvilinear lines in each 2D slice.
        """,
        Filament,
        [("image",)], "mask"),
    _spec(
        "threshold",
        """
        Global threshold: voxels above the threshold are foreground. The threshold comes
        from the histogram of the whole image (not per block), then is multiplied by
        ``factor``.
        """,
        [Param("method", "str", "otsu",
               choices=("absolute", "otsu", "triangle", "median", "mean", "ave_tri_med",
                        "multiotsu", "yen", "isodata"),
               doc="absolute uses 'value'; ave_tri_med is the mean of the triangle and "
                   "median thresholds (Allen segmenter); multiotsu uses classes and level."),
         Param("value", "float", None, nullable=True,
               doc="The threshold of method 'absolute' (only allowed with it)."),
         Param("classes", "int", 3, minimum=2, maximum=8,
               doc="multiotsu: number of classes (ignored by other methods)."),
         Param("level", "int", 1, minimum=1,
               doc="multiotsu: which of the classes-1 thresholds to use, 1 = lowest "
                   "(ignored by other methods)."),
         Param("factor", "float", 1.0, minimum=0, exclusive_minimum=True,
               doc="Multiplies the threshold: > 1 is stricter, < 1 more permissive.")],
        [("image",)], "mask", rules=_threshold_rules),
    _spec(
        "masked_object",
        """
        Masked-object threshold (Allen segmenter's ``MO``): a permissive global threshold
        finds objects; in each object larger than object_min_size a local Otsu threshold,
        scaled by local_adjust, refines the mask. For nuclei and cells of uneven brightness.
        """,
        [Param("global_method", "str", "ave_tri_med",
               choices=("triangle", "median", "ave_tri_med"),
               doc="The global (first-pass) threshold."),
         Param("object_min_size", "int", 1200, minimum=0, unit="volume",
               doc="Objects of the first pass smaller than this (voxels) are dropped."),
         Param("local_adjust", "float", 0.98, minimum=0, exclusive_minimum=True,
               doc="Multiplies each object's local Otsu threshold: lower keeps more."),
         _connectivity("Connectivity of the first-pass objects (1: faces ... 3: corners).")],
        [("image",)], "mask"),
    _spec(
        "label",
        "Connected-component labelling of a mask (scikit-image's label).",
        [Param("connectivity", "int", None, minimum=1, maximum=3, nullable=True,
               doc="1: faces, 2: edges, 3: corners; null: full connectivity (all "
                   "neighbours, scikit-image's default)."),
         _slice_wise("the labelling", " Labels stay unique across slices.")],
        [("mask",)], "labels"),
    _spec(
        "size_filter",
        """
        Remove objects smaller than min_size or larger than max_size (voxels). On a mask
        the objects are its connected components; on labels, each label.
        """,
        [Param("min_size", "int", 0, minimum=0, unit="volume",
               doc="Smallest object kept (voxels)."),
         Param("max_size", "int", None, minimum=0, nullable=True, unit="volume",
               doc="Largest object kept (voxels); null: no upper limit."),
         _connectivity("Connectivity of the components of a mask input (ignored for "
                       "labels)."),
         Param("relabel", "bool", False,
               doc="Labels input only: renumber the kept labels 1..n in raster order.")],
        [("mask", "labels")], "same", rules=_size_rules),
    _spec(
        "fill_holes",
        """
        Fill holes of a mask whose size is between min_size and max_size (voxels); a hole is
        a background component not connected to the border.
        """,
        [Param("min_size", "int", 0, minimum=0, unit="volume",
               doc="Smallest hole filled (voxels)."),
         Param("max_size", "int", minimum=0, unit="volume",
               doc="Largest hole filled (voxels); larger holes are kept (e.g. lumens)."),
         _slice_wise("hole filling"),
         _connectivity("Connectivity of the background components (holes).")],
        [("mask",)], "mask", rules=_size_rules),
    _spec(
        "watershed",
        """
        Seeded watershed: grows the marker labels (input 2) over the image (input 1, the
        landscape: low values are flooded first), optionally restricted to a mask (input 3).
        """,
        SeededWatershed,
        [("image",), ("labels",), ("mask",)], "labels", min_inputs=2, max_inputs=3),
    _spec(
        "distance_transform",
        """
        Euclidean distance of each mask voxel to the nearest background voxel, in µm (the
        image's voxel size, per axis), capped at max_distance_um: exactly scipy's
        distance_transform_edt with that sampling, capped. The distance's ridges are the
        centres of objects: seeds for splitting touching ones by watershed.
        """,
        DistanceTransform,
        [("mask",)], "image"),
    _spec(
        "local_maxima",
        """
        Seeds: voxels that are the maximum of an ellipsoid of radius min_distance around
        them (and above min_value). Exact blockwise. Follow with label (connectivity 3) to
        give each seed an id.
        """,
        LocalMaxima,
        [("image",)], "mask"),
    _spec(
        "h_maxima",
        """
        Seeds: regional maxima rising at least h above their surroundings (scikit-image's
        h_maxima). A global reconstruction, computed per block with a halo: agrees with the
        whole-image result where the maxima are decided within the halo. Follow with label.
        """,
        HMaxima,
        [("image",)], "mask"),
    _spec(
        "graph_cut",
        """
        Binary graph cut (min-cut/max-flow) foreground/background segmentation of a
        normalized image in [0, 1]; smooths the decision of a threshold.
        """,
        GraphCut,
        [("image",)], "mask"),
    _spec(
        "combine",
        "Combine masks voxel-wise: or, and, xor, or subtract (first minus the others).",
        [Param("op", "str", choices=("or", "and", "xor", "subtract"),
               doc="The operation, applied left to right over the inputs.")],
        [("mask",)], "mask", min_inputs=2, max_inputs=None),
    _spec(
        "invert",
        """
        Invert: an image is negated (dark structures become bright, e.g. membranes in
        cryo-electron tomograms), a mask is logically negated.
        """,
        [],
        [("image", "mask")], "same"),
    _spec(
        "gamma",
        """
        Gamma adjustment (MISIC's preprocessing): clip(x, 0, 1) ** gamma, as scikit-image's
        adjust_gamma. Expects an image in [0, 1]: put it after normalize or
        clip_percentiles.
        """,
        Gamma,
        [("image",)], "image"),
    _spec(
        "unsharp_mask",
        """
        Unsharp mask (MISIC's preprocessing): x + amount * (x - gaussian(x, radius)), exactly
        scikit-image's unsharp_mask with preserve_range (reflect edges, no clipping);
        sharpens the edges between touching objects.
        """,
        UnsharpMask,
        [("image",)], "image"),
    _spec(
        "shape_index",
        """
        Koenderink's shape index of the Hessian (MISIC's network input), as scikit-image's
        shape_index with reflect edges: -1 dark cup, -0.5 trough, 0 saddle (and flat
        regions, where it is undefined), 0.5 ridge, 1 bright cap. Several scales are
        combined voxel-wise. 2D; a 3D image needs slice_wise.
        """,
        ShapeIndex,
        [("image",)], "image"),
]

STEPS: dict[str, StepSpec] = {spec.id: spec for spec in _STEP_LIST}
"""The step catalogue: function id -> :class:`StepSpec`."""


# --------------------------------------------------------------------------- Step, Workflow


@dataclass(frozen=True)
class Step:
    """A validated step of a workflow.

    Attributes
    ----------
    name : str
        Unique name in the workflow.
    function : str
        Id of the step in :data:`STEPS` (the executor key).
    params : dict of str to Any
        All parameters of the step, validated and normalized, defaults filled in (lists
        as tuples).
    inputs : tuple of str
        Names of the parent steps (or :data:`RAW`), in input order.
    kind : str
        Kind of the output: ``"image"``, ``"mask"`` or ``"labels"``.
    """

    name: str
    function: str
    params: dict[str, Any]
    inputs: tuple[str, ...]
    kind: str

    @property
    def spec(self) -> StepSpec:
        """The catalogue entry of :attr:`function`."""
        return STEPS[self.function]

    @property
    def physical(self) -> dict[str, Param]:
        """The size parameters given in physical units (name as given -> declaration);
        :func:`engine.segment.units.in_voxels` converts them."""
        return {physical_name(p): p for p in self.spec.params.values()
                if p.unit and physical_name(p) in self.params}

    def make_op(self, **computed: Any) -> BlockOp:
        """The block operation of the step, built from :attr:`params` and the ``computed``
        fields (whole-image statistics, properties of the inputs) of its op class.

        Raises
        ------
        KeyError
            If the step runs no block operation (``spec.op`` is ``None``).
        """
        if self.spec.op is None:
            raise KeyError(f"step {self.name!r} ({self.function}) runs no block operation")
        if self.physical:
            raise InputError(f"step {self.name!r} ({self.function}) gives "
                             f"{', '.join(self.physical)} in physical units: convert the "
                             "workflow with the image's voxel size first (units.in_voxels)")
        return build(self.spec.op, self.params, **computed)

    def to_dict(self) -> dict[str, Any]:
        """The step as a YAML-ready mapping (lists instead of tuples)."""
        return {"name": self.name, "function": self.function,
                "parameters": {k: _plain(v) for k, v in self.params.items()},
                "inputs": list(self.inputs)}


@dataclass(frozen=True)
class Workflow:
    """A validated workflow.

    Attributes
    ----------
    name : str
        Name (from the file, else the file stem or preset name).
    description : str or None
        Free text from the file.
    steps : tuple of Step
        All steps in topological order: parents first, otherwise in file order.
    output : str
        Name of the step whose result (a mask or labels) is written.
    source : str
        The file path or the preset name the workflow was loaded from.
    """

    name: str
    description: str | None
    steps: tuple[Step, ...]
    output: str
    source: str
    parameters: dict[str, Any] = field(default_factory=dict)
    """The top-level parameters, overrides applied (already substituted in the steps)."""

    def step(self, name: str) -> Step:
        """The step called ``name``.

        Raises
        ------
        KeyError
            If there is no such step.
        """
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"workflow {self.name!r} has no step {name!r}")

    def kind(self, name: str) -> str:
        """Kind of the value named ``name`` (``"image"`` for :data:`RAW`)."""
        return "image" if name == RAW else self.step(name).kind

    def consumers(self, name: str) -> tuple[str, ...]:
        """Names of the steps that take ``name`` (a step or :data:`RAW`) as an input."""
        return tuple(s.name for s in self.steps if name in s.inputs)

    def to_dict(self) -> dict[str, Any]:
        """The workflow as a mapping that :func:`parse_workflow` loads back unchanged."""
        out = {"name": self.name, "description": self.description,
               "steps": [s.to_dict() for s in self.steps], "output": self.output}
        if self.parameters:
            out["parameters"] = dict(self.parameters)
        return out

    def to_yaml(self) -> str:
        """:meth:`to_dict` as YAML text (all parameters explicit)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- YAML


def _read_yaml(path: Path, source: str) -> Any:
    return read_yaml(path, source, "workflow file")


# --------------------------------------------------------------------------- validation


class _Problems:
    """Collects the problems of one workflow file, each as one line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[tuple[float, str]] = []

    def add(self, message: str, step: _Draft | None = None, *, last: bool = False) -> None:
        """Record a problem of ``step``, of the top level, or (``last``) of the graph."""
        if step is not None:
            self.lines.append((step.index, f"{self.source}: {step.where}: {message}"))
        else:
            self.lines.append((math.inf if last else -1, f"{self.source}: {message}"))

    def raise_if_any(self) -> None:
        """Raise one InputError listing the problems: top level, then per step, then graph."""
        if self.lines:
            ordered = sorted(self.lines, key=lambda line: line[0])  # stable
            raise InputError("\n".join(text for _, text in ordered))


@dataclass
class _Draft:
    """A step entry while it is checked; ``None`` fields could not be determined."""

    index: int  # 0-based position in the file
    where: str  # "step 'name' (function)" or "step #3"
    name: str | None = None
    function: str | None = None
    params: dict[str, Any] | None = None
    inputs: tuple[str, ...] | None = None
    in_graph: bool = True
    kind: str | None = None


def _where(index: int, name: Any, function: Any) -> str:
    label = f"step {name!r}" if isinstance(name, str) else f"step #{index + 1}"
    if isinstance(function, str):
        label += f" ({function})"
    return label


def physical_param(param: Param) -> Param:
    """The declaration of a size parameter given in physical units (``sigma_um``): its
    own name, a number (not only an integer) for a size in voxels, and only the sign of
    its bounds (a bound in voxels, as ``>= 1``, is checked once converted)."""
    positive = param.minimum is not None and (param.minimum > 0 or param.exclusive_minimum)
    return replace(param, name=physical_name(param),
                   type="float" if param.type == "int" else param.type, default=REQUIRED,
                   unit=None,
                   minimum=None if param.minimum is None else 0.0,
                   exclusive_minimum=positive, maximum=None, exclusive_maximum=False)


def _check_params(spec: StepSpec, raw: Any, where: _Draft, problems: _Problems
                  ) -> dict[str, Any] | None:
    """Validated parameters with defaults filled, or ``None`` after reporting problems."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.add(f"'parameters' must be a mapping of name: value, got {show(raw)}",
                     where)
        return None
    ok = True
    values: dict[str, Any] = {}
    physical = {physical_name(p): p for p in spec.params.values() if p.unit}
    for key in raw:
        if key not in spec.params and key not in physical:
            known = ", ".join([*spec.params, *physical]) or "none"
            problems.add(f"unknown parameter {key!r}"
                         f"{suggest(key, [*spec.params, *physical])}; {spec.id} takes: "
                         f"{known}", where)
            ok = False
    in_um = False  # a size given in physical units: its rules wait for the conversion
    for name, param in spec.params.items():
        phys = physical_name(param)
        if phys in raw and name in raw:
            problems.add(f"give {name!r} (voxels) or {phys!r} (physical units), not both",
                         where)
            ok = False
        elif phys in raw:
            try:
                values[phys] = physical_param(param).check(raw[phys])
            except ValueError as exc:
                problems.add(str(exc), where)
                ok = False
            in_um = True
        elif name in raw:
            try:
                values[name] = param.check(raw[name])
            except ValueError as exc:
                problems.add(str(exc), where)
                ok = False
        elif param.required:
            alt = f" or {phys!r}" if phys else ""
            problems.add(f"missing required parameter {name!r}{alt} ({param.type_text()})",
                         where)
            ok = False
        else:
            values[name] = param.default
    if not ok:
        return None
    # sizes in physical units are checked against the rules once converted to voxels
    rule_problems = [] if in_um else spec.check(values)
    for message in rule_problems:
        problems.add(message, where)
    return None if rule_problems else values


def _check_step(index: int, entry: Any, previous: _Draft | None, problems: _Problems
                ) -> _Draft:
    if not isinstance(entry, Mapping):
        draft = _Draft(index, f"step #{index + 1}", in_graph=False)
        problems.add("must be a mapping with 'name' and 'function' keys, got "
                     f"{show(entry)}", draft)
        return draft
    name, function = entry.get("name"), entry.get("function")
    draft = _Draft(index, _where(index, name, function))
    where = draft
    for key in entry:
        if key not in STEP_KEYS:
            problems.add(f"unknown key {key!r}{suggest(key, STEP_KEYS)}; a step has: "
                         f"{', '.join(STEP_KEYS)}", where)
    # name
    if name is None:
        problems.add("missing 'name'", where)
        draft.in_graph = False
    elif not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        problems.add(f"name must be letters, digits, '_' or '-', got {show(name)}", where)
        draft.in_graph = False
    elif name == RAW:
        problems.add(f"name {RAW!r} is reserved for the input image", where)
        draft.in_graph = False
    else:
        draft.name = name
    # function and parameters
    spec = None
    if function is None:
        problems.add(f"missing 'function' (one of: {', '.join(STEPS)})", where)
    elif not isinstance(function, str) or function not in STEPS:
        problems.add(f"unknown function {show(function)}{suggest(function, STEPS)}; "
                     f"functions: {', '.join(STEPS)}", where)
    else:
        spec = STEPS[function]
        draft.function = function
        draft.params = _check_params(spec, entry.get("parameters"), where, problems)
    if spec is None and "parameters" in entry and not isinstance(
            entry["parameters"], Mapping | None):
        problems.add(f"'parameters' must be a mapping of name: value, got "
                     f"{show(entry['parameters'])}", where)
    # inputs
    if "inputs" in entry and entry["inputs"] is not None:
        inputs = entry["inputs"]
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list | tuple) or not all(isinstance(i, str)
                                                           for i in inputs):
            problems.add(f"'inputs' must be a list of step names (or {RAW!r}), got "
                         f"{show(entry['inputs'])}", where)
        else:
            draft.inputs = tuple(inputs)
    elif previous is None:
        draft.inputs = (RAW,)
    elif previous.name is not None and previous.in_graph:
        draft.inputs = (previous.name,)
    if spec is not None and draft.inputs is not None:
        n = len(draft.inputs)
        if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
            problems.add(f"takes {spec.count_text()} ({spec.inputs_text()}), got {n}: "
                         f"{show(list(draft.inputs))}", where)
    return draft


def _find_cycles(graph: dict[str, tuple[str, ...]]) -> list[list[str]]:
    """Cycles of ``graph`` (node -> parents), each once, in data-flow order."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for parent in graph.get(node, ()):
            if parent not in graph:
                continue
            if state.get(parent) == 1:
                loop = stack[stack.index(parent):]
                if frozenset(loop) not in seen:
                    seen.add(frozenset(loop))
                    flow = [parent, *reversed(loop[1:])]
                    cycles.append([*flow, parent])
            elif parent not in state:
                visit(parent)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
    return cycles


def _topological(drafts: list[_Draft]) -> list[_Draft]:
    """Parents first; among steps that are ready, the earliest in the file first."""
    by_name = {d.name: d for d in drafts}
    pending = {d.name: sum(1 for i in (d.inputs or ()) if i in by_name) for d in drafts}
    order: list[_Draft] = []
    ready = sorted((d for d in drafts if pending[d.name] == 0), key=lambda d: d.index)
    while ready:
        current = ready.pop(0)
        order.append(current)
        for d in drafts:
            if current.name in (d.inputs or ()):
                pending[d.name] -= d.inputs.count(current.name)  # type: ignore[union-attr]
                if pending[d.name] == 0:
                    ready.append(d)
        ready.sort(key=lambda d: d.index)
    return order


def parse_overrides(items: Sequence[str], option: str = "--param") -> dict[str, Any]:
    """``KEY=VALUE`` options as a mapping for :func:`parse_workflow`'s ``overrides``;
    values are parsed as YAML (``8``, ``[1, 2, 2]``, ``otsu``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise InputError(f"{option} {item!r}: expected KEY=VALUE, e.g. diameter_um=8 "
                             "(a workflow parameter) or smooth.sigma=2 (STEP.PARAM)")
        out[key] = parse_yaml(text, f"{option} {item!r}")
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def _parameters(data: Mapping[str, Any], overrides: Mapping[str, Any],
                problems: _Problems) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The workflow's top-level parameters with ``overrides`` applied, and the overrides
    of step parameters (``STEP.PARAM``) by step name."""
    declared_values = data.get("parameters") or {}
    values: dict[str, Any] = {}
    if not isinstance(declared_values, Mapping):
        problems.add(f"'parameters' must be a mapping of name: number, got "
                     f"{show(declared_values)}")
        declared_values = {}
    for key, value in declared_values.items():
        if not isinstance(key, str) or not key.isidentifier():
            problems.add(f"parameter name {show(key)} must be a name (letters, digits, '_')")
        elif not _finite_number(value):
            problems.add(f"parameter {key!r} must be a finite number, got {show(value)}")
        else:
            values[key] = value
    per_step: dict[str, dict[str, Any]] = {}
    step_names = [e.get("name") for e in data.get("steps") or []
                  if isinstance(e, Mapping) and isinstance(e.get("name"), str)]
    for key, value in overrides.items():
        if "." in key:
            step, _, name = key.partition(".")
            if step not in step_names:
                problems.add(f"--param {key}: no step {step!r}{suggest(step, step_names)} "
                             f"(steps: {', '.join(step_names)})")
            else:
                per_step.setdefault(step, {})[name] = value
        elif key not in values:
            known = ", ".join(values) or "none"
            problems.add(f"--param {key}: no such workflow parameter"
                         f"{suggest(key, values)} (parameters: {known}; set a step's "
                         f"parameter as STEP.PARAM=VALUE)")
        elif not _finite_number(value):
            problems.add(f"--param {key}: must be a finite number, got {show(value)}")
        else:
            values[key] = value
    return values, per_step


def _substituted(entry: Any, index: int, names: Mapping[str, Any],
                 overrides: Mapping[str, dict[str, Any]], problems: _Problems) -> Any:
    """The step ``entry`` with its overrides applied and its expressions evaluated."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("parameters") or {},
                                                        Mapping):
        return entry
    params = dict(entry.get("parameters") or {})
    params.update(overrides.get(entry.get("name"), {}))
    for key, value in params.items():
        try:
            params[key] = substitute(value, names)
        except ValueError as exc:
            problems.add(f"parameter {key!r}: {exc}", _Draft(
                index, _where(index, entry.get("name"), entry.get("function"))))
    return {**entry, "parameters": params}


def parse_workflow(data: Any, source: str = "<workflow>", *,
                   image_output: bool = False,
                   overrides: Mapping[str, Any] | None = None) -> Workflow:
    """Validate a workflow mapping (as loaded from YAML) completely.

    Parameters
    ----------
    data : Any
        The loaded document; must be a mapping with a ``steps`` list.
    source : str
        The file path or preset name, used in messages and as :attr:`Workflow.source`.
    image_output : bool
        Also accept an output step that produces an image (``voxelmill preprocess``);
        by default the output must produce a mask or labels.
    overrides : mapping of str to Any, optional
        ``--param KEY=VALUE`` values: ``KEY`` a top-level parameter (``diameter_um``),
        or ``STEP.PARAM`` a step parameter (``smooth.sigma``).

    Returns
    -------
    Workflow
        The validated workflow, steps in topological order, expressions evaluated.

    Raises
    ------
    InputError
        Listing every problem found, one per line, each naming ``source`` and, where it
        applies, the step, the parameter and the offending value.
    """
    problems = _Problems(source)
    if data is None:
        problems.add("the workflow is empty; it needs a 'steps' list")
        problems.raise_if_any()
    if not isinstance(data, Mapping):
        problems.add(f"the top level must be a mapping with a 'steps' list, got "
                     f"{type_name(data)}")
        problems.raise_if_any()
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.add(f"unknown top-level key {show(key)}{suggest(key, TOP_LEVEL_KEYS)}; "
                         f"allowed: {', '.join(TOP_LEVEL_KEYS)}")
    name = data.get("name")
    if name is not None and not isinstance(name, str):
        problems.add(f"'name' must be a string, got {show(name)}")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        problems.add(f"'description' must be a string, got {show(description)}")
    entries = data.get("steps")
    if entries is None:
        problems.add("missing 'steps': a list of steps, each with 'name' and 'function'")
        problems.raise_if_any()
    if not isinstance(entries, list):
        problems.add(f"'steps' must be a list of steps, got {type_name(entries)}")
        problems.raise_if_any()
    if not entries:
        problems.add("'steps' is empty; a workflow needs at least one step")
        problems.raise_if_any()

    parameters, step_overrides = _parameters(data, overrides or {}, problems)
    entries = [_substituted(entry, index, parameters, step_overrides, problems)
               for index, entry in enumerate(entries)]
    drafts: list[_Draft] = []
    for index, entry in enumerate(entries):
        drafts.append(_check_step(index, entry, drafts[-1] if drafts else None, problems))

    # duplicate names: only the first step of a name joins the graph
    first_of: dict[str, _Draft] = {}
    for d in drafts:
        if d.name is None or not d.in_graph:
            continue
        if d.name in first_of:
            problems.add(f"duplicate step name {d.name!r} (also step "
                         f"#{first_of[d.name].index + 1})", d)
            d.in_graph = False
        else:
            first_of[d.name] = d
    nodes = [d for d in drafts if d.in_graph and d.name is not None]
    defined = {d.name for d in drafts if d.name is not None} | {RAW}

    # undefined inputs
    graph_ok = all(d.inputs is not None for d in nodes)
    for d in drafts:
        for parent in d.inputs or ():
            if parent not in defined:
                graph_ok = False
                problems.add(f"input {parent!r} names no step"
                             f"{suggest(parent, sorted(defined))} (inputs are step names "
                             f"or {RAW!r})", d)

    # cycles
    graph = {d.name: d.inputs or () for d in nodes}
    cyclic: set[str] = set()
    for cycle in _find_cycles(graph):  # type: ignore[arg-type]
        cyclic.update(cycle)
        graph_ok = False
        problems.add("the step inputs form a cycle: " + " -> ".join(cycle), last=True)

    # kinds along the edges, parents first
    acyclic = [d for d in nodes if d.name not in cyclic]
    kinds: dict[str, str | None] = {RAW: "image"}
    for d in _topological(acyclic):
        if d.function is None or d.inputs is None:
            kinds[d.name] = None  # type: ignore[index]
            continue
        spec = STEPS[d.function]
        input_kinds = [kinds.get(p) for p in d.inputs]
        for position, (parent, kind) in enumerate(zip(d.inputs, input_kinds, strict=True)):
            if kind is None:
                continue
            if spec.max_inputs is not None and position >= spec.max_inputs:
                break
            accepted = spec.accepts(position)
            if kind not in accepted:
                problems.add(f"input {position + 1} {parent!r} is {_kind_phrase(kind)}, but "
                             f"{spec.id} expects {_kinds_phrase(accepted)} there", d)
        d.kind = spec.output_kind(input_kinds)
        if (d.function == "size_filter" and d.params is not None and d.params["relabel"]
                and d.kind == "mask"):
            problems.add("parameter 'relabel' applies to labels input only, but the input "
                         "is a mask; add a 'label' step first or set relabel: false", d)
        kinds[d.name] = d.kind  # type: ignore[index]

    # output
    output = data.get("output")
    output_draft: _Draft | None = None
    if output is None:
        last = drafts[-1]
        output_draft = last if last.in_graph and last.name is not None else None
        output = last.name
    elif not isinstance(output, str):
        problems.add(f"'output' must be a step name, got {show(output)}", last=True)
    elif output == RAW:
        problems.add(f"'output' must produce a mask or labels, but {RAW!r} is the input "
                     "image", last=True)
    elif output not in first_of:
        problems.add(f"'output' names an unknown step {output!r}"
                     f"{suggest(output, list(first_of))}", last=True)
    else:
        output_draft = first_of[output]
    if output_draft is not None:
        if output_draft.kind == "image" and not image_output:
            problems.add(f"the output {output_draft.name!r} ({output_draft.function}) "
                         "produces an image; the output must produce a mask or labels "
                         "(add a threshold or filter step, or set 'output')", last=True)
        # steps the output does not depend on
        used: set[str] = set()
        todo = [output_draft.name]
        while todo:
            current = todo.pop()
            if current in used or current not in first_of:
                continue
            used.add(current)
            todo.extend(first_of[current].inputs or ())
        if graph_ok:  # else the unused steps may only be the echo of another problem
            for d in nodes:
                if d.name not in used:
                    problems.add(f"not used by the output {output_draft.name!r}; remove the "
                                 "step, use it as an input, or set 'output'", d)

    problems.raise_if_any()
    steps = tuple(
        Step(name=d.name, function=d.function, params=d.params, inputs=d.inputs,  # type: ignore[arg-type]
             kind=d.kind)  # type: ignore[arg-type]
        for d in _topological(nodes))
    if name is None:
        name = Path(source).stem or "workflow"
    return Workflow(name=name, description=description, steps=steps, output=output,
                    source=source, parameters=parameters)


# --------------------------------------------------------------------------- presets

PRESETS: dict[str, str] = {
    "membrane": "Membranes and sheets in cryo-electron tomograms: invert, normalize, "
                "edge-preserving smoothing, slice-wise filament filter, label.",
    "spot": "Puncta and small round objects: normalize, gaussian, spot filter, label.",
    "filament": "Fibres and tubes: normalize, edge-preserving smoothing, 3D filament "
                "filter, label.",
    "nucleus": "Nuclei and cells: percentile clip, gaussian, masked-object threshold, "
               "fill holes, label.",
    "threshold": "The simplest: gaussian, Otsu threshold, label, size filter.",
    "nucleus-3d": "Touching nuclei in 3D: gaussian, Otsu, distance transform, local-maxima "
                  "seeds, watershed; every size from one parameter, diameter_um.",
    "filament-dark": "Dark fibres (microtubules in an electron tomogram): normalize, "
                     "edge-preserving smoothing, 3D filament filter with polarity dark.",
    "allen-cetn2": "Allen CETN2 (centrioles, spots): normalize [8000], slice-wise gaussian, "
                   "3D spot filter, label.",
    "allen-tuba1b": "Allen TUBA1B (microtubules, filaments): normalize [1.5, 8], "
                    "edge-preserving smoothing, 3D filament filter, label.",
    "allen-lmnb1": "Allen LMNB1 (nuclear envelope, shells): normalize [4000], gaussian, "
                   "slice-wise 2D filament filter at 3 scales, label.",
}
"""Packaged workflows: preset name -> one-line description."""


def preset_path(name: str) -> Path:
    """Path of the packaged YAML file of preset ``name``.

    Raises
    ------
    InputError
        If ``name`` is not in :data:`PRESETS`.
    """
    if name not in PRESETS:
        raise InputError(f"unknown workflow preset {name!r}{suggest(name, PRESETS)}; "
                         f"presets: {', '.join(PRESETS)}")
    return _PRESET_DIR / f"{name}.yaml"


def load_workflow(spec: str | Path, *, image_output: bool = False,
                  overrides: Mapping[str, Any] | None = None) -> Workflow:
    """Load and validate a workflow file or a preset.

    Parameters
    ----------
    spec : str or Path
        Path of an existing YAML file, else the name of a preset (:data:`PRESETS`).
    image_output, overrides
        As :func:`parse_workflow`.

    Returns
    -------
    Workflow
        The validated workflow; :attr:`Workflow.source` is the path as given or the
        preset name.

    Raises
    ------
    InputError
        If ``spec`` is neither an existing file nor a preset, or the file is unreadable or
        invalid (every problem of the file is listed).
    """
    path = Path(spec)
    if path.is_file():
        return parse_workflow(_read_yaml(path, str(spec)), str(spec),
                              image_output=image_output, overrides=overrides)
    text = str(spec)
    if text in PRESETS:
        return parse_workflow(_read_yaml(preset_path(text), text), text,
                              image_output=image_output, overrides=overrides)
    if path.exists():
        raise InputError(f"{spec}: the workflow must be a YAML file, not a directory")
    looks_like_file = path.suffix.lower() in (".yaml", ".yml") or len(path.parts) > 1
    what = "workflow file not found" if looks_like_file else "neither a workflow file nor a preset"
    raise InputError(f"{spec}: {what}{suggest(text, PRESETS)}; presets: "
                     f"{', '.join(PRESETS)}")


# --------------------------------------------------------------------------- help


def describe_steps() -> str:
    """Help text of the catalogue: every step, its inputs, output and parameters."""
    lines = ["Workflow steps (function ids). Kinds: image (float), mask (bool), labels.",
             "Sizes in voxels may be given in physical units instead (NAME_um, NAME_um3), "
             "converted with the image's voxel size; a value may be an expression of the "
             "workflow's parameters (\"=0.25 * diameter_um\").", ""]
    for spec in STEPS.values():
        output = "same kind" if spec.output == "same" else spec.output
        lines.append(f"{spec.id}: {spec.inputs_text()} -> {output}")
        for line in spec.doc.splitlines():
            lines.append(f"    {line.strip()}" if line.strip() else "")
        for param in spec.params.values():
            default = "required" if param.required else f"default {show(param.default)}"
            details = [param.type_text()]
            if param.range_text():
                details.append(param.range_text())
            if param.unit:
                unit = "µm" if param.unit == "length" else "µm³"
                details.append(f"or {physical_name(param)} in {unit}")
            details.append(default)
            lines.append(f"  - {param.name}: {'; '.join(details)}")
            if param.doc:
                lines.extend(textwrap.wrap(param.doc, 92, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
