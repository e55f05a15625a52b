"""Giving the freed memory of the client's process back to the system.

The process that holds the client (and an embedded scheduler) allocates and frees small and
medium buffers for every task: messages, task states, each block's result before it is
folded. glibc's ``malloc`` keeps what is freed for reuse, in heaps that it shrinks only from
the top; between long-lived objects the freed pages stay in the process. Over 10⁴ blocks
that was a large part of the client's growth in ``bench_scale.py soak``, although nothing
live grew with the block count. ``malloc_trim(0)`` hands every whole free page of every heap
back (what is in use does not move); distributed's documentation suggests the same call
for workers (a ``trim_memory`` function run with ``client.run``).

Everything here is a no-op where the C library is not glibc (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
from typing import Any


@functools.cache
def _glibc() -> Any:
    """glibc, loaded (``None`` where the C library is another)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_freed_memory() -> bool:
    """Give the free pages of every glibc heap of this process back to the system
    (``malloc_trim(0)``); what is in use stays where it is.

    Returns
    -------
    bool
        Whether any memory was given back (``False`` too where the C library is not
        glibc).
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)))
