"""Upstream faults as the SMTP client sees them, from an upstream that misbehaves on purpose (a raw asyncio
server, not the sandbox): each fault gets the right reply and queue behaviour, calls that may have reached
the upstream are counted as ambiguous, and no reply ever carries an internal reason or exception name."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.ops.metrics import REGISTRY
from gateway.smtp.tls import write_self_signed
from tests.harness import LoopThread, Running
from tests.smtputil import reset_on_close
from tests.spool_helpers import send, spool_rows

EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Timeout|Warning)\b|Traceback|errno", re.I)


class FaultyUpstream:
    """Accepts HTTP requests and misbehaves in one chosen way."""

    def __init__(self, mode: str, tls: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls = tls
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=self.tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            if self.mode == "reset":
                _reset(writer)
                return
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_length(head))
            self.requests += 1
            if self.mode == "reset_after":
                _reset(writer)
            elif self.mode == "slow_headers":
                await asyncio.sleep(30)
            elif self.mode == "huge":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20971520\r\n\r\n")
                for _ in range(320):
                    writer.write(b"x" * 65536)
                    await writer.drain()
            else:
                writer.write(_answer(self.mode))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


def _length(head: bytes) -> int:
    return next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)


def _answer(mode: str) -> bytes:
    if mode == "invalid_json":
        kind, body = b"text/html", b"<html>upstream proxy error</html>"
    else:
        kind, body = b"application/json", b'{"status":"err","on":"campana pausada"}'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind, len(body))
    return head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    reset_on_close(writer.get_extra_info("socket"))


# mode -> (sent for sure (counted ambiguous when queued), the passthrough reply's code and enhanced code)
FAULTS: dict[str, tuple[bool | None, str]] = {
    "refused": (False, "451 4.4.1"),
    "tls_failure": (False, "451 4.4.1"),
    "reset": (None, "451 4.4.1"),  # RST right after accept: whether the request went out is not knowable
    "reset_after": (True, "451 4.4.1"),
    "slow_headers": (True, "451 4.4.1"),
    "invalid_json": (True, "451 4.4.1"),
    "huge": (True, "451 4.4.1"),
}


@pytest.fixture
def upstream(loop_thread: LoopThread, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The api_base of a misbehaving upstream for the test's `mode` parameter."""
    mode = request.param
    if mode == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            yield f"http://127.0.0.1:{s.getsockname()[1]}"
        return
    tls = None
    if mode == "tls_failure":  # a certificate the gateway does not trust
        cert, key = write_self_signed(tmp_path / "upstream-tls")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
    server = FaultyUpstream(mode, tls)
    port = loop_thread.run(server.start())
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        loop_thread.run(server.stop())


def ambiguous() -> float:
    labels = {"account": "acme", "cause": "answer_lost"}
    return REGISTRY.get_sample_value("smtp_gateway_ambiguous_calls_total", labels) or 0.0


def _no_internals(code: int, text: str) -> None:
    assert not EXCEPTION_NAME.search(text), f"internal detail in the reply: {code} {text}"


@pytest.mark.parametrize("upstream", list(FAULTS), indirect=True)
def test_store_and_forward_queues_and_counts_what_may_have_been_sent(
    gateway_factory: Callable[..., Running], upstream: str, request: pytest.FixtureRequest
) -> None:
    mode = request.node.callspec.params["upstream"]
    sent, _ = FAULTS[mode]
    gw = gateway_factory(
        accounts={"acme": {"api_base": upstream, "http_timeout": 0.5}},
        delivery={"retry_schedule": [3600], "inline_budget": 5.0},
    )
    before = ambiguous()
    code, text = send(gw.port(), f"fault {mode}")
    _no_internals(code, text)
    assert code == 250 and len(text.rsplit(" ", 1)[1]) == 16, text  # queued under a local id
    [row] = spool_rows(gw.settings.delivery.spool_path)
    assert row["state"] == "queued" and row["last_error"]  # the reason is kept for operators ...
    if sent is True:
        assert ambiguous() == before + 1  # ... and a call that may have been delivered is counted
    elif sent is False:
        assert ambiguous() == before


@pytest.mark.parametrize("upstream", list(FAULTS), indirect=True)
def test_passthrough_answers_4xx_without_internals(
    gateway_factory: Callable[..., Running], upstream: str, request: pytest.FixtureRequest
) -> None:
    _, reply = FAULTS[request.node.callspec.params["upstream"]]
    gw = gateway_factory(
        accounts={"acme": {"api_base": upstream, "http_timeout": 0.5}},
        delivery={"mode": "passthrough", "inline_budget": 5.0},
    )
    code, text = send(gw.port(), "fault")
    _no_internals(code, text)
    assert f"{code} {text}".startswith(reply), text
    assert spool_rows(gw.settings.delivery.spool_path) == []


@pytest.mark.parametrize("upstream", ["error_body"], indirect=True)
def test_http_200_with_an_error_body_is_refused_with_the_upstreams_words(
    gateway_factory: Callable[..., Running], upstream: str
) -> None:
    gw = gateway_factory(accounts={"acme": {"api_base": upstream}})
    assert send(gw.port(), "refused") == (554, "5.6.0 campana pausada")
    assert spool_rows(gw.settings.delivery.spool_path) == []
