"""The client's process gives freed memory back (engine.allocator): glibc's thresholds stay
fixed at 128 KiB, so medium buffers freed in any order leave the process, where by default
they stay in its heap once a larger buffer has been freed."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only")

# A fresh process: 4 MiB allocated and freed (glibc's default then raises its mmap and trim
# thresholds), then 96 buffers of 384 KiB written, all freed but the last (which keeps the
# heap's top in use): how much of the 36 MiB the process still holds.
PROBE = textwrap.dedent("""
    import json, os, sys
    import numpy as np, psutil
    from engine.allocator import bound_freed_memory
    applied = bound_freed_memory() if sys.argv[1] == "bounded" else []
    rss = lambda: psutil.Process().memory_info().rss
    big = np.ones(4 * 2**20, np.uint8); del big
    before = rss()
    bufs = [np.ones(384 * 2**10, np.uint8) for _ in range(96)]
    held = rss() - before
    del bufs[:-1]
    print(json.dumps({"applied": applied, "held": held, "kept": rss() - before}))
""")


def _probe(mode: str, env: dict[str, str] | None = None) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_buffers_leave_the_process():
    """With the thresholds bound, less than a quarter of the freed 36 MiB stays resident;
    without them (glibc's default, the control that shows the probe measures it) more
    than three quarters stays."""
    bounded = _probe("bounded")
    assert bounded["applied"] == ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"]
    assert bounded["held"] > 30 * 2**20, bounded  # the buffers were resident
    assert bounded["kept"] < 9 * 2**20, bounded
    default = _probe("default")
    assert default["kept"] > 27 * 2**20, default


def test_the_users_settings_win():
    """A threshold set through glibc's environment variable is left as the user set it."""
    res = _probe("bounded", {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20)})
    assert res["applied"] == ["MALLOC_TRIM_THRESHOLD_"]
