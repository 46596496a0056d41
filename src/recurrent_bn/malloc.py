"""glibc malloc settings for training processes.

A training step allocates and frees tensors of tens of megabytes every iteration. With glibc's defaults each of
them is a fresh `mmap` (anything above the dynamic mmap threshold) that is unmapped on free, so every step faults
in its memory page by page again: at the pMNIST shape a step took 90k-185k page faults, and the step time of every
implementation halved (`torch.nn.LSTM` included) once freed memory stayed in the heap. That is what
`M_MMAP_MAX = 0` (no mmap for large blocks) and a large `M_TRIM_THRESHOLD` (do not return the top of the heap to
the system) do; the same as starting the process with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`.

The cost: the process keeps its peak heap for its lifetime instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest threshold it can express (2 GiB) is far above any free block at the top of the
# heap that a training step leaves.
TRIM_THRESHOLD = 2**31 - 1

_applied = False


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_malloc() -> bool:
    """Keep freed memory in the heap (glibc only): returns True if the settings were applied, False elsewhere.

    Call it once at process start-up, before the first large allocations; calling it again does nothing.
    """
    global _applied
    if _applied:
        return True
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    _applied = ok
    return ok
