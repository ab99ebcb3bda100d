"""Freed multi-megabyte blocks go back to the kernel at once (glibc's mmap threshold, limits.malloc_mmap_threshold)."""

from __future__ import annotations

import ctypes
import os
import platform
from enum import Enum

# glibc <malloc.h>: the mallopt() parameters, and the most M_MMAP_THRESHOLD accepts on 64-bit.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024
# glibc reads these tunables at process start; an operator who sets one has decided, and it wins.
ENV_TUNABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class MmapThreshold(Enum):
    SET = "set"
    FROM_ENVIRONMENT = "environment"  # MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set: glibc applied it
    GLIBC_DEFAULT = "glibc default"  # configured 0
    UNSUPPORTED = "unsupported"  # not glibc (musl, macOS): their allocators have no such knob


def set_mmap_threshold(threshold: int) -> MmapThreshold:
    """Blocks of `threshold` bytes or more are mmapped, so unmapped when freed.

    glibc's default threshold starts at 128 KiB and rises to the largest block freed so far (up to 32 MiB):
    after one big message, the buffers of the next ones come from the heap and stay in the process's RSS
    once freed (docs/messages.md, memory). Setting it turns that rise off, and with it the trim threshold's, which
    would then stay at 128 KiB and hand the heap's top back to the kernel after nearly every message: it is
    set to twice the threshold, as glibc's own rule keeps it. Below the default (4 MiB) every 1 MB
    message's buffers are mapped afresh, page by page (docs/development/benchmarks.md has the A/B).
    """
    if any(os.environ.get(name) for name in ENV_TUNABLES):
        return MmapThreshold.FROM_ENVIRONMENT
    if threshold == 0:
        return MmapThreshold.GLIBC_DEFAULT
    if platform.libc_ver()[0] != "glibc":
        return MmapThreshold.UNSUPPORTED
    threshold = min(threshold, MAX_MMAP_THRESHOLD)
    libc = ctypes.CDLL(None)
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1 or libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold) != 1:
        return MmapThreshold.UNSUPPORTED
    return MmapThreshold.SET
