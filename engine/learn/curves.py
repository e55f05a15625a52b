"""Learning curves of a training run as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_curves(history: Sequence[Mapping[str, Any]], out: str | os.PathLike[str],
                title: str = "") -> Path:
    """Plot training and validation loss (left) and validation Dice and IoU (right) against
    the iteration; entries without a key are skipped for that curve. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    out = Path(out)
    fig = Figure(figsize=(9, 3.6), dpi=100)
    loss_ax, score_ax = fig.subplots(1, 2)
    for ax, keys, ylabel in ((loss_ax, ("loss", "val_loss"), "loss"),
                             (score_ax, ("val_dice", "val_iou"), "score")):
        for key in keys:
            points = [(h["iteration"], h[key]) for h in history if key in h]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    score_ax.set_ylim(0, 1)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out
