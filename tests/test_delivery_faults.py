"""Faults inside delivery, end to end in-process: the upstream refusing the gateway's own key (queued,
logged at error level once a minute, counted, /readyz degraded), a corrupt queue record (dead-lettered with the
reason), a bug in delivery (451 4.3.0 inline; from the queue: retried, then dead-lettered, each time
logged once with its traceback and counted; never retried silently for days), and a bug in MIME parsing
(451 4.3.0, logged with its traceback and counted, not a silent 554)."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable, Mapping
from email.errors import HeaderParseError
from email.feedparser import FeedParser
from email.message import Message as EmailMessage
from typing import Any

import httpx
import pytest
import structlog

from gateway.core.errors import ContentRejected
from gateway.core.model import Submission
from gateway.core.outcome import BeforeSend, Outcome, no_hook
from gateway.core.records import Decision, RetryPolicy
from gateway.delivery import transition
from gateway.mime import parse
from gateway.ops.metrics import REGISTRY
from gateway.queue.sqlite import SqliteQueue
from gateway.queue.store import NewMessage
from tests.harness import DENGAGE_ACCOUNT, DENGAGE_SENDER, DENGAGE_USER, PASSWORD, Running
from tests.spool_helpers import send, spool_rows, wait_for

FAST = {"retry_schedule": [0.2], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 5.0}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_refused_key_is_queued_logged_once_counted_and_degraded(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST, http={"port": 0})
    before = metric("smtp_gateway_upstream_auth_refused_total", account="acme")
    gw.fault(status=403, count=None, kind="send")
    with structlog.testing.capture_logs() as logs:
        replies = [send(gw.port(), f"key refused {i}") for i in range(3)]
    assert all(code == 250 for code, _ in replies)  # queued: nothing is lost while an operator fixes the key
    assert len(spool_rows(gw.settings.delivery.spool_path)) == 3
    assert [e["event"] for e in logs].count("upstream_refused_credentials") == 1
    assert metric("smtp_gateway_upstream_auth_refused_total", account="acme") >= before + 3
    assert gw.app.operator is not None
    # Ready but degraded: the key is every instance's, so taking this one out of the balancer would only
    # move the clients to another refused the same (or to none), while this one queues with a 250.
    ready = httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/readyz", timeout=5)
    assert ready.status_code == 200 and "problems" not in ready.json()
    assert "refuses the gateway's credentials" in ready.json()["degraded"][0]
    health = httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/healthz", timeout=5).json()
    assert health["degraded"] == ready.json()["degraded"]
    gw.clear_faults()
    wait_for(lambda: len(gw.sent) == 3, what="delivered once the key works")
    assert httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/readyz", timeout=5).json() == {"ready": True}


def test_a_corrupt_queue_record_is_dead_lettered_with_the_reason(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    now = time.time()
    plan = transition.fresh((), now, RetryPolicy((1.0,), 0, 100))
    corrupt = NewMessage(
        id="C0FFEE0000000001",
        account="acme",
        mail_from="a@acme.example",
        subject="x",
        submission=b'{"v": 2, "principal": {}}',
        decision=Decision("queued", dict(plan.calls), 1, now, None),
        created=now,
        expires=now + 100,
    )

    async def insert() -> None:
        store = SqliteQueue(gw.settings.delivery.spool_path)
        try:
            await store.insert(corrupt)
        finally:
            await store.close()

    asyncio.run(insert())
    [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="dead letter")
    assert dead["id"] == "C0FFEE0000000001" and dead["dead_reason"].startswith("corrupt queue record")


class Broken:
    """Stands in for a bug: the provider's deliver raises what no code expects."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(
        self, submission: Submission, done: Mapping[str, str], before_send: BeforeSend = no_hook
    ) -> Outcome:
        self.calls += 1
        raise KeyError("campana")


def test_a_bug_in_delivery_is_logged_counted_and_dead_lettered(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    gw.fault(status=503, count=1, kind="send")
    assert send(gw.port(), "will meet a bug")[0] == 250  # queued after the 503
    before = metric("smtp_gateway_internal_errors_total", where="queue_delivery")
    provider: Any = gw.app.providers["acme"]
    broken = Broken()
    with structlog.testing.capture_logs() as logs:
        provider.deliver = broken
        [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="dead letter")
    assert broken.calls == 3
    assert dead["dead_reason"].startswith("internal error 3 times") and "KeyError" in dead["dead_reason"]
    errors = [e for e in logs if e["event"] == "delivery_internal_error"]
    assert len(errors) == 3 and all(isinstance(e.get("exc_info"), KeyError) for e in errors)
    assert metric("smtp_gateway_internal_errors_total", where="queue_delivery") == before + 3
    # Inline, the client hears 451 4.3.0 and nothing of the bug.
    assert send(gw.port(), "inline bug") == (451, "4.3.0 Internal error; try again later")


# A bug in one call of a multi-call message (dEngage: one call per recipient): b's call meets it after a's went.
TWO = ("a@example.com", "b@example.com")


def _send_two(gw: Running, subject: str) -> int:
    raw = f"From: {DENGAGE_SENDER}\r\nTo: {', '.join(TWO)}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(DENGAGE_USER, PASSWORD)
        client.mail(DENGAGE_SENDER)
        for rcpt in TWO:
            client.rcpt(rcpt)
        code, _ = client.data(raw)
    return code


def _break_b(gw: Running) -> None:
    provider: Any = gw.app.providers[DENGAGE_ACCOUNT]
    real = provider.send_one

    async def send_one(submission: Any, call: Any, before_send: Any = no_hook) -> Any:
        if call.key == "b@example.com":
            raise KeyError("a bug in b's call")
        return await real(submission, call, before_send)

    provider.send_one = send_one


def _copies(gw: Running, rcpt: str) -> int:
    return len([r for r in gw.calls("send", status=200) if r["to"] == rcpt])


def test_inline_a_bug_in_one_call_queues_the_rest_not_451(gateway_factory: Callable[..., Running]) -> None:
    """a was delivered: a 451 would make the client resend a's copy. The rest is queued (250), a stays done."""
    gw = gateway_factory(delivery=FAST, dengage={})
    _break_b(gw)
    before = metric("smtp_gateway_internal_errors_total", where="inline_delivery")
    ambiguous = metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="internal_error")
    with structlog.testing.capture_logs() as logs:
        assert _send_two(gw, "inline partial bug") == 250
    assert _copies(gw, "a@example.com") == 1
    # (the retry worker may have tried b again since: its lines come after the inline one)
    error = next(e for e in logs if e["event"] == "delivery_internal_error")
    assert error["call"] == "b@example.com" and isinstance(error["exc_info"], KeyError)
    assert metric("smtp_gateway_internal_errors_total", where="inline_delivery") == before + 1
    # b's bug may have struck after its request went: the call is tried again, so it is counted as ambiguous.
    assert metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="internal_error") > ambiguous


def test_from_the_queue_a_bug_in_one_call_keeps_the_delivered_call(gateway_factory: Callable[..., Running]) -> None:
    """b's bug is retried and dead-lettered after 3 times; a, delivered on the first of them, is not resent."""
    gw = gateway_factory(delivery=FAST, dengage={})
    gw.fault(status=503, count=2, kind="send")  # both first calls fail: queued with a and b pending
    assert _send_two(gw, "queued partial bug") == 250
    before = metric("smtp_gateway_internal_errors_total", where="queue_delivery")
    ambiguous = metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="internal_error")
    with structlog.testing.capture_logs() as logs:
        _break_b(gw)
        [dead] = wait_for(lambda: spool_rows(gw.settings.delivery.spool_path, "dead"), what="dead letter", timeout=30)
    assert dead["dead_reason"].startswith("internal error 3 times") and "KeyError" in dead["dead_reason"]
    assert _copies(gw, "a@example.com") == 1
    errors = [e for e in logs if e["event"] == "delivery_internal_error"]
    assert len(errors) == 3 and all(e["call"] == "b@example.com" for e in errors)
    assert metric("smtp_gateway_internal_errors_total", where="queue_delivery") == before + 3
    assert (
        metric("smtp_gateway_ambiguous_calls_total", account=DENGAGE_ACCOUNT, cause="internal_error") == ambiguous + 3
    )


def test_a_bug_in_mime_parsing_is_451_logged_with_its_traceback_and_counted(
    gateway: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No real message makes the stdlib parser raise anything but its own errors (the corpus and the fuzz
    tests find none), so the bug is injected into the stdlib's Message, which both the feed parser and the
    fast path (gateway/mime/fastsplit.py) ask for each part's content type, for this test's messages only."""
    content_type = EmailMessage.get_content_type

    def buggy(self: EmailMessage) -> str:
        if "X-Trigger-Bug" in self:
            raise IndexError("list index out of range")
        return content_type(self)

    monkeypatch.setattr(EmailMessage, "get_content_type", buggy)
    before = metric("smtp_gateway_internal_errors_total", where="accept")
    with structlog.testing.capture_logs() as logs:
        assert send(gw_port := gateway.port(), "meets a bug", extra="X-Trigger-Bug: 1\r\n") == (
            451,
            "4.3.0 Internal error; try again later",
        )
        assert send(gw_port, "no bug")[0] == 250  # the next message is parsed as ever
    [error] = [e for e in logs if e["event"] == "message_internal_error"]
    assert isinstance(error["exc_info"], IndexError) and error["log_level"] == "error"
    assert metric("smtp_gateway_internal_errors_total", where="accept") == before + 1
    assert len(gateway.sent) == 1


def test_what_the_stdlib_parser_raises_for_a_bad_message_is_still_554(monkeypatch: pytest.MonkeyPatch) -> None:
    """The email package's own errors (its documented MessageError family) mean an unreadable message; so does
    the one crash of the stdlib a real message triggers (RFC 2231 boundary sections mixed: a TypeError in
    email.utils.decode_params)."""
    mixed = (
        b"From: a@acme.example\r\nSubject: x\r\n"
        b"Content-Type: multipart/mixed; boundary*=utf-8''x; boundary*0=y\r\n\r\n--x\r\n\r\nhi\r\n--x--\r\n"
    )
    with pytest.raises(ContentRejected) as unreadable:
        parse(mixed)
    assert str(unreadable.value.reply) == "554 5.6.0 Message could not be parsed"
    assert "TypeError" in unreadable.value.reason

    def unreadable(self: FeedParser, lines: list[str]) -> None:
        raise HeaderParseError("header line cannot be parsed")

    monkeypatch.setattr(FeedParser, "_parse_headers", unreadable)
    with pytest.raises(ContentRejected) as refused:
        # The feed parser's path: the fast one reads a message this plain without it.
        parse(b"Subject: x\r\n\r\nbody\r\n", fast=False)
    assert str(refused.value.reply) == "554 5.6.0 Message could not be parsed"
    assert "HeaderParseError" in refused.value.reason
