"""Webhook deliveries run each on its own, at most webhook_concurrency at once: one receiver that never
answers holds only its own deliveries, not the other webhooks' (review after250c F2)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config.returnpath import WebhookSettings
from gateway.ledger.backends import open_returns
from gateway.ledger.model import OutboxRow
from gateway.ledger.returns import Delivery, ReturnStore
from gateway.ops.metrics import WEBHOOK_PENDING
from gateway.returnpath.webhooks import WebhookSender
from gateway.upstream.client import HttpClient
from tests.test_returnpath_units import T0, Clock, _ledger, _sent

SILENT_TIMEOUT = 10  # the silent receiver's timeout: the healthy one's event must not wait for it
HANG_GUARD = 60.0


@dataclass
class Receivers:
    """A receiver that accepts the connection and never answers (`slow`, a hung proxy) beside one that answers
    at once (`fast`), and what they saw."""

    order: list[str] = field(default_factory=list)
    slow_open: int = 0
    slow_got: asyncio.Event = field(default_factory=asyncio.Event)
    fast_got: asyncio.Event = field(default_factory=asyncio.Event)
    hooks: dict[str, WebhookSettings] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def _receivers() -> AsyncIterator[Receivers]:
    seen = Receivers()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.slow_open += 1
        seen.slow_got.set()
        await reader.read()  # never answers; returns when the client gives up and closes
        seen.order.append("slow gave up")
        writer.close()

    async def fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.order.append("fast received")
        seen.fast_got.set()
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    servers = {"slow": await asyncio.start_server(silent, "127.0.0.1", 0)}
    servers["fast"] = await asyncio.start_server(fast, "127.0.0.1", 0)
    for name, server in servers.items():
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/h"
        seen.hooks[name] = WebhookSettings(name=name, url=url, secret="s", timeout=SILENT_TIMEOUT)
    try:
        yield seen
    finally:
        for server in servers.values():
            server.close()


@contextlib.asynccontextmanager
async def _running(sender: WebhookSender, http: HttpClient, ledger: Any) -> AsyncIterator[None]:
    """The sender's loop for the block; then it, the HTTP client and the ledger are closed."""
    task = asyncio.create_task(sender.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await http.aclose()
        await ledger.close()


@pytest.mark.asyncio
async def test_a_silent_receiver_does_not_hold_up_another_webhooks_delivery(tmp_path: Path) -> None:
    """`slow` never answers; an event for `fast` becomes due while the `slow` POST is under way: `fast` gets it
    while `slow` still hangs, not after slow's timeout."""
    async with _receivers() as seen:
        ledger = await _ledger(tmp_path)
        http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: seen.hooks, clock=Clock(T0))
        async with _running(sender, http, ledger):
            await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
            await ledger.write([OutboxRow("slow", "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
            sender.wakeup.set()
            await seen.slow_got.wait()
            # An event for the healthy receiver, due now; this instance is told at once (as the poller does).
            await ledger.write([OutboxRow("fast", "ev2", "M1", T0 - 600, T0, "bounced", '{"id": "ev2"}')])
            sender.wakeup.set()
            await seen.fast_got.wait()
            assert seen.order == ["fast received"], f"the healthy receiver waited for the silent one: {seen.order}"


@pytest.mark.asyncio
async def test_no_more_than_webhook_concurrency_posts_are_under_way(tmp_path: Path) -> None:
    """Three deliveries due to a receiver that answers only when told, concurrency 2: two POSTs arrive, the
    third only once one of those has ended (its slot refilled without waiting for the other)."""
    arrived: list[str] = []
    seen = asyncio.Condition()
    release: dict[str, asyncio.Event] = {}

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        event = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-gateway-event-id")
        )
        release[event] = asyncio.Event()
        async with seen:
            arrived.append(event)
            seen.notify_all()
        await release[event].wait()
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(held, "127.0.0.1", 0)
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    hook = WebhookSettings(
        name="crm", url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/h", secret="s", timeout=60
    )
    sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {"crm": hook}, concurrency=2, clock=Clock(T0))
    await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
    await ledger.write(
        [OutboxRow("crm", f"ev{n}", "M1", T0 - 600, T0 - 3 + n, "bounced", f'{{"id": "ev{n}"}}') for n in range(3)]
    )
    try:
        async with _running(sender, http, ledger):
            async with seen:
                await seen.wait_for(lambda: len(arrived) == 2)
            first, second = arrived
            # The two in flight hold both slots: the third is not leased while they run.
            assert await sender.returns.pending_deliveries() == {"crm": 3}
            release[first].set()
            # A guard against a hang, not a timed assertion: without the refill the third waits for `second`,
            # which is held until the third arrives.
            async with asyncio.timeout(HANG_GUARD), seen:
                await seen.wait_for(lambda: len(arrived) == 3)
            assert arrived[2] not in (first, second)
            assert not release[second].is_set()  # refilled while the other still ran
            release[second].set()
            release[arrived[2]].set()
    finally:
        server.close()


@pytest.mark.asyncio
async def test_a_silent_receiver_with_many_events_holds_only_its_share_of_the_slots(tmp_path: Path) -> None:
    """Ten events due to `slow` (a receiver that never answers), queued before one for `fast`, concurrency 4:
    `slow` holds at most its share (4 // 2 webhooks = 2 POSTs) and `fast` gets its event while `slow` hangs,
    not after slow's timeout (review follow6 1: one task per delivery alone let the silent one fill every slot)."""
    async with _receivers() as seen:
        ledger = await _ledger(tmp_path)
        http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: seen.hooks, concurrency=4, clock=Clock(T0))
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        # slow's events are due first (an older next_attempt): a claim in due order takes them before fast's.
        await ledger.write(
            [
                OutboxRow("slow", f"s{n}", "M1", T0 - 600, T0 - 100 + n, "bounced", f'{{"id": "s{n}"}}')
                for n in range(10)
            ]
            + [OutboxRow("fast", "f1", "M1", T0 - 600, T0, "bounced", '{"id": "f1"}')]
        )
        async with _running(sender, http, ledger):
            await seen.fast_got.wait()
            assert seen.order == ["fast received"], f"the healthy receiver waited for the silent one: {seen.order}"
            assert seen.slow_open <= sender.share(2) == 2


def _ended(returns: ReturnStore, webhook: str, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Set once a delivery of `webhook` is settled (to await it instead of polling the outbox)."""
    ended = asyncio.Event()
    settle = returns.settle_delivery

    async def told(delivery: Delivery, state: str, **kwargs: Any) -> bool:
        settled = await settle(delivery, state, **kwargs)
        if delivery.webhook == webhook:
            ended.set()
        return settled

    monkeypatch.setattr(returns, "settle_delivery", told)
    return ended


@pytest.mark.asyncio
async def test_a_removed_webhooks_delivery_ends_while_a_silent_receiver_holds_every_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gone` was removed on a reload; the lone `slow` (every slot its share) never answers and has a backlog:
    gone's delivery (no receiver needed) ends at once, not after slow's timeout (review today7 F1: it was read
    only with what slow's room left of the free slots, i.e. never while slow had a due backlog)."""
    async with _receivers() as seen:
        hooks = {"slow": seen.hooks["slow"]}
        ledger = await _ledger(tmp_path)
        returns = open_returns(ledger)
        ended = _ended(returns, "gone", monkeypatch)
        http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
        sender = WebhookSender(returns, http, "gw-a", lambda: hooks, concurrency=2, clock=Clock(T0))
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        rows = [OutboxRow("slow", f"s{n}", "M1", T0 - 600, T0 - 200 + n, "bounced", "{}") for n in range(4)]
        rows.append(OutboxRow("gone", "g1", "M1", T0 - 600, T0 - 100, "bounced", '{"id": "g1"}'))  # due after
        await ledger.write(rows)
        async with _running(sender, http, ledger):
            while seen.slow_open < 2:  # both slots now hang on the silent receiver
                await seen.slow_got.wait()
                seen.slow_got.clear()
            await ended.wait()
            assert seen.order == [], f"the removed webhook's delivery waited for the silent one: {seen.order}"
            assert await returns.pending_deliveries() == {"slow": 4}


@pytest.mark.asyncio
async def test_a_removed_webhooks_deliveries_end_when_no_webhook_is_configured(tmp_path: Path) -> None:
    """Every webhook removed by a reload: their deliveries still end (as removed), and the pending gauge reads
    0 (review today7 N4: the sender claimed nothing with no webhook configured, so they stayed pending)."""
    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    hooks = {"gone": WebhookSettings(name="gone", url="http://127.0.0.1:9/h", secret="s", timeout=5)}
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await ledger.write([OutboxRow("gone", f"g{n}", "M1", T0 - 600, T0, "bounced", "{}") for n in range(3)])
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: hooks, concurrency=2, clock=Clock(T0))
        await sender.count_pending()
        assert WEBHOOK_PENDING.labels(webhook="gone")._value.get() == 3
        hooks.clear()  # the reload
        with capture_logs():
            assert await sender.round() == 2  # a bounded batch: up to `concurrency`
            assert await sender.round() == 1
        assert await sender.returns.pending_deliveries() == {}
        await sender.count_pending()
        assert WEBHOOK_PENDING.labels(webhook="gone")._value.get() == 0
    finally:
        await http.aclose()
        await ledger.close()


@pytest.mark.asyncio
async def test_a_webhook_added_on_reload_gets_its_share_while_a_silent_one_holds_every_slot(tmp_path: Path) -> None:
    """A lone `slow` (every slot its share) never answers and holds both slots; a reload adds `fast` (shares 1
    each): fast's event is POSTed while slow still hangs, the total then over webhook_concurrency until slow's
    over-share POSTs end (review today7 F2: it waited for slow's timeout)."""
    async with _receivers() as seen:
        hooks = {"slow": seen.hooks["slow"]}
        ledger = await _ledger(tmp_path)
        http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: hooks, concurrency=2, clock=Clock(T0))
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await ledger.write([OutboxRow("slow", f"s{n}", "M1", T0 - 600, T0 - 5 + n, "bounced", "{}") for n in range(3)])
        async with _running(sender, http, ledger):
            while seen.slow_open < 2:  # both slots now hang on the silent receiver
                await seen.slow_got.wait()
                seen.slow_got.clear()
            hooks["fast"] = seen.hooks["fast"]  # a reload adds a webhook: its share is 2 // 2 = 1
            await ledger.write([OutboxRow("fast", "f1", "M1", T0 - 600, T0, "bounced", '{"id": "f1"}')])
            sender.wakeup.set()
            await seen.fast_got.wait()
            assert seen.order == ["fast received"], f"the added webhook waited for the silent one: {seen.order}"
            assert seen.slow_open == 2  # slow, over its new share, started no more
