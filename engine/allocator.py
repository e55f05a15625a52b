"""The C allocator of the process that holds the client (and an embedded scheduler).

That process allocates and frees small and medium buffers for every task: messages, task
states, each block's result before it is folded. glibc's ``malloc`` keeps what is freed
for reuse, and by default raises its mmap threshold each time a large buffer is freed, so
that later buffers of that size come from the heap: freed memory between long-lived
objects then stays in the process. Over 10⁴ blocks that is most of the client's growth
(measured with ``bench_scale.py soak``), although nothing live grows with the block
count. distributed sets ``MALLOC_TRIM_THRESHOLD_`` for the worker processes it spawns for
the same reason; this module does it for the process that runs the command.

Everything here is a no-op where the C library is not glibc (macOS, musl, Windows), and
the settings a user gives through glibc's environment variables win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from typing import Any

#: glibc's ``mallopt`` parameters (``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: what a freed buffer may leave in the heap before glibc gives it back, and the size from
#: which a buffer is mapped on its own (and unmapped when freed): glibc's own default for
#: the latter (128 KiB), kept fixed instead of rising with every large free
FREED_LIMIT_BYTES = 128 * 2**10

#: the environment variables through which a user sets these thresholds themselves
ENVIRONMENT = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
               M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_"}


@functools.cache
def _glibc() -> Any:
    """glibc, loaded (``None`` where the C library is another)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def bound_freed_memory(limit: int = FREED_LIMIT_BYTES) -> list[str]:
    """Make glibc give freed memory back sooner in this process, for its whole life.

    Sets ``M_TRIM_THRESHOLD`` (free memory at the top of a heap beyond which it is
    returned) and ``M_MMAP_THRESHOLD`` (buffers at least this large get their own mapping,
    returned when freed) to ``limit`` bytes; either one set also stops glibc from raising
    the mmap threshold on its own. A threshold already set through its environment
    variable is left as the user set it.

    Parameters
    ----------
    limit : int
        Both thresholds, in bytes.

    Returns
    -------
    list of str
        The names of the environment variables whose settings were applied here (empty
        where the C library is not glibc).
    """
    libc = _glibc()
    if libc is None:
        return []
    applied = []
    for param, name in ENVIRONMENT.items():
        if name in os.environ:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(limit)) == 1:
            applied.append(name)
    return applied


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
