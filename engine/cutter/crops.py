"""Marker-centred crops and the network's input, shared by training and prediction.

The crop of a marker at ``(y, x)`` covers ``[y - c/2, y + c/2) × [x - c/2, x + c/2)`` for an
even crop size ``c``: the marker sits at pixel ``(c/2, c/2)`` of every crop. Beyond the image
the (normalized) channels are 0 and the foreground mask is False. The network sees the
image channels plus one *marker channel*, a Gaussian of σ = c/8 at the crop centre: a
convolutional network has no other way to know which of the cells in its crop is "its"
cell (cellcutter feeds the marker's own mask as that extra channel; with point markers
it is the same for every crop, a positional cue).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.learn.normalize import ChannelStats, apply_stats
from engine.segment.refs import Stored

Box = tuple[slice, slice]


def crop_box(y: int, x: int, crop: int) -> Box:
    """The crop of the marker at ``(y, x)`` in image coordinates (may exceed the image)."""
    h = crop // 2
    return (slice(int(y) - h, int(y) - h + crop), slice(int(x) - h, int(x) - h + crop))


def _inner(box: Box, shape: Sequence[int]) -> tuple[Box, list[tuple[int, int]]]:
    inner = tuple(slice(min(max(b.start, 0), n), max(min(b.stop, n), 0))
                  for b, n in zip(box, shape, strict=True))
    pad = [(i.start - b.start, b.stop - max(i.stop, i.start)) for b, i in
           zip(box, inner, strict=True)]
    return inner, pad  # type: ignore[return-value]


def read_channels(refs: Sequence[Stored], stats: ChannelStats, box: Box,
                  shape: Sequence[int]) -> np.ndarray:
    """Normalized channels ``(C, h, w)`` float32 of ``box``; 0 beyond the image."""
    inner, pad = _inner(box, shape)
    h, w = (b.stop - b.start for b in box)
    if inner[0].stop <= inner[0].start or inner[1].stop <= inner[1].start:
        return np.zeros((len(refs), h, w), np.float32)
    image = apply_stats(np.stack([np.asarray(r.read_region(inner)) for r in refs]), stats)
    return np.pad(image, [(0, 0), *pad]) if any(a or b for a, b in pad) else image


def read_mask(ref: Stored, box: Box, shape: Sequence[int]) -> np.ndarray:
    """Foreground (label > 0) of ``box``, bool; False beyond the image."""
    inner, pad = _inner(box, shape)
    h, w = (b.stop - b.start for b in box)
    if inner[0].stop <= inner[0].start or inner[1].stop <= inner[1].start:
        return np.zeros((h, w), bool)
    mask = np.asarray(ref.read_region(inner)) > 0
    return np.pad(mask, pad) if any(a or b for a, b in pad) else mask


def marker_channel(crop: int) -> np.ndarray:
    """The marker channel ``(c, c)`` float32: a Gaussian of σ = c/8 at ``(c/2, c/2)``."""
    r = np.arange(crop, dtype=np.float32) - crop // 2
    g = np.exp(-(r * r) / (2 * (crop / 8) ** 2))
    return np.outer(g, g).astype(np.float32)


def network_inputs(area: np.ndarray, origins: np.ndarray, crop: int) -> np.ndarray:
    """``(N, C + 1, c, c)`` float32: the crops at ``origins`` (top-left, in ``area``'s
    coordinates) of the ``(C, H, W)`` ``area``, each with the marker channel appended."""
    marker = marker_channel(crop)
    out = np.empty((len(origins), area.shape[0] + 1, crop, crop), np.float32)
    for k, (oy, ox) in enumerate(origins):
        out[k, :-1] = area[:, oy:oy + crop, ox:ox + crop]
        out[k, -1] = marker
    return out
