"""Webhook receivers' odd answers, against the real sender, the real HTTP client (both transports) and a real
receiver on 127.0.0.1, over a real SQLite outbox: what is logged, kept in the outbox and put on the timeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config.returnpath import WebhookSettings
from gateway.ledger.backends import open_returns
from gateway.ledger.model import OutboxRow
from gateway.ops.metrics import WEBHOOK_FAILED
from gateway.returnpath.webhooks import WebhookSender
from gateway.upstream.client import HttpClient, TransportKind
from tests.test_returnpath_units import T0, Clock, _ledger, _select, _sent

pytestmark = pytest.mark.asyncio

TOKEN = "T0KEN-8f3a9c2e71d44b0f"


@asynccontextmanager
async def _receiver(answer: bytes) -> AsyncIterator[int]:
    """A receiver that reads one request (head and body) and writes `answer` as it is; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _count(webhook: str) -> dict[str, float]:
    return {
        s.labels["reason"]: s.value
        for m in WEBHOOK_FAILED.collect()
        for s in m.samples
        if s.labels.get("webhook") == webhook and s.name.endswith("_total")
    }


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_a_hooks_secret_path_is_in_no_log_line_outbox_row_or_timeline(
    tmp_path: Path, transport: TransportKind
) -> None:
    """A receiver (or a proxy, a wrong port) answering a malformed status line: aiohttp's error text ends
    `url='<the whole URL>'`, and a hook's path is often its token. It must reach neither the logs, nor the
    outbox's last_error, nor the `webhook_failed` timeline detail the API and the console show; and the attempt
    is counted as an answer that is not HTTP, not as a timeout."""
    name = f"garbled-{transport}"
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0, transport=transport)
    async with _receiver(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok") as port:
        try:
            await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
            await ledger.write([OutboxRow(name, "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
            hook = WebhookSettings(
                name=name, url=f"http://127.0.0.1:{port}/hooks/{TOKEN}", secret="s", timeout=5, backoff=1, max_age=60
            )
            clock = Clock(T0)
            before = _count(name)
            sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {name: hook}, clock=clock)
            with capture_logs() as logs:
                await sender.round()  # retried: logged at warning, kept as last_error
                [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
                assert state == "pending" and error
                clock.t = T0 + 3600.0  # past max_age: failed for good, on the timeline
                await sender.round()
            [(state, error)] = _select(tmp_path, "SELECT state, last_error FROM webhook_outbox")
            [(detail,)] = _select(tmp_path, "SELECT detail FROM ledger_events WHERE kind='webhook_failed'")
            assert state == "failed"
            for text in (str(error), str(detail), *(repr(line) for line in logs)):
                assert TOKEN not in text and "/hooks/" not in text, text
            assert "not HTTP" in str(error)
            assert len(logs) == 2
            after = _count(name)
            assert after.get("invalid_answer", 0) - before.get("invalid_answer", 0) == 2
            assert after.get("timeout", 0) == before.get("timeout", 0)
        finally:
            await http.aclose()
            await ledger.close()
