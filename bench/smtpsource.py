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

HELO_NAME = "client.bench"


@dataclass
class SourceRun:
    """Outcome of one smtp-source run."""

    sent: int
    elapsed_s: float
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
    """Reads smtp-source's "1\\r2\\r3\\r..." counter output and keeps the latest value."""

    def __init__(self, stream: int) -> None:
        super().__init__(daemon=True)
        self.fd = stream
        self.value = 0

    def run(self) -> None:
        tail = b""
        while chunk := os.read(self.fd, 65536):
            tail += chunk
            head, sep, tail = tail.rpartition(b"\r")
            if sep:
                last = head.rpartition(b"\r")[2].strip()
                if last.isdigit():
                    self.value = int(last)


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
    """Send up to `count` messages; stop smtp-source after `time_limit` seconds and count what was done."""
    cmd = command(target, path, sessions, count, persistent, sender, rcpt)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        counter = Counter(proc.stdout.fileno())
        counter.start()
        try:
            proc.wait(timeout=time_limit)
            elapsed, limited = time.perf_counter() - start, False
        except subprocess.TimeoutExpired:
            elapsed, limited = time.perf_counter() - start, True
            sent_at_limit = counter.value
        finally:
            if proc.poll() is None:
                proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            counter.join(timeout=5)
            proc.stdout.close()
        if limited:
            return SourceRun(sent_at_limit, elapsed, True)
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace").strip().replace("\n", " | ")
            return SourceRun(counter.value, elapsed, False, text[-300:] or f"exit status {proc.returncode}")
        return SourceRun(max(counter.value, count), elapsed, False)
