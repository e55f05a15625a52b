"""Per-sample data augmentation in numpy, run on CPU data-loader workers.

One training sample is

* ``image``: float array ``(C, Z, Y, X)`` or ``(C, Y, X)`` (converted to float32),
* ``label``: integer array ``(Z, Y, X)`` or ``(Y, X)``; 0 background, 1 foreground,
  2 = ignore (any integer values are carried through unchanged),
* ``cost`` (optional): float32 per-voxel loss weights, the label's shape.

:class:`Augment` applies a configurable, seeded chain of transforms. *Geometric* transforms
(``flip``, ``rot90``) move image, label and cost together, so labels keep their exact values
and stay aligned with the image. *Intensity* and *artifact* transforms change only the image.
Transforms run in the fixed order of :data:`TRANSFORM_ORDER`; each has a probability ``p``
of being applied to a sample (``p = 0`` never, ``p = 1`` always).

Configuration is a mapping ``{transform name: {setting: value}}``; a transform that is not
named is disabled, a named one takes the defaults of its settings class for the settings it
does not give. Ranges are ``[low, high]`` pairs (a single number means a fixed value), and a
value is drawn uniformly from the range for every sample. Example::

    Augment({"flip": {"p": 0.5}, "rot90": {"p": 0.5},
             "noise": {"p": 0.3, "sigma": [0.0, 0.1]},
             "lowres": {"p": 0.1, "factor": [1.5, 3.0], "inplane_only": True}}, seed=0)

Transforms and their settings (intensities relative to a channel's standard deviation use
1 instead for a constant channel):

``flip`` (:class:`FlipSettings`)
    Each spatial axis (only Y and X with ``inplane_only``) is flipped independently with
    probability ``p``.
``rot90`` (:class:`Rot90Settings`)
    With probability ``p``, rotate by k·90° in the (Y, X) plane, k drawn from {1, 2, 3}.
    Only when Y == X, because 90° and 270° rotations swap the Y and X sizes; for
    non-square planes k = 2 (a 180° rotation, which keeps the shape) is used.
``intensity`` (:class:`IntensitySettings`)
    ``image * scale + shift * std`` per channel.
``gamma`` (:class:`GammaSettings`)
    Per channel, normalise to [0, 1] by min and max, raise to ``gamma`` and map back to the
    channel's original range (constant channels are left alone).
``blur`` (:class:`BlurSettings`)
    Gaussian blur of every channel over the spatial axes (``scipy.ndimage.gaussian_filter``,
    sigma in voxels).
``lowres`` (:class:`LowresSettings`)
    Simulated lower resolution: downsample by ``factor`` (linear interpolation,
    ``scipy.ndimage.zoom``) and upsample back to exactly the input shape.
``stripes`` (:class:`StripesSettings`)
    Additive periodic bands ``amplitude * std * sin(2π·i/period + phase)`` along one random
    spatial axis.
``blobs`` (:class:`BlobsSettings`)
    A few Gaussian spots of random centre, radius and sign (dark or bright).
``artifact_noise`` (:class:`NoiseSettings`, default sigma 0.2–0.5)
    Strong additive Gaussian noise, like ``noise`` with a larger default sigma.
``noise`` (:class:`NoiseSettings`)
    Additive Gaussian noise with standard deviation ``sigma * std`` per channel.

Outputs are new C-contiguous arrays (safe for ``torch.from_numpy``); inputs are not changed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from engine.errors import InputError, OptionError

Range = tuple[float, float]


@dataclass(frozen=True)
class FlipSettings:
    """Random flips. ``p``: probability per axis; ``inplane_only``: flip only Y and X."""

    p: float = 0.5
    inplane_only: bool = False


@dataclass(frozen=True)
class Rot90Settings:
    """Random 90° rotations in the (Y, X) plane with probability ``p`` (180° if Y != X)."""

    p: float = 0.5


@dataclass(frozen=True)
class IntensitySettings:
    """``image * scale + shift * std``; ``scale`` > 0 and ``shift`` (in std units) ranges."""

    p: float = 0.5
    scale: Range = (0.9, 1.1)
    shift: Range = (-0.1, 0.1)


@dataclass(frozen=True)
class GammaSettings:
    """Gamma on min-max normalised values, ``gamma`` > 0 range."""

    p: float = 0.3
    gamma: Range = (0.7, 1.5)


@dataclass(frozen=True)
class NoiseSettings:
    """Additive Gaussian noise, ``sigma`` relative to the channel's std (range, >= 0)."""

    p: float = 0.3
    sigma: Range = (0.0, 0.1)


@dataclass(frozen=True)
class BlurSettings:
    """Gaussian blur, ``sigma`` in voxels (range, >= 0)."""

    p: float = 0.2
    sigma: Range = (0.5, 1.0)


@dataclass(frozen=True)
class LowresSettings:
    """Down- then up-sampling by ``factor`` (range, >= 1); ``inplane_only``: Y and X only."""

    p: float = 0.1
    factor: Range = (1.5, 3.0)
    inplane_only: bool = False


@dataclass(frozen=True)
class StripesSettings:
    """Periodic additive bands: ``amplitude`` (std units, >= 0), ``period`` (voxels, > 0).

    ``inplane_only``: the bands vary along Y or X only.
    """

    p: float = 0.1
    amplitude: Range = (0.1, 0.3)
    period: Range = (4.0, 16.0)
    inplane_only: bool = False


@dataclass(frozen=True)
class BlobsSettings:
    """Gaussian spots: ``count`` (int range, >= 0), ``radius`` (voxels, > 0) and
    ``amplitude`` (std units, >= 0; the sign is random)."""

    p: float = 0.1
    count: Range = (1, 4)
    radius: Range = (2.0, 6.0)
    amplitude: Range = (0.5, 1.5)


_SETTINGS: dict[str, type] = {
    "flip": FlipSettings,
    "rot90": Rot90Settings,
    "intensity": IntensitySettings,
    "gamma": GammaSettings,
    "blur": BlurSettings,
    "lowres": LowresSettings,
    "stripes": StripesSettings,
    "blobs": BlobsSettings,
    "artifact_noise": NoiseSettings,
    "noise": NoiseSettings,
}

#: The order in which transforms are applied.
TRANSFORM_ORDER: tuple[str, ...] = tuple(_SETTINGS)

_DEFAULT_OVERRIDES: dict[str, dict[str, Any]] = {"artifact_noise": {"sigma": (0.2, 0.5)}}

# (lower bound, lower bound inclusive) for each range setting
_RANGE_BOUNDS: dict[str, tuple[float, bool]] = {
    "scale": (0.0, False),
    "shift": (-math.inf, False),
    "gamma": (0.0, False),
    "sigma": (0.0, True),
    "factor": (1.0, True),
    "amplitude": (0.0, True),
    "period": (0.0, False),
    "count": (0.0, True),
    "radius": (0.0, False),
}


def _parse_range(name: str, key: str, value: Any) -> Range:
    where = f"augmentation {name}.{key}"
    if isinstance(value, bool):
        raise OptionError(f"{where} must be a number or [low, high], got {value!r}")
    if isinstance(value, int | float):
        lo = hi = float(value)
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise OptionError(
                f"{where} must be a number or [low, high], got {value!r}"
            ) from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise OptionError(f"{where} must be finite, got {value!r}")
    if lo > hi:
        raise OptionError(f"{where}: low {lo} is greater than high {hi}")
    bound, inclusive = _RANGE_BOUNDS[key]
    if lo < bound or (lo == bound and not inclusive):
        op = ">=" if inclusive else ">"
        raise OptionError(f"{where} must be {op} {bound:g}, got {value!r}")
    if key == "count" and (lo != int(lo) or hi != int(hi)):
        raise OptionError(f"{where} must be integers, got {value!r}")
    return (lo, hi)


def _parse_settings(name: str, options: Any) -> Any:
    if name not in _SETTINGS:
        raise OptionError(
            f"unknown augmentation transform {name!r}; known: {', '.join(TRANSFORM_ORDER)}"
        )
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise OptionError(
            f"augmentation {name} settings must be a mapping, got {type(options).__name__}"
        )
    cls = _SETTINGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = dict(_DEFAULT_OVERRIDES.get(name, {}))
    for key, value in options.items():
        if key not in fields:
            raise OptionError(
                f"unknown setting {key!r} for augmentation {name}; "
                f"known: {', '.join(sorted(fields))}"
            )
        if key == "p":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise OptionError(f"augmentation {name}.p must be a number, got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise OptionError(f"augmentation {name}.p must be in [0, 1], got {value!r}")
            values[key] = float(value)
        elif key == "inplane_only":
            if not isinstance(value, bool):
                raise OptionError(
                    f"augmentation {name}.inplane_only must be true or false, got {value!r}"
                )
            values[key] = value
        else:
            values[key] = _parse_range(name, key, value)
    return cls(**values)


def _channel_std(image: np.ndarray) -> np.ndarray:
    """Per-channel std shaped for broadcasting, 1 where a channel is constant."""
    axes = tuple(range(1, image.ndim))
    std = image.std(axis=axes, dtype=np.float64)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    return std.reshape((-1,) + (1,) * (image.ndim - 1))


def _uniform(rng: np.random.Generator, r: Range) -> float:
    lo, hi = r
    return lo if lo == hi else float(rng.uniform(lo, hi))


def _resize(channel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resize of one channel to exactly ``shape``."""
    factors = [n / o for n, o in zip(shape, channel.shape, strict=True)]
    out = ndimage.zoom(channel, factors, order=1, mode="nearest", grid_mode=False)
    if out.shape != tuple(shape):  # rounding guard; zoom's output is round(shape * factor)
        pads = [(0, max(0, n - o)) for n, o in zip(shape, out.shape, strict=True)]
        out = np.pad(out, pads, mode="edge")[tuple(slice(0, n) for n in shape)]
    return out


class Augment:
    """A seeded chain of augmentations for one training sample.

    Parameters
    ----------
    config : mapping of str to mapping, optional
        ``{transform: {setting: value}}``, see the module docstring; transforms not named are
        disabled. ``None`` or ``{}`` disables everything (identity).
    seed : int, numpy.random.Generator or None
        Seed of the generator used when ``__call__`` is not given an ``rng``; the same seed
        gives the same sequence of outputs.

    Raises
    ------
    OptionError
        For an unknown transform or setting, a probability outside [0, 1] or an invalid
        range; the message names it.

    Attributes
    ----------
    settings : dict of str to settings dataclass
        The enabled transforms with their complete settings, in application order.
    """

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        config = {} if config is None else config
        if not isinstance(config, Mapping):
            raise OptionError(
                f"augmentation config must be a mapping, got {type(config).__name__}"
            )
        parsed = {str(name): _parse_settings(str(name), opts) for name, opts in config.items()}
        self.settings: dict[str, Any] = {n: parsed[n] for n in TRANSFORM_ORDER if n in parsed}
        self._rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def to_config(self) -> dict[str, dict[str, Any]]:
        """The complete settings as a JSON-serialisable mapping (for checkpoint metadata);
        ``Augment(aug.to_config())`` builds an equivalent chain."""
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.settings.items():
            out[name] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()
            }
        return out

    def __call__(
        self,
        image: np.ndarray,
        label: np.ndarray,
        cost: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Augment one sample.

        Parameters
        ----------
        image : numpy.ndarray
            ``(C, Z, Y, X)`` or ``(C, Y, X)``, any real dtype (computed in float32).
        label : numpy.ndarray
            ``(Z, Y, X)`` or ``(Y, X)`` integers (2 = ignore), ``image.shape[1:]``.
        cost : numpy.ndarray, optional
            Per-voxel loss weights, the label's shape.
        rng : numpy.random.Generator, optional
            Generator to draw from; default the one seeded at construction.

        Returns
        -------
        image : numpy.ndarray
            float32, same shape as the input image (``rot90`` keeps shapes, see above).
        label : numpy.ndarray
            Same dtype and values as the input label, moved like the image.
        cost : numpy.ndarray or None
            float32, moved like the image, or None.

        Raises
        ------
        InputError
            If the shapes do not fit together.
        """
        rng = self._rng if rng is None else rng
        image = np.asarray(image)
        label = np.asarray(label)
        if image.ndim not in (3, 4):
            raise InputError(
                f"augmentation image must be (C, Y, X) or (C, Z, Y, X), got shape {image.shape}"
            )
        if label.shape != image.shape[1:]:
            raise InputError(
                f"augmentation label shape {label.shape} does not match image shape "
                f"{image.shape} (expected {image.shape[1:]})"
            )
        if cost is not None and np.shape(cost) != label.shape:
            raise InputError(
                f"augmentation cost shape {np.shape(cost)} does not match label shape "
                f"{label.shape}"
            )
        img = np.array(image, dtype=np.float32, copy=True)
        lab = label
        cst = None if cost is None else np.asarray(cost, dtype=np.float32)
        nsp = label.ndim

        for name, s in self.settings.items():
            if name == "flip":
                axes = range(nsp - 2, nsp) if s.inplane_only else range(nsp)
                for ax in axes:
                    if rng.random() < s.p:
                        img = np.flip(img, axis=ax + 1)
                        lab = np.flip(lab, axis=ax)
                        cst = None if cst is None else np.flip(cst, axis=ax)
                continue
            if not rng.random() < s.p:
                continue
            if name == "rot90":
                k = int(rng.integers(1, 4)) if label.shape[-1] == label.shape[-2] else 2
                img = np.rot90(img, k, axes=(-2, -1))
                lab = np.rot90(lab, k, axes=(-2, -1))
                cst = None if cst is None else np.rot90(cst, k, axes=(-2, -1))
            elif name == "intensity":
                scale = _uniform(rng, s.scale)
                shift = _uniform(rng, s.shift)
                img = img * np.float32(scale) + np.float32(shift) * _channel_std(img)
            elif name == "gamma":
                img = self._gamma(img, _uniform(rng, s.gamma))
            elif name == "blur":
                sigma = _uniform(rng, s.sigma)
                if sigma > 0:
                    img = ndimage.gaussian_filter(img, sigma=(0,) + (sigma,) * nsp, mode="reflect")
            elif name == "lowres":
                img = self._lowres(img, _uniform(rng, s.factor), s.inplane_only)
            elif name == "stripes":
                img = self._stripes(img, s, rng)
            elif name == "blobs":
                img = self._blobs(img, s, rng)
            elif name in ("noise", "artifact_noise"):
                sigma = _uniform(rng, s.sigma)
                noise = rng.standard_normal(img.shape, dtype=np.float32)
                img = img + noise * (np.float32(sigma) * _channel_std(img))

        img = np.ascontiguousarray(img, dtype=np.float32)
        lab = np.ascontiguousarray(lab)
        cst = None if cst is None else np.ascontiguousarray(cst, dtype=np.float32)
        return img, lab, cst

    @staticmethod
    def _gamma(img: np.ndarray, gamma: float) -> np.ndarray:
        out = img.copy()
        for c in range(img.shape[0]):
            lo, hi = float(img[c].min()), float(img[c].max())
            if hi > lo:
                x = (img[c] - lo) / (hi - lo)
                out[c] = np.power(np.clip(x, 0.0, 1.0), gamma) * (hi - lo) + lo
        return out

    @staticmethod
    def _lowres(img: np.ndarray, factor: float, inplane_only: bool) -> np.ndarray:
        spatial = img.shape[1:]
        first = len(spatial) - 2 if inplane_only else 0
        small = tuple(
            max(1, round(n / factor)) if i >= first else n for i, n in enumerate(spatial)
        )
        if small == spatial:
            return img
        return np.stack([_resize(_resize(ch, small), spatial) for ch in img]).astype(np.float32)

    @staticmethod
    def _stripes(img: np.ndarray, s: StripesSettings, rng: np.random.Generator) -> np.ndarray:
        nsp = img.ndim - 1
        axes = list(range(nsp - 2, nsp)) if s.inplane_only else list(range(nsp))
        ax = int(axes[rng.integers(len(axes))])
        amp = _uniform(rng, s.amplitude)
        period = _uniform(rng, s.period)
        phase = float(rng.uniform(0.0, 2.0 * math.pi))
        i = np.arange(img.shape[ax + 1], dtype=np.float64)
        wave = (amp * np.sin(2.0 * math.pi * i / period + phase)).astype(np.float32)
        shape = [1] * img.ndim
        shape[ax + 1] = -1
        return img + wave.reshape(shape) * _channel_std(img)

    @staticmethod
    def _blobs(img: np.ndarray, s: BlobsSettings, rng: np.random.Generator) -> np.ndarray:
        spatial = img.shape[1:]
        count = int(rng.integers(int(s.count[0]), int(s.count[1]) + 1))
        field = np.zeros(spatial, dtype=np.float32)
        grids = np.ogrid[tuple(slice(0, n) for n in spatial)]
        for _ in range(count):
            centre = [rng.uniform(0, n - 1) for n in spatial]
            radius = _uniform(rng, s.radius)
            amp = _uniform(rng, s.amplitude) * (1.0 if rng.random() < 0.5 else -1.0)
            d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
            field += (amp * np.exp(-d2 / (2.0 * radius * radius))).astype(np.float32)
        return img + field[None] * _channel_std(img)
