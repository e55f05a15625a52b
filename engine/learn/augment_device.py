"""Augmentation of a whole batch on the training device, in torch.

The transforms of :mod:`engine.learn.augment` are all elementwise or separable (flips, 90°
rotations, intensity, gamma, Gaussian blur, low resolution, stripes, blobs, noise), so they
run on the batch where it already is instead of on the loader's CPU threads. The work is
split in two:

* :func:`draw` runs on a loader thread, per sample, with that sample's generator (seeded
  from ``(seed, iteration, sample)``): it makes every random choice — whether a transform
  applies, its parameters, a seed for its noise — with the same distributions as
  :class:`engine.learn.augment.Augment`, and returns them as a short list of operations;
* :func:`apply` runs them on the device, on the batch's images and targets (geometric
  operations move the targets too; the targets' boundaries commute with flips and
  rotations, so they can be made from the labels before).

The NumPy path stays for training on the CPU. Given the same operations, :func:`apply`
computes what the NumPy transforms compute (float tolerance); noise is drawn by torch from
the drawn seed, so its values differ from NumPy's but not its distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.learn.augment import Augment

#: one operation: (transform name, its parameters)
Op = tuple[str, dict[str, Any]]


def _uniform(rng: np.random.Generator, r: Sequence[float]) -> float:
    lo, hi = float(r[0]), float(r[1])
    return lo if lo == hi else float(rng.uniform(lo, hi))


def draw(augment: Augment, rng: np.random.Generator, spatial: Sequence[int]) -> list[Op]:
    """The random choices for one sample of spatial shape ``spatial`` (no data touched).

    Parameters
    ----------
    augment : Augment
        The configured chain (its ``settings``, in application order).
    rng : numpy.random.Generator
        The sample's generator.
    spatial : tuple of int
        ``(Y, X)`` or ``(Z, Y, X)``.

    Returns
    -------
    list of (str, dict)
        The operations to apply, in order.
    """
    nsp = len(spatial)
    ops: list[Op] = []
    for name, s in augment.settings.items():
        if name == "flip":
            axes = range(nsp - 2, nsp) if s.inplane_only else range(nsp)
            flips = [ax for ax in axes if rng.random() < s.p]
            if flips:
                ops.append(("flip", {"axes": flips}))
            continue
        if not rng.random() < s.p:
            continue
        if name == "rot90":
            k = int(rng.integers(1, 4)) if spatial[-1] == spatial[-2] else 2
            ops.append(("rot90", {"k": k}))
        elif name == "intensity":
            ops.append(("intensity", {"scale": _uniform(rng, s.scale),
                                       "shift": _uniform(rng, s.shift)}))
        elif name == "gamma":
            ops.append(("gamma", {"gamma": _uniform(rng, s.gamma)}))
        elif name == "blur":
            ops.append(("blur", {"sigma": _uniform(rng, s.sigma)}))
        elif name == "lowres":
            ops.append(("lowres", {"factor": _uniform(rng, s.factor),
                                   "inplane_only": s.inplane_only}))
        elif name == "stripes":
            axes = list(range(nsp - 2, nsp)) if s.inplane_only else list(range(nsp))
            ax = int(axes[rng.integers(len(axes))])
            ops.append(("stripes", {"axis": ax, "amplitude": _uniform(rng, s.amplitude),
                                    "period": _uniform(rng, s.period),
                                    "phase": float(rng.uniform(0.0, 2.0 * math.pi))}))
        elif name == "blobs":
            count = int(rng.integers(int(s.count[0]), int(s.count[1]) + 1))
            blobs = []
            for _ in range(count):
                centre = [float(rng.uniform(0, n - 1)) for n in spatial]
                radius = _uniform(rng, s.radius)
                amp = _uniform(rng, s.amplitude) * (1.0 if rng.random() < 0.5 else -1.0)
                blobs.append((centre, radius, amp))
            ops.append(("blobs", {"blobs": blobs}))
        elif name in ("noise", "artifact_noise"):
            ops.append(("noise", {"sigma": _uniform(rng, s.sigma),
                                  "seed": int(rng.integers(2**62))}))
    return ops


def channel_std(image: torch.Tensor) -> torch.Tensor:
    """Per-channel population std of ``(C, *S)``, shaped ``(C, 1, ...)``, 1 where a channel
    is constant (as the NumPy transforms; computed in float64)."""
    flat = image.reshape(image.shape[0], -1).double()
    std = flat.std(dim=1, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std)).to(image.dtype)
    return std.reshape((-1,) + (1,) * (image.ndim - 1))


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of an axis of length ``n`` padded by ``radius`` as scipy's ``reflect``
    (half-sample symmetric: ``d c b a | a b c d | d c b a``)."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(image: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur of ``(C, *S)`` over the spatial axes, as
    ``scipy.ndimage.gaussian_filter(image, (0, sigma, ...), mode="reflect")``."""
    if sigma <= 0:
        return image
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (w / w.sum()).to(image.dtype).to(image.device).reshape(1, 1, -1)
    out = image
    for axis in range(1, image.ndim):
        moved = out.movedim(axis, -1)
        n = moved.shape[-1]
        padded = moved.index_select(-1, _symmetric_index(n, radius, image.device))
        flat = padded.reshape(-1, 1, n + 2 * radius)
        out = F.conv1d(flat, kernel).reshape(moved.shape).movedim(-1, axis)
    return out


def _gamma(image: torch.Tensor, gamma: float) -> torch.Tensor:
    flat = image.reshape(image.shape[0], -1)
    lo = flat.min(dim=1).values.reshape((-1,) + (1,) * (image.ndim - 1))
    hi = flat.max(dim=1).values.reshape((-1,) + (1,) * (image.ndim - 1))
    span = hi - lo
    x = ((image - lo) / torch.where(span > 0, span, torch.ones_like(span))).clamp(0.0, 1.0)
    return torch.where(span > 0, x.pow(gamma) * span + lo, image)


def _lowres(image: torch.Tensor, factor: float, inplane_only: bool) -> torch.Tensor:
    spatial = tuple(image.shape[1:])
    first = len(spatial) - 2 if inplane_only else 0
    small = tuple(max(1, round(n / factor)) if i >= first else n
                  for i, n in enumerate(spatial))
    if small == spatial:
        return image
    # linear, corners aligned: scipy.ndimage.zoom(order=1, grid_mode=False)
    mode = "trilinear" if len(spatial) == 3 else "bilinear"
    down = F.interpolate(image[None], size=small, mode=mode, align_corners=True)
    return F.interpolate(down, size=spatial, mode=mode, align_corners=True)[0]


def _stripes(image: torch.Tensor, axis: int, amplitude: float, period: float,
             phase: float) -> torch.Tensor:
    i = torch.arange(image.shape[axis + 1], dtype=torch.float64, device=image.device)
    wave = (amplitude * torch.sin(2.0 * math.pi * i / period + phase)).to(image.dtype)
    shape = [1] * image.ndim
    shape[axis + 1] = -1
    return image + wave.reshape(shape) * channel_std(image)


def _blobs(image: torch.Tensor, blobs: Sequence[tuple[Sequence[float], float, float]]
           ) -> torch.Tensor:
    spatial = image.shape[1:]
    field = torch.zeros(spatial, dtype=image.dtype, device=image.device)
    coords = [torch.arange(n, dtype=torch.float64, device=image.device) for n in spatial]
    for centre, radius, amp in blobs:
        d2 = torch.zeros((), dtype=torch.float64, device=image.device)
        for a, (g, c) in enumerate(zip(coords, centre, strict=True)):
            shape = [1] * len(spatial)
            shape[a] = -1
            d2 = d2 + ((g - c) ** 2).reshape(shape)
        field += (amp * torch.exp(-d2 / (2.0 * radius * radius))).to(image.dtype)
    return image + field[None] * channel_std(image)


def _noise(image: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=image.device)
    gen.manual_seed(seed)
    noise = torch.randn(image.shape, generator=gen, dtype=image.dtype, device=image.device)
    return image + noise * (sigma * channel_std(image))


def apply_sample(image: torch.Tensor, target: torch.Tensor | None, ops: Sequence[Op]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one sample's operations.

    Parameters
    ----------
    image : torch.Tensor
        float ``(C, *S)``.
    target : torch.Tensor or None
        ``(*S)`` or ``(K, *S)``: moved by flips and rotations like the image.
    ops : list of (str, dict)
        From :func:`draw`.
    """
    nsp = image.ndim - 1
    for name, p in ops:
        if name == "flip":
            image = image.flip([a + 1 for a in p["axes"]])
            if target is not None:
                lead = target.ndim - nsp
                target = target.flip([a + lead for a in p["axes"]])
        elif name == "rot90":
            image = torch.rot90(image, p["k"], dims=(-2, -1))
            if target is not None:
                target = torch.rot90(target, p["k"], dims=(-2, -1))
        elif name == "intensity":
            image = image * p["scale"] + p["shift"] * channel_std(image)
        elif name == "gamma":
            image = _gamma(image, p["gamma"])
        elif name == "blur":
            image = gaussian_blur(image, p["sigma"])
        elif name == "lowres":
            image = _lowres(image, p["factor"], p["inplane_only"])
        elif name == "stripes":
            image = _stripes(image, p["axis"], p["amplitude"], p["period"], p["phase"])
        elif name == "blobs":
            image = _blobs(image, p["blobs"])
        elif name == "noise":
            image = _noise(image, p["sigma"], p["seed"])
        else:  # pragma: no cover - draw() makes only the names above
            raise ValueError(f"unknown device augmentation {name!r}")
    return image, target


def apply(image: torch.Tensor, target: torch.Tensor, ops: Sequence[Sequence[Op]]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch where it is: image ``(B, C, *S)`` float, target ``(B, *T)``;
    ``ops[b]`` are sample ``b``'s operations. Returns new contiguous tensors."""
    if not any(ops):
        return image, target
    images, targets = [], []
    for b, sample_ops in enumerate(ops):
        img, tgt = apply_sample(image[b], target[b], sample_ops)
        images.append(img)
        targets.append(tgt)
    return torch.stack(images).contiguous(), torch.stack(targets).contiguous()


__all__ = ["apply", "apply_sample", "channel_std", "draw", "gaussian_blur"]
