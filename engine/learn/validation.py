"""Validation during training: the whole held-out region, predicted as ``voxelmill predict``
predicts it.

Every validation volume's region is predicted with the tiled, blended predictor of
:mod:`engine.predict.block` on the tile grid that ``voxelmill predict`` lays over the whole
volume (tiles of the training patch shape, :data:`engine.predict.tiling.DEFAULT_OVERLAP`
overlap, :data:`engine.predict.tiling.DEFAULT_BLEND` weights, the input normalized with the
volume's global statistics, mixed precision on CUDA). Tiles that overlap the region read
their context from outside it, as predict does, so the Dice printed during training is the
Dice that predict's labels have on the same region (within float rounding).

Metrics, over the valid (not ignored) voxels of all regions together: ``val_dice`` and
``val_iou`` of the foreground (probability > 0.5, or an argmax that is not class 0) —
left out when neither truth nor prediction has a foreground voxel, since they are then
undefined (never reported as 1.0); ``val_loss``, the configured training loss of each
finished slab of the blended probabilities, averaged over the slabs weighted by their
valid voxels.

Memory: each region is predicted in blocks of at most :data:`BLOCK_TILES` tiles per axis
(the write region; its read region adds up to a tile on each side); neither the region nor
the volume is ever held whole.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.blocks import Region
from engine.learn.data import IGNORE, TrainVolume, read_box
from engine.predict.block import Finished, Finishing, predict_block
from engine.predict.device import TilePredictor
from engine.predict.tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, TileGrid, blend_weights

#: a validation block spans at most this many tiles per axis
BLOCK_TILES = 4
#: probabilities are clamped to [EPS, 1 - EPS] before they become logits for the loss
EPS = 1e-6


def region_blocks(region: Region, tile: Sequence[int]) -> list[Region]:
    """``region`` cut into blocks of at most :data:`BLOCK_TILES` tiles per axis."""
    per_axis = []
    for r, t in zip(region, tile, strict=True):
        step = BLOCK_TILES * int(t)
        per_axis.append([slice(s, min(s + step, r.stop)) for s in range(r.start, r.stop, step)])
    return [tuple(b) for b in itertools.product(*per_axis)]


@dataclass
class _Totals:
    """Counts and loss summed over the finished slabs (written from writer threads)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    loss: float = 0.0
    valid: int = 0


class Validator:
    """Validates a model in training on the validation volumes' regions.

    Parameters
    ----------
    volumes : sequence of TrainVolume
        With statistics (:func:`engine.learn.data.prepare`); their ``region`` is validated.
    patch_shape : sequence of int
        The training patch shape: predict's default tile.
    divisor : sequence of int
        What every tile axis must be divisible by (the model's).
    kind : {"binary", "boundary", "classes"}
        The target kind: which output is foreground, sigmoid or softmax.
    device : torch.device
        Where the model is.
    batch : int
        Tiles per forward pass.
    loss : callable
        ``loss(logits, targets)``: the training loss of a batch, a scalar tensor.
    targets : callable
        ``targets(label)``: training targets of int64 labels ``(1, *S)`` (``IGNORE`` = -1).
    """

    def __init__(self, volumes: Sequence[TrainVolume], patch_shape: Sequence[int],
                 divisor: Sequence[int], kind: str, device: torch.device, batch: int,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 targets: Callable[[np.ndarray], np.ndarray]) -> None:
        self.volumes = list(volumes)
        self.kind, self.device, self.batch = kind, device, batch
        self.loss, self.targets = loss, targets
        self.grids = [TileGrid.make(v.label.shape, patch_shape, DEFAULT_OVERLAP, divisor)
                      for v in self.volumes]
        self.weights = [blend_weights(g.tile, DEFAULT_BLEND) for g in self.grids]
        self.predictor: TilePredictor | None = None

    @property
    def voxels(self) -> int:
        """Voxels validated (every region's)."""
        return int(sum(np.prod(v.region_shape) for v in self.volumes))

    def __bool__(self) -> bool:
        return bool(self.volumes)

    def __call__(self, model: torch.nn.Module, channels_out: int) -> dict[str, float]:
        """``val_loss`` and, when defined, ``val_dice`` and ``val_iou`` of ``model``."""
        if self.predictor is None or self.predictor.model is not model:
            self.close()
            self.predictor = TilePredictor(model, self.device,
                                           "softmax" if self.kind == "classes" else "sigmoid",
                                           batch=self.batch)
        finishing = Finishing("float16", self.kind)
        totals = _Totals()
        lock = threading.Lock()
        was_training = model.training
        model.eval()
        try:
            for vol, grid, weights in zip(self.volumes, self.grids, self.weights,
                                          strict=True):
                stats = vol.stats
                channels = int(vol.image.shape[0])
                offset = stats.offset if stats is not None else (0.0,) * channels
                scale = stats.scale if stats is not None else (1.0,) * channels
                sink = self._sink(vol, totals, lock)
                unit = int(vol.image.chunksize[1])
                for block in region_blocks(vol.region, grid.tile):
                    predict_block(self.predictor, lambda box, v=vol: read_box(
                        v.image, (slice(None), *box)), grid, block, weights, channels_out,
                        offset, scale, finishing, sink, unit)
        finally:
            model.train(was_training)
        out = {"val_loss": totals.loss / max(totals.valid, 1)}
        denom = totals.tp + totals.fp + totals.fn
        if denom:  # else undefined: nothing to find and nothing found
            out["val_dice"] = 2 * totals.tp / (2 * totals.tp + totals.fp + totals.fn)
            out["val_iou"] = totals.tp / denom
        return out

    def _sink(self, vol: TrainVolume, totals: _Totals, lock: threading.Lock
              ) -> Callable[[Finished], None]:
        """The writer of :func:`predict_block`: scores each finished slab."""

        def write(done: Finished) -> None:
            if done.level:
                return
            label = read_box(vol.label, done.region).astype(np.int64)
            valid = label != IGNORE
            truth = label > 0
            pred = done.labels > 0
            tp = int((pred & truth & valid).sum())
            fp = int((pred & ~truth & valid).sum())
            fn = int((~pred & truth & valid).sum())
            n_valid = int(valid.sum())
            loss = 0.0
            if n_valid:
                assert done.probabilities is not None  # level 0 always carries them
                p = torch.from_numpy(done.probabilities.astype(np.float32)).clamp(EPS, 1 - EPS)
                logits = torch.log(p) if self.kind == "classes" else \
                    torch.log(p) - torch.log1p(-p)
                target = torch.from_numpy(self.targets(label[None]))
                loss = float(self.loss(logits[None], target)) * n_valid
            with lock:
                totals.tp += tp
                totals.fp += fp
                totals.fn += fn
                totals.loss += loss
                totals.valid += n_valid

        return write

    def close(self) -> None:
        """Stop the predictor's device thread."""
        if self.predictor is not None:
            self.predictor.close()
            self.predictor = None


def improved(entry: dict[str, Any], best: dict[str, Any], by: str) -> bool:
    """Whether the validation ``entry`` beats ``best`` on ``by``: a higher ``val_dice``, or
    a lower ``val_loss``; the first validation always does."""
    if not best or by not in best:
        return True
    if by not in entry:
        return False
    return entry[by] < best[by] if by == "val_loss" else entry[by] > best[by]


__all__ = ["BLOCK_TILES", "Validator", "improved", "region_blocks"]
