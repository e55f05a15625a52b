"""Shared fixtures: a small in-process cluster, the CLI as a subprocess, the real data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import pytest

# Two test processes share two cores (pytest -n 2): one intra-op thread each for torch, set
# before any test imports it, and for the CLI subprocesses, which inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# the CLI subprocesses start their embedded clusters without a dashboard (its bokeh import
# costs each ~0.4 s of CPU and 20 MiB); tests/test_dashboard.py and test_tls ask for one
os.environ.setdefault("VOXELMILL_DASHBOARD_ADDRESS", "none")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` beside the repository; tests skip when it is absent."""
    if not REAL.is_dir():
        pytest.skip("../shared/data/real is not available")
    return REAL


@pytest.fixture(scope="session")
def client():
    """A distributed client on an in-process cluster (2 threads): fast, same code path.

    Tests that exercise real distribution start `dask scheduler` / `dask worker`
    subprocesses themselves (tests/test_distributed.py).
    """
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``voxelmill ARGS`` as a user would, capturing output and the exit code."""
    exe = Path(sys.executable).parent / "voxelmill"
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=full_env)


def write_mrc(path: Path, data: np.ndarray, voxel_size: float | tuple = 1.0) -> Path:
    with mrcfile.new(path, data, overwrite=True) as mrc:
        mrc.voxel_size = voxel_size
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dask_processes(logs: Path, workers: Sequence[Sequence[str]],
                   certs: Any = None) -> Iterator[str]:
    """Run ``dask scheduler`` and one single-threaded ``dask worker`` per entry of ``workers``
    (its extra arguments, e.g. ``["--resources", "GPU=1"]``) as subprocesses on 127.0.0.1;
    yield the scheduler address once every worker has joined. With ``certs`` (from
    ``engine.security.make_certificates``) everything speaks TLS with mutual authentication
    and the address is ``tls://``."""
    from distributed import Client

    bindir = Path(sys.executable).parent
    port = free_port()
    address = f"{'tls' if certs else 'tcp'}://127.0.0.1:{port}"
    security = None

    def flags(role: str) -> list[str]:
        if not certs:
            return []
        return ["--tls-ca-file", str(certs.ca_cert), "--tls-cert", str(certs.certs[role]),
                "--tls-key", str(certs.keys[role])]

    if certs:
        from engine.security import load_security

        security = load_security(certs.directory)
    procs = [subprocess.Popen(
        [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", "127.0.0.1:0", *(["--protocol", "tls"] if certs else []),
         *flags("scheduler")],
        stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT)]
    for i, extra in enumerate(workers):
        procs.append(subprocess.Popen(
            [str(bindir / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
             "--nworkers", "1", "--no-dashboard", "--name", f"w{i}",
             "--local-directory", str(logs / f"w{i}"), *flags("worker"), *extra],
            stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout="5s", security=security) as c:
                    if workers:  # none: the scheduler alone, its workers the caller's
                        c.wait_for_workers(len(workers),
                                           timeout=max(1, deadline - time.monotonic()))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the end-to-end recipe tests (minutes each) first, so that the two test
    processes finish together instead of one running them alone at the end."""
    items.sort(key=lambda item: not Path(str(item.fspath)).name.startswith("test_recipe_"))
