"""`smtp-gateway serve` itself (a subprocess on uvloop, JSON logs because its stderr is no terminal): a
connect-and-close flood leaves no slot taken (before: CLOSE-WAIT until the timeout, 421 for everyone);
SIGHUP applies a good configuration to new sessions without dropping open ones, refuses a bad one with the
reason, names what needs a restart; with `--workers 2` every worker reloads."""

from __future__ import annotations

import copy
import json
import signal
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.configs import gateway_config, listener, toml
from tests.devices_util import raw_send
from tests.harness import PASSWORD, PASSWORD_HASH, LoopThread, sandbox_for_tests
from tests.ops_util import scraped
from tests.procs import CLI, complete_lines, listening, ready, spawn
from tests.smtputil import RawClient, message
from tests.spool_helpers import wait_for
from tests.test_tls_tickets import client_context

NEWBIE = "newbie"


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    config: Path
    smtp: int
    http: int

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in complete_lines(self.log):
            event = json.loads(line)  # every line is JSON: the default when stderr is no terminal
            if name is None or event["event"] == name:
                found.append(event)
        return found

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.http}/metrics", timeout=5).text

    def port(self, listener: str = "plain") -> int:
        return self.smtp

    def write(self, config: dict[str, Any] | str) -> None:
        self.config.write_text(config if isinstance(config, str) else toml(config))


@pytest.fixture
def sandbox_port(loop_thread: LoopThread) -> Iterator[int]:
    sandbox = sandbox_for_tests()
    port = loop_thread.run(sandbox.start("127.0.0.1", 0))
    yield port
    loop_thread.run(sandbox.stop())


@pytest.fixture
def serve(tmp_path: Path, sandbox_port: int) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(*args: str, smtp: int = 0, tls: int | None = None, **overrides: Any) -> Served:
        config = config_for(tmp_path, sandbox_port, smtp, tls, **overrides)
        path = tmp_path / "gateway.toml"
        path.write_text(toml(config))
        log = tmp_path / f"serve{len(started)}.log"
        with log.open("wb") as out:
            proc = spawn(
                [*CLI, "serve", "--config", str(path), "--drain-timeout", "2", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        served = Served(proc, log, path, smtp, 0)
        started.append(served)
        ports = ready(log, proc, timeout=30)
        served.smtp, served.http = ports["plain"], ports["http"]
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGTERM)
            try:
                served.proc.wait(30)
            except subprocess.TimeoutExpired:
                served.proc.kill()
                served.proc.wait(5)


def config_for(tmp: Path, sandbox_port: int, smtp: int = 0, tls: int | None = None, **overrides: Any) -> dict[str, Any]:
    """One plain listener (`smtp`: 0 for any free port; a fixed one is shared with SO_REUSEPORT), with `tls`
    an implicit-TLS one on that port (shared too), and the operator endpoint on any free port."""
    listeners = [listener("plain", port=smtp, **({"reuse_port": True} if smtp else {}))]
    if tls is not None:
        listeners.append(listener("implicit", "implicit", port=tls, reuse_port=True))
    http = {"address": "127.0.0.1", "port": 0}
    return gateway_config(tmp, sandbox_port, listeners=listeners, http=http, **overrides)


def close_wait(port: int) -> int:
    """Sockets of the gateway's port in CLOSE-WAIT (state 08 in /proc/net/tcp)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "08":
            count += 1
    return count


def test_connect_and_close_flood_holds_no_slot(serve: Callable[..., Served]) -> None:
    served = serve(limits={"max_sessions": 50})
    before = served.metrics()

    def handled(text: str) -> float:
        return scraped(text, "smtp_gateway_sessions_total", listener="plain") + scraped(
            text, "smtp_gateway_connections_refused_total", listener="plain"
        )

    for _ in range(200):
        socket.create_connection(("127.0.0.1", served.smtp), timeout=10).close()
    # Every connection taken (as a session, or refused while 50 were open), then every slot free again:
    # nothing waits for the 300 s command timeout any more.
    wait_for(lambda: handled(served.metrics()) - handled(before) >= 200, 30, "the flood handled")
    wait_for(
        lambda: scraped(served.metrics(), "smtp_gateway_sessions_active", listener="plain") == 0,
        30,
        "every session released",
    )
    assert close_wait(served.smtp) == 0
    with RawClient(served) as client:  # type: ignore[arg-type]
        assert client.greeting[-1].startswith("220 ")
        client.cmd("EHLO after.flood")
        assert client.login().startswith("235 ")
        assert raw_send(client, message(subject="after the flood")).startswith("250 2.0.0 ")


def test_sighup_good_bad_and_restart_only(serve: Callable[..., Served], tmp_path: Path, sandbox_port: int) -> None:
    served = serve()
    config = config_for(tmp_path, sandbox_port)  # as started
    with RawClient(served) as before:  # type: ignore[arg-type]
        before.cmd("EHLO before.reload")
        assert before.login().startswith("235 ")
        assert before.cmd("MAIL FROM:<billing@acme.example>").startswith("250 ")
        assert before.cmd("RCPT TO:<a@example.com>").startswith("250 ")

        good = copy.deepcopy(config)
        good["accounts"]["acme"]["users"].append({"username": NEWBIE, "password_hash": PASSWORD_HASH, "campaign": 22})
        good["limits"] = {"max_recipients": 1}
        served.write(good)
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served.events("config_reloaded"), 30, "config_reloaded")
        with RawClient(served) as after:  # type: ignore[arg-type]
            after.cmd("EHLO after.reload")
            assert after.login(NEWBIE, PASSWORD).startswith("235 ")
            assert raw_send(after, message(subject="new login")).startswith("250 2.0.0 ")
        # The open session was not dropped and keeps its limits.
        assert before.cmd("RCPT TO:<b@example.com>").startswith("250 ")
        assert before.cmd("DATA").startswith("354 ")
        before.write(message(subject="across the reload") + b".\r\n")
        assert before.reply()[-1].startswith("250 2.0.0 ")

    served.write("[limits\nmax_recipients = 2\n")  # a TOML syntax error
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served.events("config_reload_failed"), 30, "config_reload_failed")
    [failed] = served.events("config_reload_failed")
    assert failed["level"] == "error" and f"{served.config}:1:" in failed["reason"] and "TOML" in failed["reason"]
    with RawClient(served) as client:  # type: ignore[arg-type]
        client.cmd("EHLO still.there")
        assert client.login(NEWBIE, PASSWORD).startswith("235 ")  # the configuration that was running

    moved = copy.deepcopy(good)
    moved["listeners"][0]["port"] = served.smtp + 1  # not bound: a new port needs a restart
    served.write(moved)
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: served.events("config_reload_restart_needed"), 30, "config_reload_restart_needed")
    [restart] = served.events("config_reload_restart_needed")
    assert restart["keys"] == ["listeners[plain].port"] and restart["level"] == "warning"
    assert listening(served.smtp)

    text = served.metrics()
    assert scraped(text, "smtp_gateway_config_reloads_total", result="ok") == 2
    assert scraped(text, "smtp_gateway_config_reloads_total", result="invalid") == 1
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    assert "Traceback" not in served.log.read_text()
    assert [e["event"] for e in served.events() if e["level"] == "error"] == ["config_reload_failed"]


def test_sighup_reaches_every_worker(serve: Callable[..., Served], tmp_path: Path, sandbox_port: int) -> None:
    # The workers share one port (SO_REUSEPORT): this test holds it, bound but not listening, so it stays
    # theirs for the whole test (and gets none of their connections).
    with socket.socket() as reserved:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(("127.0.0.1", 0))
        workers_reload(serve, tmp_path, sandbox_port, reserved.getsockname()[1])


def workers_reload(serve: Callable[..., Served], tmp_path: Path, sandbox_port: int, port: int) -> None:
    served = serve("--workers", "2", smtp=port)
    wait_for(lambda: len(served.events("ready")) == 2, 30, "both workers ready")
    config = config_for(tmp_path, sandbox_port, port)
    config["accounts"]["acme"]["users"].append({"username": NEWBIE, "password_hash": PASSWORD_HASH, "campaign": 22})
    served.write(config)
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(served.events("config_reloaded")) == 2, 30, "both workers reloaded")
    assert sorted(e["worker"] for e in served.events("config_reloaded")) == [0, 1]
    for _ in range(4):  # whichever worker the kernel picks knows the new login
        with RawClient(served) as client:  # type: ignore[arg-type]
            client.cmd("EHLO worker.test")
            assert client.login(NEWBIE, PASSWORD).startswith("235 ")


def test_sighup_rotates_the_ticket_keys_the_workers_share(serve: Callable[..., Served]) -> None:
    """Any worker resumes any worker's TLS sessions (one ticket secret from the supervisor); a SIGHUP gives
    them all a fresh one, so tickets issued before it no longer resume and the new ones resume anywhere."""
    with socket.socket() as plain, socket.socket() as tls:
        for reserved in (plain, tls):  # bound, not listening: the ports stay the workers' (see above)
            reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            reserved.bind(("127.0.0.1", 0))
        port = tls.getsockname()[1]
        served = serve("--workers", "2", smtp=plain.getsockname()[1], tls=port)
        wait_for(lambda: len(served.events("ready")) == 2, 30, "both workers ready")
        client = client_context(ssl.TLSVersion.TLSv1_2)
        before, _ = greeted(port, client)
        # Whichever worker the kernel picks each time resumes it.
        assert all(greeted(port, client, before)[1] for _ in range(6))
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(served.events("tls_reloaded")) == 2, 30, "both workers reloaded")
        assert not any(greeted(port, client, before)[1] for _ in range(6))  # keys rotated everywhere
        after, _ = greeted(port, client)
        assert all(greeted(port, client, after)[1] for _ in range(6))


def greeted(port: int, client: ssl.SSLContext, session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool]:
    """One implicit-TLS connection up to the greeting: its TLS session, and whether `session` resumed."""
    with client.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), session=session) as sock:
        assert sock.recv(100).startswith(b"220 ")
        result = sock.session, sock.session_reused
    assert result[0] is not None
    return result[0], result[1]
