"""The network on the device: batches of tiles in, probabilities out, timed on the device.

:class:`TilePredictor` runs a model on a batch of tiles already on the device, with mixed
precision on CUDA and optional flip TTA; it measures the device time of every forward pass
(CUDA events, or the wall time on the CPU, where a call is synchronous) and, when a batch
runs out of device memory, halves the batch for the rest of the run (once per size, said in
:attr:`TilePredictor.notes`) instead of failing.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

#: tiles per call when neither the user nor the device's free memory says otherwise
CPU_BATCH = 4
#: the most tiles per call the free-memory rule picks
MAX_AUTO_BATCH = 32


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """The exceptions torch raises when the device runs out of memory."""
    found = [getattr(torch, "OutOfMemoryError", None),
             getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple({e for e in found if isinstance(e, type)}) or (RuntimeError,)


class DeviceTimer:
    """Sums the device time of timed sections: CUDA events on a GPU (read at :meth:`total`,
    so timing never synchronizes the stream), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pairs: list[tuple[Any, Any]] = []
        self._seconds = 0.0

    def section(self) -> _Section:
        return _Section(self)

    def total(self) -> float:
        """Seconds of device time so far (waits for the recorded sections to finish)."""
        if self._pairs:
            self._pairs[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._pairs) / 1e3
            self._pairs.clear()
        return self._seconds


class _Section:
    def __init__(self, timer: DeviceTimer) -> None:
        self.timer = timer

    def __enter__(self) -> None:
        import time

        if self.timer.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        import time

        if self.timer.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.timer._pairs.append((self.start, end))
        else:
            self.timer._seconds += time.perf_counter() - self.t0


@dataclass
class TilePredictor:
    """Probabilities ``(B, K, *tile)`` float32 of tiles ``(B, C, *tile)`` on the device.

    Parameters
    ----------
    model : torch.nn.Module
        On ``device``, in eval mode.
    device : torch.device
    activation : {"sigmoid", "softmax", "none"}
    tta : bool
        Average over every flip of the spatial axes (8 in 3D, 4 in 2D).
    amp : bool
        float16 autocast on CUDA.
    batch : int
        Tiles per forward pass; halved on a device out-of-memory error.
    threads : int, optional
        Intra-op threads of the forward passes (on the CPU: the cores the model may use;
        the caller's count when None). Only the device thread uses them.
    """

    model: torch.nn.Module
    device: torch.device
    activation: str
    tta: bool = False
    amp: bool = True
    batch: int = CPU_BATCH
    threads: int | None = None
    timer: DeviceTimer = field(init=False)
    notes: list[str] = field(default_factory=list)
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.timer = DeviceTimer(self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16,
                            enabled=self.amp and self.device.type == "cuda"):
            logits = self.model(x)
        logits = logits.float()
        if self.activation == "none":  # a package whose outputs need no activation
            return logits
        return torch.softmax(logits, 1) if self.activation == "softmax" \
            else torch.sigmoid(logits)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tta:
            return self._forward(x)
        spatial = list(range(2, x.ndim))
        total = None
        combos = [[a for i, a in enumerate(spatial) if m >> i & 1]
                  for m in range(2 ** len(spatial))]
        for dims in combos:
            y = self._forward(torch.flip(x, dims) if dims else x)
            y = torch.flip(y, dims) if dims else y
            total = y if total is None else total + y
        return total / len(combos)

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.timer.section():
            return self._predict(tiles)

    def untimed(self, tiles: torch.Tensor) -> torch.Tensor:
        """The prediction without timing it (a probe)."""
        with torch.inference_mode():
            return self._predict(tiles)

    def submit(self, tiles: torch.Tensor) -> Future:
        """:meth:`predict` in this predictor's own thread, so the caller can blend the
        previous batch meanwhile (on a GPU the thread only launches the work; one thread
        for every forward pass also keeps cuDNN's per-thread handles and tuned algorithms
        to one set)."""
        return self._thread().submit(self.predict, tiles)

    def warm_up(self, channels: int, tile: tuple[int, ...]) -> None:
        """One untimed forward pass of a full batch of zero tiles in the device thread: on
        a GPU, cuDNN chooses its algorithms for the batch's shape now, not in the first
        block."""
        if self.device.type == "cuda":
            x = torch.zeros((self.batch, channels, *tile), device=self.device)
            self._thread().submit(self.untimed, x).result()
            torch.cuda.synchronize(self.device)

    def _thread(self) -> ThreadPoolExecutor:
        """The device thread, started on first use with :attr:`threads` intra-op threads
        (else the count of the thread that starts it), while torch's count everywhere else
        stays what it was.

        Under OpenMP the count is per thread: a new thread starts from ``OMP_NUM_THREADS``
        (1 in a Dask worker), which oneDNN's convolutions read without asking torch, and
        takes torch's process-wide count only at its first parallel operation on a large
        tensor. The device thread used to get the worker's threads only because the task
        thread had raised the process-wide count before that operation: the first
        convolution of the first forward pass ran on one thread, and a network of
        convolutions alone would have stayed there (a 3D convolution in such a thread:
        0.46 s, 0.25 s with the count set). So the device thread sets and fixes its own
        count before anything runs there, and the caller then puts the process-wide count
        back, so the task thread's blending stays at the worker's default (one thread in a
        Dask worker; alternating one and two run by run on the U-Net of
        ``bench_predict.py``: 8.62 against 8.63 s, no difference).
        """
        if self._pool is None:
            caller = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="voxelmill-device",
                                            initializer=_fix_intra_op_threads,
                                            initargs=(self.threads or caller,))
            self._pool.submit(int).result()  # the thread starts and fixes its count
            torch.set_num_threads(caller)
        return self._pool

    def close(self) -> None:
        """Stop the device thread (a later :meth:`submit` starts another)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def predict(self, tiles: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__`, retried in halves after a device out-of-memory error."""
        try:
            return self(tiles)
        except out_of_memory_errors():
            if len(tiles) <= 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = max(1, len(tiles) // 2)
            self.notes.append(f"device out of memory with a batch of {len(tiles)} tiles: "
                              f"retrying with batches of {half}")
            self.batch = half
            return torch.cat([self.predict(tiles[:half]), self.predict(tiles[half:])])


def _fix_intra_op_threads(n: int) -> None:
    """Give the calling thread ``n`` intra-op threads for good. torch sets a thread's
    OpenMP count from its process-wide one once, when the thread first asks for it (the
    first parallel operation on a large tensor): asking now, while the process-wide count
    is ``n``, keeps a later reset of that count (the caller's, just after) from reaching
    this thread."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # torch's one-time per-thread initialisation happens here


def auto_batch(predictor: TilePredictor, channels: int, tile: tuple[int, ...],
               share: float = 0.4) -> int:
    """Tiles per call from the device's free memory: one tile's peak memory (measured with
    a forward pass of one zero tile) into ``share`` of the free memory, 1 to
    :data:`MAX_AUTO_BATCH`. On the CPU: :data:`CPU_BATCH`."""
    if predictor.device.type != "cuda":
        return CPU_BATCH
    torch.cuda.synchronize(predictor.device)
    base = torch.cuda.memory_allocated(predictor.device)
    torch.cuda.reset_peak_memory_stats(predictor.device)
    x = torch.zeros((1, channels, *tile), device=predictor.device)
    with torch.inference_mode():
        predictor.untimed(x)
    per_tile = max(torch.cuda.max_memory_allocated(predictor.device) - base, 1)
    free, _ = torch.cuda.mem_get_info(predictor.device)
    return int(max(1, min(MAX_AUTO_BATCH, share * free // per_tile)))
