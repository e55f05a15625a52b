"""``voxelmill cutter train``: self-supervised training of the cutter network.

No annotation: the network (the U-Net of :mod:`engine.learn.unet`, 2D, inputs = the image
channels + the marker channel of :mod:`engine.cutter.crops`, one logit output) learns from
the markers and the foreground mask alone, with the loss of :mod:`engine.cutter.loss`.

Markers outside the foreground mask are ignored. A training sample (one iteration) is one
marker ``i``, drawn with the seed
``(seed, iteration)``, plus every marker whose crop overlaps ``i``'s (Chebyshev distance
below the crop size; at most ``max_group``, nearest first), so the overlap term sees the
neighbours ``i`` competes with. Their common area (the union of the crops, one pixel of
margin) is read once from the store (normalized with the channels' global percentiles,
one reduction pass), transformed by one of the 8 flips/rotations, and cut into the crops.
Adam with a cosine-decayed learning rate.

Outputs in ``--output``: ``last.pt`` (a voxelmill checkpoint, :mod:`engine.learn.checkpoint`,
``target.kind = "cutter"``: architecture, channels, normalization and this image's
statistics, crop size, marker channel, loss weights, history) and ``metrics.json`` (the
loss and its three terms, averaged over each logging interval).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import __version__
from engine.cutter.common import (
    SlideImage,
    check_markers_source,
    in_mask,
    load_markers,
    open_slide,
)
from engine.cutter.crops import network_inputs, read_channels, read_mask
from engine.cutter.loss import OUTSIDE_WEIGHT, cutter_loss
from engine.errors import DestinationError, InputError, OptionError
from engine.learn.normalize import ChannelStats, Normalization
from engine.segment.refs import Stored

LAST = "last.pt"
METRICS = "metrics.json"
KIND = "cutter"


@dataclass(frozen=True)
class CutterTrainOptions:
    """Options of ``voxelmill cutter train`` (see its ``--help``)."""

    markers: str
    mask: str
    channels: tuple[str, ...]
    output: Path
    crop: int = 64
    iterations: int = 600
    lr: float = 3e-3
    device: str = "auto"
    seed: int = 0
    overlap_weight: float = 1.0
    outside_weight: float = OUTSIDE_WEIGHT
    features: tuple[int, ...] = (8, 16, 32)
    max_group: int = 8
    threads: int | None = None
    overwrite: bool = False


@dataclass
class CutterTrainPlan:
    image: SlideImage
    options: CutterTrainOptions
    refs: list[Stored]
    channel_names: list[str]
    mask: Stored
    markers_source: Stored | Path
    divisor: tuple[int, ...]


@dataclass
class CutterTrainResult:
    output: Path
    checkpoint: Path
    iterations: int
    markers: int
    history: list[dict[str, Any]]
    seconds: float
    device: str
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_channels(image: SlideImage, channels: Sequence[str]) -> tuple[list[Stored],
                                                                          list[str]]:
    """Stored references and names of the chosen channels (by name or index)."""
    names = list(image.volume.channel_names)
    if not channels:
        if "c" in image.volume.axes and image.volume.data.shape[image.volume.axes.index("c")] > 1:
            raise OptionError(f"{image.source}: has several channels ({', '.join(names)}); "
                              "choose the network's input with --channels")
        channels = ("0",) if "c" in image.volume.axes else ()
    if not channels:  # no channel axis
        return [image.channel(None)], ["channel 0"]
    refs, out = [], []
    for c in channels:
        ref = image.channel(c)
        refs.append(ref)
        index = ref.prefix[-1]
        out.append(names[index] if index < len(names) else f"channel {index}")
    return refs, out


def plan_cutter_training(src: str | Path, options: CutterTrainOptions) -> CutterTrainPlan:
    """Check everything before compute; raise a ``VoxelmillError`` naming the problem."""
    from engine.learn.unet import UNet

    image = open_slide(src)
    o = options
    if o.iterations < 1:
        raise OptionError(f"--iterations {o.iterations}: must be ≥ 1")
    if not o.lr > 0:
        raise OptionError(f"--lr {o.lr}: must be > 0")
    if o.overlap_weight < 0 or o.outside_weight < 0:
        raise OptionError("--overlap-weight and --outside-weight must be ≥ 0")
    if o.threads is not None and o.threads < 1:
        raise OptionError(f"--threads {o.threads}: must be ≥ 1")
    if o.max_group < 1:
        raise OptionError(f"max_group {o.max_group}: must be ≥ 1")
    refs, names = resolve_channels(image, o.channels)
    model = UNet(2, len(refs) + 1, 1, features=o.features)
    div = model.divisor
    if o.crop < div[0] or o.crop % div[0] or o.crop % 2:
        raise OptionError(f"--crop {o.crop}: must be an even multiple of {div[0]} (the "
                          f"network's {len(o.features) - 1} poolings), e.g. "
                          f"{max(div[0], div[0] * round(o.crop / div[0]))}")
    mask = image.label(o.mask, "--mask")
    markers = check_markers_source(image, o.markers)
    out = Path(o.output)
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out}: exists and is not a folder")
    if (out / LAST).exists() and not o.overwrite:
        raise DestinationError(f"{out / LAST}: exists; pass --overwrite to replace it")
    from engine.learn.train import resolve_device

    resolve_device(o.device)  # cuda without a GPU is refused before anything runs
    return CutterTrainPlan(image, o, refs, names, mask, markers, div)


def channel_stats(image: SlideImage, refs: Sequence[Stored], client: Any) -> ChannelStats:
    """Global percentile statistics (1–99.8 %) of each chosen channel."""
    from engine.learn.normalize import compute_stats

    return compute_stats(list(refs), Normalization(), client)


# --------------------------------------------------------------------------- samples


def transform(area: np.ndarray, outside: np.ndarray, points: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One of the 8 flips/rotations (``k`` bits: flip y, flip x, transpose) applied to the
    ``(C, H, W)`` area, its ``(H, W)`` outside mask and ``(N, 2)`` points in it."""
    pts = points.copy()
    if k & 1:
        area, outside = area[:, ::-1], outside[::-1]
        pts[:, 0] = outside.shape[0] - 1 - pts[:, 0]
    if k & 2:
        area, outside = area[:, :, ::-1], outside[:, ::-1]
        pts[:, 1] = outside.shape[1] - 1 - pts[:, 1]
    if k & 4:
        area, outside = area.transpose(0, 2, 1), outside.T
        pts = pts[:, ::-1]
    return np.ascontiguousarray(area), np.ascontiguousarray(outside), np.ascontiguousarray(pts)


@dataclass
class GroupSampler:
    """Draws training samples: a marker and the markers whose crops overlap its crop."""

    yx: np.ndarray  # (N, 2)
    refs: Sequence[Stored]
    mask: Stored
    stats: ChannelStats
    shape: tuple[int, int]
    crop: int
    max_group: int
    seed: int

    def __post_init__(self) -> None:
        from scipy.spatial import cKDTree

        self.tree = cKDTree(self.yx)

    def group(self, i: int) -> np.ndarray:
        """Indices of marker ``i`` (first) and its overlapping neighbours, nearest first."""
        near = self.tree.query_ball_point(self.yx[i], r=self.crop - 1, p=np.inf)
        near = [j for j in near if j != i]
        d = np.abs(self.yx[near] - self.yx[i]).max(1) if near else np.zeros(0)
        order = [near[j] for j in np.argsort(d, kind="stable")]
        return np.asarray([i, *order[:self.max_group - 1]], np.int64)

    def sample(self, iteration: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs (n, C+1, c, c), offsets (n, 2), outside (H, W))`` of one sample."""
        rng = np.random.default_rng([self.seed, iteration])
        members = self.group(int(rng.integers(len(self.yx))))
        pts = self.yx[members]
        h = self.crop // 2
        lo = pts.min(0) - h - 1
        hi = pts.max(0) + h + 1
        box = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))
        area = read_channels(self.refs, self.stats, box, self.shape)
        outside = ~read_mask(self.mask, box, self.shape)
        area, outside, local = transform(area, outside, pts - lo, int(rng.integers(8)))
        origins = local - h
        return network_inputs(area, origins, self.crop), origins, outside


# --------------------------------------------------------------------------- the loop


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def metadata(plan: CutterTrainPlan, model: Any, stats: ChannelStats, history: list[dict],
             iteration: int, n_markers: int) -> dict[str, Any]:
    """Checkpoint metadata: the fields ``voxelmill train`` writes, with ``target.kind``
    ``"cutter"`` and the cutter's crop, marker channel and loss weights."""
    from engine.learn.unet import receptive_field

    o = plan.options
    return {
        "arch": {"name": "unet", **model.arch()},
        "input": {"channels": list(plan.channel_names),
                  "normalization": Normalization().to_dict(),
                  "stats": [{"name": plan.image.source.name, **stats.to_dict()}],
                  "marker_channel": {"kind": "gaussian", "sigma": o.crop / 8}},
        "target": {"kind": KIND, "classes": [], "activation": "sigmoid"},
        "patch_shape": [o.crop, o.crop], "crop": o.crop,
        "divisor": list(model.divisor), "receptive_field": list(receptive_field(model)),
        "voxel_size": list(plan.image.voxel_size), "unit": plan.image.unit,
        "iteration": iteration, "best": {}, "history": history,
        "loss": {"overlap_weight": o.overlap_weight, "outside_weight": o.outside_weight},
        "markers": n_markers,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
        "trained_with": __version__,
    }


def run_cutter_training(plan: CutterTrainPlan, client: Any,
                        events: Callable[[dict[str, Any]], None] | None = None,
                        report: Callable[[str], None] = print) -> CutterTrainResult:
    """Train as planned (in this process; the markers and statistics come from the
    cluster) and write ``last.pt`` and ``metrics.json``."""
    import torch

    from engine.learn.checkpoint import save_checkpoint
    from engine.learn.train import resolve_device
    from engine.learn.unet import UNet
    from engine.runlock import output_lock

    o = plan.options
    out = Path(o.output)
    out.mkdir(parents=True, exist_ok=True)
    emit = events or (lambda e: None)
    with output_lock(out, report=report):
        rows = load_markers(client, plan.image, plan.markers_source, o.markers)
        inside = in_mask(plan.mask, rows)
        if not inside.any():
            raise InputError(f"--markers {o.markers}: none of the {len(rows)} markers lies "
                             f"in the foreground mask {o.mask!r}")
        if not inside.all():
            report(f"ignoring {int((~inside).sum())} of {len(rows)} markers outside the "
                   "foreground mask")
        rows = rows[inside]
        stats = channel_stats(plan.image, plan.refs, client)
        report(f"training on {len(rows)} markers, crops {o.crop}×{o.crop}, channels "
               f"{', '.join(plan.channel_names)}")
        sampler = GroupSampler(rows[:, 1:].copy(), plan.refs, plan.mask, stats,
                               plan.image.shape, o.crop, o.max_group, o.seed)
        device = resolve_device(o.device)
        if o.threads:  # on a busy shared CPU one thread can be many times faster than two
            torch.set_num_threads(o.threads)
        torch.manual_seed(o.seed)
        model = UNet(2, len(plan.refs) + 1, 1, features=o.features).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=o.lr)
        log_every = max(1, o.iterations // 20)
        history: list[dict[str, Any]] = []
        acc = {"loss": 0.0, "area": 0.0, "overlap": 0.0, "outside": 0.0, "crops": 0.0}
        n_acc = 0
        t0 = time.monotonic()
        model.train()
        for it in range(1, o.iterations + 1):
            lr = o.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (it - 1) / o.iterations)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs, offsets, outside = sampler.sample(it)
            x = torch.from_numpy(inputs).to(device)
            logits = model(x)
            loss, terms = cutter_loss(logits, offsets.tolist(), outside.shape,
                                      torch.from_numpy(outside).to(device),
                                      o.overlap_weight, o.outside_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise OptionError(f"training diverged at iteration {it} (loss {value}); "
                                  "lower --lr")
            for k, v in (("loss", value), *terms.items(), ("crops", float(len(inputs)))):
                acc[k] += v
            n_acc += 1
            emit({"event": "iteration", "iteration": it, "loss": value, "lr": lr})
            if it % log_every and it != o.iterations:
                continue
            entry = {"iteration": it, **{k: round(v / n_acc, 5) for k, v in acc.items()},
                     "lr": lr, "time_s": round(time.monotonic() - t0, 3)}
            history.append(entry)
            acc = dict.fromkeys(acc, 0.0)
            n_acc = 0
            emit({"event": "log", **entry})
            meta = metadata(plan, model, stats, history, it, len(rows))
            save_checkpoint(out / LAST, {k: v.detach().cpu() for k, v in
                                         model.state_dict().items()}, meta)
            _write_json(out / METRICS, {"iteration": it, "stopped": "running",
                                        "history": history})
        _write_json(out / METRICS, {"iteration": o.iterations, "stopped": "completed",
                                    "history": history})
        return CutterTrainResult(out, out / LAST, o.iterations, len(rows), history,
                                 time.monotonic() - t0, str(device))
