"""Benchmark: ``voxelmill convert`` (MRC → multiscale OME-Zarr) against ome-zarr-py.

Usage::

    .venv/bin/python tests/benchmarks/bench_convert.py [--size 512] [--repeats 3] [--workdir DIR]

What it does:

1. Generates a float32 MRC of ``size³`` voxels (10 Å) with tomogram-like content: a slowly
   varying background, an ice layer, dark vesicle membranes (spherical shells) and strong
   Gaussian noise. It is written slab by slab into ``mrcfile.new_mmap`` so generation
   never holds the whole volume; it is not timed. The file is flushed to disk before the
   trials, and both tools then read it from a warm page cache.
2. voxelmill: ``engine.pipelines.convert.convert`` with 128³ chunks (default pyramid:
   halve until the smallest level fits one chunk) on the embedded ``LocalCluster`` with
   the default shape for this machine (``ClusterOptions()``). The cluster start and the
   conversion are timed separately; throughput is input MiB / conversion seconds.
3. Peer: ``ome_zarr.writer.write_image`` (ome-zarr-py) of a dask array over the same
   memory-mapped MRC (``mrcfile.mmap(...).data``, 128³ dask chunks), the same chunks, the
   same number of levels with the same 2× mean downsampling (``Methods.LOCAL_MEAN`` with
   scale factors 2, 4, 8 … on z, y and x), NGFF 0.5 / zarr v3, blosc lz4 level 5 with
   byte shuffle, computed with dask's default threaded scheduler.
4. The two run alternately ``--repeats`` times; medians are reported. Every trial runs in
   a fresh child Python process, so that one trial's memory never counts in another's;
   inside it a background thread samples the resident set size summed over the process
   and all of its descendants (LocalCluster nanny and worker processes) every 50 ms while
   the measured call runs, and keeps the maximum. ``rss`` counts file-backed pages too
   (the peer keeps the MRC memory map open, so touched input pages count for it);
   ``anon`` is rss minus shared/file-backed pages and is reported alongside.
5. Each output is checked against the input (level 0 in full on the first repeat, random
   chunks afterwards; one level-1 chunk against the 2× mean) before it is deleted.

The last line of stdout is one JSON object with the medians.

This file is a script, not a test module: pytest does not collect ``tests/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

MIB = 2**20
VOXEL_A = 10.0
POLL_S = 0.05
REFRESH_EVERY = 20  # samples between re-listings of the process tree


# ------------------------------------------------------------------------------ input data

def _vesicles(size: int, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Random vesicles (centre z, y, x and radius, in voxels) inside the ice layer."""
    n = max(8, (size // 64) ** 2)
    rmin, rmax = max(4.0, size / 40), max(8.0, size / 12)
    out = []
    for _ in range(n):
        r = float(rng.uniform(rmin, rmax))
        z = float(rng.uniform(0.3 * size, 0.7 * size))
        y, x = (float(v) for v in rng.uniform(r, size - r, 2))
        out.append((z, y, x, r))
    return out


def generate_mrc(path: Path, size: int, seed: int = 0, slab: int = 32) -> None:
    """Write a tomogram-like float32 ``size³`` MRC, slab by slab (never the whole volume)."""
    import mrcfile

    rng = np.random.default_rng(seed)
    vesicles = _vesicles(size, rng)
    coord = np.arange(size, dtype=np.float32)
    # smooth background: a few separable low-frequency waves
    waves = []
    for _ in range(4):
        k = rng.uniform(1, 4, 3) * 2 * np.pi / size
        ph = rng.uniform(0, 2 * np.pi, 3)
        waves.append([np.cos(k[i] * coord + ph[i]).astype(np.float32) * 0.3 for i in range(3)])
    thickness = 2.0  # membrane half-width, voxels
    amin, amax, total = np.inf, -np.inf, 0.0
    with mrcfile.new_mmap(str(path), shape=(size, size, size), mrc_mode=2,
                          overwrite=True) as mrc:
        for z0 in range(0, size, slab):
            z1 = min(z0 + slab, size)
            zz = coord[z0:z1]
            block = np.zeros((z1 - z0, size, size), dtype=np.float32)
            for wz, wy, wx in waves:
                block += wz[z0:z1, None, None] * (wy[:, None] * wx[None, :])[None]
            # ice layer: denser between 25 % and 75 % of the depth, soft edges
            ice = 0.5 * (np.tanh((zz - 0.25 * size) / 8.0) - np.tanh((zz - 0.75 * size) / 8.0))
            block += (0.5 * ice).astype(np.float32)[:, None, None]
            for cz, cy, cx, r in vesicles:
                lo, hi = max(z0, int(cz - r - 4)), min(z1, int(cz + r + 5))
                if lo >= hi:
                    continue
                ylo, yhi = max(0, int(cy - r - 4)), min(size, int(cy + r + 5))
                xlo, xhi = max(0, int(cx - r - 4)), min(size, int(cx + r + 5))
                dz = coord[lo:hi, None, None] - cz
                dy = coord[None, ylo:yhi, None] - cy
                dx = coord[None, None, xlo:xhi] - cx
                dist = np.sqrt(dz * dz + dy * dy + dx * dx) - r
                block[lo - z0:hi - z0, ylo:yhi, xlo:xhi] -= 1.5 * np.exp(
                    -(dist * dist) / (2 * thickness**2))
            srng = np.random.default_rng([seed, z0])
            block += srng.standard_normal(block.shape, dtype=np.float32)
            mrc.data[z0:z1] = block
            amin, amax = min(amin, float(block.min())), max(amax, float(block.max()))
            total += float(block.sum(dtype=np.float64))
        mrc.voxel_size = VOXEL_A
        mrc.header.dmin, mrc.header.dmax = amin, amax
        mrc.header.dmean = total / size**3
        mrc.header.rms = -1


# ------------------------------------------------------------------------------ peak RSS

class PeakRSS:
    """Samples the RSS summed over this process and all its descendants in a thread; keeps
    the peak of the sum and the peak of the largest single process."""

    def __init__(self, interval: float = POLL_S) -> None:
        import psutil

        self.root = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.peak_anon = 0
        self.peak_largest = 0  # the most one process of the tree held at a sample
        self.samples = 0
        self._cpu0: dict[int, float] = {}  # CPU seconds per pid when measuring started
        self._cpu: dict[int, float] = {}  # ... at the last sample
        self._procs: list[Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        """User + system CPU seconds of the process tree while measuring."""
        return sum(v - self._cpu0.get(pid, 0.0) for pid, v in self._cpu.items())

    def _tree(self) -> list[Any]:
        """The process tree; re-listed every ~1 s (listing scans /proc, reading is cheap)."""
        import psutil

        if self._procs is None or self.samples % REFRESH_EVERY == 0:
            try:
                self._procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                self._procs = [self.root]
        return self._procs

    def sample(self) -> tuple[int, int]:
        import psutil

        rss = anon = 0
        largest = 0
        for p in self._tree():
            try:
                with p.oneshot():
                    mi = p.memory_info()
                    ct = p.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            rss += mi.rss
            largest = max(largest, mi.rss)
            anon += mi.rss - getattr(mi, "shared", 0)
            self._cpu[p.pid] = ct.user + ct.system
        self.peak_largest = max(self.peak_largest, largest)
        return rss, anon

    def _record(self) -> None:
        rss, anon = self.sample()
        if not self.samples:
            self._cpu0 = dict(self._cpu)
        self.peak = max(self.peak, rss)
        self.peak_anon = max(self.peak_anon, anon)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._record()

    def __enter__(self) -> PeakRSS:
        self._record()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


# ------------------------------------------------------------------------------ trials (child)

def _levels(size: int, chunk: int) -> list[tuple[int, ...]]:
    from engine.pyramid import plan_levels

    return [lv.shape for lv in plan_levels((size,) * 3, "zyx", (VOXEL_A,) * 3, (chunk,) * 3)]


def trial_voxelmill(args: argparse.Namespace) -> dict[str, Any]:
    from engine.cluster import ClusterOptions, connect
    from engine.pipelines.convert import ConvertOptions, convert

    copts = ClusterOptions(workers=args.workers, threads_per_worker=args.threads)
    options = ConvertOptions(chunks=(args.chunks,), clevel=args.clevel,
                             compression=args.compression, block_mib=args.block_mib)
    t0 = time.perf_counter()
    with connect(copts, report=lambda line: None) as client:
        start_s = time.perf_counter() - t0
        nthreads = client.nthreads()
        with PeakRSS() as mon:
            idle_mib = mon.peak / MIB
            t1 = time.perf_counter()
            result = convert(args.trial_src, args.trial_dst, options, client,
                             report=lambda line: None)
            seconds = time.perf_counter() - t1
    return {"seconds": seconds, "cluster_start_s": start_s, "peak_rss": mon.peak,
            "peak_anon": mon.peak_anon, "idle_rss_mib": idle_mib, "samples": mon.samples,
            "cpu_s": mon.cpu_s,
            "levels": len(result.levels), "workers": len(nthreads),
            "threads": sum(nthreads.values())}


def trial_peer(args: argparse.Namespace) -> dict[str, Any]:
    import dask.array as da
    import mrcfile
    from ome_zarr.format import FormatV05
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image
    from zarr.codecs import BloscCodec

    nlev = len(_levels(args.size, args.chunks))
    with mrcfile.mmap(args.trial_src, mode="r") as mrc:
        with PeakRSS() as mon:
            t1 = time.perf_counter()
            data = da.from_array(mrc.data, chunks=(args.chunks,) * 3)
            write_image(
                data, str(args.trial_dst),
                scale_factors=[{"z": 2**i, "y": 2**i, "x": 2**i} for i in range(1, nlev)],
                method=Methods.LOCAL_MEAN, fmt=FormatV05(), axes="zyx",
                scale=dict.fromkeys("zyx", VOXEL_A), axes_units=dict.fromkeys("zyx", "angstrom"),
                storage_options={"chunks": (args.chunks,) * 3, "compressor": BloscCodec(
                    cname=args.compression, clevel=args.clevel, shuffle="shuffle")},
            )
            seconds = time.perf_counter() - t1
    return {"seconds": seconds, "peak_rss": mon.peak, "peak_anon": mon.peak_anon,
            "samples": mon.samples, "cpu_s": mon.cpu_s, "levels": nlev}


# ------------------------------------------------------------------------------ verification

def _level_paths(dst: Path) -> list[Path]:
    meta = json.loads((dst / "zarr.json").read_text())
    datasets = meta["attributes"]["ome"]["multiscales"][0]["datasets"]
    return [dst / d["path"] for d in datasets]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(f"verification failed: {message}")


def verify(dst: Path, src: Path, levels: list[tuple[int, ...]], chunk: int, full: bool,
           rng: np.random.Generator) -> str:
    """Check an output against the input; raise AssertionError when it differs."""
    import mrcfile
    import zarr

    paths = _level_paths(dst)
    shapes = [tuple(zarr.open_array(str(p), mode="r").shape) for p in paths]
    _check(shapes == levels, f"{dst}: level shapes {shapes} != {levels}")
    a0 = zarr.open_array(str(paths[0]), mode="r")
    _check(tuple(a0.chunks) == (min(chunk, levels[0][0]),) * 3, f"{dst}: chunks {a0.chunks}")
    codecs = [c["name"] if c["name"] != "blosc" else "blosc(" + ",".join(
        f"{k}={v}" for k, v in c.get("configuration", {}).items() if k != "blocksize") + ")"
        for c in json.loads((paths[0] / "zarr.json").read_text())["codecs"]]
    n = levels[0][0]
    with mrcfile.mmap(str(src), mode="r") as mrc:
        ref = mrc.data
        if full:
            for z in range(0, n, chunk):
                got = a0[z:z + chunk]
                _check(np.array_equal(got, ref[z:z + chunk]), f"{dst}: level 0 z={z} differs")
            what = "level 0 in full"
        else:
            for _ in range(8):
                o = [int(rng.integers(0, -(-n // chunk))) * chunk for _ in range(3)]
                sl = tuple(slice(v, v + chunk) for v in o)
                _check(np.array_equal(a0[sl], ref[sl]), f"{dst}: level 0 chunk {o} differs")
            what = "8 random level-0 chunks"
        if len(paths) > 1:
            c1 = min(chunk, levels[1][0])
            o = [int(rng.integers(0, -(-levels[1][0] // c1))) * c1 for _ in range(3)]
            got = zarr.open_array(str(paths[1]), mode="r")[tuple(slice(v, v + c1) for v in o)]
            block = np.asarray(ref[tuple(slice(2 * v, 2 * v + 2 * c1) for v in o)],
                               dtype=np.float64)
            s = block.shape
            want = block.reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean(axis=(1, 3, 5))
            _check(np.allclose(got, want, rtol=1e-5, atol=1e-5), f"{dst}: level 1 differs")
            what += ", a level-1 chunk = 2× mean"
    return f"{what}; codecs {' '.join(codecs)}"


# ------------------------------------------------------------------------------ driver

def run_child(kind: str, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trial", kind,
           "--trial-src", str(src), "--trial-dst", str(dst), "--size", str(args.size),
           "--chunks", str(args.chunks), "--block-mib", str(args.block_mib),
           "--clevel", str(args.clevel), "--compression", args.compression]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return run_trial(kind, cmd)


def run_trial(kind: str, cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run one trial's child process; the JSON object its last stdout line holds.

    Past ``timeout`` seconds the child is killed and ``TimeoutExpired`` raised.
    """
    # the child's stderr (cluster logs, shutdown noise) is shown only when the trial fails
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{kind} trial failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="edge of the cubic input (voxels)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each tool")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where input and outputs go (default: a new temp dir under /tmp)")
    p.add_argument("--keep-input", action="store_true",
                   help="reuse WORKDIR/input-SIZE.mrc if present and keep it at the end")
    p.add_argument("--skip-peer", action="store_true", help="run voxelmill only")
    p.add_argument("--chunks", type=int, default=128, help="chunk edge (both tools)")
    p.add_argument("--clevel", type=int, default=5, help="blosc level (both tools)")
    p.add_argument("--compression", default="lz4", help="blosc codec (both tools)")
    p.add_argument("--block-mib", type=int, default=64, help="voxelmill ConvertOptions.block_mib")
    p.add_argument("--workers", type=int, default=None, help="voxelmill ClusterOptions.workers")
    p.add_argument("--threads", type=int, default=None,
                   help="voxelmill ClusterOptions.threads_per_worker")
    p.add_argument("--trial", choices=("voxelmill", "peer"), help=argparse.SUPPRESS)
    p.add_argument("--trial-src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trial-dst", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.trial:  # child process: one measured trial, its result as the last stdout line
        fn = trial_voxelmill if args.trial == "voxelmill" else trial_peer
        print(json.dumps(fn(args)), flush=True)
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when terminated
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="voxelmill-bench-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"input-{args.size}.mrc"
    nbytes = args.size**3 * 4
    mib = nbytes / MIB
    levels = _levels(args.size, args.chunks)
    if levels[-1][0] * 2 ** (len(levels) - 1) != args.size:
        # ome-zarr-py floors odd level sizes where voxelmill rounds up: outputs would differ
        raise SystemExit(f"--size {args.size}: use a size that halves evenly down to one "
                         f"chunk (e.g. 512 or 1024 with --chunks {args.chunks})")
    try:
        if args.keep_input and src.exists() and src.stat().st_size == 1024 + nbytes:
            print(f"reusing {src}")
        else:
            t = time.perf_counter()
            generate_mrc(src, args.size)
            os.sync()
            print(f"generated {src}: {args.size}³ float32 = {mib:.0f} MiB, {VOXEL_A} Å, "
                  f"in {time.perf_counter() - t:.1f} s (not measured)")
        print(f"levels: {levels}; chunks {args.chunks}³; blosc {args.compression} "
              f"clevel {args.clevel}; block_mib {args.block_mib}; cores {os.cpu_count()}")
        results: dict[str, list[dict[str, Any]]] = {"voxelmill": [], "peer": []}
        kinds = ["voxelmill"] if args.skip_peer else ["voxelmill", "peer"]
        rng = np.random.default_rng(1)
        for rep in range(args.repeats):
            for kind in kinds:
                dst = workdir / f"{kind}.ome.zarr"
                remove(dst)
                res = run_child(kind, src, dst, args)
                checked = verify(dst, src, levels, args.chunks, rep == 0, rng)
                remove(dst)
                os.sync()
                results[kind].append(res)
                extra = (f", cluster start {res['cluster_start_s']:.1f} s, "
                         f"{res['workers']} worker(s), {res['threads']} thread(s) in total, "
                         f"idle tree {res['idle_rss_mib']:.0f} MiB"
                         if kind == "voxelmill" else ", dask threaded scheduler")
                print(f"[{rep + 1}/{args.repeats}] {kind:9s} {res['seconds']:7.2f} s "
                      f"{mib / res['seconds']:7.1f} MiB/s  peak rss {res['peak_rss'] / MIB:6.0f}"
                      f" MiB (anon {res['peak_anon'] / MIB:.0f} MiB, {res['samples']} samples)"
                      f", cpu {res['cpu_s']:.1f} s"
                      f"{extra}; verified: {checked}", flush=True)

        def med(kind: str, key: str) -> float | None:
            vals = [r[key] for r in results[kind]]
            return statistics.median(vals) if vals else None

        vm_s, peer_s = med("voxelmill", "seconds"), med("peer", "seconds")
        vm_rate = mib / vm_s
        peer_rate = mib / peer_s if peer_s else None
        vm_rss, peer_rss = med("voxelmill", "peak_rss"), med("peer", "peak_rss")
        print(f"median voxelmill: {vm_s:.2f} s = {vm_rate:.1f} MiB/s, peak rss "
              f"{vm_rss / MIB:.0f} MiB (anon {med('voxelmill', 'peak_anon') / MIB:.0f} MiB), "
              f"cluster start {med('voxelmill', 'cluster_start_s'):.1f} s, "
              f"cpu {med('voxelmill', 'cpu_s'):.1f} s")
        if peer_s:
            print(f"median peer (ome-zarr-py {_peer_version()} write_image, local_mean, NGFF "
                  f"0.5/zarr v3): {peer_s:.2f} s = {peer_rate:.1f} MiB/s, peak rss "
                  f"{peer_rss / MIB:.0f} MiB (anon {med('peer', 'peak_anon') / MIB:.0f} MiB), "
                  f"cpu {med('peer', 'cpu_s'):.1f} s")
        summary = {
            "size": args.size,
            "voxelmill_mib_s": round(vm_rate, 2),
            "peer_mib_s": round(peer_rate, 2) if peer_rate else None,
            "ratio": round(vm_rate / peer_rate, 3) if peer_rate else None,
            "peak_rss_mib": round(vm_rss / MIB, 1),
            "peer_peak_rss_mib": round(peer_rss / MIB, 1) if peer_rss else None,
            "voxelmill_s": round(vm_s, 3),
            "peer_s": round(peer_s, 3) if peer_s else None,
            "levels": len(levels),
        }
        print(json.dumps(summary), flush=True)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for kind in ("voxelmill", "peer"):
                remove(workdir / f"{kind}.ome.zarr")
                remove(workdir / f".{kind}.ome.zarr.partial")
            if not args.keep_input:
                remove(src)


def _peer_version() -> str:
    from importlib.metadata import version

    return version("ome-zarr")


if __name__ == "__main__":
    main()
