"""One block predicted as a stream: read slabs in, tile rows through the device, slabs out.

The block's *read region* (the union of the tiles of the global grid that overlap its
write region, :class:`engine.predict.tiling.TileGrid`) is read in slabs along the first
axis, one storage-chunk row at a time, by a reader thread that stays ahead of the device
(``prefetch`` slabs); on a GPU each slab is copied to the device from pinned memory on a
copy stream while the network runs. On the device the slab is normalized into the block's
input buffer, the tiles of each tile row are cut from it, run through the network in
batches, weighted and summed into the block's accumulators. As soon as no later tile row
reaches a chunk row of the write region, that chunk row is finished on the device (divided
by the summed weights, cast to the stored type, thresholded) and handed to a writer thread:
reading, the network and writing overlap within a block, and across blocks while the next
block's reader fills its queue.

Every voxel sums the same tiles with the same weights as one sliding window over the whole
volume, so the result does not depend on the block layout (within float32 rounding: the
sums run on the device in float32).

With a :class:`Handover` a block runs only the tiles it owns (those starting in its write
region, :meth:`engine.predict.tiling.TileGrid.owned`), so no tile runs twice in a layout:
its sums cover its write region and a band on the high side (its *reach*); it starts by
adding the sums its lower neighbours left for it, and ends by handing the band's sums to
the later blocks they fall in.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from engine.blocks import Region
from engine.predict.device import TilePredictor
from engine.predict.tiling import TileGrid

#: slabs read ahead of the device, each by its own thread
PREFETCH = 3
#: finished slabs written at the same time
WRITERS = 3
#: batches queued on the device while the loop blends an earlier one (see :func:`_loop`)
QUEUED = 2


@dataclass(frozen=True)
class Finished:
    """Stored outputs of one finished slab of a write region, or of a pyramid level of it.

    ``probabilities`` is ``(K, *slab)`` in the stored type (uint8 0–255 or float16; None on
    a level computed on the host, see :func:`predict_block`), ``labels`` ``(*slab)`` uint8;
    ``region`` is the slab in the coordinates of ``level`` (0: the volume's).
    """

    region: Region
    probabilities: np.ndarray | None
    labels: np.ndarray
    level: int = 0


@dataclass
class BlockTimes:
    """Where one block's time went, in seconds (``model_s`` is device time)."""

    model_s: float = 0.0
    read_s: float = 0.0
    input_wait_s: float = 0.0
    write_s: float = 0.0
    output_wait_s: float = 0.0
    handover_s: float = 0.0  # loading and saving the sums handed between blocks
    tiles: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Finishing:
    """How a finished slab is stored: the probability type and the label rule."""

    probabilities: str  # "uint8" | "float16"
    kind: str  # "classes" (argmax) or anything else (foreground channel > threshold)
    threshold: float = 0.5

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.probabilities == "uint8" else torch.float16

    def __call__(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored probabilities and labels of float32 probabilities ``(K, ...)``."""
        if self.probabilities == "uint8":
            stored = torch.round(probs.clamp(0, 1) * 255).to(torch.uint8)
        else:
            stored = probs.to(torch.float16)
        if self.kind == "classes":
            labels = probs.argmax(0).to(torch.uint8)
        else:  # binary and boundary models: the foreground channel
            labels = (probs[0] > self.threshold).to(torch.uint8)
        return stored, labels


class Handover(Protocol):
    """What a block exchanges with its neighbours when each tile runs in one block only.

    Sums are ``(K + 1, *piece)`` float32: the ``K`` weighted probability sums, then the
    summed weights.
    """

    def incoming(self) -> list[tuple[Region, np.ndarray]]:
        """The sums other blocks left in this block's write region (volume coordinates),
        in a fixed order (called from a thread when the block starts)."""
        ...

    def pieces(self, reach: Region) -> list[Region]:
        """The parts of ``reach`` beyond the write region, one per later block."""
        ...

    def save(self, piece: Region, sums: np.ndarray) -> None:
        """Store the sums of ``piece`` for the block it lies in, before the task ends."""
        ...


def slabs(box: Region, unit: int) -> list[slice]:
    """The first axis of ``box`` cut at multiples of ``unit`` (storage-chunk rows)."""
    edges = [box[0].start, *range((box[0].start // unit + 1) * unit, box[0].stop, unit),
             box[0].stop]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _torch_compatible(a: np.ndarray) -> np.ndarray:
    """``a`` as a contiguous array torch takes, values unchanged (wider unsigned integers
    become signed ones of twice the width, booleans uint8, byte order native)."""
    a = np.ascontiguousarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    if a.dtype.kind == "u" and a.itemsize > 1:
        return a.astype({2: np.int32, 4: np.int64}.get(a.itemsize, np.float64))
    if not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


class _Reader(threading.Thread):
    """Reads the slabs of the clipped read region and stages them for the device, in order,
    several at a time (``prefetch`` threads: decoding releases the GIL, and one thread
    reads slower than a GPU consumes)."""

    def __init__(self, read: Callable[[Region], np.ndarray], inner: Region, unit: int,
                 device: torch.device, prefetch: int) -> None:
        super().__init__(name="voxelmill-read", daemon=True)
        self.read, self.inner, self.unit, self.device = read, inner, unit, device
        self.prefetch = max(1, prefetch)
        self.out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self.stop = threading.Event()
        self.seconds = 0.0
        self._streams = threading.local()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _stage(self, sl: slice) -> tuple[slice, torch.Tensor, Any, float]:
        """Read one slab; on a GPU, pin it and start its copy on this thread's stream."""
        t0 = time.perf_counter()
        host = torch.from_numpy(_torch_compatible(self.read((sl, *self.inner[1:]))))
        event = None
        if self.device.type == "cuda":
            stream = getattr(self._streams, "stream", None)
            if stream is None:
                stream = self._streams.stream = torch.cuda.Stream(self.device)
            host = host.pin_memory()
            with torch.cuda.stream(stream):
                data = host.to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
        else:
            data = host
        return sl, data, event, time.perf_counter() - t0

    def run(self) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        todo = iter(slabs(self.inner, self.unit)
                    if self.inner[0].stop > self.inner[0].start else [])
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="voxelmill-read") as pool:
            ahead: deque = deque()
            try:
                while True:
                    while len(ahead) < self.prefetch:
                        sl = next(todo, None)
                        if sl is None:
                            break
                        ahead.append(pool.submit(self._stage, sl))
                    if not ahead:
                        return
                    sl, data, event, seconds = ahead.popleft().result()
                    self.seconds += seconds
                    if not self._put((sl, data, event)):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the device loop
                self._put(exc)
            finally:
                for fut in ahead:
                    fut.cancel()


class _Writer(threading.Thread):
    """Waits for each finished slab's copy to the host, then stores it; ``threads`` slabs
    (or levels) at a time, since each one writes its own chunks."""

    def __init__(self, write: Callable[[Finished], None], threads: int = WRITERS) -> None:
        super().__init__(name="voxelmill-write", daemon=True)
        self.write, self.threads = write, threads
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _store(self, job: tuple) -> None:
        if self.error is not None:
            return  # after a failure: drain; the device loop raises it
        try:
            t0 = time.perf_counter()
            region, stored, labels, event, level = job
            if event is not None:
                event.synchronize()
            self.write(Finished(region, None if stored is None else stored.numpy(),
                                labels.numpy(), level))
            with self._lock:
                self.seconds += time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - raised by the device loop
            self.error = exc

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="voxelmill-write") as pool:
            while True:
                job = self.jobs.get()
                if job is None:
                    return  # leaving the pool waits for the writes under way
                pool.submit(self._store, job)


def probability_levels_here(device: torch.device, probabilities: str) -> bool:
    """Whether :func:`predict_block` makes the probabilities' pyramid levels itself: always
    on the CPU; on a GPU for uint8 only, since torch rounds float64 to float16 through
    float32 there, and the levels must equal :mod:`engine.pyramid`'s exactly."""
    return device.type != "cuda" or probabilities == "uint8"


class _BlockPyramid:
    """A block's pyramid levels, built while its chunk rows are finished.

    Level ``L`` of the block is kept whole (``1/8^L`` of the block); its planes are
    downsampled from level ``L-1`` as soon as the planes under them are finished, and sent
    in whole chunk rows, so the levels are written while the network still runs and only
    the last row's share remains at the end. Downsampling windows never straddle two rows
    (rows are multiples of the factors), so the result equals downsampling the whole
    block: on a GPU by :mod:`engine.predict.downsample` (uint8 probabilities and labels;
    float16 probabilities come as None, their exact rounding is the host's), on the CPU by
    :mod:`engine.pyramid` (probabilities) and :mod:`engine.predict.downsample` (labels, by
    per-class counts while the classes are fewer than a window's voxels).
    """

    def __init__(self, shape: Sequence[int], channels: int, finishing: Finishing,
                 levels: Sequence[Sequence[int]], unit: int, device: torch.device) -> None:
        self.unit, self.cuda = unit, device.type == "cuda"
        # the label values: a class index, or foreground 0/1
        self.classes = channels if finishing.kind == "classes" else 2
        self.factors = [tuple(f) for f in levels]
        self.factor = [(1,) * len(shape)]
        shapes = [tuple(shape)]
        for f in self.factors:
            self.factor.append(tuple(a * b for a, b in zip(self.factor[-1], f, strict=True)))
            shapes.append(tuple(-(-n // k) for n, k in zip(shapes[-1], f, strict=True)))
        self.stored = [torch.empty((channels, *sh), dtype=finishing.dtype, device=device)
                       if probability_levels_here(device, finishing.probabilities) else None
                       for sh in shapes]
        self.labels = [torch.empty(sh, dtype=torch.uint8, device=device) for sh in shapes]
        # planes of each level computed, and handed on (whole chunk rows but the last)
        self.made = [0] * len(shapes)
        self.sent = [0] * len(shapes)

    def add(self, planes: slice, stored: torch.Tensor, labels: torch.Tensor) -> None:
        """Level-0 planes ``planes`` (block coordinates) are finished."""
        if self.stored[0] is not None:
            self.stored[0][:, planes] = stored
        self.labels[0][planes] = labels
        self.made[0] = self.sent[0] = planes.stop

    def _down(self, level: int, planes: slice) -> tuple[torch.Tensor | None, torch.Tensor]:
        from engine.predict.downsample import downsample_mean, downsample_mode

        f = self.factors[level - 1]
        src = slice(planes.start * f[0], min(planes.stop * f[0],
                                             self.labels[level - 1].shape[0]))
        stored = self.stored[level - 1]
        labels = self.labels[level - 1][src]
        # counting each class beats comparing every pair of a window's members while the
        # classes are fewer than the window's voxels (on the CPU too, where it is torch's)
        few = self.classes <= math.prod(f)
        if self.cuda:
            down_s = None if stored is None else downsample_mean(stored[:, src], (1, *f))
            return down_s, downsample_mode(labels, f, self.classes if few else None)
        from engine.pyramid import downsample_mean as mean_np
        from engine.pyramid import downsample_mode as mode_np

        down_s = None if stored is None else torch.from_numpy(
            mean_np(stored[:, src].numpy(), (1, *f)))
        return down_s, (downsample_mode(labels, f, self.classes) if few
                        else torch.from_numpy(mode_np(labels.numpy(), f)))

    def advance(self, finished: bool) -> list[tuple[int, int, Any, torch.Tensor]]:
        """The level rows that can be sent now: ``(level, first plane, probabilities or
        None, labels)``; with ``finished`` (every level-0 plane done) all the rest.

        Each level is computed as far as the finished planes below it allow (whole windows),
        so that after the last level-0 row only its own share of each level is left to do;
        it is sent in whole chunk rows.
        """
        out = []
        for level in range(1, len(self.labels)):
            total = self.labels[level].shape[0]
            can = total if finished else self.made[level - 1] // self.factors[level - 1][0]
            if can > self.made[level]:
                planes = slice(self.made[level], can)
                stored, labels = self._down(level, planes)
                if self.stored[level] is not None and stored is not None:
                    self.stored[level][:, planes] = stored
                self.labels[level][planes] = labels
                self.made[level] = can
            ready = total if finished else self.made[level] // self.unit * self.unit
            if ready <= self.sent[level]:
                continue
            rows = slice(self.sent[level], ready)
            stored_rows = None if self.stored[level] is None else self.stored[level][:, rows]
            out.append((level, rows.start, stored_rows, self.labels[level][rows]))
            self.sent[level] = ready
        return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (pinned and asynchronous from a GPU; ``t`` itself on the CPU,
    where finishing made it new)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def predict_block(predictor: TilePredictor, read: Callable[[Region], np.ndarray],
                  grid: TileGrid, region: Region, weights: np.ndarray, channels_out: int,
                  offset: Sequence[float], scale: Sequence[float], finishing: Finishing,
                  write: Callable[[Finished], None], unit: int,
                  prefetch: int = PREFETCH,
                  device_slot: Callable[[], Any] | None = None,
                  levels: Sequence[Sequence[int]] = (),
                  handover: Handover | None = None) -> BlockTimes:
    """Predict the write region ``region`` and hand its finished slabs to ``write``.

    Parameters
    ----------
    predictor : TilePredictor
        The network on its device.
    read : callable
        ``read(box)`` returns the raw input ``(C, *box shape)`` of a box inside the volume
        (called from a reader thread).
    grid : TileGrid
        The global tile grid.
    region : tuple of slice
        The write region; its start along the first axis is a multiple of ``unit`` when
        slabs must be whole storage chunks (otherwise the first slab is shorter).
    weights : ndarray
        :func:`engine.predict.tiling.blend_weights` of ``grid.tile``, float32.
    channels_out : int
        ``K``, the network's output channels.
    offset, scale : sequence of float
        Normalization per input channel: ``(x - offset[c]) / scale[c]``; beyond the volume
        the normalized input is 0.
    finishing : Finishing
        Stored type and label rule.
    write : callable
        ``write(Finished)``, called from a writer thread, once per slab, in order; slabs
        cover the write region in whole multiples of ``unit`` along the first axis (the
        last one up to the region's end).
    unit : int
        Storage-chunk length of the outputs (and rows of the input) along the first axis.
    prefetch : int
        Input slabs read ahead.
    device_slot : callable, optional
        A context manager factory held while this block uses the device (one block at a
        time per device); reading starts before it is acquired.
    levels : sequence of tuple of int
        Spatial downsampling factors of the pyramid levels computed from the block, each
        from the previous level: after the last slab, ``write`` also receives each level
        of the whole write region (``Finished.level`` 1, 2 …), computed on the device
        (:mod:`engine.predict.downsample`) for the labels and uint8 probabilities; float16
        probabilities come as None there (see :func:`probability_levels_here`).
    handover : Handover, optional
        Run only the tiles the block owns: fold in the sums of :meth:`Handover.incoming`
        before the first tile, and :meth:`Handover.save` the band beyond the write region
        before returning. Without it the block runs every tile that overlaps it (a region
        predicted on its own).

    Returns
    -------
    BlockTimes
    """
    dev = predictor.device
    times = BlockTimes()
    tiles = grid.tiles_for(region) if handover is None else grid.owned(region)
    sums = region if handover is None else grid.reach(region)
    times.tiles = len(tiles)
    box = tuple(slice(min(t[a] for t in tiles), max(t[a] for t in tiles) + grid.tile[a])
                if tiles else slice(r.start, r.start) for a, r in enumerate(region))
    inner = tuple(slice(max(b.start, 0), min(b.stop, n)) for b, n in
                  zip(box, grid.shape, strict=True))
    helpers = ThreadPoolExecutor(WRITERS, thread_name_prefix="voxelmill-handover")
    loading = helpers.submit(_timed, handover.incoming) if handover is not None else None
    reader = _Reader(read, inner, unit, dev, prefetch)
    writer = _Writer(write)
    reader.start()
    writer.start()
    try:
        with device_slot() if device_slot is not None else nullcontext():
            acc, wsum = _stream(predictor, reader, writer, grid, tiles, box, inner, region,
                                sums, loading, weights, channels_out, offset, scale,
                                finishing, unit, times, levels)
        saving = [] if handover is None else _hand_on(handover, helpers, acc, wsum, sums)
        del acc, wsum
        t0 = time.perf_counter()
        writer.jobs.put(None)
        writer.join()
        for job in saving:
            times.handover_s += job.result()
        times.output_wait_s = time.perf_counter() - t0
        if writer.error is not None:
            raise writer.error
    finally:
        reader.stop.set()
        if writer.is_alive():
            writer.jobs.put(None)
        reader.join()
        helpers.shutdown(wait=True)
    times.read_s, times.write_s = reader.seconds, writer.seconds
    return times


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def _hand_on(handover: Handover, pool: ThreadPoolExecutor, acc: torch.Tensor,
             wsum: torch.Tensor, sums: Region) -> list[Any]:
    """Copy each piece of the band beyond the write region to the host and save it in
    ``pool``; the futures return the seconds each save took."""
    jobs = []
    for piece in handover.pieces(sums):
        local = tuple(slice(p.start - s.start, p.stop - s.start)
                      for p, s in zip(piece, sums, strict=True))
        data = torch.cat([acc[(slice(None), *local)], wsum[local][None]]).cpu().numpy()
        jobs.append(pool.submit(lambda p=piece, d=data: _timed(handover.save, p, d)[1]))
    return jobs


def _stream(predictor: TilePredictor, reader: _Reader, writer: _Writer, grid: TileGrid,
            tiles: list[tuple[int, ...]], box: Region, inner: Region, region: Region,
            sums: Region, loading: Any, weights: np.ndarray, channels_out: int,
            offset: Sequence[float], scale: Sequence[float], finishing: Finishing, unit: int,
            times: BlockTimes, levels: Sequence[Sequence[int]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The device side of :func:`predict_block` (see there); returns the block's weighted
    sums and weights over ``sums`` (the write region, or the reach with a handover)."""
    dev = predictor.device
    nd = len(grid.shape)
    channels = len(offset)
    shape = tuple(r.stop - r.start for r in region)
    bshape = tuple(b.stop - b.start for b in box)
    view = (-1,) + (1,) * nd
    off = torch.tensor(offset, dtype=torch.float32, device=dev).reshape(view)
    sc = torch.tensor(scale, dtype=torch.float32, device=dev).reshape(view)
    w = torch.from_numpy(np.ascontiguousarray(weights)).to(dev)
    # every voxel of the input buffer is filled from the volume, but beyond its edges
    image = (torch.empty if box == inner else torch.zeros)(
        (channels, *bshape), dtype=torch.float32, device=dev)
    own = tuple(slice(0, n) for n in shape[1:])  # the write region within the sums
    made: list[torch.Tensor] = []

    def accumulators() -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted sums and summed weights over ``sums``, made when the first batch
        is blended (zeroing them then overlaps the device): zeros plus the lower
        neighbours' sums, in their fixed order, before any tile."""
        if made:
            return made[0], made[1]
        sshape = tuple(r.stop - r.start for r in sums)
        acc = torch.zeros((channels_out, *sshape), dtype=torch.float32, device=dev)
        wsum = torch.zeros(sshape, dtype=torch.float32, device=dev)
        if loading is not None:
            t0 = time.perf_counter()
            pieces, seconds = loading.result()
            times.input_wait_s += time.perf_counter() - t0
            times.handover_s += seconds
            for where, data in pieces:
                local = tuple(slice(p.start - s.start, p.stop - s.start)
                              for p, s in zip(where, sums, strict=True))
                d = torch.from_numpy(data).to(dev)
                acc[(slice(None), *local)] += d[:-1]
                wsum[local] += d[-1]
        made.extend((acc, wsum))
        return acc, wsum

    # the block's outputs on every level it writes (level L from level L-1, a chunk row at
    # a time as soon as its planes are finished) and how many planes of each are done
    pyramid = _BlockPyramid(shape, channels_out, finishing, levels, unit, dev) \
        if levels else None
    levels_thread = ThreadPoolExecutor(1, thread_name_prefix="voxelmill-levels") \
        if pyramid is not None and dev.type != "cuda" else None
    level_jobs: list[Any] = []
    filled = inner[0].start  # planes of the read region copied to the device so far
    done = region[0].start  # planes of the write region handed to the writer
    model_before = predictor.timer.total()

    def fill(need: int) -> None:
        """Copy the input planes up to ``need`` into the block's input buffer."""
        nonlocal filled
        while filled < need:
            t0 = time.perf_counter()
            item = reader.out.get()
            times.input_wait_s += time.perf_counter() - t0
            if isinstance(item, BaseException):
                raise item
            sl, data, event = item
            if event is not None:
                torch.cuda.current_stream(dev).wait_event(event)
                data.record_stream(torch.cuda.current_stream(dev))
            dst = (slice(None), slice(sl.start - box[0].start, sl.stop - box[0].start),
                   *(slice(i.start - b.start, i.stop - b.start)
                     for i, b in zip(inner[1:], box[1:], strict=True)))
            image[dst] = (data.to(torch.float32) - off) / sc
            filled = sl.stop

    def blend(batch: list[tuple[int, ...]], probs: torch.Tensor) -> None:
        """Add each tile's weighted probabilities inside the sums' box."""
        acc, wsum = accumulators()
        for p, prob in zip(batch, probs, strict=True):
            tsl, rsl = [], []
            for s, k, g in zip(p, grid.kept(p), sums, strict=True):
                lo, hi = max(k.start, g.start), min(k.stop, g.stop)
                tsl.append(slice(lo - s, hi - s))
                rsl.append(slice(lo - g.start, hi - g.start))
            wt = w[tuple(tsl)]
            acc[(slice(None), *rsl)].addcmul_(prob[(slice(None), *tsl)], wt)
            wsum[tuple(rsl)].add_(wt)

    def send(level: int, where: Region, stored: torch.Tensor | None,
             labels: torch.Tensor) -> None:
        stored = None if stored is None else _to_host(stored)
        labels = _to_host(labels)
        event = None
        if dev.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        writer.jobs.put((where, stored, labels, event, level))
        if writer.error is not None:
            raise writer.error

    def finish(upto: int) -> None:
        """Hand the planes of the write region below ``upto`` to the writer."""
        nonlocal done
        sl = slice(done - region[0].start, upto - region[0].start)
        acc, wsum = accumulators()
        stored, labels = finishing(acc[(slice(None), sl, *own)] / wsum[(sl, *own)])
        send(0, (slice(done, upto), *region[1:]), stored, labels)
        done = upto
        if pyramid is not None:
            pyramid.add(sl, stored, labels)
            if levels_thread is None:  # a GPU: launching the downsampling costs nothing
                levels_rows(done == region[0].stop)
            else:  # the CPU: downsampling is work, done beside the loop (rows in order)
                level_jobs.append(levels_thread.submit(levels_rows, done == region[0].stop))

    def levels_rows(finished: bool) -> None:
        """Send the pyramid rows the finished planes allow."""
        assert pyramid is not None
        for level, lo, stored, labels in pyramid.advance(finished):
            origin = [r.start // pyramid.factor[level][a] for a, r in enumerate(region)]
            where = (slice(origin[0] + lo, origin[0] + lo + labels.shape[0]),
                     *(slice(o, o + n) for o, n in zip(origin[1:], labels.shape[1:],
                                                       strict=True)))
            send(level, where, stored, labels)

    # tiles in the grid's order (first axis slowest), in batches across tile rows (every
    # batch but the last is full); the device runs batches i and i+1 while i-1 is blended
    try:
        _loop(predictor, tiles, grid, box, inner, region, unit, fill, image, blend, finish,
              lambda: done)
    finally:
        if levels_thread is not None:
            levels_thread.shutdown(wait=True)
    for job in level_jobs:
        job.result()  # raises what the levels thread met
    times.model_s = predictor.timer.total() - model_before
    times.notes = list(predictor.notes)
    return accumulators()


def _loop(predictor: TilePredictor, tiles: list[tuple[int, ...]], grid: TileGrid, box: Region,
          inner: Region, region: Region, unit: int, fill: Callable[[int], None],
          image: torch.Tensor, blend: Callable[[list[tuple[int, ...]], torch.Tensor], None],
          finish: Callable[[int], None], finished_upto: Callable[[], int]) -> None:
    """The batches of :func:`_stream`: fill the input, cut the tiles, keep :data:`QUEUED`
    batches queued on the device while an earlier one is blended, finish chunk rows
    nothing later reaches.

    With one batch queued the device would wait whenever blending a batch and finishing a
    chunk row take longer than the next batch's forward pass; a second one queued covers
    such bursts as long as the loop keeps up on average.
    """
    with torch.inference_mode():
        pending: deque[tuple[list[tuple[int, ...]], Any]] = deque()
        n = 0
        while pending or n < len(tiles):
            while n < len(tiles) and len(pending) <= QUEUED:  # and the one to blend
                batch = tiles[n:n + predictor.batch]
                fill(min(max(p[0] for p in batch) + grid.tile[0], inner[0].stop))
                x = torch.stack([image[(slice(None), *(slice(s - b.start, s - b.start + t)
                                                       for s, b, t in zip(p, box, grid.tile,
                                                                          strict=True)))]
                                 for p in batch])
                pending.append((batch, predictor.submit(x)))
                n += len(batch)
            batch, result = pending.popleft()
            blend(batch, result.result())
            # planes below the next unblended tile get no more: finish whole chunk rows
            final = pending[0][0][0][0] if pending else \
                tiles[n][0] if n < len(tiles) else region[0].stop
            upto = region[0].stop if final >= region[0].stop else final // unit * unit
            if upto > finished_upto():
                finish(upto)
        if finished_upto() < region[0].stop:  # a block that owns no tile: only handed sums
            finish(region[0].stop)
