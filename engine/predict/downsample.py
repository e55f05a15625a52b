"""Pyramid downsampling on the device, equal to :mod:`engine.pyramid`'s NumPy versions.

A predicted block's outputs are on the device when they are finished; its coarser levels
are computed there too, so only a fraction of a level more comes back to the host. The
results are those of :func:`engine.pyramid.downsample_mean` and
:func:`engine.pyramid.downsample_mode` voxel for voxel: the same edge replication of odd
ends, sums in float64 (exact for the uint8 and float16 values predictions are stored as)
or float32 for float32 data in the same axis order, rounding half to even for integers,
and ties of the mode going to the first value seen in the window.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def _pad_to_windows(data: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Edge-replicate the end of every axis to a multiple of its factor."""
    for axis, f in enumerate(factors):
        extra = -data.shape[axis] % f
        if extra:
            last = data.narrow(axis, data.shape[axis] - 1, 1)
            data = torch.cat([data, *([last] * extra)], dim=axis)
    return data


def downsample_mean(data: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Mean over ``factors`` windows, same dtype (see the module docstring)."""
    if all(f == 1 for f in factors):
        return data
    data = _pad_to_windows(data, factors)
    acc_dtype = torch.float32 if data.dtype == torch.float32 else torch.float64
    acc = data
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        parts = [acc.narrow(axis, k, acc.shape[axis] - k)[
            (slice(None),) * axis + (slice(None, None, f),)] for k in range(f)]
        total = parts[0].to(acc_dtype) + parts[1].to(acc_dtype)
        for part in parts[2:]:
            total += part.to(acc_dtype)
        acc = total
    acc = acc * (1.0 / int(torch.tensor(factors).prod()))
    if not data.dtype.is_floating_point:
        acc = torch.round(acc)
        if data.dtype != torch.bool:
            info = torch.iinfo(data.dtype)
            acc = acc.clamp(info.min, info.max)
    return acc.to(data.dtype)


def downsample_mode(data: torch.Tensor, factors: Sequence[int],
                    classes: int | None = None) -> torch.Tensor:
    """Most frequent value in each ``factors`` window; ties to the first seen (C order
    within the window).

    With ``classes``, every value of ``data`` is known to lie in ``0 .. classes - 1`` (a
    network's labels): each class's count and first position are summed over the window's
    strided views, ``classes × window`` elementwise steps without copying the windows out,
    instead of comparing every pair of window members (``window²``).
    """
    if all(f == 1 for f in factors):
        return data
    data = _pad_to_windows(data, factors)
    if classes is not None:
        return _mode_of_classes(data, factors, classes)
    shape = []
    for s, f in zip(data.shape, factors, strict=True):
        shape += [s // f, f]
    n = data.ndim
    view = data.reshape(shape).permute([2 * i for i in range(n)] + [2 * i + 1 for i in range(n)])
    flat = view.reshape(*view.shape[:n], -1)
    counts = (flat.unsqueeze(-1) == flat.unsqueeze(-2)).sum(-1)
    # argmax of the first maximum: equal counts keep the lowest window position
    k = flat.shape[-1]
    key = counts * k + (k - 1 - torch.arange(k, device=data.device))
    pick = key.argmax(-1, keepdim=True)
    return torch.gather(flat, -1, pick)[..., 0]


def _mode_of_classes(data: torch.Tensor, factors: Sequence[int], classes: int) -> torch.Tensor:
    """:func:`downsample_mode` of ``data`` (padded to whole windows) with values below
    ``classes``: the class of the largest key ``count × k + (k - 1 - first position)``."""
    members = [data[tuple(slice(o, None, f) for o, f in zip(offset, factors, strict=True))]
               for offset in itertools.product(*(range(f) for f in factors))]  # C order
    k = len(members)
    best = out = None
    for c in range(classes):
        count = torch.zeros(members[0].shape, dtype=torch.int32, device=data.device)
        first = torch.zeros_like(count)  # k - 1 - the first position holding c (0: none)
        for i, m in enumerate(members):
            hit = (m == c).to(torch.int32)
            count += hit
            first = torch.maximum(first, hit * (k - 1 - i))
        key = count * k + first  # 0 where c is absent, below every present class
        if best is None:
            best, out = key, torch.zeros(key.shape, dtype=data.dtype, device=data.device)
        else:
            better = key > best
            best = torch.where(better, key, best)
            out = torch.where(better, torch.full_like(out, c), out)
    assert out is not None
    return out
