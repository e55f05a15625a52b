"""Step parameters given in physical units, converted to voxels with the image's voxel size.

A size parameter (declared with ``unit="length"`` or ``unit="volume"``, see
:mod:`engine.segment.params`) may be written in µm as ``NAME_um`` (``sigma_um``,
``min_distance_um``, ``halo_um``, ``scales_um``) or in µm³ as ``NAME_um3``
(``min_size_um3``). :func:`in_voxels` converts them once the image is known:

- a length becomes one value per filtered axis, ``value / voxel_size[a]`` (the last two
  axes when the step is ``slice_wise`` on a 3D image), collapsed to one number when all
  are equal; an integer length (a halo) is the largest ``ceil`` of those; a
  ``[sigma, cutoff]`` list converts each sigma;
- a volume becomes ``value / prod(voxel_size)`` voxels, rounded for an integer size.

The converted values are checked against the parameter's declaration and the step's
rules, as if the user had written them in voxels, so one preset serves a 0.3 µm slide and
a 0.13 µm stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from engine.errors import InputError
from engine.segment.params import Param, show
from engine.segment.workflow import Step, Workflow
from engine.volume import convert_length

__all__ = ["in_voxels", "voxel_size_um"]


def voxel_size_um(voxel_size: Sequence[float], unit: str) -> tuple[float, ...] | None:
    """The voxel size in µm; ``None`` when ``unit`` is no length unit."""
    try:
        return tuple(convert_length(float(v), unit, "micrometer") for v in voxel_size)
    except Exception:  # an unknown unit ("pixel", ""): no physical size
        return None


def _lengths(value: Any, voxels: tuple[float, ...]) -> tuple[float, ...]:
    """One length (or one per axis) in µm, as voxels along each of ``voxels``' axes."""
    if isinstance(value, tuple):
        if len(value) != len(voxels):
            raise ValueError(f"has {len(value)} values, but the step runs along "
                             f"{len(voxels)} axes")
        return tuple(v / s for v, s in zip(value, voxels, strict=True))
    return tuple(value / s for s in voxels)


def _collapse(values: tuple[float, ...]) -> float | tuple[float, ...]:
    """One number when all axes agree (to rounding), else one per axis."""
    return values[0] if all(math.isclose(v, values[0], rel_tol=1e-9) for v in values) \
        else values


def _convert(spec: Param, value: Any, voxels: tuple[float, ...]) -> Any:
    """``value`` (µm or µm³) in voxels for the parameter ``spec``."""
    if value is None:
        return None
    if spec.unit == "volume":
        n = value / math.prod(voxels)
        return int(round(n)) if spec.type == "int" else n
    if spec.type == "scales":
        return [[_as_list(_collapse(_lengths(s, voxels))), c] for s, c in value]
    per_axis = _lengths(value, voxels)
    if spec.type == "int":
        return max(math.ceil(v - 1e-9) for v in per_axis)
    return _as_list(_collapse(per_axis))  # float_or_floats


def _as_list(value: float | tuple[float, ...]) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _step_in_voxels(step: Step, voxels: tuple[float, ...], source: str) -> Step:
    params = dict(step.params)
    problems = []
    filtered = voxels[1:] if params.get("slice_wise") and len(voxels) == 3 else voxels
    for phys, spec in step.physical.items():
        value = params.pop(phys)
        where = f"{source}: step {step.name!r} ({step.function}): parameter {phys!r} " \
                f"{show(value)}"
        try:
            params[spec.name] = spec.check(_convert(spec, value, filtered))
        except ValueError as exc:
            problems.append(f"{where}: {exc} (converted with the voxel size "
                            f"{', '.join(f'{v:g}' for v in voxels)} µm)")
    if not problems:
        problems = [f"{source}: step {step.name!r} ({step.function}), in voxels: {m}"
                    for m in step.spec.check(params)]
    if problems:
        raise InputError("\n".join(problems))
    return replace(step, params=params)


def in_voxels(workflow: Workflow, voxel_size: Sequence[float], unit: str) -> Workflow:
    """``workflow`` with every size given in physical units converted to voxels.

    Parameters
    ----------
    workflow : Workflow
        A validated workflow, possibly with ``NAME_um`` / ``NAME_um3`` parameters.
    voxel_size : sequence of float
        The image's voxel size per spatial axis, (z, y, x) or (y, x), in ``unit``.
    unit : str
        NGFF length unit of ``voxel_size`` (``"micrometer"``, ``"nanometer"`` ...).

    Returns
    -------
    Workflow
        The same workflow, every size in voxels (unchanged when none was physical).

    Raises
    ------
    InputError
        When a converted value breaks its parameter's rules, or when the workflow gives
        sizes in µm and the voxel size has no physical unit.
    """
    if not any(step.physical for step in workflow.steps):
        return workflow
    voxels = voxel_size_um(voxel_size, unit)
    if voxels is None or not all(math.isfinite(v) and v > 0 for v in voxels):
        names = [f"{s.name}.{p}" for s in workflow.steps for p in s.physical]
        raise InputError(f"{workflow.source}: {', '.join(names)} given in physical units, "
                         f"but the image's voxel size ({', '.join(map(str, voxel_size))} "
                         f"{unit}) is not a physical length; give those sizes in voxels")
    steps = tuple(_step_in_voxels(s, voxels, workflow.source) if s.physical else s
                  for s in workflow.steps)
    return replace(workflow, steps=steps)
