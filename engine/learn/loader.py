"""The parallel crop pipeline: training batches made by a pool of threads, ahead of the loop.

Each sample ``j`` of iteration ``i`` is one task: a loader thread samples its crop, reads
and decodes the chunks it touches, augments it and writes it straight into its slot of the
batch's buffers (pinned host memory when training on CUDA, so the copy to the device is
asynchronous). Batches up to ``prefetch`` iterations ahead are in flight, so while the
device runs a step the threads already prepare the next ones.

Why threads and not ``torch.utils.data.DataLoader`` worker processes: the work of a crop is
chunk decompression (blosc, zstd), NumPy and SciPy, which release the GIL for most of their
time; threads share the samplers' caches (foreground coordinates, volumes held in memory)
instead of copying them per process; and training under ``--scheduler`` runs inside a Dask
worker, whose daemonic process cannot start child processes. The benchmark
(``tests/benchmarks/bench_train.py``) measures whether the threads keep up.

Exactness: a sample is made from ``(seed, i, j)`` alone (see :mod:`engine.learn.train`), and
its slot in the batch is fixed, so the batches are the same whatever the number of threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: most loader threads chosen by default (more rarely help one device)
MAX_DEFAULT_WORKERS = 12

#: ``fill(iteration, j, image_slot, target_slot)`` writes sample ``j`` into its slots and
#: returns anything the step needs beside the tensors (e.g. device augmentation parameters)
Fill = Callable[[int, int, np.ndarray, np.ndarray], Any]


def default_workers(ranks_here: int = 1) -> int:
    """Loader threads when ``data.workers`` is ``auto``: the cores of this process left after
    one for the training loop, shared among the ranks on this machine, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, (cores - 1) // max(ranks_here, 1)))


@dataclass
class Batch:
    """One iteration's data on the host.

    Attributes
    ----------
    image : torch.Tensor
        float32 ``(B, C, *patch)``, pinned on a CUDA machine.
    target : torch.Tensor
        Integer ``(B, *target)`` (int8 unless many classes), made int64 on the device.
    extras : list
        What ``fill`` returned for each sample, in sample order.
    """

    image: torch.Tensor
    target: torch.Tensor
    extras: list[Any]

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and int64 target on ``device`` (asynchronous copies from pinned memory)."""
        x = self.image.to(device, non_blocking=True)
        t = self.target.to(device, non_blocking=True).long()
        return x, t


class _Pending:
    """A batch being filled: its buffers and one future per sample."""

    def __init__(self, image: torch.Tensor, target: torch.Tensor) -> None:
        self.image, self.target = image, target
        self.futures: list[Future] = []


class BatchLoader:
    """Batches from per-sample tasks run by ``workers`` threads (0: in the caller).

    Parameters
    ----------
    fill : callable
        ``fill(iteration, j, image_slot, target_slot) -> extra``; see :data:`Fill`.
    samples : sequence of int
        The sample indices ``j`` this loader makes for each iteration (all of the global
        batch on one device; a rank's share with several).
    image_shape, target_shape : tuple of int
        One sample's image ``(C, *patch)`` and target shape.
    workers : int
        Loader threads; 0 makes every sample in :meth:`get`, in the calling thread.
    prefetch : int
        Iterations prepared ahead of the one asked for.
    pin : bool
        Page-locked buffers (only when CUDA is available), for asynchronous copies.
    target_dtype : torch.dtype
        Of the target buffers (int8 by default: targets are -1, 0, 1 or small class
        indices; made int64 on the device).
    """

    def __init__(self, fill: Fill, samples: Sequence[int], image_shape: Sequence[int],
                 target_shape: Sequence[int], workers: int, prefetch: int,
                 pin: bool = False, target_dtype: torch.dtype = torch.int8) -> None:
        self.fill = fill
        self.samples = list(samples)
        self.image_shape = (len(self.samples), *image_shape)
        self.target_shape = (len(self.samples), *target_shape)
        self.workers = int(workers)
        self.prefetch = max(int(prefetch), 1) if self.workers else 0
        self.pin = bool(pin) and torch.cuda.is_available()
        self.target_dtype = target_dtype
        self.pool = (ThreadPoolExecutor(self.workers, thread_name_prefix="voxelmill-crops")
                     if self.workers else None)
        self.pending: dict[int, _Pending] = {}
        self.closed = threading.Event()

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.empty(self.image_shape, dtype=torch.float32, pin_memory=self.pin)
        target = torch.empty(self.target_shape, dtype=self.target_dtype,
                             pin_memory=self.pin)
        return image, target

    def _task(self, iteration: int, slot: int, j: int, batch: _Pending) -> Any:
        if self.closed.is_set():  # shutting down: do not start reading another crop
            return None
        return self.fill(iteration, j, batch.image[slot].numpy(), batch.target[slot].numpy())

    def _schedule(self, iteration: int) -> None:
        batch = _Pending(*self._buffers())
        assert self.pool is not None
        batch.futures = [self.pool.submit(self._task, iteration, slot, j, batch)
                         for slot, j in enumerate(self.samples)]
        self.pending[iteration] = batch

    def get(self, iteration: int, last: int) -> Batch:
        """The batch of ``iteration``; batches up to ``iteration + prefetch`` (at most
        ``last``) are scheduled."""
        if self.pool is None:
            image, target = self._buffers()
            extras = [self.fill(iteration, j, image[slot].numpy(), target[slot].numpy())
                      for slot, j in enumerate(self.samples)]
            return Batch(image, target, extras)
        for i in range(iteration, min(iteration + self.prefetch, last) + 1):
            if i not in self.pending:
                self._schedule(i)
        batch = self.pending.pop(iteration)
        extras = [f.result() for f in batch.futures]  # a sample's error is raised here
        return Batch(batch.image, batch.target, extras)

    def close(self) -> None:
        """Cancel what has not started, wait for the running tasks."""
        self.closed.set()
        for batch in self.pending.values():
            for f in batch.futures:
                f.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Batch", "BatchLoader", "default_workers"]
