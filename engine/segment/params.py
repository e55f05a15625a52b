"""Step parameters, declared once: type, default, allowed range and documentation.

A :class:`Param` describes one parameter of a workflow step. The parameters of a step
that runs a block operation are declared on the operation's own dataclass fields
(:func:`param`), so the workflow validation, ``voxelmill segment --list-steps`` and the
executor, which builds the operation from the validated values (:func:`build`), all read
the one declaration, and the operation checks the same rules when it is built from Python
(:func:`check_declared`). Fields that the executor fills in from whole-image statistics or
from the step's inputs are marked :func:`computed`.

Two phrasings of one rule: :meth:`Param.check` reports a value of a workflow file as the
user wrote it in YAML (``parameter 'sigma' must be > 0, got -1``);
:meth:`Param.convert` reports an argument of a Python call, ``repr`` and all
(``gaussian sigma must be a finite number > 0, got -1.0``), as an
:class:`~engine.errors.OptionError`.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from engine.errors import OptionError

__all__ = [
    "PARAM_TYPES", "REQUIRED", "UNITS", "Param", "Sigma", "build", "check_declared", "computed",
    "declared", "field_names", "param", "physical_name", "show", "slice_wise_doc", "suggest",
    "type_name", "undeclared_fields",
]

PARAM_TYPES = ("float", "int", "bool", "str", "floats", "scales", "float_or_floats")
"""Types a :class:`Param` may declare."""

UNITS: dict[str | None, str] = {None: "", "length": "_um", "volume": "_um3"}
"""Physical kinds of a size parameter -> suffix of its physical-unit name."""

# a length may differ per axis on anisotropic voxels: one value per axis, or the largest
# (an integer halo); a volume is one number
_UNIT_TYPES = {"length": ("int", "float_or_floats", "scales"), "volume": ("int", "float")}


def physical_name(spec: Param) -> str | None:
    """The name under which a workflow gives ``spec`` in µm (``sigma_um``) or µm³
    (``min_size_um3``); ``None`` when the parameter is no size."""
    return spec.name + UNITS[spec.unit] if spec.unit else None


class _Required:
    """Type of the :data:`REQUIRED` sentinel."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Default of a parameter that has none: the workflow must give a value."""


# --------------------------------------------------------------------------- formatting



def show(value: Any) -> str:
    """A value as the user wrote it in YAML (``null``, ``true``, ``'text'``, ``[1, 2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{show(k)}: {show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _num(x: float) -> str:
    """A bound, compactly (``0``, ``0.25``, ``1e-06``)."""
    return f"{x:g}"


def type_name(value: Any) -> str:
    """What kind of YAML value ``value`` is, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def suggest(word: Any, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _one_of(choices: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in choices)



def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A number as Python code passes one: NumPy scalars too, never a boolean."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool)


def _items(value: Any) -> tuple[Any, ...] | None:
    """The elements of a list, tuple or array; ``None`` for anything else (a string too)."""
    return tuple(value) if isinstance(value, Sequence | np.ndarray) and not isinstance(
        value, str | bytes) else None


Sigma = float | tuple[float, ...]
"""A Gaussian sigma: one value for every filtered axis, or one per filtered axis."""


def _sigma(value: Any) -> Sigma | None:
    """A sigma as written (a number, or a list of numbers one per axis), all finite and
    > 0, as a float or a tuple of floats; ``None`` if it is not one."""
    values = _items(value)
    if values is None:
        values = (value,)
    if not values or not all(_is_real(v) for v in values):
        return None
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) and v > 0 for v in out):
        return None
    return out if _items(value) is not None else out[0]


def _scale_pairs(items: Sequence[Any], subject: str, shown: Callable[[Any], str],
                 error: type[Exception], hint: str = "") -> tuple[tuple[Sigma, float], ...]:
    """``[sigma, cutoff]`` pairs as tuples: sigma > 0 (a number, or a list of numbers one
    per filtered axis), cutoff >= 0, all finite.

    Raises ``error`` naming ``subject``, the item and the value (as ``shown`` writes it).
    """
    pairs = []
    for i, item in enumerate(items):
        pair = _items(item)
        if pair is None or len(pair) != 2 or not _is_real(pair[1]) or not (
                _is_real(pair[0]) or _items(pair[0]) is not None):
            raise error(f"{subject} item {i + 1} must be a [sigma, cutoff] pair of numbers "
                        f"(sigma may be a list, one per axis), got {shown(item)}{hint}")
        sigma, cutoff = _sigma(pair[0]), float(pair[1])
        if sigma is None:
            raise error(f"{subject} item {i + 1}: sigma must be > 0, got {shown(pair[0])}")
        if not (math.isfinite(cutoff) and cutoff >= 0):
            raise error(f"{subject} item {i + 1}: cutoff must be >= 0, got {shown(pair[1])}")
        pairs.append((sigma, cutoff))
    return tuple(pairs)


def slice_wise_doc(what: str = "the filter", note: str = "") -> str:
    """The doc of a step's ``slice_wise`` parameter, applying ``what`` per 2D slice."""
    return (f"Apply {what} to each 2D slice (last two axes) separately instead of in 3D; "
            f"for anisotropic data or 2D-like structures.{note}")


# --------------------------------------------------------------------------- Param


@dataclass(frozen=True)
class Param:
    """One parameter of a step: type, default, allowed range and documentation.

    Attributes
    ----------
    name : str
        Key in the step's ``parameters`` mapping.
    type : str
        One of :data:`PARAM_TYPES`: ``"float"`` (an int is accepted and converted),
        ``"int"`` (a bool is *not* an int), ``"bool"``, ``"str"``, ``"floats"`` (a list of
        numbers), ``"scales"`` (a list of ``[sigma, cutoff]`` pairs, ``sigma > 0``,
        ``cutoff >= 0``) or ``"float_or_floats"`` (a number, or a list of numbers, e.g. one
        per axis).
    default : Any
        Value used when the workflow omits the parameter, already normalized (lists as
        tuples); :data:`REQUIRED` when the workflow must give one.
    minimum, maximum : float or None
        Bounds of the value (of every element, for list types); ``None``: unbounded.
    exclusive_minimum, exclusive_maximum : bool
        Whether the bound itself is excluded.
    choices : tuple of str or None
        Allowed values of a ``"str"`` parameter.
    nullable : bool
        Whether ``null`` is allowed (it means "not set"; see the doc of the parameter).
    lengths : tuple of int or None
        Allowed lengths of a ``"floats"`` list; ``None``: any non-empty length.
    doc : str
        One or two sentences: meaning, unit, when to change it.
    unit : str or None
        ``"length"`` or ``"volume"`` for a size in voxels that a workflow may also give in
        physical units, as ``NAME_um`` (a length in µm) or ``NAME_um3`` (a volume in µm³);
        see :func:`physical_name` and :mod:`engine.segment.units`. ``None``: voxels only
        (or no size at all).
    """

    name: str
    type: str
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    lengths: tuple[int, ...] | None = None
    doc: str = ""
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"unknown parameter type {self.type!r}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown parameter unit {self.unit!r}")
        if self.unit and self.type not in _UNIT_TYPES[self.unit]:
            raise ValueError(f"a {self.unit} takes one of {_UNIT_TYPES[self.unit]}, not "
                             f"{self.type!r}")
        if self.default is not REQUIRED:
            object.__setattr__(self, "default", self.check(self.default))

    @property
    def required(self) -> bool:
        """Whether the workflow must give a value (there is no default)."""
        return self.default is REQUIRED

    # ------------------------------------------------------------------ descriptions

    def range_text(self) -> str:
        """The allowed range, e.g. ``"> 0"``, ``"in (0, 1]"``, ``"in [1, 3]"``, or ``""``."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            left = "(" if self.exclusive_minimum else "["
            right = ")" if self.exclusive_maximum else "]"
            return f"in {left}{_num(lo)}, {_num(hi)}{right}"
        if lo is not None:
            return f"{'>' if self.exclusive_minimum else '>='} {_num(lo)}"
        if hi is not None:
            return f"{'<' if self.exclusive_maximum else '<='} {_num(hi)}"
        return ""

    def type_text(self) -> str:
        """The expected value in words, e.g. ``"a list of 1, 2 or 4 numbers"``."""
        if self.type == "float":
            text = "a number"
        elif self.type == "int":
            text = "an integer"
        elif self.type == "bool":
            text = "true or false"
        elif self.type == "str":
            text = f"one of {_one_of(self.choices)}" if self.choices else "a string"
        elif self.type == "floats":
            if self.lengths:
                counts = [str(n) for n in self.lengths]
                count = counts[0] if len(counts) == 1 else (
                    ", ".join(counts[:-1]) + " or " + counts[-1])
                text = f"a list of {count} numbers"
            else:
                text = "a non-empty list of numbers"
        elif self.type == "scales":
            text = ("a list of [sigma, cutoff] pairs, e.g. [[1, 0.04]] (sigma may be one "
                    "number per axis, e.g. [[[0.5, 1, 1], 0.04]])")
        else:
            text = "a number or a list of numbers (one per axis)"
        if self.nullable:
            text += " or null"
        return text

    # ------------------------------------------------------------------ validation

    def _fail(self, what: str, value: Any) -> ValueError:
        return ValueError(f"parameter {self.name!r} must be {what}, got {show(value)}")

    def _outside(self, x: float) -> bool:
        """Whether the number ``x`` lies outside the declared range."""
        lo, hi = self.minimum, self.maximum
        return bool((lo is not None and (x <= lo if self.exclusive_minimum else x < lo))
                    or (hi is not None and (x >= hi if self.exclusive_maximum else x > hi)))

    def _bounded(self, x: float, value: Any, item: str = "") -> None:
        """Raise if the number ``x`` (``value`` as written) is out of range."""
        if not math.isfinite(x):
            raise ValueError(
                f"parameter {self.name!r}{item} must be a finite number, got {show(value)}")
        if self._outside(x):
            raise ValueError(
                f"parameter {self.name!r}{item} must be {self.range_text()}, got {show(value)}")

    def _number(self, value: Any, item: str = "") -> float:
        if not _is_number(value):
            raise ValueError(f"parameter {self.name!r}{item} must be a number, got "
                             f"{show(value)} ({type_name(value)})")
        self._bounded(float(value), value, item)
        return float(value)

    def _numbers(self, value: Any) -> tuple[float, ...]:
        return tuple(self._number(v, f" item {i + 1}") for i, v in enumerate(value))

    def check(self, value: Any) -> Any:
        """Validate ``value`` and return it normalized.

        Parameters
        ----------
        value : Any
            The value as loaded from YAML.

        Returns
        -------
        Any
            ``float`` for ``"float"`` (ints converted), ``int``, ``bool``, ``str``, tuples of
            floats for list types and a tuple of ``(sigma, cutoff)`` tuples for
            ``"scales"``; ``None`` for ``null`` when :attr:`nullable`.

        Raises
        ------
        ValueError
            With a message naming the parameter, the expectation and the value, e.g.
            ``parameter 'sigma' must be > 0, got -1``.
        """
        if value is None:
            if self.nullable:
                return None
            raise self._fail(self.type_text(), value)
        kind = self.type
        if kind == "float":
            if not _is_number(value):
                raise ValueError(f"parameter {self.name!r} must be {self.type_text()}, got "
                                 f"{show(value)} ({type_name(value)})")
            self._bounded(float(value), value)
            return float(value)
        if kind == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"parameter {self.name!r} must be {self.type_text()}, got "
                                 f"{show(value)} ({type_name(value)})")
            self._bounded(value, value)
            return int(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self._fail("true or false", value)
            return value
        if kind == "str":
            if not isinstance(value, str):
                raise self._fail(self.type_text(), value)
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"parameter {self.name!r} must be one of "
                                 f"{_one_of(self.choices)}, got {show(value)}"
                                 f"{suggest(value, self.choices)}")
            return value
        if kind == "floats":
            if not isinstance(value, list | tuple) or not value:
                raise self._fail(self.type_text(), value)
            if self.lengths is not None and len(value) not in self.lengths:
                raise ValueError(f"parameter {self.name!r} must be {self.type_text()}, got "
                                 f"{len(value)}: {show(value)}")
            return self._numbers(value)
        if kind == "float_or_floats":
            if _is_number(value):
                return self._number(value)
            if not isinstance(value, list | tuple) or not value:
                raise self._fail(self.type_text(), value)
            return self._numbers(value)
        # scales
        if not isinstance(value, list | tuple) or not value:
            raise self._fail(self.type_text(), value)
        return _scale_pairs(value, f"parameter {self.name!r}", show, ValueError,
                            " (write a list of pairs, e.g. [[1, 0.04]])")

    def convert(self, value: Any, subject: str) -> Any:
        """Validate an argument of a Python call and return it normalized as :meth:`check`.

        The rules are those of :meth:`check`; NumPy scalars and arrays are accepted where
        numbers and lists are.

        Parameters
        ----------
        value : Any
            The argument, e.g. a field of an operation being constructed.
        subject : str
            What the message calls the value, e.g. ``"gaussian sigma"``.

        Raises
        ------
        OptionError
            Naming ``subject``, the expectation and ``repr(value)``.
        """

        def fail(expected: str) -> OptionError:
            return OptionError(f"{subject} must be {expected}, got {value!r}")

        if value is None:
            if self.nullable:
                return None
            raise fail(f"set ({self.type_text()})")
        kind = self.type
        if kind == "bool":
            if not isinstance(value, bool | np.bool_):
                raise fail("true or false")
            return bool(value)
        if kind == "str":
            if not isinstance(value, str) or (self.choices is not None
                                              and value not in self.choices):
                raise fail(f"one of {', '.join(self.choices)}" if self.choices else "a string")
            return value
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise fail("an integer")
            if self._outside(int(value)):
                raise fail(self.range_text())
            return int(value)
        if kind == "float" or (kind == "float_or_floats" and _is_real(value)):
            return self._convert_number(value, subject)
        items = _items(value)
        if kind == "scales":
            return self._convert_scales(items, value, subject)
        if items is None:
            raise fail("a number or a sequence of numbers" if kind == "float_or_floats"
                       else "a sequence of numbers")
        if not items:
            raise OptionError(f"{subject} must not be empty")
        if self.lengths is not None and len(items) not in self.lengths:
            raise fail(self.type_text().replace("a list of", "a sequence of"))
        return tuple(self._convert_number(v, f"{subject} item {i + 1}")
                     for i, v in enumerate(items))

    def _convert_number(self, value: Any, subject: str) -> float:
        if not _is_real(value):
            raise OptionError(f"{subject} must be a number, got {value!r}")
        x = float(value)
        if not math.isfinite(x) or self._outside(x):
            expected = f"a finite number {self.range_text()}" if self.range_text() else "finite"
            raise OptionError(f"{subject} must be {expected}, got {value!r}")
        return x

    def _convert_scales(self, items: tuple[Any, ...] | None, value: Any, subject: str
                        ) -> tuple[tuple[Sigma, float], ...]:
        if items is None:
            raise OptionError(f"{subject} must be a sequence of [sigma, cutoff] pairs, "
                              f"got {value!r}")
        if not items:
            raise OptionError(f"{subject} needs at least one [sigma, cutoff] pair, got {value!r}")
        return _scale_pairs(items, subject, repr, OptionError)


# --------------------------------------------------------------------------- declarations
#
# A block operation declares its step parameters on its dataclass fields:
#
#     @dataclass(frozen=True)
#     class Gaussian(BlockOp):
#         sigma: float | tuple[float, ...] = param("float_or_floats", minimum=0, ...)
#         truncate: float = param("float", 4.0, minimum=0, exclusive_minimum=True, doc=...)
#
# The field's name is the parameter's name unless ``name`` says otherwise (``halo`` in a
# workflow is ``halo_size`` on an op, whose ``halo()`` method is taken).

_PARAM = "voxelmill.param"
_COMPUTED = "voxelmill.computed"
_SAME: Any = object()


def param(type: str, default: Any = REQUIRED, *, doc: str, name: str = "",
          step_default: Any = _SAME, minimum: float | None = None,
          maximum: float | None = None, exclusive_minimum: bool = False,
          exclusive_maximum: bool = False, choices: tuple[str, ...] | None = None,
          nullable: bool = False, lengths: tuple[int, ...] | None = None,
          unit: str | None = None) -> Any:
    """A dataclass field that is a step parameter; the arguments are those of :class:`Param`.

    Parameters
    ----------
    type, default, doc
        As :class:`Param`; ``default`` is also the field's default (normalized), and a
        :data:`REQUIRED` parameter is a field without default.
    minimum, maximum, exclusive_minimum, exclusive_maximum, choices, nullable, lengths, unit
        As :class:`Param`.
    name : str
        The parameter's name in workflow files; default: the field's name.
    step_default : Any
        A workflow default that differs from the Python default (``default``).

    Returns
    -------
    dataclasses.Field
    """
    spec = Param(name, type, default if step_default is _SAME else step_default,
                 minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                 exclusive_maximum=exclusive_maximum, choices=choices, nullable=nullable,
                 lengths=lengths, doc=doc, unit=unit)
    # the field's default, normalized as the step's (ints to floats, lists to tuples)
    default = spec.default if step_default is _SAME else replace(spec, default=default).default
    if default is REQUIRED:
        return field(metadata={_PARAM: spec})
    return field(default=default, metadata={_PARAM: spec})


def computed(default: Any = None) -> Any:
    """A dataclass field that is no step parameter: the executor fills it in from a
    whole-image statistic or from the step's inputs."""
    return field(default=default, metadata={_COMPUTED: True})


@functools.cache
def _declarations(cls: type) -> tuple[tuple[str, Param], ...]:
    """``(field name, parameter)`` of each declared field of ``cls``, in field order."""
    return tuple((f.name, replace(f.metadata[_PARAM], name=f.metadata[_PARAM].name or f.name))
                 for f in fields(cls) if _PARAM in f.metadata)


def declared(cls: type) -> dict[str, Param]:
    """The step parameters declared on the fields of ``cls``: name -> :class:`Param`."""
    return {p.name: p for _, p in _declarations(cls)}


def undeclared_fields(cls: type) -> list[str]:
    """Fields of ``cls`` that are neither a declared parameter nor :func:`computed`."""
    return [f.name for f in fields(cls)
            if _PARAM not in f.metadata and _COMPUTED not in f.metadata]


def field_names(cls: type) -> dict[str, str]:
    """Parameter name -> name of the field of ``cls`` that declares it."""
    return {p.name: attr for attr, p in _declarations(cls)}


def build(cls: type, values: Mapping[str, Any], **computed_values: Any) -> Any:
    """``cls`` built from validated step parameters (by parameter name) and the fields
    the executor computed."""
    names = field_names(cls)
    return cls(**{names[k]: v for k, v in values.items()}, **computed_values)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def check_declared(obj: Any) -> None:
    """Check and normalize the declared fields of the frozen dataclass ``obj`` in place.

    Raises
    ------
    OptionError
        For the first field that breaks its declaration, e.g. ``graph_cut prior must be
        a finite number in (0, 1), got 1.0``.
    """
    owner = _snake(type(obj).__name__)
    for attr, spec in _declarations(type(obj)):
        object.__setattr__(obj, attr, spec.convert(getattr(obj, attr), f"{owner} {attr}"))
