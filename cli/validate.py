"""The one set of option validators every ``voxelmill`` command goes through.

:func:`validate_app` wraps every command of the typer app so that, after typer has parsed
the command line and before the command body runs (so before any file is read, any
folder, lock or partial output is made and any cluster starts), each option value is
checked: every float option must be finite, and each option named in :data:`RULES` (or,
for a name that means different things in different commands, :data:`COMMAND_RULES`)
must pass its rule. A refusal is one line naming the option and the value, exit code 2.
With ``--scheduler``, every path argument then reaches the command made absolute: the
workers of a cluster started in another folder open what they are given in theirs.

Shape and number-list options stay strings on the command line (``--tile 64,128,128``);
their rules parse them with :func:`cli.common.ints` / :func:`cli.common.floats`, the
parsers the commands use, so the check and the use agree.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from cli.common import floats, ints, user_errors
from engine.errors import OptionError

#: A rule: ``check(value, flag)`` raises :class:`OptionError` naming ``flag``.
Rule = Callable[[Any, str], None]

#: The most voxels one patch, tile or crop may hold: each is held whole in a worker's (or
#: a GPU's) memory, so a larger one is a typing error, not a request (2³⁰ float32 voxels
#: are 4 GiB).
MAX_WINDOW_VOXELS = 2**30

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
               "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10,
               "mib": 2**20, "gib": 2**30, "tib": 2**40}


def finite(value: Any, flag: str) -> None:
    """Refuse NaN and ±inf."""
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{flag} {value}: expected a finite number")


def at_least(low: float) -> Rule:
    """A number ``>= low`` (a text value, e.g. a channel name, is the command's to check)."""
    def check(value: Any, flag: str) -> None:
        if isinstance(value, str):
            return
        finite(value, flag)
        if value < low:
            raise OptionError(f"{flag} {value}: must be at least {low:g}")
    return check


def positive(value: Any, flag: str) -> None:
    """A number ``> 0``."""
    if isinstance(value, str):
        return
    finite(value, flag)
    if value <= 0:
        raise OptionError(f"{flag} {value}: must be positive (greater than 0)")


def between(low: float, high: float, *, high_open: bool = False) -> Rule:
    """A number in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    def check(value: Any, flag: str) -> None:
        if isinstance(value, str):
            return
        finite(value, flag)
        if value < low or value > high or (high_open and value == high):
            interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
            raise OptionError(f"{flag} {value}: must lie in {interval}")
    return check


def shape(*, minimum: int = 1, max_voxels: int | None = None) -> Rule:
    """Whole numbers separated by commas, each ``>= minimum``; their product (one value
    stands for every axis, so up to its cube) at most ``max_voxels``."""
    def check(value: Any, flag: str) -> None:
        values = ints(str(value), flag) or ()
        if not values:
            raise OptionError(f"{flag} {value!r}: expected whole numbers separated by commas")
        low = [v for v in values if v < minimum]
        if low:
            raise OptionError(f"{flag} {value}: each value must be at least {minimum}")
        voxels = math.prod(values) if len(values) > 1 else values[0] ** 3
        if max_voxels is not None and voxels > max_voxels:
            raise OptionError(f"{flag} {value}: {voxels:.3g} voxels per window; at most "
                              f"{max_voxels:.3g} fit in memory, choose a smaller size")
    return check


def numbers(value: Any, flag: str) -> None:
    """Finite numbers separated by commas (their meaning is checked by the engine)."""
    floats(str(value), flag)


def memory_size(value: Any, flag: str) -> None:
    """A memory limit as Dask takes it: ``auto``, bytes, a fraction of the machine's memory
    (at most 1) or a number with a unit (``4GiB``, ``500MB``)."""
    text = str(value).strip()
    if text.lower() == "auto":
        return
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", text)
    if m is None or m.group(2).lower() not in _BYTE_UNITS:
        raise OptionError(f"{flag} {text!r}: expected a memory size such as 4GiB, 500MB or "
                          "auto")
    number = float(m.group(1))
    if not math.isfinite(number) or number <= 0:
        raise OptionError(f"{flag} {text!r}: must be greater than 0")
    if not m.group(2) and number > 1 and number != int(number):
        raise OptionError(f"{flag} {text!r}: a size in bytes is a whole number")


def axes(value: Any, flag: str) -> None:
    """Axis letters for ``--axes``: one of t, c, z, y, x per stored axis, each once, y and x
    present (whether there is one per axis of the file is the reader's check)."""
    from engine.io.axes import check_axes  # late: engine.io loads dask, and --help need not

    check_axes(str(value), flag)


def gpu_count(value: Any, flag: str) -> None:
    """``auto`` or a whole number ``>= 0``."""
    if str(value).strip().lower() != "auto" and not re.fullmatch(r"\s*[0-9]+\s*", str(value)):
        raise OptionError(f"{flag} {value!r}: expected a number of GPUs or auto")


_WINDOW = shape(max_voxels=MAX_WINDOW_VOXELS)

#: The rule of each option, by parameter name (the same name means the same in every
#: command; exceptions are in :data:`COMMAND_RULES`).
RULES: dict[str, Rule] = {
    # cluster
    "workers": at_least(1), "threads_per_worker": at_least(1), "threads": at_least(1),
    "memory_limit": memory_size, "jobs": at_least(1), "gpus_per_job": at_least(0),
    "gpus": gpu_count,
    # inputs
    "axes": axes,
    # blocks, chunks, windows
    "block_mib": positive, "chunks": shape(), "shards": shape(),
    "block": shape(), "stride": shape(), "tile": _WINDOW, "size": _WINDOW,
    "patch_shape": _WINDOW, "border": shape(minimum=0), "halo": at_least(0),
    "max_levels": at_least(1), "level": at_least(0), "crop": at_least(1),
    # numbers of things
    "n": at_least(1), "batch": at_least(1), "batch_size": at_least(1),
    "iterations": at_least(1), "train_iterations": at_least(1), "days": at_least(1),
    "index_start": at_least(0), "max_outside": at_least(0), "min_size": at_least(0),
    "connectivity": between(1, 3), "background_class": at_least(0), "channel": at_least(0),
    "value": at_least(0), "seed": at_least(0), "min_distance": at_least(0),
    # physical and model parameters
    "voxel_size": numbers, "scale": numbers, "fractions": numbers,
    "overlap": between(0, 1, high_open=True), "threshold": between(0, 1),
    "confidence": between(0, 1), "weight": at_least(0), "sigma": positive,
    "diameter": positive, "lr": positive, "overlap_weight": at_least(0),
    "outside_weight": at_least(0), "compactness": at_least(0), "object_width": positive,
    "target_width": positive,
}

#: Rules of a name that means something else in one command, by (command path, name).
COMMAND_RULES: dict[tuple[str, str], Rule] = {
    ("cutter markers", "threshold"): at_least(0),  # a LoG response, not a probability
    ("demo", "size"): at_least(16),  # the phantom's edge, not a window
}


def _flag(name: str, annotation: Any) -> str:
    for meta in getattr(annotation, "__metadata__", ()):
        for decl in getattr(meta, "param_decls", None) or ():
            if decl.startswith("--"):
                return decl.split("/")[0]
    return "--" + name.replace("_", "-")


def validated(command: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a typer command) with every option value checked before it runs."""
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters)
    flags = {p: _flag(p, hints.get(p)) for p in params}

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            for name, value in kwargs.items():
                if value is None or isinstance(value, bool | list):
                    continue  # lists are NAME=PATH pairs and names, parsed by the command
                finite(value, flags[name])
                rule = COMMAND_RULES.get((command, name), RULES.get(name))
                if rule is not None and isinstance(value, str | int | float):
                    rule(value, flags[name])
        if kwargs.get("scheduler"):
            # its workers open paths in their own working folder, started elsewhere: they
            # must be given the path this folder means (elsewhere, paths stay as typed, so
            # that messages show them so)
            kwargs = {name: value.absolute() if isinstance(value, Path) else value
                      for name, value in kwargs.items()}
        return fn(*args, **kwargs)

    return run


def validate_app(app: typer.Typer, path: str = "") -> None:
    """Wrap every command (and the callback) of ``app`` and its sub-apps in
    :func:`validated`; call once, after every command is registered."""
    if app.registered_callback is not None and app.registered_callback.callback is not None:
        cb = app.registered_callback
        cb.callback = validated(path, cb.callback)
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else "")
        if info.callback is not None:
            info.callback = validated(f"{path} {name}".strip(), info.callback)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            validate_app(group.typer_instance, f"{path} {group.name}".strip())
