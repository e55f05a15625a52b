"""A plain-torch U-Net for 2D and 3D (optionally anisotropic) segmentation.

Tensors are channels-first: ``(N, C, Y, X)`` for ``spatial_dims=2`` and ``(N, C, Z, Y, X)``
for ``spatial_dims=3``, float32 (or float64 after ``model.double()``). The model returns
logits of shape ``(N, out_channels, *spatial)`` with the input's spatial shape.

Architecture (``L = len(features)`` levels, ``L - 1`` poolings):

* encoder level ``i``: two convolutions (kernel 3 per axis, "same" zero padding), each
  followed by the optional normalisation and a ReLU; between levels a max-pool whose kernel
  equals its stride (2 per axis);
* decoder level ``i`` (``L - 2`` down to 0): upsampling by the matching pooling factor —
  a transposed convolution with kernel = stride (``up_mode="transpose"``) or nearest
  upsampling followed by a 1×1(×1) convolution (``up_mode="upsample"``) — concatenation
  with the encoder level's output (the skip) and two convolutions as in the encoder;
* a final 1×1(×1) convolution to ``out_channels`` logits.

Anisotropic volumes (3D only, e.g. light-sheet or confocal stacks whose Z spacing is several
times the in-plane spacing): the first ``anisotropic_levels`` poolings, and the matching
upsamplings, act in-plane only (factor ``(1, 2, 2)``). The convolutions of those levels
(encoder and decoder levels ``0 .. anisotropic_levels - 1``) use ``(1, 3, 3)`` kernels: at
those resolutions a Z neighbour is far away compared with an in-plane one, so 3D context is
gathered only once in-plane pooling has made the voxels closer to isotropic (the choice of
nnU-Net and of the Allen Cell Structure Segmenter's anisotropic nets). Deeper levels use
full 3×3×3 kernels and 2×2×2 pooling.

Every pooling divides its axis exactly, so each spatial axis of the input must be a
multiple of :attr:`UNet.divisor`; :meth:`UNet.check_input_shape` says so with a suggested
shape. :func:`receptive_field` gives the receptive field per axis, computed from the
architecture alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from engine.errors import OptionError

__all__ = ["UNet", "receptive_field"]

NORMS = ("instance", "batch", "group")
UP_MODES = ("transpose", "upsample")


def _conv_cls(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(norm: str | None, spatial_dims: int, channels: int, num_groups: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    if norm == "batch":
        cls = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        return cls(channels)
    return nn.GroupNorm(math.gcd(num_groups, channels), channels)


class _ConvBlock(nn.Sequential):
    """Two (conv → norm → ReLU) with "same" padding and the given kernel per axis."""

    def __init__(
        self,
        spatial_dims: int,
        in_ch: int,
        out_ch: int,
        kernel: tuple[int, ...],
        norm: str | None,
        num_groups: int,
    ) -> None:
        conv = _conv_cls(spatial_dims)
        padding = tuple(k // 2 for k in kernel)
        layers: list[nn.Module] = []
        for i in range(2):
            layers.append(
                conv(in_ch if i == 0 else out_ch, out_ch, kernel, padding=padding,
                     bias=norm is None or norm == "group")
            )
            layers.append(_norm(norm, spatial_dims, out_ch, num_groups))
            layers.append(nn.ReLU(inplace=False))
        super().__init__(*layers)


class UNet(nn.Module):
    """A U-Net for 2D ``(N, C, Y, X)`` or 3D ``(N, C, Z, Y, X)`` float inputs.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels, out_channels : int
        Input channels and output logit channels (1 for binary segmentation with
        :func:`engine.learn.losses.masked_bce_dice`, C classes for ``masked_ce_dice``).
    features : sequence of int
        Channels per level, coarsest last; ``len(features) - 1`` poolings.
    norm : {"instance", "batch", "group", None}
        Normalisation after each convolution (``None``: none, convolutions get a bias).
    anisotropic_levels : int
        3D only: number of leading poolings that are in-plane only (``(1, 2, 2)``); those
        levels' convolutions use ``(1, 3, 3)`` kernels. At most ``len(features) - 1``.
    up_mode : {"transpose", "upsample"}
        Transposed convolution (kernel = stride) or nearest upsampling + 1×1 convolution.
    num_groups : int
        Groups for ``norm="group"`` (reduced to ``gcd(num_groups, channels)``).

    Raises
    ------
    OptionError
        For an invalid argument.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        features: Sequence[int] = (16, 32, 64, 128),
        norm: str | None = "instance",
        anisotropic_levels: int = 0,
        up_mode: str = "transpose",
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise OptionError(f"spatial_dims must be 2 or 3, not {spatial_dims!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("num_groups", num_groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(f"{name} must be a positive integer, not {value!r}")
        features = tuple(features)
        if not features or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in features
        ):
            raise OptionError(
                f"features must be a non-empty sequence of positive integers, not {features!r}"
            )
        if norm not in (*NORMS, None):
            raise OptionError(f"norm must be one of {NORMS} or None, not {norm!r}")
        if up_mode not in UP_MODES:
            raise OptionError(f"up_mode must be one of {UP_MODES}, not {up_mode!r}")
        n_pool = len(features) - 1
        if not isinstance(anisotropic_levels, int) or not 0 <= anisotropic_levels <= n_pool:
            raise OptionError(
                f"anisotropic_levels must be an integer in [0, {n_pool}] (the number of "
                f"poolings for features={list(features)}), not {anisotropic_levels!r}"
            )
        if anisotropic_levels and spatial_dims != 3:
            raise OptionError(
                f"anisotropic_levels={anisotropic_levels} needs spatial_dims=3 (in-plane "
                "pooling of Z, Y, X volumes)"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.norm = norm
        self.anisotropic_levels = anisotropic_levels
        self.up_mode = up_mode
        self.num_groups = num_groups

        d = spatial_dims
        #: kernel per level and pooling factor per pooling, each a tuple per axis
        self.kernels: tuple[tuple[int, ...], ...] = tuple(
            (1, 3, 3) if i < anisotropic_levels else (3,) * d for i in range(len(features))
        )
        self.pool_factors: tuple[tuple[int, ...], ...] = tuple(
            (1, 2, 2) if i < anisotropic_levels else (2,) * d for i in range(n_pool)
        )
        conv = _conv_cls(d)
        pool = nn.MaxPool2d if d == 2 else nn.MaxPool3d
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        prev = in_channels
        for i, f in enumerate(features):
            self.encoders.append(_ConvBlock(d, prev, f, self.kernels[i], norm, num_groups))
            prev = f
        for p in self.pool_factors:
            self.pools.append(pool(kernel_size=p, stride=p))
        for i in range(n_pool):  # ups[i] / decoders[i] bring level i+1 back to level i
            p = self.pool_factors[i]
            if up_mode == "transpose":
                up: nn.Module = (nn.ConvTranspose2d if d == 2 else nn.ConvTranspose3d)(
                    features[i + 1], features[i], kernel_size=p, stride=p
                )
            else:
                up = nn.Sequential(
                    nn.Upsample(scale_factor=p, mode="nearest"),
                    conv(features[i + 1], features[i], kernel_size=1),
                )
            self.ups.append(up)
            self.decoders.append(
                _ConvBlock(d, 2 * features[i], features[i], self.kernels[i], norm, num_groups)
            )
        self.head = conv(features[0], out_channels, kernel_size=1)

    @property
    def divisor(self) -> tuple[int, ...]:
        """Per spatial axis, the product of the pooling factors: every input axis must be a
        multiple of it."""
        return tuple(
            math.prod(p[a] for p in self.pool_factors) for a in range(self.spatial_dims)
        )

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Check a spatial shape (``(Y, X)`` or ``(Z, Y, X)``) against :attr:`divisor`.

        Raises
        ------
        OptionError
            With the nearest valid shape (each axis rounded to the nearest non-zero multiple
            of the divisor, ties rounded up) if the shape does not fit the poolings.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.spatial_dims:
            raise OptionError(
                f"patch shape {shape} must have {self.spatial_dims} spatial axes for this "
                f"{self.spatial_dims}D model"
            )
        div = self.divisor
        if any(s < 1 for s in shape) or any(s % q for s, q in zip(shape, div, strict=True)):
            suggestion = tuple(
                max(q, q * math.floor(s / q + 0.5)) for s, q in zip(shape, div, strict=True)
            )
            raise OptionError(
                f"patch shape {shape} must be divisible by {div} on every axis for this "
                f"model's {len(self.pool_factors)} poolings; e.g. use {suggestion}"
            )

    def arch(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict: ``UNet(**arch)`` rebuilds
        the same architecture (same state-dict keys and shapes)."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "features": list(self.features),
            "norm": self.norm,
            "anisotropic_levels": self.anisotropic_levels,
            "up_mode": self.up_mode,
            "num_groups": self.num_groups,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, *spatial)`` for a float input ``(N, in_channels,
        *spatial)``.

        Raises
        ------
        OptionError
            If the input's rank, channels or spatial shape do not fit the model.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise OptionError(
                f"input of shape {tuple(x.shape)} does not fit this model: expected "
                f"(N, {self.in_channels}, {', '.join('ZYX'[-self.spatial_dims:])})"
            )
        self.check_input_shape(x.shape[2:])
        skips = []
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i < len(self.pools):
                skips.append(x)
                x = self.pools[i](x)
        for i in reversed(range(len(self.pools))):
            x = self.ups[i](x)
            x = self.decoders[i](torch.cat([skips[i], x], dim=1))
        return self.head(x)


Interval = Callable[[int], tuple[int, int]]


def _axis_receptive_field(kernels: Sequence[int], pools: Sequence[int]) -> int:
    """Exact receptive field along one axis: the largest input extent that one output
    voxel depends on, over all output positions (the dependency pattern repeats with the
    period ``prod(pools)``).

    Each layer maps an output position to the closed input interval it depends on (all
    dependency intervals are contiguous and move monotonically with the position):
    a "same" convolution of kernel ``k`` widens by ``k // 2`` each side, a pooling of
    factor ``p`` maps coarse voxel ``c`` to fine voxels ``p*c .. p*c + p - 1``, an
    upsampling (transposed conv with kernel = stride, or nearest + 1×1 conv) maps fine
    voxel ``x`` to coarse voxel ``x // p``, and a skip concatenation takes the union.
    Image borders (zero padding) are ignored: this is the interior receptive field.
    """

    def conv(f: Interval, k: int) -> Interval:
        h = k // 2
        return lambda x: (f(x - h)[0], f(x + h)[1])

    def pool(f: Interval, p: int) -> Interval:
        return lambda c: (f(p * c)[0], f(p * c + p - 1)[1])

    def up(f: Interval, p: int) -> Interval:
        return lambda x: f(x // p)

    def union(f: Interval, g: Interval) -> Interval:
        def h(x: int) -> tuple[int, int]:
            a, b = f(x), g(x)
            return min(a[0], b[0]), max(a[1], b[1])

        return h

    def identity(x: int) -> tuple[int, int]:
        return x, x

    f: Interval = identity
    skips: list[Interval] = []
    for i, k in enumerate(kernels):
        f = conv(conv(f, k), k)
        if i < len(pools):
            skips.append(f)
            f = pool(f, pools[i])
    for i in reversed(range(len(pools))):
        f = conv(conv(union(skips[i], up(f, pools[i])), kernels[i]), kernels[i])
    period = math.prod(pools)
    return max(hi - lo + 1 for lo, hi in (f(x) for x in range(period)))


def receptive_field(model: UNet) -> tuple[int, ...]:
    """Receptive field of ``model`` per spatial axis, in input voxels.

    Computed from the architecture alone (kernel sizes, pooling factors, skips): for each
    axis, the largest extent of input voxels that any single output voxel depends on, away
    from the image borders. Because of the poolings the exact extent depends on an output
    voxel's position modulo :attr:`UNet.divisor`; this is the maximum over those positions.
    The final 1×1 convolution and the upsamplings add nothing.
    """
    return tuple(
        _axis_receptive_field(
            [k[a] for k in model.kernels], [p[a] for p in model.pool_factors]
        )
        for a in range(model.spatial_dims)
    )
