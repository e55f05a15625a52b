"""A simulated accelerator for tests and benchmarks on machines without one.

:class:`SimulatedDevice` wraps a model: each forward pass computes the wrapped model's exact
output, then sleeps (releasing the GIL, as a GPU kernel leaves the CPU free) until the call
has cost ``voxels / rate`` seconds of wall time, where ``voxels`` are the batch's tile voxels.
:func:`install` puts one in this process's model cache for a checkpoint, in place of the
model :func:`engine.predict.workers.worker_model` would load (run it on every worker with
``client.run``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


class SimulatedDevice(torch.nn.Module):
    """``inner(x)``, costing ``B × tile voxels / (mvox_per_s × 10⁶)`` seconds of wall time."""

    def __init__(self, inner: torch.nn.Module, mvox_per_s: float) -> None:
        super().__init__()
        self.inner = inner
        self.rate = mvox_per_s * 1e6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = self.inner(x)
        due = x.shape[0] * math.prod(x.shape[2:]) / self.rate
        left = due - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return y


class PointwiseNet(torch.nn.Module):
    """A cheap exact stand-in for a network: output channel ``k`` is ``a[k] · mean(x) +
    b[k]`` per voxel (for benchmarks, where the real network on the CPU would cost more
    than the simulated device; a 1×1 convolution is far slower on the CPU)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.a = torch.nn.Parameter(torch.linspace(0.5, 1.5, out_channels))
        self.b = torch.nn.Parameter(torch.linspace(-0.1, 0.1, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * self.spatial_dims
        return x.mean(1, keepdim=True) * self.a.reshape(view) + self.b.reshape(view)


def install(checkpoint: str | Path, mvox_per_s: float, cheap: bool = False,
            device: str = "auto") -> None:
    """Use a :class:`SimulatedDevice` for ``checkpoint`` in this process (the checkpoint's
    own network inside it, or with ``cheap`` a :class:`PointwiseNet`)."""
    from engine.learn.model import load_model
    from engine.predict.workers import register_model, resolve_device

    model, meta = load_model(checkpoint, resolve_device(device))
    if cheap:
        arch = meta["arch"]
        torch.manual_seed(0)
        model = PointwiseNet(int(arch["in_channels"]), int(arch["out_channels"]),
                             int(arch["spatial_dims"])).eval()
    register_model(checkpoint, device, SimulatedDevice(model, mvox_per_s).eval(), meta)
