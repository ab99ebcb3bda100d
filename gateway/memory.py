"""Freed multi-megabyte blocks go back to the kernel at once (glibc's mmap threshold, limits.malloc_mmap_threshold)."""

from __future__ import annotations

import ctypes
import os
import platform
from enum import Enum

# glibc <malloc.h>: the mallopt() parameter, and the most it accepts on 64-bit (4 MiB * sizeof(long)).
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
# glibc reads this tunable at process start; an operator who sets it has decided, and it wins.
ENV_TUNABLE = "MALLOC_MMAP_THRESHOLD_"


class MmapThreshold(Enum):
    SET = "set"
    FROM_ENVIRONMENT = "environment"  # MALLOC_MMAP_THRESHOLD_ is set: glibc applied it already
    GLIBC_DEFAULT = "glibc default"  # configured 0
    UNSUPPORTED = "unsupported"  # not glibc (musl, macOS): their allocators have no such knob


def set_mmap_threshold(threshold: int) -> MmapThreshold:
    """Blocks of `threshold` bytes or more are mmapped and unmapped when freed. glibc's default threshold
    starts at 128 KiB and rises to the largest block freed so far (up to 32 MiB), after which a 40 MB scan's
    buffers stay in the heap: freed, yet counted in the process's RSS until a later trim (README, Memory)."""
    if os.environ.get(ENV_TUNABLE):
        return MmapThreshold.FROM_ENVIRONMENT
    if threshold == 0:
        return MmapThreshold.GLIBC_DEFAULT
    if platform.libc_ver()[0] != "glibc":
        return MmapThreshold.UNSUPPORTED
    libc = ctypes.CDLL(None)
    if libc.mallopt(M_MMAP_THRESHOLD, min(threshold, MAX_MMAP_THRESHOLD)) != 1:
        return MmapThreshold.UNSUPPORTED
    return MmapThreshold.SET
