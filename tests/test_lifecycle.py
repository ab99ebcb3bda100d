"""The life of `smtp-gateway serve` (one process, and `--workers N` under its supervisor) around its start
and its stop: signals while starting, ports of every worker, a worker that cannot start, a supervisor that is
killed. Every process a test starts is gone when it ends, workers included (the fixture below)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import procs
from tests.configs import serve_config, write
from tests.procs import events, ready, spawn
from tests.spool_helpers import wait_for

CLI = [sys.executable, "-m", "gateway"]


def _ours(tmp: Path) -> list[int]:
    """Processes whose command line names this test's folder (workers a supervisor left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp) in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(tmp_path: Path) -> Iterator[None]:
    yield
    procs.reap()
    for pid in _ours(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _caught(pid: int) -> int:
    """The signals `pid` has a handler for (a bit mask, /proc's SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def test_sighup_while_starting_is_applied_once_started_not_fatal(tmp_path: Path) -> None:
    """systemctl reload (a certbot deploy hook) while `serve` opens its queue: SIGHUP's default action would
    end the process, and systemd counts that as a clean exit, so nothing would restart it."""
    config = write(tmp_path / "gateway.toml", serve_config(tmp_path))
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:  # a first start creates the queue
        first = spawn([*CLI, "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
    ready(log, first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0

    # Another process of the instance holds the queue's write lock: the start waits in the queue's open.
    lock = sqlite3.connect(tmp_path / "spool.sqlite3", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with log.open("ab") as out:
            gw = spawn([*CLI, "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)
        # In run() (its SIGTERM handler is installed): the start is under way, held by the lock.
        wait_for(lambda: _caught(gw.pid) & (1 << (signal.SIGTERM - 1)), 20, "SIGTERM handler installed")
        assert not events(log, "ready")[1:]
        gw.send_signal(signal.SIGHUP)
        lock.rollback()
    finally:
        lock.close()
    try:
        ready(log, gw, seen=1)
    except AssertionError:
        raise AssertionError(f"serve ended with {gw.wait(5)} (-1: killed by SIGHUP)") from None
    # The reload asked for while starting is done once started.
    wait_for(lambda: events(log, "config_reloaded"), 20, "the deferred reload")
    assert events(log, "reload_after_start")
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(30) == 0
