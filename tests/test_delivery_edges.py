"""Delivery's edges, end to end in-process: a client that disconnects while its inline call runs, lost
answers (ambiguous calls) and the `hold` policy, resends with an idempotency key (also through two
instances on one PostgreSQL queue), and a backlog that drains as soon as the upstream answers again."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from gateway.core.errors import SpoolUnavailable
from gateway.ops.metrics import REGISTRY
from gateway.queue.postgres import PostgresQueue
from tests.harness import Running, sandbox_for_tests
from tests.pgserver import PgCluster
from tests.smtputil import RawClient
from tests.spool_helpers import send, spool_rows, wait_for

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 5.0}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def send_and_vanish(gw: Running, subject: str) -> None:
    """A whole transaction, then the client hangs up right after the final dot, before any reply."""
    with RawClient(gw) as client:
        client.open_data()
        client.write(
            f"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: {subject}\r\n\r\nhi\r\n.\r\n".encode()
        )
        client.reset_on_close()


def test_client_gone_during_a_delivered_call_is_recorded(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    before = metric("smtp_gateway_client_gone_total", verdict="delivered")
    gw.fault(delay=1.0, count=1)
    send_and_vanish(gw, "gone but sent")
    wait_for(lambda: metric("smtp_gateway_client_gone_total", verdict="delivered") > before, what="recorded")
    assert [r["body"]["asunto"] for r in gw.sent] == ["gone but sent"]
    assert spool_rows(gw.settings.delivery.spool_path) == []


def test_client_gone_during_a_failed_call_is_queued_and_delivered(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    before = metric("smtp_gateway_client_gone_total", verdict="queued")
    gw.fault(delay=1.0, status=503, count=1)
    send_and_vanish(gw, "gone and failed")
    wait_for(lambda: metric("smtp_gateway_client_gone_total", verdict="queued") > before, what="recorded")
    wait_for(lambda: len(gw.sent) == 1, what="retried from the queue")
    assert gw.sent[0]["body"]["asunto"] == "gone and failed"


def test_a_lost_answer_is_counted_ambiguous_and_resent(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST, accounts={"acme": {"http_timeout": 0.5}})
    before = metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost")
    gw.fault(mode="timeout", count=1)  # the request arrives; no answer ever comes
    code, text = send(gw.port(), "lost answer")
    assert code == 250 and len(text.rsplit(" ", 1)[1]) == 16  # queued under a local id
    wait_for(lambda: len(gw.sent) == 1, what="resent")
    assert metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost") == before + 1
    # The upstream saw the call twice: the one whose answer was lost, and the resend.
    assert [r.get("fault") for r in gw.requests] == ["timeout", None]


def test_hold_policy_dead_letters_instead_of_resending(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery={**FAST, "ambiguous": "hold"}, accounts={"acme": {"http_timeout": 0.5}})
    gw.fault(mode="timeout", count=1)
    code, _ = send(gw.port(), "held")
    assert code == 250
    [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="held")
    assert dead["dead_reason"].startswith("held") and "queue requeue" in dead["dead_reason"]
    assert gw.sent == []


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_5xx_after_sending_is_ambiguous_and_held(gateway_factory: Callable[..., Running], status: int) -> None:
    """A 500 that is not the upstream's own JSON (a crashed server's page), or a proxy's 502/504 after it
    forwarded the call: the mail may be out, so the call is counted ambiguous and held under ambiguous =
    "hold", never resent as if not sent (vendors3 F3)."""
    gw = gateway_factory(delivery={**FAST, "ambiguous": "hold"})
    before = metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost")
    gw.fault(status=status, count=1, kind="send", mode="page")
    with structlog.testing.capture_logs() as logs:
        code, _ = send(gw.port(), "held after a 5xx")
        assert code == 250
        [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="held")
    assert dead["dead_reason"].startswith("held")
    assert metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost") == before + 1
    assert any(e["event"] == "delivery_ambiguous" for e in logs)
    assert gw.sent == []


def test_a_500_in_the_vendors_own_error_json_is_retried_not_held(gateway_factory: Callable[..., Running]) -> None:
    """Review today8b F4: DMDS answering 500 with its own `{"status": "err", ...}` says the call failed: a plain
    temporary failure, retried, not counted ambiguous; under ambiguous = "hold" an outage answering so to every
    call no longer turns every message into a dead letter."""
    gw = gateway_factory(delivery={**FAST, "ambiguous": "hold"})
    before = metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost")
    gw.fault(status=500, count=2, kind="send", reason="internal error")
    code, _ = send(gw.port(), "retried after DMDS' own 500")
    assert code == 250
    wait_for(lambda: len(gw.sent) == 1, what="sent after the 500s")
    assert metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="answer_lost") == before
    assert spool_rows(gw.settings.delivery.spool_path, "dead") == []


def test_a_resend_with_the_same_key_is_not_sent_again(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    first = send(gw.port(), "keyed", body="one", extra="X-Gateway-Idempotency-Key: order-42\r\n")
    again = send(gw.port(), "keyed", body="one", extra="X-Gateway-Idempotency-Key: order-42\r\n")
    other = send(gw.port(), "keyed", body="one", extra="X-Gateway-Idempotency-Key: order-43\r\n")
    assert first[0] == again[0] == other[0] == 250
    assert again[1] == first[1] and other[1] != first[1]
    assert len(gw.sent) == 2
    assert all("X-Gateway" not in str(r["body"]) for r in gw.sent)  # the option header is consumed


def test_a_key_reused_for_a_different_message_is_refused_for_good(gateway_factory: Callable[..., Running]) -> None:
    """The second message is not silently dropped as a resend: a permanent refusal naming the conflict,
    logged and counted. A true resend (the same message, even with a new Date and Message-ID) still gets 250."""
    gw = gateway_factory(delivery=FAST)
    key = "X-Gateway-Idempotency-Key: order-77\r\n"
    before = metric("smtp_gateway_resends_total", account="acme", result="conflict")
    first = send(gw.port(), "order 77", body="one", extra=key + "Message-ID: <a@acme.example>\r\n")
    with structlog.testing.capture_logs() as logs:
        other_body = send(gw.port(), "order 77", body="two", extra=key)
        other_rcpt = send(gw.port(), "order 77", to=("someone@example.com",), body="one", extra=key)
        other_subject = send(gw.port(), "order 78", body="one", extra=key)
    resend = send(gw.port(), "order 77", body="one", extra=key + "Message-ID: <b@acme.example>\r\n")
    conflict = (554, "5.6.0 Idempotency key already used for a different message")
    assert first[0] == 250 and [other_body, other_rcpt, other_subject] == [conflict] * 3
    assert resend == first
    assert [r["body"]["asunto"] for r in gw.sent] == ["order 77"]
    assert metric("smtp_gateway_resends_total", account="acme", result="conflict") == before + 3
    conflicts = [e for e in logs if e["event"] == "message_resend_conflict"]
    assert len(conflicts) == 3 and all(e["first_queue_id"] == conflicts[0]["first_queue_id"] for e in conflicts)


def test_a_key_answered_while_the_store_fails_still_refuses_a_different_message(
    gateway_factory: Callable[..., Running],
) -> None:
    """The store took the first message's claim, then failed before its answer (kept in memory until the
    store is back). While it is still down, another message with that key gets 554, not a 250 for mail
    never sent; the same message again is still a resend."""
    gw = gateway_factory(delivery=FAST)
    store: Any = gw.app.store

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise SpoolUnavailable("database or disk is full")

    key = "X-Gateway-Idempotency-Key: invoice-2024-7\r\n"
    store.finish_key = down
    first = send(gw.port(), "invoice 7", body="one", extra=key)
    assert first[0] == 250
    wait_for(lambda: len(gw.app.owner.keys.late) or None, 10, "the answer kept in memory")
    store.claim_key = store.record_key = down  # still down when the next messages come
    other = send(gw.port(), "invoice 8", body="another message, the same key by mistake", extra=key)
    resend = send(gw.port(), "invoice 7", body="one", extra=key)
    assert other == (554, "5.6.0 Idempotency key already used for a different message")
    assert resend == first
    assert [r["body"]["asunto"] for r in gw.sent] == ["invoice 7"]


def test_a_queue_that_cannot_store_is_logged_once_per_outage(gateway_factory: Callable[..., Running]) -> None:
    """Each message the queue cannot take has its own summary line (message_deferred, with the reason); the
    outage itself is one spool_unavailable when it begins and one spool_available when a message is stored
    again, not an error line per message beside each summary line; each is counted in
    smtp_gateway_queue_store_failures_total."""
    gw = gateway_factory(delivery=FAST)
    store: Any = gw.app.store
    insert = store.insert

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise SpoolUnavailable("database or disk is full")

    gw.fault(status=503, count=None)  # every message needs the queue
    failures = REGISTRY.get_sample_value("smtp_gateway_queue_store_failures_total") or 0.0
    with structlog.testing.capture_logs() as logs:
        store.insert = down
        refused = [send(gw.port(), f"refused {i}")[0] for i in range(3)]
        store.insert = insert
        queued = send(gw.port(), "queued")[0]
    gw.clear_faults()
    assert (refused, queued) == ([452, 452, 452], 250)
    assert [e["event"] for e in logs if e["event"].startswith("spool_")] == ["spool_unavailable", "spool_available"]
    assert [e["failures"] for e in logs if e["event"] == "spool_available"] == [3]
    # Each one counted, for the SmtpGatewayQueueCannotStore alert (the log says the outage once).
    assert REGISTRY.get_sample_value("smtp_gateway_queue_store_failures_total") == failures + 3
    assert len([e for e in logs if e["event"] == "message_deferred"]) == 3
    wait_for(lambda: [r["body"]["asunto"] for r in gw.sent] == ["queued"] or None, 10, "the queued one delivered")


def test_a_429_with_retry_after_zero_waits_on_the_schedule(gateway_factory: Callable[..., Running]) -> None:
    """An upstream (a proxy, a skewed clock's past date) answering every send 429 with `Retry-After: 0`: the
    queued message is due on the retry schedule, not again at once (it was sent ~130 times a second, for its
    whole lifetime). The sandbox's fault API sends no Retry-After: a middleware answers instead."""
    sandbox = sandbox_for_tests()
    hits: list[str] = []

    @web.middleware
    async def always_429(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and not request.path.startswith("/_sandbox"):
            await request.read()
            hits.append(request.path)
            return web.json_response({"status": "err", "on": "rate"}, status=429, headers={"Retry-After": "0"})
        return await handler(request)

    sandbox.app.middlewares.append(always_429)
    gw = gateway_factory(sandbox=sandbox, delivery={"retry_schedule": [60.0], "retry_jitter": 0.0})
    assert send(gw.port(), "rate limited")[0] == 250
    [row] = spool_rows(gw.settings.delivery.spool_path)
    assert row["next_attempt"] >= row["created"] + 60.0  # type: ignore[operator]
    assert (row["attempts"], len(hits)) == (1, 1)


def key_row(path: Path, account: str = "acme") -> sqlite3.Row | None:
    """The account's one idempotency key row in the SQLite queue (the tests use one key at a time)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM idempotency WHERE account=?", (account,)).fetchone()


def set_key_row(path: Path, sql: str, *params: object) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(sql, params)


def test_a_key_whose_answer_was_never_recorded_is_taken_over_once_stale_and_counted(
    gateway_factory: Callable[..., Running],
) -> None:
    """The window of a process killed after an inline delivery and before its key's answer was written: the
    queue is left with the claim and no answer (set here as that kill leaves it). The client's resend gets
    451 while the claim may still be in progress, then takes the key over and is sent again: counted and
    logged as an ambiguous call of cause key_taken_over, once."""
    gw = gateway_factory(delivery=FAST)
    spool = gw.settings.delivery.spool_path
    header = "X-Gateway-Idempotency-Key: order-99\r\n"
    first = send(gw.port(), "killed", extra=header)
    assert first[0] == 250
    row = wait_for(lambda: (r := key_row(spool)) is not None and r["reply_id"] is not None and r, what="answer")
    first_id = row["msg_id"]
    set_key_row(spool, "UPDATE idempotency SET reply_id=NULL")  # the answer the SIGKILL kept from the queue
    before = metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="key_taken_over")

    assert send(gw.port(), "killed", extra=header)[0] == 451  # within inline_budget + 60 s: still in progress
    stale = gw.settings.delivery.inline_budget + 61
    set_key_row(spool, "UPDATE idempotency SET created=created-?", stale)
    with structlog.testing.capture_logs() as logs:
        taken = send(gw.port(), "killed", extra=header)
    again = send(gw.port(), "killed", extra=header)

    assert taken[0] == 250 and taken[1] != first[1] and again == taken  # the key is the resend's now
    assert [r["body"]["asunto"] for r in gw.sent] == ["killed", "killed"]  # the duplicate this window allows
    assert metric("smtp_gateway_ambiguous_calls_total", account="acme", cause="key_taken_over") == before + 1
    [event] = [e for e in logs if e["event"] == "delivery_ambiguous"]
    assert event["cause"] == "key_taken_over" and event["first_queue_id"] == first_id


def test_message_id_keys_are_opt_in_and_include_the_envelope(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST, accounts={"acme": {"idempotency_from_message_id": True}})
    mid = "Message-ID: <resend-1@acme.example>\r\n"
    first = send(gw.port(), "mid", extra=mid)
    again = send(gw.port(), "mid", extra=mid)
    to_other = send(gw.port(), "mid", to=("someone@example.com",), extra=mid)
    assert first[1] == again[1] and to_other[1] != first[1]
    assert len(gw.sent) == 2


def test_the_same_key_through_two_instances_reaches_the_upstream_once(
    gateway_factory: Callable[..., Running], pg_cluster: PgCluster
) -> None:
    url = pg_cluster.new_database()
    one = gateway_factory(delivery={**FAST, "queue_url": url})
    two = gateway_factory(sandbox=one.sandbox, delivery={**FAST, "queue_url": url})
    header = "X-Gateway-Idempotency-Key: invoice-7\r\n"
    first = send(one.port(), "twice", extra=header)
    again = send(two.port(), "twice", extra=header)
    assert first[0] == again[0] == 250 and again[1] == first[1]
    assert len(one.sent) == 1


def test_a_backlog_drains_as_soon_as_the_upstream_is_back(gateway_factory: Callable[..., Running]) -> None:
    # The schedule alone would not retry within the test; only the probe of a down upstream can.
    gw = gateway_factory(delivery={**FAST, "retry_schedule": [3600], "probe_interval": 0.3, "concurrency": 1})
    gw.fault(status=503, count=None)
    replies = [send(gw.port(), f"backlog {i}") for i in range(5)]
    assert all(code == 250 for code, _ in replies)
    gw.clear_faults()
    wait_for(lambda: len(gw.sent) == 5, what="drained by the probe and the wake-up")
    assert [r["body"]["asunto"] for r in gw.sent] == [f"backlog {i}" for i in range(5)]


def test_an_upstream_reason_with_a_nul_is_dead_lettered_on_postgresql(
    gateway_factory: Callable[..., Running], pg_cluster: PgCluster
) -> None:
    """PostgreSQL text cannot hold U+0000: a refusal whose words held one could never be settled (DataError,
    taken for the queue being down), so the message was resent every lease. Stored with U+FFFD, it is settled."""
    url = pg_cluster.new_database()
    gw = gateway_factory(delivery={**FAST, "queue_url": url, "lease_seconds": 3})
    gw.fault(status=503, count=1, kind="send")
    assert send(gw.port(), "nul")[0] == 250  # queued
    gw.fault(status=400, count=None, kind="send", reason="invalid\u0000email")

    def dead() -> list[dict[str, Any]]:
        return [r for r in _pg_rows(url) if r["state"] == "dead"]

    [row] = wait_for(dead, what="the dead letter")
    assert "invalid\ufffdemail" in row["dead_reason"]
    assert len(gw.calls("send", provider="dmds")) == 2  # the 503, then the refusal: never resent


def _pg_rows(url: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        store = PostgresQueue(url)
        try:
            return await store.list(("queued", "inflight", "dead"))
        finally:
            await store.close()

    return asyncio.run(read())
