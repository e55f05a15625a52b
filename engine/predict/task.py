"""The inference block task, its dispatch to device workers, and the throughput report.

:class:`PredictTask` runs on a worker for one block: it takes the model the worker process
loaded once, streams the block through the device (:func:`engine.predict.block.predict_block`,
one block at a time per device while other blocks of the same worker read and write), and
writes the probabilities, the labels and the pyramid levels that fit in the block straight
into the output arrays.

:func:`device_dispatch` says how blocks go to workers: on a cluster with GPU workers
(``--resources GPU=1``) each task asks for ``1 / IN_FLIGHT_PER_DEVICE`` of a GPU, so a GPU
worker holds that many blocks at once (one on the device, the next being read, the last
being written) and CPU-only workers get none; without GPU workers every worker predicts.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.blocks import Block, Region
from engine.io.opened import open_array

#: blocks a device worker holds at once: computing, being read, being written
IN_FLIGHT_PER_DEVICE = 3


def device_dispatch(client: Any) -> tuple[list[str], dict[str, float] | None, int]:
    """``(gpu workers, task resources, blocks submitted at once)`` for a device pass."""
    from engine.cluster import gpu_workers

    gpus = gpu_workers(client)
    if gpus:
        return gpus, {"GPU": 1 / IN_FLIGHT_PER_DEVICE}, 2 * IN_FLIGHT_PER_DEVICE * len(gpus)
    return gpus, None, IN_FLIGHT_PER_DEVICE * max(1, len(client.nthreads()))


def worker_address() -> str:
    """This worker's address (the host name outside a worker)."""
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # called directly, not in a worker
        return socket.gethostname()


@dataclass(frozen=True)
class VolumeSource:
    """The model's input channels of the level-0 array ``path`` (raw values).

    ``prefix`` fixes leading axes (a time point); ``channels`` index the channel axis when
    ``has_channel_axis``.
    """

    path: str
    channels: tuple[int, ...]
    has_channel_axis: bool
    prefix: tuple[int, ...] = ()

    def read(self, box: Region) -> np.ndarray:
        """``(C, *box shape)`` of a box inside the volume; a damaged chunk is a user error
        naming it."""
        from engine.io.integrity import read_checked

        arr = open_array(self.path)
        if not self.has_channel_axis:
            return read_checked(arr, self.path, self.prefix + tuple(box))[None]
        return np.stack([read_checked(arr, self.path, self.prefix + (c, *box))
                         for c in self.channels])


@dataclass(frozen=True)
class OutputArrays:
    """Where a block's outputs go: the level arrays written from the block itself.

    ``probabilities`` are the paths of levels 0..m of the probabilities (``(K, *spatial)``),
    ``labels`` those of the labels (one path, level 0 only, when the labels are labelled
    into instances later); ``factors`` are the spatial downsampling factors from each level
    to the next.
    """

    probabilities: tuple[str, ...]
    labels: tuple[str, ...]
    factors: tuple[tuple[int, ...], ...]


class _BlockOutputs:
    """Writes a block's finished slabs and levels as they come. When the block predictor
    leaves the probabilities' levels to the host (``levels_here`` False, see
    :func:`engine.predict.block.probability_levels_here`), the block's probabilities are
    kept in memory and their levels written at the end."""

    def __init__(self, arrays: OutputArrays, region: Region, channels_out: int,
                 prob_dtype: str, levels_here: bool) -> None:
        shape = tuple(r.stop - r.start for r in region)
        self.arrays, self.region, self.k = arrays, region, channels_out
        host = not levels_here and len(arrays.probabilities) > 1
        self.probs = np.empty((channels_out, *shape), prob_dtype) if host else None

    def write(self, done: Any) -> None:  # done: engine.predict.block.Finished
        from engine.pyramid import write_levels

        if done.probabilities is not None:
            write_levels(self.arrays.probabilities[done.level:done.level + 1],
                         (slice(0, self.k), *done.region), done.probabilities, (), "mean",
                         whole=True)
            if done.level == 0 and self.probs is not None:
                local = tuple(slice(d.start - r.start, d.stop - r.start)
                              for d, r in zip(done.region, self.region, strict=True))
                self.probs[(slice(None), *local)] = done.probabilities
        if done.level < len(self.arrays.labels):
            write_levels(self.arrays.labels[done.level:done.level + 1], done.region,
                         done.labels, (), "mode", whole=True)

    def finish(self) -> None:
        """Write the float16 probabilities' levels from the block in memory."""
        from engine.pyramid import write_levels

        if self.probs is not None:
            write_levels(self.arrays.probabilities, (slice(0, self.k), *self.region),
                         self.probs, tuple((1, *f) for f in self.arrays.factors), "mean",
                         write_first=False)


@dataclass
class PredictTask:
    """One block: read, normalize, predict its tiles, blend, write (see the module
    docstring). Returns the block's timings for :func:`throughput`."""

    model: str
    device: str
    source: VolumeSource
    grid: Any  # engine.predict.tiling.TileGrid
    blend: str
    batch: int | None
    tta: bool
    offset: tuple[float, ...]
    scale: tuple[float, ...]
    outputs: OutputArrays
    prob_dtype: str
    threshold: float
    kind: str
    unit: int  # storage-chunk length of the outputs along the first spatial axis
    trust_code: bool = False  # a bioimage.io package may run its own architecture code
    # each tile in one block, sums handed between blocks (engine.predict.spill.Spill); None:
    # every block runs all the tiles that overlap it
    spill: Any = None

    def __call__(self, block: Block) -> dict[str, Any]:
        from engine.predict.block import Finishing, predict_block, probability_levels_here
        from engine.predict.tiling import blend_weights
        from engine.predict.workers import device_lock, load_counts, worker_predictor

        start = time.time()
        t0 = time.perf_counter()
        predictor, meta = worker_predictor(self.model, self.device, self.tta, self.batch,
                                           len(self.source.channels), self.grid.tile,
                                           self.trust_code)
        load_s = time.perf_counter() - t0
        k = int(meta["arch"]["out_channels"])
        sink = _BlockOutputs(self.outputs, block.write, k, self.prob_dtype,
                             probability_levels_here(predictor.device, self.prob_dtype))
        lock = device_lock(predictor.device)
        waited = [0.0]

        @contextmanager
        def slot() -> Iterator[None]:  # the device, one block at a time; the wait is reported
            w0 = time.perf_counter()
            with lock:
                waited[0] = time.perf_counter() - w0
                yield

        times = predict_block(predictor, self.source.read, self.grid, block.write,
                              blend_weights(self.grid.tile, self.blend), k, self.offset,
                              self.scale, Finishing(self.prob_dtype, self.kind, self.threshold),
                              sink.write, self.unit, device_slot=slot,
                              levels=self.outputs.factors,
                              handover=self.spill.handover(block.index)
                              if self.spill is not None else None)
        t1 = time.perf_counter()
        sink.finish()
        pyramid_s = time.perf_counter() - t1
        return {"worker": worker_address(), "voxels": int(np.prod(block.shape)),
                "tiles": times.tiles, "model_s": times.model_s, "read_s": times.read_s,
                "input_wait_s": times.input_wait_s, "write_s": times.write_s + pyramid_s,
                "output_wait_s": times.output_wait_s, "device_wait_s": waited[0],
                "handover_s": times.handover_s,
                "load_s": load_s, "start": start, "end": time.time(),
                "loads": load_counts().get(str(Path(self.model).resolve()), 0),
                "device": str(predictor.device), "batch": predictor.batch,
                "notes": times.notes}


@dataclass
class Throughput:
    """Per worker totals of the block reports."""

    blocks: int = 0
    voxels: int = 0
    tiles: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    start: float = float("inf")
    end: float = 0.0


TIMED = ("model_s", "read_s", "input_wait_s", "write_s", "output_wait_s", "device_wait_s",
         "load_s", "handover_s")


@dataclass
class Tally:
    """Block reports folded: per worker totals and the distinct notes (a streaming
    reduction's value: the client keeps this, not a report per block)."""

    per: dict[str, Throughput] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, report: dict[str, Any] | Tally) -> Tally:
        """The tally of one block's report (a tally as it is)."""
        if isinstance(report, Tally):
            return report
        sums = {key: report.get(key, 0.0) for key in TIMED}
        return cls({report["worker"]: Throughput(1, report["voxels"], report["tiles"], sums,
                                                 report["start"], report["end"])},
                   list(dict.fromkeys(report.get("notes", []))))


def merge_reports(a: dict[str, Any] | Tally, b: dict[str, Any] | Tally) -> Tally:
    """Fold two block reports or tallies into one (a ``combine`` for the runner)."""
    a, b = Tally.of(a), Tally.of(b)
    per = dict(a.per)
    for worker, w in b.per.items():
        v = per.get(worker)
        per[worker] = w if v is None else Throughput(
            v.blocks + w.blocks, v.voxels + w.voxels, v.tiles + w.tiles,
            {k: v.sums.get(k, 0.0) + w.sums.get(k, 0.0) for k in TIMED},
            min(v.start, w.start), max(v.end, w.end))
    return Tally(per, a.notes + [n for n in b.notes if n not in a.notes])


def throughput(results: Sequence[dict[str, Any]] | dict[str, Any] | Tally | None,
               seconds: float,
               grid_tiles: int | None = None) -> dict[str, Any]:
    """Voxels per second overall and per worker, and where each device worker's time went:
    ``device_busy`` is the model's device time over the worker's busy span (first block
    start to last block end); reads and writes run in threads beside the device, so their
    seconds overlap it; ``handover_s`` is the time spent loading and saving the sums handed
    between blocks. ``tiles`` counts the tiles run through the network, and
    ``tile_ratio`` divides them by the tiles of the global grid (1.0: none computed twice).

    ``results`` are the blocks' reports, their :class:`Tally` or the one block's report
    (what :func:`merge_reports` folds to), or None when no block ran."""
    tally = Tally()
    if isinstance(results, (Tally, dict)):
        tally = Tally.of(results)
    elif results:
        for r in results:
            tally = merge_reports(tally, r)
    per, notes = tally.per, tally.notes
    total = {k: sum(w.sums.get(k, 0.0) for w in per.values()) for k in TIMED}
    spans = sum(max(w.end - w.start, 1e-9) for w in per.values())
    voxels = sum(w.voxels for w in per.values())
    tiles = sum(w.tiles for w in per.values())
    out: dict[str, Any] = {
        "voxels": int(voxels), "seconds": round(seconds, 3),
        "voxels_per_s": round(voxels / seconds, 1) if seconds else None,
        **{k: round(v, 3) for k, v in total.items()},
        "device_busy": round(total["model_s"] / spans, 3) if per else None,
        "tiles": int(tiles),
        "workers": {a: {"blocks": w.blocks, "voxels_per_s": round(
            w.voxels / max(w.end - w.start, 1e-9), 1),
            "device_busy": round(w.sums.get("model_s", 0.0) / max(w.end - w.start, 1e-9), 3),
            **{k: round(w.sums.get(k, 0.0), 3) for k in TIMED}}
            for a, w in sorted(per.items())},
        "notes": notes,
    }
    if grid_tiles:
        out["grid_tiles"] = int(grid_tiles)
        out["tile_ratio"] = round(tiles / grid_tiles, 3)
    return out
