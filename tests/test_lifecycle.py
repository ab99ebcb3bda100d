"""The life of `smtp-gateway serve` (one process, and `--workers N` under its supervisor) around its start
and its stop: signals while starting, ports of every worker, a worker that cannot start, a supervisor that is
killed. Every process a test starts is gone when it ends, workers included (the fixture below)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def _caught(pid: int, field: str = "SigCgt") -> int:
    """The signals `pid` has a handler for (a bit mask, /proc's SigCgt), or ignores (`field="SigIgn"`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    return 0


WHEN_CLI_IMPORTS = """
import signal, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "gateway.cli":  # what the console script imports first (most of the gateway)
            print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
            raise SystemExit(0)
sys.meta_path.insert(0, Watch())
sys.argv = ["smtp-gateway", *sys.argv[1:]]
from gateway.entry import main
main()
"""


@pytest.mark.parametrize("argv", [["serve"], ["serve", "--worker-slot", "1"], ["status"]])
def test_sighup_is_ignored_while_serve_imports(argv: list[str]) -> None:
    """Before `serve` can catch SIGHUP it imports most of the gateway (tens of milliseconds), where a reload's
    SIGHUP would end it (and systemd counts that a clean exit): ignored from the console script's first
    instruction (the configuration is read after the imports). Other commands keep the default (a hangup ends
    them)."""
    out = subprocess.run(
        [sys.executable, "-c", WHEN_CLI_IMPORTS, *argv], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == str("serve" in argv)


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


def _held_port_with_free_one_below() -> tuple[socket.socket, int]:
    """A listening socket on port Q (held by 'another program') with Q-1 free."""
    while True:
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        q = held.getsockname()[1]
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", q - 1))
        except OSError:
            held.close()
            continue
        finally:
            probe.close()
        return held, q


def test_serve_workers_checks_every_workers_operator_port_before_it_starts(tmp_path: Path) -> None:
    held, q = _held_port_with_free_one_below()
    try:
        # Worker 0 serves the operator endpoint on q-1, worker 1 on q: held by another program.
        config = write(tmp_path / "gateway.toml", serve_config(tmp_path, http={"address": "127.0.0.1", "port": q - 1}))
        out = subprocess.run(
            [*CLI, "serve", "--config", str(config), "--workers", "2"], capture_output=True, text=True, timeout=60
        )
    finally:
        held.close()
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"http (operator endpoint) of worker 1 127.0.0.1:{q}: in use by" in out.stdout + out.stderr
    assert "worker_started" not in out.stdout + out.stderr


def test_a_worker_that_cannot_start_ends_the_supervisor_with_status_1(tmp_path: Path) -> None:
    """Not restarted for ever behind a supervisor that looks up: after a few failed starts in a row, every
    worker is stopped and the supervisor exits 1."""
    missing = str(tmp_path / "missing.toml")
    code = (
        "from gateway.ops.supervisor import Supervisor\n"
        f"raise SystemExit(Supervisor(['serve', '--config', {missing!r}], 2).run())"
    )
    log = tmp_path / "supervisor.log"
    with log.open("ab") as out:
        sup = spawn([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    assert sup.wait(120) == 1, log.read_text()
    text = log.read_text()
    assert "worker_cannot_start" in text, text
    assert text.count("worker_cannot_start") == 1, text


def test_sigterm_while_the_supervisor_starts_its_workers_stops_them_all(tmp_path: Path) -> None:
    """systemctl stop right after systemctl start: a worker started after the SIGTERM is stopped too, and the
    supervisor does not wait for it for ever."""
    config = write(tmp_path / "gateway.toml", serve_config(tmp_path))
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        sup = spawn([*CLI, "serve", "--config", str(config), "--workers", "8"], stdout=out, stderr=subprocess.STDOUT)
    children = Path(f"/proc/{sup.pid}/task/{sup.pid}/children")
    # The SIGTERM comes once the first worker exists, while the others are being started.
    # (Watched without a pause: the workers are started within milliseconds of each other.)
    while sup.poll() is None and not children.read_text().split():
        pass
    sup.send_signal(signal.SIGTERM)
    try:
        code = sup.wait(60)
    except subprocess.TimeoutExpired:
        started = {e["worker"] for e in events(log, "worker_started")}
        stopped = {e["worker"] for e in events(log, "worker_stopped")}
        raise AssertionError(
            f"supervisor still waiting; workers started {sorted(started)}, stopped {sorted(stopped)}"
        ) from None
    assert code == 0, log.read_text()
    started = {e["worker"] for e in events(log, "worker_started")}
    assert started == {e["worker"] for e in events(log, "worker_stopped")}


def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of the supervisor (outside systemd and Docker, which kill the whole group): its workers drain
    and exit rather than serve on unsupervised, holding the ports."""
    config = write(tmp_path / "gateway.toml", serve_config(tmp_path))
    log = tmp_path / "gateway.log"
    with log.open("ab") as out:
        sup = spawn([*CLI, "serve", "--config", str(config), "--workers", "2"], stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: len(events(log, "ready")) >= 2, 30, "both workers ready")
    pids = [e["pid"] for e in events(log, "worker_started")]
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)

    def gone() -> bool:
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                alive.append(pid)
        return not alive

    wait_for(gone, 30, "workers of a SIGKILLed supervisor gone")
    assert len(events(log, "stopped")) == 2  # each drained and stopped cleanly
