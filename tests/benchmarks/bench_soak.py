"""Soak: 100,000 no-op blocks through the runner on the embedded cluster, scheduler memory
recorded; the peer submits the same tasks as one graph (``client.map``) at once.

The embedded cluster's scheduler lives in this process (workers are subprocesses), so this
process's resident memory is the scheduler's plus the client's. Sampled every 0.2 s.

    python tests/benchmarks/bench_soak.py [--blocks 100000] [--workers 2]

Prints one JSON line at the end: per mode seconds, blocks/s, the most tasks the scheduler
held at once, resident memory at start / peak and the growth; and the ratio of the peer's
memory growth to the runner's.
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


def noop(block: Any) -> None:
    """The block task: nothing, so the run measures the machinery only."""
    return None


def sampled(client: Any, work: Callable[[], Any]) -> dict[str, Any]:
    scheduler = client.cluster.scheduler
    proc = psutil.Process()
    gc.collect()
    start = proc.memory_info().rss
    peak = {"rss": start, "tasks": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak["rss"] = max(peak["rss"], proc.memory_info().rss)
            peak["tasks"] = max(peak["tasks"], len(scheduler.tasks))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    n = work()
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return {"seconds": round(seconds, 2), "blocks_per_s": round(n / seconds, 1),
            "peak_scheduler_tasks": peak["tasks"], "rss_start_mib": round(start / 2**20, 1),
            "rss_peak_mib": round(peak["rss"] / 2**20, 1),
            "rss_growth_mib": round((peak["rss"] - start) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from engine.blocks import BlockGrid
    from engine.cluster import ClusterOptions, connect
    from engine.runner import run_blocks

    grid = BlockGrid((args.blocks,), 1)
    with connect(ClusterOptions(workers=args.workers, threads_per_worker=1),
                 report=lambda _: None) as client:
        def throttled() -> int:
            return run_blocks(client, grid, noop, name="soak").computed

        def all_at_once() -> int:
            futures = client.map(noop, range(args.blocks), pure=False)
            client.gather(futures)
            n = len(futures)
            del futures
            return n

        runner = sampled(client, throttled)
        time.sleep(2)  # let the scheduler forget the first run's tasks
        peer = sampled(client, all_at_once)
    print(json.dumps({
        "blocks": args.blocks, "workers": args.workers, "runner": runner, "all_at_once": peer,
        "memory_growth_ratio_peer_vs_runner": round(
            peer["rss_growth_mib"] / max(runner["rss_growth_mib"], 1.0), 2),
        "speed_ratio_runner_vs_peer": round(runner["blocks_per_s"] / peer["blocks_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
