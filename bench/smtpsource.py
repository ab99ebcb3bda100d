"""Runs Postfix's smtp-source for at most N messages and T seconds, counting completed messages."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from procmon import die_with_parent

HELO_NAME = "client.bench"


@dataclass
class SourceRun:
    """Outcome of one smtp-source run."""

    sent: int  # smtp-source's counter (it counts a message before its end-of-DATA reply)
    elapsed_s: float
    msgs_per_s: float
    time_limited: bool
    error: str = ""


def binary() -> str | None:
    """Path of smtp-source, or None."""
    found = shutil.which("smtp-source")
    if found:
        return found
    return "/usr/sbin/smtp-source" if Path("/usr/sbin/smtp-source").exists() else None


def command(target: str, path: Path, sessions: int, count: int, persistent: bool, sender: str, rcpt: str) -> list[str]:
    """smtp-source command line; -c prints a counter after every completed DATA."""
    cmd = [binary() or "smtp-source", "-c", "-s", str(sessions), "-m", str(count), "-C", "3", "-M", HELO_NAME]
    if persistent:
        cmd.append("-d")  # all messages of a session over one connection
    return [*cmd, "-F", str(path), "-f", sender, "-t", rcpt, target]


class Counter(threading.Thread):
    """Reads smtp-source's "1\\r2\\r3\\r..." counter output; keeps the latest value and when it was seen."""

    def __init__(self, stream: int, start: float) -> None:
        super().__init__(daemon=True)
        self.fd = stream
        self.start_time = start
        self.value = 0
        self.history: list[tuple[float, int]] = []  # (seconds since start, value)

    def run(self) -> None:
        tail = b""
        while chunk := os.read(self.fd, 65536):
            tail += chunk
            head, sep, tail = tail.rpartition(b"\r")
            last = head.rpartition(b"\r")[2].strip()
            if sep and last.isdigit():
                self.value = int(last)
                self.history.append((time.perf_counter() - self.start_time, self.value))

    def first_at_least(self, value: int) -> tuple[float, int] | None:
        """The first (time, value) with value >= `value`."""
        for mark in list(self.history):
            if mark[1] >= value:
                return mark
        return None


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate smtp-source if it still runs."""
    if proc.poll() is None:
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _error_text(err: IO[bytes], returncode: int) -> str:
    err.seek(0)
    text = err.read().decode(errors="replace").strip().replace("\n", " | ")
    return text[-300:] or f"exit status {returncode}"


def run(
    target: str,
    path: Path,
    sessions: int,
    count: int,
    persistent: bool,
    time_limit: float,
    sender: str,
    rcpt: str,
) -> SourceRun:
    """Send up to `count` messages; a run that completes gives count / elapsed.

    A longer run is stopped once `time_limit` has passed and the steady-state window holds enough
    messages (or at 4 × `time_limit`), and gives the rate over that window, read from smtp-source's
    counter: the window starts once the sessions are up and busy (the counter has reached 2 × sessions),
    and ends at the stop.
    The counter runs ahead of the server's replies by at most one message per session; in steady
    state that offset is the same at both ends and cancels out.
    """
    cmd = command(target, path, sessions, count, persistent, sender, rcpt)
    need = 2 * sessions + 5
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, preexec_fn=die_with_parent
        )
        assert proc.stdout is not None
        counter = Counter(proc.stdout.fileno(), start)
        counter.start()
        window: tuple[float, int, float, int] | None = None
        try:
            while proc.poll() is None:
                time.sleep(0.05)
                now, value = time.perf_counter() - start, counter.value
                first = counter.first_at_least(min(2 * sessions, count))
                enough = first is not None and value - first[1] >= need
                if now >= 4 * time_limit or (now >= time_limit and enough):
                    # It may have exited during the sleep (done, or msg_fatal on a refused message): then its
                    # exit status decides below, not a window it did not run to.
                    if proc.poll() is None:
                        window = (*first, now, value) if first and value > first[1] else (0.0, 0, now, value)
                    break
            elapsed = time.perf_counter() - start
        finally:
            _stop(proc)
            counter.join(timeout=5)
            proc.stdout.close()
        if window is not None:
            t1, v1, t2, v2 = window
            return SourceRun(v2, t2, (v2 - v1) / (t2 - t1), True)
        if proc.returncode != 0:
            return SourceRun(counter.value, elapsed, 0.0, False, _error_text(err, proc.returncode))
        return SourceRun(count, elapsed, count / elapsed, False)
