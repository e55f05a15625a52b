"""Run workflow steps on in-memory arrays through the real executors (for tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engine.io.sources import InMemorySource
from engine.labels import LabelResult
from engine.segment.execute import Context, run_workflow
from engine.segment.refs import Source, to_dask
from engine.segment.workflow import parse_workflow


def run_steps(client: Any, work: Path, image: np.ndarray, steps: list[dict[str, Any]],
              block: tuple[int, ...], capture: str | None = None) -> np.ndarray:
    """Run ``steps`` on ``image`` blockwise; return the output (or the ``capture``d step).

    An image-valued step can be captured: a final threshold is appended so the workflow
    is valid, and the captured step's array is read back through a dask view.
    """
    steps = list(steps)
    if capture is not None and steps[-1]["name"] == capture:
        steps.append({"name": "_end", "function": "threshold",
                      "parameters": {"method": "absolute", "value": 0.0}})
    wf = parse_workflow({"steps": steps}, "test")
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(client, work, tuple(block))
    got: dict[str, Any] = {}
    result = run_workflow(ctx, wf, Source(InMemorySource(np.asarray(image)), tuple(block)),
                          keep=(capture,) if capture else (),
                          on_result=lambda step, ref: got.setdefault(step.name, ref))
    if capture is not None:
        result = got[capture]
    if isinstance(result, LabelResult):
        return np.asarray(result.view.compute())
    return np.asarray(to_dask(result, block).compute())


def blobs(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    """A smooth random float32 image in about [0, 1] with blob-like structures."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.random(shape), sigma)
    img = (img - img.min()) / (img.max() - img.min())
    return img.astype(np.float32)


def spots(shape: tuple[int, ...], seed: int, density: float = 0.002, sigma: float = 1.0,
          noise: float = 5e-4) -> np.ndarray:
    """Sparse bright gaussian spots on a faintly noisy background, float32 in [0, 1].

    Unlike :func:`blobs`, an Otsu threshold of its smoothed version yields many separate
    objects (smoothed noise splits about half and half, into one percolating object).
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter((rng.random(shape) < density).astype(np.float32), sigma)
    img += noise * rng.standard_normal(shape).astype(np.float32)
    return ((img - img.min()) / (img.max() - img.min())).astype(np.float32)


LAYOUTS_3D = [(8, 12, 7), (23, 37, 29), (11, 36, 28), (1, 19, 30)]
"""Block layouts for (23, 37, 29) images: odd sizes, whole volume, 1-voxel remainders at
the far edges, single planes."""
