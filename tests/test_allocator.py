"""The client's process gives freed memory back (engine.allocator.trim_freed_memory, which
the embedded cluster calls every few seconds): buffers freed in the middle of glibc's heap
stay resident until then."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only")

# A fresh process: 4 MiB allocated and freed (glibc then serves buffers below that size from
# its heap), then 96 buffers of 384 KiB written, all freed but the last (which keeps the
# heap's top in use): how much of the 36 MiB the process holds before and after the trim.
PROBE = textwrap.dedent("""
    import json
    import numpy as np, psutil
    from engine.allocator import trim_freed_memory
    rss = lambda: psutil.Process().memory_info().rss
    big = np.ones(4 * 2**20, np.uint8); del big
    before = rss()
    bufs = [np.ones(384 * 2**10, np.uint8) for _ in range(96)]
    held = rss() - before
    del bufs[:-1]
    kept = rss() - before
    trimmed = trim_freed_memory()
    print(json.dumps({"held": held, "kept": kept, "trimmed": trimmed,
                      "after_trim": rss() - before}))
""")


def test_trim_gives_freed_buffers_back():
    """Freed in the middle of the heap, more than three quarters of the 36 MiB stay
    resident (the control: the probe sees them); after the trim less than a quarter."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["held"] > 30 * 2**20, res  # the buffers were resident
    assert res["kept"] > 27 * 2**20, res
    assert res["trimmed"] is True, res
    assert res["after_trim"] < 9 * 2**20, res
