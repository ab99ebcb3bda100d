"""Out of file descriptors (RLIMIT_NOFILE reached by idle connections): accept() fails with EMFILE. The server
survives and recovers by itself; the operator hears of it once per episode: descriptors_exhausted when it
begins, descriptors_available (with how many accepts and checks failed) when it ends, and
smtp_gateway_descriptors_exhausted_total. Before, nothing at all was logged under uvloop (libuv closes the
connections it cannot take with a reserved descriptor), and asyncio logged a traceback every second."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.smtp import descriptors
from tests.configs import serve_config, write
from tests.devices_util import captured_logs
from tests.devices_util import events as logged
from tests.procs import CLI, events, ready, spawn
from tests.spool_helpers import wait_for

NOFILE = 64


def _limit() -> None:  # in the child, before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_running_out_of_descriptors_is_logged_once_per_episode(tmp_path: Path, loop: str) -> None:
    env = dict(os.environ)
    if loop == "asyncio":  # `serve` runs on uvloop when it can import it
        (tmp_path / "no_uvloop").mkdir()
        (tmp_path / "no_uvloop" / "uvloop.py").write_text("raise ImportError('this test runs asyncio')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "no_uvloop"), env.get("PYTHONPATH", "")])
    cfg = write(tmp_path / "gw.toml", serve_config(tmp_path, limits={"max_sessions_per_ip": 1000}))
    log = tmp_path / "log.json"
    with log.open("ab") as out:
        proc = spawn(
            [*CLI, "serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=_limit
        )
    port = ready(log, proc)["plain"]
    socks = []
    try:
        for _ in range(NOFILE + 20):
            socks.append(socket.create_connection(("127.0.0.1", port), 2))
        exhausted = wait_for(lambda: events(log, "descriptors_exhausted"), 15, "descriptors_exhausted")
    finally:
        for s in socks:
            s.close()
    available = wait_for(lambda: events(log, "descriptors_available"), 30, "descriptors_available")  # after QUIET
    assert len(exhausted) == 1 and exhausted[0]["limit"] == NOFILE, exhausted
    assert len(available) == 1, available
    assert available[0]["accepts_failed"] + available[0]["checks_failed"] >= 1
    assert not events(log, "library_log"), "asyncio's own line for each failed accept"
    # Recovered: a new client gets its greeting.
    with socket.create_connection(("127.0.0.1", port), 5) as client:
        client.settimeout(5)
        assert client.recv(200).startswith(b"220 ")
    assert proc.poll() is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_descriptors_freed_one_at_a_time_at_the_limit_are_one_episode() -> None:
    """At the limit, with connections coming and going, each freed descriptor lets one accept through and the
    next fails again: one episode until none has failed for QUIET seconds, not two lines a second."""
    clock = Clock()
    watch = descriptors.DescriptorWatch(clock)
    emfile = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    with captured_logs() as logs:
        for _ in range(10):
            watch._exhausted("accept", emfile)
            clock.now += 0.5
            watch.available()  # one accept got through
            clock.now += 0.5
        assert not logged(logs, "descriptors_available")
        clock.now += descriptors.QUIET
        watch.available()
    assert len(logged(logs, "descriptors_exhausted")) == 1
    [ended] = logged(logs, "descriptors_available")
    assert ended["accepts_failed"] == 10


async def test_a_check_that_cannot_be_made_is_said_once_and_stops_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/null refused for another reason than exhaustion (a sandbox, a security module): said once, the
    check stops (asyncio's failed accepts are still counted), and stopping the watch raises nothing into the
    drain (before: the task died with the error, and stop() raised it there)."""

    def refused(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(descriptors.os, "open", refused)
    watch = descriptors.DescriptorWatch()
    with captured_logs() as logs:
        watch.start(asyncio.get_running_loop())
        assert watch._task is not None
        await asyncio.wait_for(asyncio.shield(watch._task), 30)
        await watch.stop()
    assert len(logged(logs, "descriptors_check_unavailable")) == 1
