"""``voxelmill train``: train a U-Net from a YAML configuration. Thin: parse, call
``engine.learn.train``, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.options import MemoryLimit, Overwrite, Scheduler, Threads, Workers


def require_torch(what: str) -> None:
    """A one-line error instead of an ImportError traceback when PyTorch is missing."""
    from engine.errors import VoxelmillError

    try:
        import torch  # noqa: F401
    except ImportError:
        raise VoxelmillError(
            f"{what} needs PyTorch: pip install -c constraints.txt -e '.[learn]' (CPU), or "
            "install your CUDA build of torch first") from None


def _overrides(output: Path | None, data: list[Path] | None, val_data: list[Path] | None,
               labels: str | None, channels: str | None, patch_shape: str | None,
               iterations: int | None, batch_size: int | None, lr: float | None,
               device: str | None, seed: int | None, init: Path | None,
               settings: list[str] | None) -> list[str]:
    """The flags as dotted ``KEY=VALUE`` overrides (paths made absolute: flags are relative
    to the current folder, config entries to the config file)."""
    import json

    from cli.common import ints

    out: list[str] = []

    def sources(paths: list[Path]) -> str:
        entries: list[dict[str, Any]] = []
        for p in paths:
            e: dict[str, Any] = {"path": str(p.resolve())}
            if labels is not None:
                e["labels"] = labels
            if channels is not None:
                e["channels"] = [int(c) if c.strip().isdigit() else c.strip()
                                 for c in channels.split(",")]
            entries.append(e)
        return json.dumps(entries)

    if output is not None:
        out.append(f"output={json.dumps(str(output.resolve()))}")
    if data:
        out.append(f"data.train={sources(data)}")
    if val_data:
        out.append(f"data.val={sources(val_data)}")
    if patch_shape is not None:
        out.append(f"data.patch_shape={list(ints(patch_shape, '--patch-shape') or ())}")
    for key, value in (("iterations", iterations), ("batch_size", batch_size), ("lr", lr),
                       ("seed", seed)):
        if value is not None:
            out.append(f"train.{key}={value}")
    if device is not None:
        out.append(f"train.device={device}")
    if init is not None:
        out.append(f"train.init={json.dumps(str(init.resolve()))}")
    return out + list(settings or [])


def train(
    config: Annotated[Path | None, typer.Argument(
        help="Training configuration (YAML): data sources, target, model, loss, augmentation, "
        "loop. Optional when the flags say enough.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for best.pt, last.pt, metrics.json, curves.png.")] = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", help="Training source (OME-Zarr with labels, patch folder, dataset split, "
        "curated samples, PartSeg project); repeatable; replaces data.train.")] = None,
    val_data: Annotated[list[Path] | None, typer.Option(
        "--val-data", help="Validation source; repeatable; replaces data.val.")] = None,
    labels: Annotated[str | None, typer.Option(
        help="With --data: label image name (OME-Zarr labels/NAME, PartSeg roi or an "
        "alternative map).")] = None,
    channels: Annotated[str | None, typer.Option(
        help="With --data: input channels by name or index, comma-separated.")] = None,
    patch_shape: Annotated[str | None, typer.Option(
        help="Crop shape, e.g. 128,128 or 64,128,128.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Training iterations.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Crops per iteration.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of initialisation and sampling.")
                    ] = None,
    init: Annotated[Path | None, typer.Option(
        help="Checkpoint to fine-tune from (its architecture is kept).")] = None,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="Any configuration field as KEY=VALUE with a dotted key, e.g. "
        "--set train.val_every=50 --set loss.pos_weight=auto; repeatable.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in the output folder from its last.pt.")] = False,
    overwrite: Overwrite = False,
    gpus: Annotated[str | None, typer.Option(
        help="N or auto: the embedded cluster starts one GPU worker per device and trains on "
        "them, one data-parallel rank each (the batch shared among them); with --device cpu, "
        "N CPU ranks (gloo).")] = None,
    scheduler: Scheduler = None, workers: Workers = None,
    threads_per_worker: Threads = None, memory_limit: MemoryLimit = None,
) -> None:
    """Train a U-Net on curated automatic labels; with --scheduler or --gpus, on the workers
    that have GPU=1 resources (data-parallel when there are several)."""
    from cli.common import cluster, err, out, set_cluster_options, user_errors

    with user_errors():
        require_torch("voxelmill train")
        from engine.learn.config import load_config
        from engine.learn.train import plan_training, run_training, train_on_cluster

        cfg = load_config(config, _overrides(output, data, val_data, labels, channels,
                                             patch_shape, iterations, batch_size, lr, device,
                                             seed, init, settings))
        from engine.cluster import gpu_workers

        if gpus is not None:
            set_cluster_options(gpus=gpus, cpu_gpu_workers=cfg.train.device == "cpu")
        show = _Display(cfg.train.iterations)
        with cluster(scheduler, workers, threads_per_worker, memory_limit) as client:
            plan = plan_training(cfg, client, resume, overwrite)
            err.print(f"training on {plan.train_voxels / 1e6:.2f} M voxels from "
                      f"{len(plan.train)} region(s), validating on {plan.val_voxels / 1e6:.2f} "
                      f"M voxels from {len(plan.val)}", markup=False)
            for line in plan.notes:
                err.print(line, markup=False)
            on_cluster = bool(scheduler) or bool(gpu_workers(client))
            if on_cluster:
                result = train_on_cluster(plan, client, show, overwrite,
                                          report=lambda line: err.print(line, markup=False))
        if not on_cluster:  # the embedded cluster only computed the statistics
            result = run_training(plan, show, overwrite)
        show.close()
        best = result.best
        score = (f"best validation Dice {best['val_dice']:.3f} (IoU {best['val_iou']:.3f}) at "
                 f"iteration {best['iteration']}") if "val_dice" in best else (
            f"lowest validation loss {best['val_loss']:.4f} at iteration {best['iteration']} "
            "(no validation Dice: no foreground)") if "val_loss" in best else "no validation"
        where = f" on {result.worker}" if result.worker else ""
        out.print(f"trained {result.iterations} iterations{where} ({result.device}, "
                  f"{result.seconds:.0f} s, {result.stopped}); {score}", markup=False)
        out.print(f"wrote {result.output}/best.pt, last.pt, metrics.json, curves.png",
                  markup=False)


class _Display:
    """A progress bar with the loss on a terminal; a line per validation otherwise."""

    def __init__(self, total: int) -> None:
        import sys

        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from cli.common import err

        self.err = err
        self.bar: Any = None
        if sys.stderr.isatty():
            self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/"
                                "{task.total}"), TextColumn("{task.fields[loss]}"),
                                TextColumn("{task.fields[wait]}"), TimeRemainingColumn(),
                                console=err)
            self.task = self.bar.add_task("train", total=total, loss="", wait="")
            self.bar.start()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start" and self.bar is not None:
            self.bar.update(self.task, completed=event["start"] - 1)
        elif kind == "iteration" and self.bar is not None:
            # the share of the loop's time spent waiting for data (the crop loader)
            self.bar.update(self.task, completed=event["iteration"],
                            loss=f"loss {event['loss']:.4f}",
                            wait=f"data wait {event.get('data_wait_fraction', 0.0):.0%}")
        elif kind == "validation":
            val = (f", val loss {event['val_loss']:.4f}, Dice {event['val_dice']:.3f}, "
                   f"IoU {event['val_iou']:.3f}") if "val_dice" in event else (
                f", val loss {event['val_loss']:.4f}, Dice undefined" if "val_loss" in event
                else "")
            timing = (f"; data wait {event['data_wait_s']:.1f} s, step {event['step_s']:.1f} s,"
                      f" validation {event['val_s']:.1f} s") if "step_s" in event else ""
            line = (f"iteration {event['iteration']}: loss {event['loss']:.4f}, "
                    f"lr {event['lr']:.2e}{val}{timing}")
            if self.bar is not None:
                self.bar.update(self.task, completed=event["iteration"])
                self.bar.console.print(line, markup=False)
            else:
                self.err.print(line, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
