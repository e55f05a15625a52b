"""Per worker process: the model loaded once, the device it runs on, and one lock per device.

A block task asks :func:`worker_model` for its model; the first task of a worker process
loads it (from a checkpoint, a TorchScript file or a bioimage.io package, on the worker's
device), later tasks of that process reuse it. :data:`LOADS` counts the loads per model
key, so tests (and the throughput report) can check that a worker loaded its model once,
not once per block.
:func:`device_lock` lets several block tasks of one worker read and write at the same time
while one of them at a time feeds the device.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import torch

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, int, int, str], tuple[torch.nn.Module, dict[str, Any]]] = {}
#: loads per (path, mtime, size, device) in this process
LOADS: Counter = Counter()


_DEVICE_LOCKS: dict[str, threading.Lock] = {}


def worker_gpu_index() -> int:
    """The GPU of this worker among those it sees: a worker of a multi-GPU SLURM job is
    started as ``NAME-0``, ``NAME-1`` … (``dask worker --nworkers K``), one per GPU; any
    other worker (one per GPU with ``CUDA_VISIBLE_DEVICES`` set, or a single GPU) uses 0."""
    try:
        from distributed import get_worker

        name = str(get_worker().name)
    except (ImportError, ValueError):  # not in a worker
        return 0
    tail = name.rsplit("-", 1)[-1]
    count = torch.cuda.device_count()
    return int(tail) % count if tail.isdigit() and count > 1 else 0


def resolve_device(name: str) -> torch.device:
    """``auto``: this worker's GPU when it has one, else the CPU; ``cuda``: this worker's
    GPU (see :func:`worker_gpu_index`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", worker_gpu_index())
    return torch.device(name)


def device_lock(device: torch.device) -> threading.Lock:
    """The lock of ``device`` in this process: held by the block task feeding it, so blocks
    take the device one after another while their reads and writes overlap."""
    with _LOCK:
        return _DEVICE_LOCKS.setdefault(str(device), threading.Lock())


def register_model(path: str | os.PathLike[str], device: str, model: torch.nn.Module,
                   meta: dict[str, Any]) -> None:
    """Use ``model`` (already built, e.g. wrapped or compiled) for ``path`` on ``device`` in
    this process, instead of loading the file (not counted in :data:`LOADS`)."""
    key = _key(path, resolve_device(device))
    with _LOCK:
        _MODELS[key] = (model, meta)
        for k in [k for k in _PREDICTORS if k[0] == key]:  # predictors of the old model
            del _PREDICTORS[k]


def _key(path: str | os.PathLike[str], dev: torch.device) -> tuple[str, int, int, str]:
    st = Path(path).stat()
    return str(Path(path).resolve()), st.st_mtime_ns, st.st_size, str(dev)


def worker_model(path: str | os.PathLike[str], device: str = "auto", trust_code: bool = False
                 ) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """The model at ``path`` (a checkpoint, a TorchScript file or a bioimage.io package)
    on this process's device, loaded at the first call only; a package's own code runs
    only with ``trust_code``."""
    from engine.learn.model import load_model
    from engine.zoo.package import is_package, load_package

    dev = resolve_device(device)
    key = _key(path, dev)
    with _LOCK:  # worker threads share the model; only one loads it
        if key not in _MODELS:
            _MODELS[key] = load_package(path, dev, trust_code) if is_package(path) \
                else load_model(path, dev)
            LOADS[key] += 1
    model, meta = _MODELS[key]
    return model, meta, dev


def worker_threads() -> int:
    """Threads of this Dask worker (this machine's cores outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except ValueError:  # not in a worker
        return os.cpu_count() or 1


def use_worker_threads() -> int:
    """Let torch use every thread of this Dask worker (workers start with
    ``OMP_NUM_THREADS=1``); the caller runs one prediction at a time per worker."""
    n = worker_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def load_counts() -> dict[str, int]:
    """Loads per model file in this process (for ``client.run``)."""
    out: dict[str, int] = {}
    for (path, *_), n in LOADS.items():
        out[path] = out.get(path, 0) + n
    return out


_PREDICTORS: dict[tuple[Any, ...], Any] = {}


def worker_predictor(path: str | os.PathLike[str], device: str, tta: bool, batch: int | None,
                     channels: int, tile: tuple[int, ...], trust_code: bool = False
                     ) -> tuple[Any, dict[str, Any]]:
    """This process's :class:`engine.predict.device.TilePredictor` for the model at
    ``path`` (loaded once), with ``batch`` tiles per call, or a batch chosen once from the
    device's free memory when ``batch`` is None. A batch halved after running out of device
    memory stays halved for later blocks."""
    from engine.predict.device import TilePredictor, auto_batch

    model, meta, dev = worker_model(path, device, trust_code)
    if dev.type == "cuda":  # tiles have one shape: let cuDNN pick its fastest algorithms
        torch.backends.cudnn.benchmark = True
    key = (_key(path, dev), tta, batch, channels, tuple(tile))
    with _LOCK:
        predictor = _PREDICTORS.get(key)
    if predictor is None:
        # on the CPU the forward passes get every thread of the worker, set in the device
        # thread itself; the blending beside them keeps the worker's default
        predictor = TilePredictor(model, dev, meta["target"].get("activation", "sigmoid"),
                                  tta, threads=worker_threads() if dev.type == "cpu" else None)
        with device_lock(dev):  # the probe and the warm-up use the device
            predictor.batch = batch or auto_batch(predictor, channels, tuple(tile))
            predictor.warm_up(channels, tuple(tile))
        with _LOCK:
            predictor = _PREDICTORS.setdefault(key, predictor)
    return predictor, meta
