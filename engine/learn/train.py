"""The training loop: iteration-based, validated every K iterations, resumable, seeded.

:func:`plan_training` opens the sources, splits off validation, computes the global
normalization statistics (blockwise on the cluster for large volumes) and checks the
model against the patch shape — everything that can fail on user input fails there,
before any training. :func:`run_training` then trains, on this machine or (through
:func:`train_on_cluster`) as one task on a Dask worker that has ``GPU=1`` resources,
which streams its crops from the OME-Zarr stores.

Determinism: sample ``j`` of iteration ``i`` is cropped and augmented with
``numpy.random.default_rng([seed, i, j])``, and the learning rate is a function of the
iteration, so a resumed run sees exactly the batches the uninterrupted run would have seen
(on CPU, the resumed weights equal the uninterrupted ones), whatever the number of crop
loader threads (:mod:`engine.learn.loader`) or of data-parallel ranks
(:mod:`engine.learn.ddp`).

Each iteration's wall time is split into the wait for its batch (``data_wait_s``), the step
(copy to the device, device augmentation, forward, backward, optimizer: ``step_s``) and,
every ``val_every`` iterations, validation with its checkpoints (``val_s``); the sums since
the previous validation are in each ``metrics.json`` history entry.

Output folder::

    OUT/last.pt         latest state (model, optimizer, iteration, history): --resume
    OUT/best.pt         best validation Dice so far (the model to use); the lowest validation
                        loss when the validation labels hold no foreground and
                        data.allow_empty_validation allows it
    OUT/metrics.json    history: training loss, learning rate, validation loss/Dice/IoU
    OUT/curves.png      learning curves
    OUT/config.yaml     the complete configuration that was run
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from scipy import ndimage

from engine.cluster import gpu_workers
from engine.errors import ClusterLost, DestinationError, InputError, OptionError
from engine.io.budget import check_held
from engine.learn import ddp
from engine.learn.augment import Augment
from engine.learn.augment_device import apply as augment_on_device
from engine.learn.augment_device import draw as draw_augmentation
from engine.learn.checkpoint import load_checkpoint, save_checkpoint
from engine.learn.config import TrainConfig
from engine.learn.data import (
    IGNORE,
    CropSampler,
    TrainVolume,
    open_sources,
    prepare,
    split_folder_validation,
)
from engine.learn.loader import Batch, BatchLoader, default_workers
from engine.learn.losses import masked_bce_dice, masked_ce_dice
from engine.learn.split import check_validation, split_validation
from engine.learn.unet import UNet, receptive_field
from engine.learn.validation import Validator, improved
from engine.runlock import output_lock
from engine.runner import cluster_lost
from engine.stall import StallWatch
from engine.workerpaths import check_workers_see

LAST, BEST, METRICS, CURVES, CONFIG = "last.pt", "best.pt", "metrics.json", "curves.png", \
    "config.yaml"
OUTPUTS = (LAST, BEST, METRICS, CURVES, CONFIG)
#: what a training stopped by its cluster keeps, and how to go on
KEPT = "its checkpoints are kept: run it again with --resume to go on from the last one"
#: the sections that must not change when a run is resumed
FIXED_ON_RESUME = ("data", "target", "model", "loss", "augment")

Event = dict[str, Any]


@dataclass
class TrainPlan:
    """Everything a training run needs, checked and prepared (pickleable: it travels to a
    worker with :func:`train_on_cluster`)."""

    config: TrainConfig
    train: list[TrainVolume]
    val: list[TrainVolume]
    in_channels: int
    channel_names: tuple[str, ...]
    spatial_dims: int
    voxel_size: tuple[float, ...]
    unit: str
    arch: dict[str, Any]
    resume: bool = False
    init_state: dict[str, torch.Tensor] | None = None
    #: what validation compares: "val_dice", or "val_loss" (validation without foreground)
    select_by: str = "val_dice"
    #: lines for the user: where validation is, and warnings
    notes: list[str] = field(default_factory=list)

    @property
    def train_voxels(self) -> int:
        """Spatial voxels crops are drawn from (the validation regions excluded)."""
        return sum(math.prod(v.region_shape) for v in self.train)

    @property
    def val_voxels(self) -> int:
        """Spatial voxels validated."""
        return sum(math.prod(v.region_shape) for v in self.val)


def validation_regions(volumes: Sequence[TrainVolume]) -> list[dict[str, Any]]:
    """The validated regions, JSON-able: ``{"source", "region": [[start, stop], ...]}``."""
    return [{"source": v.name, "region": [[s.start, s.stop] for s in v.region]}
            for v in volumes]


@dataclass
class TrainResult:
    """What a run produced."""

    output: Path
    iterations: int
    best: dict[str, Any]
    history: list[Event]
    stopped: str
    seconds: float
    device: str
    host: str = field(default_factory=socket.gethostname)
    worker: str | None = None
    data_wait_s: float = 0.0
    step_s: float = 0.0
    #: :func:`validation_regions` of the run
    validation: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- planning


def _check_output(config: TrainConfig, resume: bool, overwrite: bool) -> None:
    out = config.output
    if out.exists() and not out.is_dir():
        raise DestinationError(f"{out}: exists and is not a folder")
    present = [n for n in OUTPUTS if (out / n).exists()]
    if resume:
        if not (out / LAST).is_file():
            raise InputError(f"{out}: nothing to resume (no {LAST}); run without --resume")
        return
    if present and not overwrite:
        raise DestinationError(
            f"{out}: holds a training run ({', '.join(present)}); use --resume to continue it "
            "or --overwrite to start again")


def _arch(config: TrainConfig, in_channels: int, spatial_dims: int,
          init: dict[str, Any] | None) -> dict[str, Any]:
    if init is not None:  # fine-tuning keeps the architecture of the checkpoint
        arch = {k: v for k, v in init["arch"].items() if k != "name"}
        if arch["spatial_dims"] != spatial_dims or arch["in_channels"] != in_channels \
                or arch["out_channels"] != config.out_channels:
            raise InputError(
                f"train.init {config.train.init}: the checkpoint's model takes "
                f"{arch['in_channels']} channel(s) in {arch['spatial_dims']}D and gives "
                f"{arch['out_channels']} output(s); this training needs {in_channels} in "
                f"{spatial_dims}D and {config.out_channels} out")
        return arch
    m = config.model
    return {"spatial_dims": spatial_dims, "in_channels": in_channels,
            "out_channels": config.out_channels, "features": list(m.features), "norm": m.norm,
            "anisotropic_levels": m.anisotropic_levels if spatial_dims == 3 else 0,
            "up_mode": m.up_mode}


def plan_training(config: TrainConfig, client: Any = None, resume: bool = False,
                  overwrite: bool = False) -> TrainPlan:
    """Open and check everything; compute the global normalization statistics.

    Raises
    ------
    InputError, OptionError, DestinationError
        For a source, option or output problem, before anything is written.
    """
    _check_output(config, resume, overwrite)
    if resume:
        _check_resumable(config)
    volumes = open_sources(config.data.train)
    explicit_val = (open_sources(config.data.val) if config.data.val
                    else split_folder_validation(config.data.train))
    split = split_validation(volumes, explicit_val, config.data.val_fraction,
                             config.train.seed, config.data.val_axis, client)
    train, val = split.train, split.val
    if not train:
        raise InputError("no training data left after holding out validation; lower "
                         "data.val_fraction or give data.val sources")
    first = train[0]
    for v in train[1:] + val:
        if v.image.shape[0] != first.image.shape[0] or v.spatial_dims != first.spatial_dims:
            raise InputError(
                f"{v.name}: {v.image.shape[0]} channel(s) in {v.spatial_dims}D, but "
                f"{first.name} has {first.image.shape[0]} in {first.spatial_dims}D; all "
                "sources of one training must match")
    patch = config.data.patch_shape
    if len(patch) != first.spatial_dims:
        raise OptionError(
            f"data.patch_shape {list(patch)} has {len(patch)} axes but the data is "
            f"{first.spatial_dims}D")
    init_meta, init_state = None, None
    if config.train.init is not None:
        ck = load_checkpoint(config.train.init)
        init_meta, init_state = ck.metadata, ck.state_dict
    arch = _arch(config, int(first.image.shape[0]), first.spatial_dims, init_meta)
    try:
        UNet(**arch).check_input_shape(patch)
    except OptionError as exc:
        raise OptionError(f"data.patch_shape: {exc}") from None
    # a batch's float32 inputs, targets, scores and the first level's features: a lower
    # bound of what one training process holds at once
    batch = config.train.batch_size
    check_held(batch * math.prod(patch) * 4 * (int(first.image.shape[0]) + 2 * arch[
        "out_channels"] + 2 * arch["features"][0]),
        f"train.batch_size {batch} × data.patch_shape {list(patch)}",
        "a training process holds a whole batch with its first layer's features")
    CropSampler(train, patch, config.data.foreground_fraction).check_foreground()
    warning = check_validation(val, split.val_foreground,
                               config.data.allow_empty_validation, client)
    prepare(train + val, config.data.normalization, client)
    return TrainPlan(config, train, val, int(first.image.shape[0]), first.channel_names,
                     first.spatial_dims, tuple(first.voxel_size), first.unit, arch, resume,
                     init_state, "val_loss" if warning else "val_dice",
                     split.notes + ([warning] if warning else []))


def _same_setting(before: Any, now: Any) -> bool:
    """Equal configuration values; a key missing on one side equals null (a field added
    since the run began, e.g. ``loss.class_weights``, at its null default)."""
    if isinstance(before, dict) and isinstance(now, dict):
        return all(_same_setting(before.get(k), now.get(k)) for k in before.keys() | now.keys())
    return before == now


def _check_resumable(config: TrainConfig) -> None:
    ck = load_checkpoint(config.output / LAST)
    before = ck.metadata.get("config", {})
    now = config.to_dict()
    for side in (before, now):  # the loader's threads change no sample
        if isinstance(side.get("data"), dict):
            side["data"] = {k: v for k, v in side["data"].items() if k != "workers"}
    changed = [s for s in FIXED_ON_RESUME if not _same_setting(before.get(s), now.get(s))]
    if changed:
        raise OptionError(
            f"{config.output / LAST}: the {', '.join(changed)} section(s) differ from the run "
            "being resumed; only train.* settings may change (start a new output folder or "
            "use --overwrite)")


# --------------------------------------------------------------------------- targets


def _boundaries(label: np.ndarray, width: int) -> np.ndarray:
    """Inner boundaries of the instances (width voxels), per sample of ``(B, *S)``."""
    out = np.zeros(label.shape, bool)
    for b, lab in enumerate(label):
        fg = lab > 0
        # a voxel is on a boundary when a neighbour belongs to another instance or background
        hi = ndimage.grey_dilation(lab, size=3)
        lo = -ndimage.grey_dilation(-np.where(lab == IGNORE, np.iinfo(lab.dtype).max, lab),
                                    size=3)
        edge = fg & ((hi != lab) | (lo != lab))
        if width > 1:
            edge = ndimage.binary_dilation(edge, iterations=width - 1) & fg
        out[b] = edge
    return out


def make_targets(label: np.ndarray, kind: str, n_classes: int, boundary_width: int = 1
                 ) -> np.ndarray:
    """Training targets from labels in the training convention (``IGNORE`` = -1).

    Parameters
    ----------
    label : ndarray of int64, shape (B, *S)
    kind : {"binary", "boundary", "classes"}

    Returns
    -------
    ndarray of int64
        binary: ``(B, 1, *S)`` 0/1/IGNORE; boundary: ``(B, 2, *S)`` (foreground, boundary)
        0/1/IGNORE; classes: ``(B, *S)`` class indices or IGNORE.
    """
    ignore = label == IGNORE
    if kind == "classes":
        bad = (label >= n_classes) & ~ignore
        if bad.any():
            raise InputError(
                f"label value {int(label[bad].max())} is not a class index below "
                f"{n_classes}: map the source's values with classes: in data.train")
        return label.astype(np.int64)
    fg = (label > 0).astype(np.int64)
    if kind == "binary":
        return np.where(ignore, IGNORE, fg)[:, None]
    edge = _boundaries(label, boundary_width).astype(np.int64)
    return np.stack([np.where(ignore, IGNORE, fg), np.where(ignore, IGNORE, edge)], axis=1)


def compute_loss(logits: torch.Tensor, target: torch.Tensor, config: TrainConfig,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """The configured loss of a batch; ignored voxels count nowhere. ``reduce``: the sum
    over data-parallel ranks of the batch-wide sums (:func:`engine.learn.ddp.reducer`)."""
    kind, lc = config.target.kind, config.loss
    logits = logits.float()
    if kind == "classes":
        return masked_ce_dice(logits, target, ignore_index=IGNORE, dice_weight=lc.dice_weight,
                              class_weights=lc.class_weights, reduce=reduce)
    total = logits.new_zeros(())
    for ch in range(logits.shape[1]):  # binary: 1 channel; boundary: foreground + boundary
        total = total + masked_bce_dice(logits[:, ch:ch + 1], target[:, ch:ch + 1],
                                        ignore_index=IGNORE, pos_weight=lc.pos_weight,
                                        dice_weight=lc.dice_weight, reduce=reduce)
    return total


# --------------------------------------------------------------------------- batches


def target_shape(config: TrainConfig) -> tuple[int, ...]:
    """One sample's target shape: ``(1, *patch)`` binary, ``(2, *patch)`` boundary,
    ``patch`` classes (see :func:`make_targets`)."""
    patch = tuple(config.data.patch_shape)
    return {"binary": (1, *patch), "boundary": (2, *patch)}.get(config.target.kind, patch)


def augments_on_device(config: TrainConfig, device: torch.device) -> bool:
    """``train.augment_on``: ``auto`` augments on the device when it is a GPU."""
    where = config.train.augment_on
    return where == "device" or (where == "auto" and device.type == "cuda")


class Batches:
    """Seeded batches from the parallel crop loader (:mod:`engine.learn.loader`).

    Parameters
    ----------
    plan : TrainPlan
    device : torch.device
        The training device (pinned buffers and device augmentation on CUDA).
    samples : sequence of int, optional
        The sample indices of the global batch made here (a data-parallel rank's share);
        default all.
    local_ranks : int
        Ranks sharing this machine's cores (the default number of loader threads).
    """

    def __init__(self, plan: TrainPlan, device: torch.device,
                 samples: Sequence[int] | None = None, local_ranks: int = 1) -> None:
        cfg = plan.config
        self.sampler = CropSampler(plan.train, cfg.data.patch_shape,
                                   cfg.data.foreground_fraction, cfg.train.seed,
                                   memory_bytes=int(cfg.data.memory_mib * 2**20))
        self.augment = Augment(cfg.augment)
        self.on_device = augments_on_device(cfg, device)
        self.cfg = cfg
        workers = cfg.data.workers
        if not isinstance(workers, int):
            workers = default_workers(local_ranks)
        small = len(cfg.target.classes) <= 127  # targets fit int8: -1, 0, 1 or classes
        self.loader = BatchLoader(
            self._fill, range(cfg.train.batch_size) if samples is None else samples,
            (plan.in_channels, *cfg.data.patch_shape), target_shape(cfg), workers,
            cfg.train.prefetch, pin=device.type == "cuda",
            target_dtype=torch.int8 if small else torch.int32)

    def _fill(self, iteration: int, j: int, image: np.ndarray, target: np.ndarray) -> Any:
        rng = np.random.default_rng([self.cfg.train.seed, iteration, j])
        img, lab = self.sampler.sample(rng)
        ops = None
        if self.on_device:  # only the random choices here; the device applies them
            ops = draw_augmentation(self.augment, rng, lab.shape)
        else:
            img, lab, _ = self.augment(img, lab, None, rng=rng)
        t = self.cfg.target
        image[...] = img
        target[...] = make_targets(lab[None].astype(np.int64), t.kind, len(t.classes),
                                   t.boundary_width)[0]
        return ops

    def get(self, iteration: int, last: int) -> Batch:
        """The host batch of ``iteration`` (batches up to ``last`` are prepared ahead)."""
        return self.loader.get(iteration, last)

    def to_device(self, batch: Batch, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and int64 target on ``device``, augmented there when so configured."""
        x, t = batch.to(device)
        if self.on_device:
            x, t = augment_on_device(x, t, batch.extras)
        return x, t

    def close(self) -> None:
        self.loader.close()


# --------------------------------------------------------------------------- the loop


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """The learning rate at ``iteration`` (1-based): linear warm-up, then the schedule."""
    c = config.train
    if c.warmup and iteration <= c.warmup:
        return c.lr * iteration / c.warmup
    span = max(c.iterations - c.warmup, 1)
    progress = min(max(iteration - c.warmup, 0) / span, 1.0)
    if c.schedule == "cosine":
        return c.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
    if c.schedule == "step":  # ÷10 after one and two thirds of the iterations
        return c.lr * 0.1 ** min(int(progress * 3), 2)
    return c.lr


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name}: CUDA is not available on {socket.gethostname()} "
                          "(torch was built without it, or no GPU is visible)")
    return torch.device(name)


def metadata(plan: TrainPlan, model: UNet, history: list[Event], best: dict[str, Any],
             iteration: int) -> dict[str, Any]:
    """The checkpoint's JSON metadata: everything inference needs, and how it was made."""
    cfg = plan.config
    kind = cfg.target.kind
    return {
        "arch": {"name": "unet", **model.arch()},
        "input": {
            "channels": list(plan.channel_names),
            "normalization": cfg.data.normalization.to_dict(),
            "stats": _stats_list(plan.train + plan.val),
        },
        "target": {"kind": kind, "classes": list(cfg.target.classes),
                   "activation": "softmax" if kind == "classes" else "sigmoid",
                   "boundary_width": cfg.target.boundary_width},
        "patch_shape": list(cfg.data.patch_shape),
        "divisor": list(model.divisor),
        "receptive_field": list(receptive_field(model)),
        "voxel_size": list(plan.voxel_size), "unit": plan.unit,
        "validation": {"regions": validation_regions(plan.val), "select_by": plan.select_by},
        "iteration": iteration, "best": best, "history": history,
        "config": cfg.to_dict(),
    }


def _stats_list(volumes: Sequence[TrainVolume]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for v in volumes:
        if v.stats is not None and v.group not in seen:
            seen[v.group] = {"name": v.group, **v.stats.to_dict()}
    return list(seen.values())


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def _write_metrics(out: Path, history: list[Event], best: dict[str, Any], stopped: str,
                   iteration: int) -> None:
    _write_json(out / METRICS, {"iteration": iteration, "stopped": stopped, "best": best,
                                "history": history})
    try:
        from engine.learn.curves import plot_curves

        plot_curves(history, out / CURVES, title=out.name)
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        pass


def run_training(plan: TrainPlan, events: Callable[[Event], None] | None = None,
                 overwrite: bool = False, rank: ddp.Rank | None = None,
                 step_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train as planned; checkpoints, metrics and curves go to ``plan.config.output``.

    Parameters
    ----------
    plan : TrainPlan
        From :func:`plan_training`.
    events : callable, optional
        Called with ``{"event": "start"|"iteration"|"validation"|"end", ...}`` dicts
        (iteration, loss, lr, val_dice, data_wait_s, step_s ...) for progress reporting.
    overwrite : bool
        Remove an earlier run's files first (the planner has checked it was asked for).
    rank : engine.learn.ddp.Rank, optional
        This process's rank of a data-parallel training (:func:`train_on_cluster` starts
        one per GPU worker); rank 0 writes the outputs and reports.
    step_model : callable, optional
        Makes the module the steps run (and the optimizer updates) from the U-Net, for
        benchmarks: e.g. a simulated accelerator (``tests/simdevice.py``). The checkpoints
        hold the U-Net.
    should_stop : callable, optional
        Asked before every iteration (on every rank); true stops the run as an interrupt
        would (``stopped: "interrupted"``, ``last.pt`` from the last validation): the client
        of a cluster run went away.
    """
    if rank is not None and not rank.is_main:
        return _run_training(plan, None, False, rank, step_model, should_stop)
    # one writer per run folder (on the cluster, the worker that trains holds it)
    with output_lock(plan.config.output):
        result = _run_training(plan, events, overwrite, rank, step_model, should_stop)
    result.validation = validation_regions(plan.val)
    return result


def amp_dtype(setting: bool | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device``: ``None`` off the GPU or when off;
    ``true`` is bf16 where the GPU supports it (no grad scaler needed), else fp16."""
    if device.type != "cuda" or setting is False:
        return None
    if setting == "fp16":
        return torch.float16
    if setting == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _memory_format(config: TrainConfig, spatial_dims: int) -> torch.memory_format | None:
    if not config.train.channels_last:
        return None
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


class _Clock:
    """Seconds spent waiting for data, stepping and validating since the last reset."""

    def __init__(self) -> None:
        self.data = self.step = self.val = 0.0
        self.total_data = self.total_step = 0.0

    def entry(self) -> dict[str, float]:
        wall = self.data + self.step + self.val
        return {"data_wait_s": round(self.data, 4), "step_s": round(self.step, 4),
                "val_s": round(self.val, 4),
                "data_wait_fraction": round(self.data / wall, 4) if wall > 0 else 0.0}

    def reset(self) -> None:
        self.data = self.step = self.val = 0.0


def _run_training(plan: TrainPlan, events: Callable[[Event], None] | None,
                  overwrite: bool, rank: ddp.Rank | None = None,
                  step_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> TrainResult:
    cfg = plan.config
    main = rank is None or rank.is_main
    emit = (events or (lambda e: None)) if main else (lambda e: None)
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    if main and overwrite and not plan.resume:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    device = resolve_device(cfg.train.device)
    if rank is not None and device.type == "cuda":
        device = torch.device("cuda", rank.device_index % max(torch.cuda.device_count(), 1))
    if rank is not None:
        ddp.start(rank, device)
    try:
        return _train_loop(plan, emit, device, rank, step_model, should_stop)
    finally:
        if rank is not None:
            ddp.stop()


def _train_loop(plan: TrainPlan, emit: Callable[[Event], None], device: torch.device,
                rank: ddp.Rank | None,
                step_model: Callable[[torch.nn.Module], torch.nn.Module] | None,
                should_stop: Callable[[], bool] | None = None) -> TrainResult:
    cfg = plan.config
    out = cfg.output
    main = rank is None or rank.is_main
    torch.manual_seed(cfg.train.seed)
    model = UNet(**plan.arch)
    if plan.init_state is not None:
        _load_state(model, plan.init_state, str(cfg.train.init))
    history: list[Event] = []
    best: dict[str, Any] = {}
    start, bad_validations = 1, 0
    running, running_n = 0.0, 0
    ck = None
    if plan.resume:
        ck = load_checkpoint(out / LAST, map_location="cpu")
        _load_state(model, ck.state_dict, str(out / LAST))
        history, best = list(ck.metadata.get("history", [])), dict(ck.metadata.get("best", {}))
        start = int(ck.metadata["iteration"]) + 1
        extra = ck.extra or {}
        bad_validations = int(extra.get("bad_validations", 0))
        running, running_n = float(extra.get("running", 0.0)), int(extra.get("running_n", 0))
        if "torch_rng" in extra:
            torch.set_rng_state(extra["torch_rng"].cpu())
    fmt = _memory_format(cfg, plan.spatial_dims)
    if fmt is None:
        model.to(device)
    else:
        model.to(device, memory_format=fmt)
    model = ddp.sync_batch_norm(model, device)
    stepped = model if step_model is None else step_model(model).to(device)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(stepped.parameters(), lr=cfg.train.lr,
                        weight_decay=cfg.train.weight_decay)
    if ck is not None and ck.optimizer is not None:
        optimizer.load_state_dict(ck.optimizer)
    net = ddp.wrap(stepped, device)
    if cfg.train.compile:
        net = torch.compile(net)
    reduce = ddp.reducer()
    if main:
        _write_yaml(out / CONFIG, cfg.to_dict())

    dtype = amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    target_cfg = cfg.target
    # rank 0 validates, on the U-Net itself (not a data-parallel wrapper)
    validator = Validator(plan.val if main else [], cfg.data.patch_shape, model.divisor,
                          target_cfg.kind, device, cfg.train.batch_size,
                          lambda x, y: compute_loss(x, y, cfg),
                          lambda lab: make_targets(lab, target_cfg.kind,
                                                   len(target_cfg.classes),
                                                   target_cfg.boundary_width))
    batches = Batches(plan, device, rank.samples(cfg.train.batch_size) if rank else None,
                      rank.local_ranks if rank else 1)
    last = cfg.train.iterations
    stop_at = min(cfg.train.stop_at or last, last)
    emit({"event": "start", "start": start, "iterations": last, "device": str(device),
          "threads": torch.get_num_threads(),
          "train_volumes": len(plan.train), "val_volumes": len(plan.val),
          "val_voxels": validator.voxels, "ranks": rank.world if rank else 1,
          "loader_workers": batches.loader.workers,
          "augment_on": "device" if batches.on_device else "cpu"})
    t0 = time.monotonic()
    stopped = "completed"
    iteration = start - 1
    clock = _Clock()
    net.train()

    def save(name: str, with_optimizer: bool) -> None:
        meta = metadata(plan, model, history, best, iteration)
        save_checkpoint(out / name, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                        meta, optimizer.state_dict() if with_optimizer else None,
                        {"bad_validations": bad_validations, "torch_rng": torch.get_rng_state(),
                         "running": running, "running_n": running_n,
                         "ranks": rank.world if rank else 1})

    try:
        for iteration in range(start, stop_at + 1):
            if should_stop is not None and ddp.any_rank(should_stop(), device):
                stopped = "interrupted"
                iteration -= 1
                break
            lr = learning_rate(cfg, iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ta = time.perf_counter()
            host = batches.get(iteration, stop_at)
            tb = time.perf_counter()
            x, t = batches.to_device(host, device)
            if fmt is not None:
                x = x.contiguous(memory_format=fmt)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                logits = net(x)
            loss = compute_loss(logits, t, cfg, reduce)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            value = float(loss.detach())  # waits for the device: the step's time is whole
            tc = time.perf_counter()
            clock.data += tb - ta
            clock.step += tc - tb
            clock.total_data += tb - ta
            clock.total_step += tc - tb
            if not math.isfinite(value):
                raise OptionError(f"training diverged at iteration {iteration} (loss {value}); "
                                  "lower train.lr")
            running += value
            running_n += 1
            busy = clock.total_data + clock.total_step
            emit({"event": "iteration", "iteration": iteration, "loss": value, "lr": lr,
                  "data_wait_s": tb - ta, "step_s": tc - tb,
                  "data_wait_fraction": clock.total_data / busy if busy > 0 else 0.0})
            if iteration % cfg.train.val_every and iteration != last:
                if iteration == stop_at:  # a slice of the training ends: resumable here
                    if main:
                        save(LAST, with_optimizer=True)
                    stopped = "stopped"
                continue
            tv = time.perf_counter()
            entry: Event = {"iteration": iteration, "loss": running / max(running_n, 1),
                            "lr": lr, "time_s": round(time.monotonic() - t0, 3)}
            running, running_n = 0.0, 0
            early = False
            if main:
                better = True  # nothing to validate on: the latest model is the best
                if validator:
                    entry.update(validator(model, cfg.out_channels))
                    better = improved(entry, best, plan.select_by)
                if better:
                    bad_validations = 0
                    # chosen by loss (no foreground to validate on): its Dice says nothing
                    kept = ("val_loss",) if plan.select_by == "val_loss" else \
                        ("val_dice", "val_iou", "val_loss")
                    best = {"iteration": iteration,
                            **{k: entry[k] for k in kept if k in entry}}
                else:
                    bad_validations += 1
                clock.val += time.perf_counter() - tv
                entry.update(clock.entry())
                history.append(entry)
                if better:
                    save(BEST, with_optimizer=False)
                save(LAST, with_optimizer=True)
                _write_metrics(out, history, best, "running", iteration)
                emit({"event": "validation", **entry, "best": best})
                early = bool(cfg.train.patience and bad_validations >= cfg.train.patience)
            clock.reset()
            if ddp.from_main(early, device):
                stopped = "early_stop"
                break
            if iteration == stop_at and stop_at < last:
                stopped = "stopped"
    finally:
        batches.close()
        validator.close()
    if main:
        _write_metrics(out, history, best, stopped, iteration)
    seconds = time.monotonic() - t0
    emit({"event": "end", "iteration": iteration, "stopped": stopped, "best": best,
          "seconds": seconds, "data_wait_s": round(clock.total_data, 3),
          "step_s": round(clock.total_step, 3)})
    return TrainResult(out, iteration, best, history, stopped, seconds, str(device),
                       data_wait_s=clock.total_data, step_s=clock.total_step)


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise InputError(f"{where}: weights do not fit the model ({' '.join(first)})") from None


def _write_yaml(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- on a cluster


def _stop_flag(name: str) -> tuple[threading.Event, threading.Event]:
    """A local flag set when the client sets the Dask event ``name`` (watched by a thread,
    so the loop asks a local flag, not the scheduler); set the second to end the watch."""
    from distributed import Event

    stop, done = threading.Event(), threading.Event()
    remote = Event(name)

    def watch() -> None:
        while not done.is_set():
            try:
                if remote.wait(timeout=1.0):
                    stop.set()
                    return
            except Exception:  # noqa: BLE001 - the scheduler went away: stop
                stop.set()
                return

    threading.Thread(target=watch, name="voxelmill-stop-watch", daemon=True).start()
    return stop, done


def _train_task(plan: TrainPlan, queue_name: str, overwrite: bool,
                rank: ddp.Rank | None = None) -> TrainResult:
    from distributed import Queue, get_worker

    worker = get_worker()
    queue = Queue(queue_name)
    last_put = [0.0]
    stop, done = _stop_flag(f"{queue_name}-stop")

    def forward(event: Event) -> None:
        # iterations are frequent: send one per second at most, the rest always
        now = time.monotonic()
        if event["event"] == "iteration" and now - last_put[0] < 1.0:
            return
        last_put[0] = now
        queue.put(json.loads(json.dumps(event, default=str)))

    before = torch.get_num_threads()
    try:  # the stop watch ends whatever happens, a device refused here included
        if resolve_device(plan.config.train.device).type == "cpu":
            # a worker starts with OMP_NUM_THREADS=1: the steps get the worker's threads, as
            # a training in the client's process gets its machine's cores
            torch.set_num_threads(worker.state.nthreads)
        result = run_training(plan, forward, overwrite, rank, should_stop=stop.is_set)
    finally:
        done.set()
        torch.set_num_threads(before)
    result.worker = worker.address
    return result


def _submit_ranks(plan: TrainPlan, client: Any, gpus: list[str], name: str,
                  overwrite: bool) -> list[Any]:
    """One training task per GPU worker, ranks of one data-parallel training."""
    world = len(gpus)
    batch = plan.config.train.batch_size
    if batch < world:
        raise OptionError(f"train.batch_size {batch}: smaller than the {world} GPU workers "
                          f"(one data-parallel rank each, each making its share of the batch); "
                          f"use a batch of at least {world}")
    port = client.run(ddp.free_port, workers=[gpus[0]])[gpus[0]]
    init = f"tcp://{ddp.host_of(gpus[0])}:{port}"
    local = ddp.local_indices(gpus)
    per_host = {h: sum(ddp.host_of(a) == h for a in gpus) for h in map(ddp.host_of, gpus)}
    return [client.submit(_train_task, plan, name, overwrite,
                          ddp.Rank(r, world, init, local[r], per_host[ddp.host_of(addr)]),
                          resources={"GPU": 1}, workers=[addr], allow_other_workers=False,
                          pure=False, key=f"{name}-rank{r}")
            for r, addr in enumerate(gpus)]


def train_on_cluster(plan: TrainPlan, client: Any, events: Callable[[Event], None] | None = None,
                     overwrite: bool = False, report: Callable[[str], None] = print
                     ) -> TrainResult:
    """Run :func:`run_training` on the GPU workers of ``client``.

    With one worker advertising ``GPU=1``, it trains there; with N ≥ 2, the N workers train
    together, one data-parallel rank each (:mod:`engine.learn.ddp`), the global batch shared
    among them. Without GPU workers, ``--device cpu`` (or ``auto``) trains on any worker and
    says so; ``--device cuda`` is refused. Progress events come back through a Dask queue
    from rank 0. The workers read their crops straight from the stores, so the output folder
    and the data must be on storage they see.
    """
    from distributed import Queue
    from distributed.utils import TimeoutError as DaskTimeout

    data = plan.config.data
    check_workers_see(client, [s.path for s in (*data.train, *data.val)],
                      [plan.config.output / "best.pt"])
    gpus = gpu_workers(client)
    device = plan.config.train.device
    if not gpus and device.startswith("cuda"):
        raise OptionError(f"--device {device}: no worker of the cluster advertises GPU "
                          "resources (start one with: dask worker --resources GPU=1)")
    name = f"voxelmill-train-{os.getpid()}-{time.time_ns()}"
    if len(gpus) >= 2:
        report(f"training on {len(gpus)} GPU workers, one data-parallel rank each "
               f"({', '.join(gpus)})")
        futures = _submit_ranks(plan, client, gpus, name, overwrite)
    else:
        report(f"training on {'a GPU worker (' + gpus[0] + ')' if gpus else 'a worker'}"
               f"{'' if gpus else ' (no worker advertises GPU=1)'}")
        futures = [client.submit(_train_task, plan, name, overwrite,
                                 resources={"GPU": 1} if gpus else None, pure=False, key=name)]
    queue = Queue(name, client=client)
    emit = events or (lambda e: None)
    finished = False
    # the loop below looks every half second: the watch need not wake it
    watch = StallWatch(client, wake=lambda: None).__enter__()  # left in the finally clause
    try:
        while True:
            try:
                emit(queue.get(timeout=0.5))
            except (DaskTimeout, TimeoutError):
                if all(f.done() for f in futures) or any(f.status == "error" for f in futures):
                    break
                if watch.message is not None:
                    raise ClusterLost(f"train: {watch.message}; {KEPT}") from None
        while queue.qsize():
            emit(queue.get())
        try:
            results = [f.result() for f in futures]  # a rank's error is raised here
        except Exception as exc:
            lost = cluster_lost(exc, "train", KEPT)
            if lost is None:
                raise
            raise lost from None
        finished = True
        return results[0]
    finally:
        watch.__exit__()
        if not finished:  # interrupted here (Ctrl-C, an error): the ranks stop too
            _stop_ranks(client, name, futures)
        queue.close()


def _stop_ranks(client: Any, name: str, futures: list[Any], wait_s: float = 60.0) -> None:
    """Tell the training tasks to stop and wait (a while) until they have, so that no rank
    writes into the run folder after this returns."""
    from distributed import Event, wait

    try:
        Event(f"{name}-stop", client=client).set()
        wait(futures, timeout=wait_s)
    except Exception:  # noqa: BLE001 - best effort on the way out; the caller's error wins
        pass


def train(config: TrainConfig, client: Any = None, resume: bool = False,
          overwrite: bool = False, on_cluster: bool = False,
          events: Callable[[Event], None] | None = None,
          report: Callable[[str], None] = print) -> TrainResult:
    """Plan, then train here or (``on_cluster``) on a GPU worker of ``client``."""
    plan = plan_training(config, client, resume, overwrite)
    if on_cluster:
        return train_on_cluster(plan, client, events, overwrite, report)
    return run_training(plan, events, overwrite)


__all__ = ["TrainPlan", "TrainResult", "compute_loss", "learning_rate", "make_targets",
           "plan_training", "run_training", "train", "train_on_cluster", "validation_regions"]
