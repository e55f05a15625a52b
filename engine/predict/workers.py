"""Models loaded once per worker process, and the tile predictor that uses them.

A block task asks :func:`worker_model` for its model; the first task of a worker process
loads it (from a checkpoint or a TorchScript file, on the worker's device), later tasks of
that process reuse it. :data:`LOADS` counts the loads per model key, so tests (and the
throughput report) can check that a worker loaded its model once, not once per block.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

_LOCK = threading.Lock()
_MODELS: dict[tuple[str, int, int, str], tuple[torch.nn.Module, dict[str, Any]]] = {}
#: loads per (path, mtime, size, device) in this process
LOADS: Counter = Counter()


def resolve_device(name: str) -> torch.device:
    """``auto``: this worker's GPU when it has one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def worker_model(path: str | os.PathLike[str], device: str = "auto"
                 ) -> tuple[torch.nn.Module, dict[str, Any], torch.device]:
    """The model at ``path`` on this process's device, loaded at the first call only."""
    from engine.learn.model import load_model

    dev = resolve_device(device)
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_mtime_ns, st.st_size, str(dev))
    with _LOCK:  # worker threads share the model; only one loads it
        if key not in _MODELS:
            _MODELS[key] = load_model(path, dev)
            LOADS[key] += 1
    model, meta = _MODELS[key]
    return model, meta, dev


def use_worker_threads() -> int:
    """Let torch use every thread of this Dask worker (workers start with
    ``OMP_NUM_THREADS=1``); the caller runs one prediction at a time per worker."""
    try:
        from distributed import get_worker

        n = get_worker().state.nthreads
    except ValueError:  # not in a worker
        n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def load_counts() -> dict[str, int]:
    """Loads per model file in this process (for ``client.run``)."""
    out: dict[str, int] = {}
    for (path, *_), n in LOADS.items():
        out[path] = out.get(path, 0) + n
    return out


@dataclass
class TilePredictor:
    """Runs the network on batches of tiles: probabilities, optional 8-fold flip TTA,
    mixed precision on CUDA."""

    model: torch.nn.Module
    device: torch.device
    activation: str  # "sigmoid" | "softmax"
    tta: bool = False
    amp: bool = True

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16,
                            enabled=self.amp and self.device.type == "cuda"):
            logits = self.model(x)
        logits = logits.float()
        return torch.softmax(logits, 1) if self.activation == "softmax" \
            else torch.sigmoid(logits)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device, non_blocking=True)
        spatial = list(range(2, x.ndim))
        with torch.inference_mode():
            if not self.tta:
                return self._forward(x).cpu().numpy()
            # every combination of flips of the (up to 3) spatial axes: 8 in 3D, 4 in 2D
            total = None
            combos = [[a for i, a in enumerate(spatial) if m >> i & 1]
                      for m in range(2 ** len(spatial))]
            for dims in combos:
                y = self._forward(torch.flip(x, dims) if dims else x)
                y = torch.flip(y, dims) if dims else y
                total = y if total is None else total + y
            return (total / len(combos)).cpu().numpy()
