"""Process-tree helpers: peak RSS/PSS sampling from /proc, and dying with the bench."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PROC = Path("/proc")
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Popen preexec_fn: the child gets SIGTERM when the bench dies, even by SIGKILL (Linux only).

    Lost when the child changes its uid (smtp-sink -u nobody): stop_stale() covers those.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (via /proc/PID/task/*/children, else a /proc scan)."""
    task_dir = PROC / str(pid) / "task"
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            kids.extend(int(x) for x in (task / "children").read_text().split())
        except FileNotFoundError:
            return _children_by_scan(pid)
        except OSError:
            continue
    return kids


def _children_by_scan(pid: int) -> list[int]:
    """Fallback for kernels without CONFIG_PROC_CHILDREN."""
    kids = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def tree(roots: Iterable[int]) -> set[int]:
    """All pids in the trees under `roots` (roots included)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children(pid))
    return seen


def cpu_seconds(pids: Iterable[int], children: bool = False) -> float:
    """User + system CPU time of these processes (all their threads) so far; `children`: with the time of
    their children that exited and were waited for (Postfix's master reaps its smtpd processes)."""
    total = 0
    for pid in pids:
        try:
            fields = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        if children:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        return int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process: shared pages split among their users (0 if unknown)."""
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def tree_rss(roots: Iterable[int]) -> int:
    """Sum of RSS over the process tree (shared pages are counted once per process)."""
    return sum(rss_bytes(pid) for pid in tree(roots))


def tree_pss(roots: Iterable[int]) -> int:
    """Sum of PSS over the process tree (shared pages counted once in total)."""
    return sum(pss_bytes(pid) for pid in tree(roots))


class PeakRss(threading.Thread):
    """Samples the summed RSS (every 100 ms) and PSS (every 1 s, it costs more) of a process tree."""

    def __init__(self, roots: Callable[[], list[int]], interval_s: float = 0.1, pss_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.interval_s = interval_s
        self.pss_every = pss_every
        self.peak = 0
        self.peak_pss = 0
        self._samples = 0
        self._stop_event = threading.Event()

    def sample(self, pss: bool = False) -> None:
        """Take one sample now (PSS too when asked or every `pss_every` samples)."""
        roots = self.roots()
        self.peak = max(self.peak, tree_rss(roots))
        if pss or self._samples % self.pss_every == 0:
            self.peak_pss = max(self.peak_pss, tree_pss(roots))
        self._samples += 1

    def run(self) -> None:
        """Sampling loop."""
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop_event.set()
        self.join(timeout=2)
        self.sample(pss=True)
        return self.peak

    def __enter__(self) -> PeakRss:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
