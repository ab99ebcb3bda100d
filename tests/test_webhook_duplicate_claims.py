"""docs/after-250.md "At least once, and exactly where not once": a webhook delivery whose answer is lost (the
receiver holds it past the webhook's timeout) is counted in
smtp_gateway_webhook_possible_duplicates_total{cause="answer_lost"} once, and is POSTed again: the receiver
sees the same event twice, the second time answered. Real sockets: an aiohttp receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from aiohttp import web

from gateway.config.returnpath import WebhookSettings
from gateway.ledger.backends import open_returns
from gateway.ledger.model import MessageRow, OutboxRow, RecipientRow
from gateway.ledger.sqlite import SqliteLedger
from gateway.ops.metrics import WEBHOOK_DUPLICATES, WEBHOOK_FAILED, WEBHOOK_SENT
from gateway.returnpath.webhooks import WebhookSender
from gateway.upstream.client import HttpClient
from tests.test_returnpath_units import Clock
from tests.webhook_receiver import Received, Receiver

T0 = 1_796_544_000.0


class HoldingReceiver(Receiver):
    """Holds its first answer until `release` is set (past the webhook's timeout); answers the rest at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if not self.received:
            body = await request.read()
            self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body, 200))
            await self.release.wait()
            return web.json_response({"ok": True})
        return await super().handle(request)


def _count(metric: object, **labels: str) -> float:
    return metric.labels(**labels)._value.get()  # type: ignore[attr-defined,no-any-return]


@pytest.mark.asyncio
async def test_a_lost_webhook_answer_is_counted_once_as_answer_lost_and_the_delivery_is_retried(
    tmp_path: Path,
) -> None:
    receiver = HoldingReceiver()
    await receiver.start()
    ledger = SqliteLedger(tmp_path / "queue.sqlite3")
    await ledger.open()
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    try:
        await ledger.write(
            [
                MessageRow("M1", T0 - 600, "acme", "billing@acme.example", "Invoice", 100, login="scanner"),
                RecipientRow("M1", T0 - 600, "a@example.net", "bounced", T0 - 300, upstream_id="TX1"),
                OutboxRow("crm", "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}'),
            ]
        )
        # The timeout must leave the POST time to reach the receiver on a loaded machine (the receiver holds its
        # answer until released, so it passes all the same): 2 s, not less.
        hook = WebhookSettings(name="crm", url=receiver.url, secret="s", timeout=2.0, backoff=1, max_age=3600)
        lost = _count(WEBHOOK_DUPLICATES, webhook="crm", cause="answer_lost")
        expired = _count(WEBHOOK_DUPLICATES, webhook="crm", cause="lease_expired")
        timeouts = _count(WEBHOOK_FAILED, webhook="crm", reason="timeout")
        sent = _count(WEBHOOK_SENT, webhook="crm")
        clock = Clock(T0)
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {"crm": hook}, clock=clock)

        assert await sender.round() == 1  # the POST is received; its answer does not come within 2 s
        assert len(receiver.received) == 1
        assert _count(WEBHOOK_DUPLICATES, webhook="crm", cause="answer_lost") == lost + 1
        assert _count(WEBHOOK_FAILED, webhook="crm", reason="timeout") == timeouts + 1
        assert _count(WEBHOOK_SENT, webhook="crm") == sent

        receiver.release.set()
        clock.t = T0 + 10.0  # past the backoff (1 s, +-50 %)
        assert await sender.round() == 1
        first, second = receiver.received
        assert first.headers["x-gateway-event-id"] == second.headers["x-gateway-event-id"]  # the same event again
        assert second.status == 200
        assert _count(WEBHOOK_SENT, webhook="crm") == sent + 1
        # Counted once: the retry that was answered adds nothing, and it is no lease taken over.
        assert _count(WEBHOOK_DUPLICATES, webhook="crm", cause="answer_lost") == lost + 1
        assert _count(WEBHOOK_DUPLICATES, webhook="crm", cause="lease_expired") == expired
        assert _state(tmp_path) == ("delivered", 2)
    finally:
        receiver.release.set()
        await http.aclose()
        await ledger.close()
        await receiver.stop()


def _state(tmp_path: Path) -> tuple[object, ...]:
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        [row] = db.execute("SELECT state, attempts FROM webhook_outbox").fetchall()
        return tuple(row)
    finally:
        db.close()
