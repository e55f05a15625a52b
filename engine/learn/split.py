"""Which voxels validate: the hold-out of training data, chosen so that it can judge a model.

Explicit validation sources (``data.val``, a split folder's ``imagesVal``) win. Otherwise,
with two source volumes (groups) or more, whole groups are held out
(:func:`engine.dataset.assign_groups`), so that no source volume is in both. With a single
source volume, each of its volumes gives up a *slab*: ``val_fraction`` of one spatial axis,
at a position where the slab's foreground density (foreground over labelled voxels) is
close to the whole source's, so that validation holds foreground in proportion.

The choice reads only per-plane foreground and labelled-voxel counts along every axis,
reduced blockwise by dask from each label chunk (:func:`foreground_profiles`); the labels
are never loaded whole. Rule, in this order:

1. the slab at the end, then at the start, of each candidate axis (``data.val_axis``, or
   every spatial axis, first first) whose density is within :data:`TOLERANCE` of the
   whole source's: the training region stays in one piece;
2. else, the position and axis of the smallest difference in density; a slab inside the
   volume leaves two training regions, one on either side.

A validation set whose labels hold no foreground voxel cannot tell a good model from one
that predicts nothing (its Dice is undefined): :func:`check_validation` refuses it unless
``data.allow_empty_validation`` is set, and then says that the model is chosen by the
validation loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import dask
import dask.array as da
import numpy as np

from engine.dataset import assign_groups
from engine.errors import InputError
from engine.learn.data import TrainVolume
from engine.learn.normalize import SMALL_BYTES

#: a slab at an end of an axis is taken when its foreground density is within this share of
#: the whole source's
TOLERANCE = 0.25
AXIS_NAMES = {2: "yx", 3: "zyx"}


@dataclass(frozen=True)
class Profile:
    """Per-plane counts of one volume's region along every spatial axis.

    ``fg[a]`` and ``valid[a]`` are int64 arrays of the region's length along axis ``a``:
    the foreground (label > 0) and labelled (not ignored) voxels of each plane.
    """

    fg: tuple[np.ndarray, ...]
    valid: tuple[np.ndarray, ...]

    @property
    def foreground(self) -> int:
        """Foreground voxels of the region."""
        return int(self.fg[0].sum())

    @property
    def labelled(self) -> int:
        """Labelled (not ignored) voxels of the region."""
        return int(self.valid[0].sum())


def foreground_profiles(volumes: Sequence[TrainVolume], client: Any = None) -> list[Profile]:
    """The :class:`Profile` of each volume's region, reduced blockwise.

    Each label chunk is reduced to its per-plane counts along each axis and those are
    summed (dask's tree reduction), on the cluster for labels larger than
    :data:`engine.learn.normalize.SMALL_BYTES` when ``client`` is given, in local threads
    otherwise; memory is a few chunks and the volume's side lengths.
    """
    tasks = []
    for v in volumes:
        lab = v.label[v.region]
        fg, valid = lab > 0, lab >= 0
        for a in range(lab.ndim):
            others = tuple(i for i in range(lab.ndim) if i != a)
            tasks.append(da.stack([fg.sum(axis=others, dtype=np.int64),
                                   valid.sum(axis=others, dtype=np.int64)]))
    if not tasks:
        return []
    big = client is not None and sum(v.label.nbytes for v in volumes) > SMALL_BYTES
    if big:
        results = client.gather(client.compute(tasks))
    else:
        results = dask.compute(*tasks, scheduler="threads", num_workers=2)
    out, k = [], 0
    for v in volumes:
        parts = [np.asarray(r) for r in results[k:k + v.spatial_dims]]
        k += v.spatial_dims
        out.append(Profile(tuple(p[0] for p in parts), tuple(p[1] for p in parts)))
    return out


@dataclass(frozen=True)
class Slab:
    """A chosen hold-out: ``[start, stop)`` along ``axis`` of the region, and its density
    relative to the whole source's (1.0: in proportion; None when nothing is labelled)."""

    axis: int
    start: int
    stop: int
    ratio: float | None


def _windows(fg: np.ndarray, valid: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and labelled voxels of every window of ``length`` planes (by start)."""
    cf = np.concatenate([[0], np.cumsum(fg)])
    cv = np.concatenate([[0], np.cumsum(valid)])
    return cf[length:] - cf[:-length], cv[length:] - cv[:-length]


def choose_slab(profile: Profile, fraction: float, density: float,
                axis: int | None = None) -> Slab | None:
    """The slab to hold out of one volume (see the module docstring for the rule).

    Parameters
    ----------
    profile : Profile
        The volume's region counts.
    fraction : float
        Share of the axis to hold out, in (0, 1).
    density : float
        The whole source's foreground density (foreground / labelled voxels).
    axis : int, optional
        Hold out along this spatial axis only.

    Returns
    -------
    Slab or None
        Coordinates relative to the region; None when no candidate axis has a plane to
        spare for training.
    """
    axes = [axis] if axis is not None else list(range(len(profile.fg)))
    scored: list[tuple[float, int, int, int, float | None]] = []  # dev, rank, start, len, r
    ends: list[tuple[int, int, int, float | None, float]] = []  # axis, start, len, r, dev
    for a in axes:
        n = len(profile.fg[a])
        length = max(1, round(n * fraction))
        if length >= n:
            continue
        fg, valid = _windows(profile.fg[a], profile.valid[a], length)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(valid > 0, fg / np.maximum(valid, 1) / density, np.nan) \
                if density > 0 else np.full(len(fg), np.nan)
        dev = np.where(np.isnan(ratio), np.inf, np.abs(ratio - 1))
        for s in (n - length, 0):  # the end first: the old hold-out when it is fair
            r = None if np.isnan(ratio[s]) else float(ratio[s])
            ends.append((a, s, length, r, float(dev[s])))
        best = int(np.flatnonzero(dev == dev.min())[-1])  # ties: the later position
        scored.append((float(dev[best]), axes.index(a), best, length,
                       None if np.isnan(ratio[best]) else float(ratio[best])))
    if not scored:
        return None
    for a, s, length, r, dev_s in ends:
        if dev_s <= TOLERANCE:
            return Slab(a, s, s + length, r)
    if density <= 0 or math.isinf(min(s[0] for s in scored)):  # nothing to be fair about
        a, s, length, r, _ = ends[0]
        return Slab(a, s, s + length, r)
    _, rank, s, length, r = min(scored, key=lambda t: (t[0], t[1]))
    return Slab(axes[rank], s, s + length, r)


def _cut(v: TrainVolume, slab: Slab) -> tuple[list[TrainVolume], TrainVolume]:
    """The training volumes (one or two) and the validation volume of a slab."""
    a = slab.axis
    r = v.region[a]
    lo, hi = r.start + slab.start, r.start + slab.stop

    def part(start: int, stop: int) -> TrainVolume:
        region = list(v.region)
        region[a] = slice(start, stop)
        return replace(v, region=tuple(region))

    train = [part(s, e) for s, e in ((r.start, lo), (hi, r.stop)) if e > s]
    return train, part(lo, hi)


@dataclass
class Split:
    """The training and validation volumes, with what was decided and why."""

    train: list[TrainVolume]
    val: list[TrainVolume]
    #: one line per held-out slab (for the user)
    notes: list[str]
    #: foreground voxels of each validation volume's region, when already counted
    val_foreground: list[int] | None = None


def axis_name(axis: int, dims: int) -> str:
    """``z``, ``y`` or ``x`` for a spatial axis index of a 2D or 3D volume."""
    return AXIS_NAMES.get(dims, "zyx")[axis] if axis < dims else str(axis)


def split_validation(volumes: Sequence[TrainVolume], explicit: Sequence[TrainVolume],
                     val_fraction: float, seed: int, val_axis: int | None = None,
                     client: Any = None) -> Split:
    """Training and validation volumes (see the module docstring).

    Parameters
    ----------
    volumes : sequence of TrainVolume
        The training sources' volumes.
    explicit : sequence of TrainVolume
        Explicit validation volumes; when any, they validate and nothing is held out.
    val_fraction : float
        Share held out, in [0, 1); 0: no validation.
    seed : int
        Seed of the group assignment.
    val_axis : int, optional
        The spatial axis of the slabs (``data.val_axis``).
    client : distributed.Client, optional
        Where large label volumes are reduced.

    Raises
    ------
    InputError
        A volume too small along the axis to give up a slab.
    """
    volumes = list(volumes)
    if explicit or val_fraction <= 0:
        return Split(volumes, list(explicit), [])
    sizes: dict[str, int] = {}
    for v in volumes:
        sizes[v.group] = sizes.get(v.group, 0) + math.prod(v.region_shape)
    if len(sizes) >= 2:
        split = assign_groups(sizes, (1 - val_fraction, val_fraction, 0.0), seed)
        val = [v for v in volumes if split[v.group] == "val"]
        return Split([v for v in volumes if split[v.group] == "train"], val,
                     [f"validation: held out whole source volume(s) "
                      f"{', '.join(sorted({v.group for v in val}))}"])
    profiles = foreground_profiles(volumes, client)
    labelled = sum(p.labelled for p in profiles)
    density = sum(p.foreground for p in profiles) / labelled if labelled else 0.0
    train, val, notes, counts = [], [], [], []
    for v, p in zip(volumes, profiles, strict=True):
        slab = choose_slab(p, val_fraction, density, val_axis)
        if slab is None:
            where = "along data.val_axis" if val_axis is not None else "along any axis"
            raise InputError(f"{v.name}: too small {where} to hold out {val_fraction:.0%} "
                             "for validation; give data.val sources")
        parts, held = _cut(v, slab)
        train += parts
        val.append(held)
        counts.append(int(p.fg[slab.axis][slab.start:slab.stop].sum()))
        name = axis_name(slab.axis, v.spatial_dims)
        share = "no labelled voxel" if slab.ratio is None else \
            f"{slab.ratio:.2f}× the source's foreground density"
        notes.append(f"validation: {v.name} {name} {held.region[slab.axis].start}:"
                     f"{held.region[slab.axis].stop} ({share})")
    return Split(train, val, notes, counts)


def check_validation(val: Sequence[TrainVolume], foreground: Sequence[int] | None,
                     allow_empty: bool, client: Any = None) -> str | None:
    """Refuse validation labels without foreground, or (``allow_empty``) warn.

    Parameters
    ----------
    val : sequence of TrainVolume
        The validation volumes.
    foreground : sequence of int, optional
        Their regions' foreground voxels when known (:attr:`Split.val_foreground`);
        counted blockwise otherwise.
    allow_empty : bool
        ``data.allow_empty_validation``.
    client : distributed.Client, optional
        Where large label volumes are reduced.

    Returns
    -------
    str or None
        The warning to show when validation is empty and allowed; None when it holds
        foreground or there is none.

    Raises
    ------
    InputError
        Naming the validation volumes and both fixes, when they hold no foreground voxel.
    """
    if not val:
        return None
    if foreground is None:
        foreground = [p.foreground for p in foreground_profiles(val, client)]
    if any(foreground):
        return None
    names = ", ".join(sorted({v.name for v in val})[:3])
    if not allow_empty:
        raise InputError(
            f"{names}: the validation labels have no foreground voxel (all 0 or ignored), so "
            "a validation Dice is undefined and a model that predicts nothing would look "
            "best; validate on data with foreground (data.val, or another data.val_fraction "
            "or data.val_axis), or set data.allow_empty_validation: true to choose the "
            "model by validation loss")
    return (f"warning: {names}: the validation labels have no foreground voxel; there is "
            "no validation Dice, and best.pt is the model of the lowest validation loss "
            "(data.allow_empty_validation), which only measures false positives there")


__all__ = ["Profile", "Slab", "Split", "TOLERANCE", "axis_name", "check_validation",
           "choose_slab", "foreground_profiles", "split_validation"]
