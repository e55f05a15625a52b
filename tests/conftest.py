"""Shared fixtures: a small in-process cluster, the CLI as a subprocess, the real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest

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
