"""Graceful shutdown of the real server (`smtp-gateway serve` in a subprocess, the sandbox in another):
SIGTERM refuses new sessions with 421 4.3.2, lets a session in DATA finish, tells idle sessions 421 and
exits 0; what was spooled before a SIGTERM is delivered after the restart."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.configs import serve_config, write
from tests.harness import PASSWORD, USER
from tests.procs import complete_lines, events, kill, ready, serve, spawn, start_sandbox
from tests.spool_helpers import send, spool_rows, wait_for

CLI = [sys.executable, "-m", "gateway"]
DRAIN_TIMEOUT = 8.0
EEID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@dataclass
class Stack:
    tmp: Path
    sandbox_url: str
    config: Path
    log: Path
    gateway: subprocess.Popen[bytes] | None = None
    smtp_port: int = 0  # the port the running gateway bound (a new one after each restart)

    def serve(self, drain_timeout: float = DRAIN_TIMEOUT) -> subprocess.Popen[bytes]:
        seen = len(self.events("ready")) if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.gateway = spawn(
                [*CLI, "serve", "--config", str(self.config), "--drain-timeout", str(drain_timeout)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.smtp_port = ready(self.log, self.gateway, seen, 15)["plain"]
        return self.gateway

    def terminate(self) -> float:
        """SIGTERM the gateway; returns when it was sent (monotonic)."""
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGTERM)
        return time.monotonic()

    def sent(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = httpx.get(f"{self.sandbox_url}/_sandbox/requests", timeout=5).json()
        return [e for e in entries if e["kind"] == "send" and e["status"] == 200]

    def fault(self, **spec: Any) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/faults", json=spec, timeout=5).raise_for_status()

    def faults(self) -> list[dict[str, Any]]:
        faults: list[dict[str, Any]] = httpx.get(f"{self.sandbox_url}/_sandbox/faults", timeout=5).json()["faults"]
        return faults

    def clear_faults(self) -> None:
        httpx.delete(f"{self.sandbox_url}/_sandbox/faults", timeout=5).raise_for_status()

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in complete_lines(self.log):
            if line.startswith("{") and f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found


def _config(tmp: Path, sandbox_url: str) -> Path:
    delivery = {
        "inline_budget": 3.0,
        "retry_schedule": [0.3],
        "retry_jitter": 0.1,
        "poll_interval": 0.2,
        "shutdown_timeout": 3.0,
    }
    return write(tmp / "gateway.toml", serve_config(tmp, sandbox_url, delivery=delivery))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    sandbox, sandbox_url = start_sandbox(tmp_path / "requests.jsonl")
    st = Stack(tmp_path, sandbox_url, _config(tmp_path, sandbox_url), tmp_path / "gateway.log")
    try:
        yield st
    finally:
        kill(st.gateway)
        kill(sandbox)


class Raw:
    """A line-level SMTP client: reads whole replies, so a test can stop anywhere (e.g. inside DATA)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        """One complete reply (the last line of a multi-line one); '' when the server closed."""
        while True:
            line = self.file.readline()
            if not line:
                return ""
            text = line.decode().rstrip("\r\n")
            if len(text) < 4 or text[3] != "-":
                return text

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def login(self) -> None:
        assert self.reply().startswith("220 ")
        assert self.cmd("EHLO client.test").startswith("250 ")
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert self.cmd(f"AUTH PLAIN {blob}").startswith("235 ")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _greeting_when_draining(port: int, deadline: float) -> str:
    """Connect until the greeting is no longer 220 (the SIGTERM is handled asynchronously)."""
    while True:
        client = Raw(port, timeout=5)
        try:
            greeting = client.reply()
            if not greeting.startswith("220"):
                return greeting
            client.cmd("QUIT")
        finally:
            client.close()
        if time.monotonic() > deadline:
            raise AssertionError("new connections were still greeted with 220 after SIGTERM")
        time.sleep(0.05)


def test_sigterm_refuses_new_sessions_and_lets_data_finish(stack: Stack) -> None:
    stack.serve()
    in_data = Raw(stack.smtp_port)
    idle = Raw(stack.smtp_port)
    try:
        in_data.login()
        idle.login()
        assert in_data.cmd("MAIL FROM:<billing@acme.example>").startswith("250 ")
        assert in_data.cmd("RCPT TO:<client@example.com>").startswith("250 ")
        assert in_data.cmd("DATA").startswith("354 ")
        in_data.sock.sendall(
            b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: draining\r\n\r\nfirst half\r\n"
        )

        sigterm_at = stack.terminate()
        greeting = _greeting_when_draining(stack.smtp_port, sigterm_at + 5)
        assert greeting.startswith("421 4.3.2 "), greeting
        assert stack.gateway is not None and stack.gateway.poll() is None  # still draining, not gone

        # The session in DATA finishes its message: delivered upstream, answered with the eeid.
        in_data.sock.sendall(b"second half\r\n.\r\n")
        final = in_data.reply()
        assert re.fullmatch(rf"250 2\.0\.0 Ok: queued as {EEID}", final), final
        eeid = final.rsplit(" ", 1)[1]
        assert [(e["body"]["asunto"], e["upstream_id"]) for e in stack.sent()] == [("draining", eeid)]
        assert "first half" in stack.sent()[0]["body"]["html"] and "second half" in stack.sent()[0]["body"]["html"]
        # ...and is then told the server is going away (or simply closed).
        after = in_data.reply()
        assert after == "" or after.startswith("421 4.3.2 "), after

        # The idle session was told 421 4.3.2 (or closed), never left hanging.
        told = idle.reply()
        assert told == "" or told.startswith("421 4.3.2 "), told
        assert idle.reply() == ""

        assert stack.gateway.wait(DRAIN_TIMEOUT + 5) == 0
        assert time.monotonic() - sigterm_at < DRAIN_TIMEOUT, "exit had to wait for the drain timeout"
    finally:
        in_data.close()
        idle.close()
    assert stack.events("shutting_down") and stack.events("stopped")


def test_idle_session_at_sigterm_gets_421_and_process_exits_0(stack: Stack) -> None:
    stack.serve()
    idle = Raw(stack.smtp_port)
    try:
        idle.login()
        assert idle.cmd("NOOP").startswith("250 ")
        sigterm_at = stack.terminate()
        last = idle.reply()  # blocks until the server speaks or closes: no sleep needed
        assert last == "" or last.startswith("421 4.3.2 "), last
        assert idle.reply() == ""  # and the connection is closed
        assert stack.gateway is not None and stack.gateway.wait(DRAIN_TIMEOUT + 5) == 0
        # Nobody was in DATA: the process must not have waited for the drain timeout.
        assert time.monotonic() - sigterm_at < DRAIN_TIMEOUT / 2
    finally:
        idle.close()


def test_mail_after_sigterm_in_open_session_is_refused(stack: Stack) -> None:
    """A session that is between messages when SIGTERM arrives cannot start a new one."""
    stack.serve()
    in_data = Raw(stack.smtp_port)
    other = Raw(stack.smtp_port)
    try:
        in_data.login()
        other.login()
        assert in_data.cmd("MAIL FROM:<billing@acme.example>").startswith("250 ")
        assert in_data.cmd("RCPT TO:<client@example.com>").startswith("250 ")
        assert in_data.cmd("DATA").startswith("354 ")  # keeps the drain waiting
        stack.terminate()
        _greeting_when_draining(stack.smtp_port, time.monotonic() + 5)
        reply = other.cmd("MAIL FROM:<billing@acme.example>")
        assert reply == "" or reply.startswith("421 4.3.2 "), reply
        in_data.sock.sendall(b"Subject: last\r\n\r\nbody\r\n.\r\n")
        assert in_data.reply().startswith("250 2.0.0 Ok: queued as ")
        assert stack.gateway is not None and stack.gateway.wait(DRAIN_TIMEOUT + 5) == 0
        assert [e["body"]["asunto"] for e in stack.sent()] == ["last"]
    finally:
        in_data.close()
        other.close()


def test_a_message_past_its_final_dot_gets_its_reply_not_421_when_the_drain_timeout_ends(stack: Stack) -> None:
    """The drain timeout ends while the message's inline call is running (the upstream answers within
    delivery.inline_budget, 3 s here, but after the drain timeout): the client is told the upstream's 250, not
    421 "try again" about a message that goes out (its resend would be a second copy)."""
    stack.serve(drain_timeout=0.2)
    stack.fault(delay=1.0, kind="send")  # within the inline budget (3 s), well past the drain timeout
    client = Raw(stack.smtp_port, timeout=20)
    try:
        client.login()
        assert client.cmd("MAIL FROM:<billing@acme.example>").startswith("250 ")
        assert client.cmd("RCPT TO:<client@example.com>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.sock.sendall(b"To: client@example.com\r\nSubject: past dot\r\n\r\nbody\r\n.\r\n")
        # The send has reached the upstream (its fault taken, its delay running): the session is past its dot.
        wait_for(lambda: not stack.faults() or None, 10, "the inline call at the upstream")
        stack.terminate()
        reply = client.reply()
        assert re.fullmatch(rf"250 2\.0\.0 Ok: queued as {EEID}", reply), reply
        eeid = reply.rsplit(" ", 1)[1]
        assert [(e["body"]["asunto"], e["upstream_id"]) for e in stack.sent()] == [("past dot", eeid)]
        after = client.reply()  # then the session is closed like any other
        assert after == "" or after.startswith("421 4.3.2 "), after
    finally:
        client.close()
    assert stack.gateway is not None and stack.gateway.wait(30) == 0
    assert not stack.events("message_aborted")


def test_spooled_messages_survive_sigterm_and_go_out_after_restart(stack: Stack) -> None:
    """test_spool_crash covers SIGKILL; this is the graceful path: spool closed on SIGTERM, resumed at start."""
    stack.serve()
    stack.fault(status=503, count=None)  # until cleared
    replies = [send(stack.smtp_port, f"spooled {n}") for n in range(3)]
    assert [code for code, _ in replies] == [250, 250, 250]
    queue_ids = [text.rsplit(" ", 1)[1] for _, text in replies]
    assert all(len(q) == 16 for q in queue_ids), queue_ids  # local ids: spooled, not delivered
    spool = stack.tmp / "spool.sqlite3"

    stack.terminate()
    assert stack.gateway is not None and stack.gateway.wait(DRAIN_TIMEOUT + 5) == 0
    assert stack.sent() == []
    assert sorted(str(r["id"]) for r in spool_rows(spool, "queued", "inflight")) == sorted(queue_ids)

    stack.clear_faults()
    stack.serve()
    wait_for(lambda: len(stack.sent()) >= 3 or None, 15, "spooled messages delivered after restart")
    wait_for(lambda: not spool_rows(spool) or None, 10, "spool empty")
    assert sorted(e["body"]["asunto"] for e in stack.sent()) == ["spooled 0", "spooled 1", "spooled 2"]
    stack.terminate()
    assert stack.gateway.wait(DRAIN_TIMEOUT + 5) == 0


def test_an_unready_delay_serves_new_sessions_while_readyz_says_503(tmp_path: Path) -> None:
    """`serve --unready-delay`: on SIGTERM /readyz turns 503 at once, and until the delay ends (or a second
    SIGTERM) a client the load balancer still sends is served as before, not refused with 421; then the drain
    and the stop as usual."""
    sandbox, sandbox_url = start_sandbox(tmp_path / "requests.jsonl")
    config = write(tmp_path / "gateway.toml", serve_config(tmp_path, sandbox_url, http={"port": 0}))
    log = tmp_path / "gateway.log"
    gw = None
    try:
        gw, ports = serve(config, log, "--unready-delay", "300")
        readyz = f"http://127.0.0.1:{ports['http']}/readyz"
        assert httpx.get(readyz, timeout=5).status_code == 200
        gw.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 503 or None, 10, "/readyz 503")
        assert send(ports["plain"], "sent while leaving")[0] == 250  # a new session, served
        assert gw.poll() is None
        gw.send_signal(signal.SIGTERM)  # the second: no need to wait the 300 s
        assert gw.wait(30) == 0
        assert [e["reason"] for e in events(log, "unready_cut_short")] == ["a second stop signal"]
    finally:
        kill(sandbox)
        if gw is not None:
            kill(gw)
