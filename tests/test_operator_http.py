"""The operator endpoint ([http] port): /healthz, /readyz (503 while draining), /metrics (Prometheus),
against a real gateway on loopback. `port = 0` binds any free port; the bound one is app.operator.port."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import APIKEY, CAMPAIGNS, PASSWORD, PASSWORD_HASH, USER, LoopThread, Running, start, stop
from tests.ops_util import captured_with_context, sample, scraped
from tests.spool_helpers import send, wait_for


@pytest.fixture
def gw(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Running]:
    running = start(loop_thread, tmp_path, http={"port": 0})
    try:
        yield running
    finally:
        stop(running)


def _url(gw: Running, path: str) -> str:
    assert gw.app.operator is not None, "http.port = 0 must enable the operator endpoint"
    assert gw.app.operator.port != 0, "app.operator.port must be the bound port"
    return f"http://127.0.0.1:{gw.app.operator.port}{path}"


def test_healthz_and_readyz(gw: Running) -> None:
    health = httpx.get(_url(gw, "/healthz"), timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    ready = httpx.get(_url(gw, "/readyz"), timeout=5)
    assert (ready.status_code, ready.json()) == (200, {"ready": True})
    assert httpx.get(_url(gw, "/nope"), timeout=5).status_code == 404


def test_metrics_count_messages_and_hold_no_secret(gw: Running) -> None:
    # The registry is process-wide (other tests count too): compare before and after.
    before = httpx.get(_url(gw, "/metrics"), timeout=5).text
    code, text = send(gw.port(), "metrics")
    assert code == 250, text
    response = httpx.get(_url(gw, "/metrics"), timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    assert "# TYPE smtp_gateway_messages_total counter" in after
    assert scraped(after, "smtp_gateway_messages_total", result="2xx") == (
        scraped(before, "smtp_gateway_messages_total", result="2xx") + 1
    )
    assert scraped(after, "smtp_gateway_sessions_total", listener="plain") >= (
        scraped(before, "smtp_gateway_sessions_total", listener="plain") + 1
    )
    assert scraped(after, "smtp_gateway_auth_total", result="ok") >= (
        scraped(before, "smtp_gateway_auth_total", result="ok") + 1
    )
    assert scraped(after, "smtp_gateway_upstream_seconds_count", account="acme", outcome="ok") >= (
        scraped(before, "smtp_gateway_upstream_seconds_count", account="acme", outcome="ok") + 1
    )
    secrets = [APIKEY, PASSWORD, PASSWORD_HASH, *CAMPAIGNS.values(), base64.b64encode(APIKEY.encode()).decode()]
    assert [s for s in secrets if s in after] == []


def test_readyz_503_while_draining_then_endpoint_closed(gw: Running) -> None:
    port = gw.port()
    sock = socket.create_connection(("127.0.0.1", port), 10)
    reader = sock.makefile("rb")

    def cmd(line: str) -> bytes:
        sock.sendall(line.encode() + b"\r\n")
        reply = reader.readline()
        while reply[3:4] == b"-":
            reply = reader.readline()
        return reply

    try:
        assert reader.readline().startswith(b"220 ")
        assert cmd("EHLO client.test").startswith(b"250 ")
        blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        assert cmd(f"AUTH PLAIN {blob}").startswith(b"235 ")
        assert cmd("MAIL FROM:<billing@acme.example>").startswith(b"250 ")
        assert cmd("RCPT TO:<client@example.com>").startswith(b"250 ")
        assert cmd("DATA").startswith(b"354 ")  # the drain waits for this session

        stopping = asyncio.run_coroutine_threadsafe(gw.app.stop(drain_timeout=10.0), gw.loop.loop)
        url = _url(gw, "/readyz")
        wait_for(lambda: httpx.get(url, timeout=5).status_code == 503, 5, "/readyz 503 while draining")
        assert httpx.get(_url(gw, "/healthz"), timeout=5).status_code == 200  # alive, just not ready

        assert cmd("Subject: drained\r\n\r\nbody\r\n.").startswith(b"250 2.0.0 Ok: queued as ")
        stopping.result(15)
    finally:
        reader.close()
        sock.close()
    assert [r["body"]["asunto"] for r in gw.sent] == ["drained"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)


class _Records(logging.Handler):
    """Standard-library records at warning and above (what the gateway's logging lets through)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_malformed_request_logs_no_secret_and_no_traceback(gw: Running) -> None:
    """A malformed header line is the client's fault: aiohttp's "Error handling request" (error level, with a
    traceback quoting the line: here a bearer token) is replaced by a counted http_bad_request line, once a
    minute per client, naming no byte of the request."""
    token = "s3cr3t-api-token-0123456789"
    assert gw.app.operator is not None
    handler, root = _Records(), logging.getLogger()
    root.addHandler(handler)
    old, root.level = root.level, logging.WARNING
    before = sample("smtp_gateway_http_bad_requests_total")
    try:
        with captured_with_context() as events:
            for bad in (f"Authorization : Bearer {token}", f"Authorization: Bearer {token}\x01", f"Cookie : s={token}"):
                with socket.create_connection(("127.0.0.1", gw.app.operator.port)) as s:
                    s.sendall(f"GET /api/v1/messages HTTP/1.1\r\nHost: gw\r\n{bad}\r\n\r\n".encode())
                    s.settimeout(5)
                    assert b" 400 " in s.recv(100)
    finally:
        root.removeHandler(handler)
        root.setLevel(old)
    texts = [r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in handler.records]
    assert not any(token in t for t in texts), texts
    assert not any(r.levelno >= logging.ERROR for r in handler.records), texts
    assert sample("smtp_gateway_http_bad_requests_total") == before + 3
    lines = [e for e in events if e["event"] == "http_bad_request"]
    # The sampler is the process's: an earlier test's bad request from 127.0.0.1 may hold this one back.
    assert len(lines) <= 1, lines
    assert not any(token in str(e) for e in events), events
    assert all(e["log_level"] == "info" and e["client"] == "127.0.0.1" for e in lines), lines
