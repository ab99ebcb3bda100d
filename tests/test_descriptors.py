"""Out of file descriptors (RLIMIT_NOFILE reached by idle connections): accept() fails with EMFILE. The server
survives and recovers by itself; the operator hears of it once per episode: descriptors_exhausted when it
begins, descriptors_available (with how many accepts and checks failed) when it ends, and
smtp_gateway_descriptors_exhausted_total. Before, nothing at all was logged under uvloop (libuv closes the
connections it cannot take with a reserved descriptor), and asyncio logged a traceback every second."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
from pathlib import Path

import pytest

from tests.configs import serve_config, write
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
    available = wait_for(lambda: events(log, "descriptors_available"), 15, "descriptors_available")
    assert len(exhausted) == 1 and exhausted[0]["limit"] == NOFILE, exhausted
    assert len(available) == 1, available
    assert available[0]["accepts_failed"] + available[0]["checks_failed"] >= 1
    assert not events(log, "library_log"), "asyncio's own line for each failed accept"
    # Recovered: a new client gets its greeting.
    with socket.create_connection(("127.0.0.1", port), 5) as client:
        client.settimeout(5)
        assert client.recv(200).startswith(b"220 ")
    assert proc.poll() is None
