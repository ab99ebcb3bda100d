"""Large messages end to end: the byte budget for large messages in flight (452 4.3.1 past it, early at
MAIL for a declared SIZE, released when a message's attempt ends or its client vanishes), and scans whose
attachment reaches the upstream byte-identical, inline and from the queue."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import os
import smtplib
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import httpx
import structlog

from gateway.core.errors import SpoolUnavailable
from tests.harness import PASSWORD, USER, Running
from tests.ops_util import sample
from tests.smtputil import RawClient
from tests.spool_helpers import wait_for

MIB = 1024 * 1024
# Room for one 3 MiB message at a time.
SMALL_BUDGET = {"max_message_size": 4 * MIB, "max_large_bytes": 5 * MIB, "large_message_threshold": MIB}


def scan(size: int, subject: str = "scan") -> tuple[bytes, bytes]:
    """A scan-to-email message with a `size`-byte PDF-like attachment (base64, 76-character lines)."""
    pdf = b"%PDF-1.4\n" + os.urandom(size - 9)
    encoded = base64.encodebytes(pdf).replace(b"\n", b"\r\n")
    head = (
        f"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n'
        "Scanned.\r\n--b1\r\nContent-Type: application/pdf; name=scan.pdf\r\nContent-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=scan.pdf\r\n\r\n"
    ).encode()
    return head + encoded + b"--b1--\r\n", pdf


def attachment_of(entry: dict[str, object]) -> bytes:
    body = entry["body"]
    assert isinstance(body, dict)
    [att] = body["adjuntos"]
    return base64.b64decode(att["contenido"])


def submit(port: int, raw: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        code, text = client.data(raw)
    return code, text.decode()


def test_a_40_mb_scan_reaches_the_upstream_byte_identical(gateway_factory: Callable[..., Running]) -> None:
    # 40 MB of PDF is ~54 MB on the wire: past the default max_message_size (40 MiB, as SES), so raised.
    gw = gateway_factory(limits={"max_message_size": 64 * MIB})
    raw, pdf = scan(40 * 1000 * 1000)
    code, text = submit(gw.port(), raw)
    assert code == 250, text
    [sent] = gw.sent
    assert hashlib.sha256(attachment_of(sent)).digest() == hashlib.sha256(pdf).digest()


def test_a_large_scan_queued_during_an_outage_is_retried_byte_identical(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(
        limits={"max_message_size": 20 * MIB},
        delivery={"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2},
    )
    gw.fault(status=503, count=2, kind="send")  # the inline call and the first retry fail
    raw, pdf = scan(6 * MIB)
    code, text = submit(gw.port(), raw)
    assert code == 250 and len(text.rsplit(" ", 1)[1]) == 16, text  # queued
    wait_for(lambda: len(gw.sent) == 1, 30, "retried from the queue")
    assert attachment_of(gw.sent[0]) == pdf


def test_large_messages_past_the_budget_get_452_and_others_go_through(
    gateway_factory: Callable[..., Running],
) -> None:
    # The upstream holds the first call for a second.
    gw = gateway_factory(limits=SMALL_BUDGET)
    gw.fault(delay=1.0, count=1, kind="send")
    raw, _ = scan(2 * MIB)  # ~2.7 MiB on the wire
    results: list[tuple[int, str]] = []
    first = threading.Thread(target=lambda: results.append(submit(gw.port(), raw)))
    first.start()
    wait_for(lambda: gw.app.listeners is not None and gw.app.listeners.budget.used > 0, 10, "first one in")
    second = submit(gw.port(), raw)
    first.join(30)
    assert results[0][0] == 250
    assert second == (452, "4.3.1 Too many large messages in progress here; try again later")
    wait_for(lambda: gw.app.listeners is not None and gw.app.listeners.budget.used == 0, 10, "released")
    assert submit(gw.port(), raw)[0] == 250  # room again once the first one's attempt ended
    small = submit(gw.port(), b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: s\r\n\r\nhi\r\n")
    assert small[0] == 250


def test_a_declared_size_past_the_free_budget_is_refused_at_mail(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(limits=SMALL_BUDGET)
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        assert client.login(USER, PASSWORD).startswith("235")
        assert gw.app.listeners is not None
        gw.app.listeners.budget.used = 2 * MIB  # as if another large message held part of the budget
        assert client.cmd(f"MAIL FROM:<billing@acme.example> SIZE={int(3.5 * MIB)}").startswith("452 4.3.1 ")
        assert client.cmd(f"MAIL FROM:<billing@acme.example> SIZE={3 * MIB}").startswith("250")


def test_a_client_vanishing_mid_data_releases_its_share(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(limits=SMALL_BUDGET)
    raw, _ = scan(3 * MIB)
    with RawClient(gw) as client:
        client.open_data()
        client.write(raw[: 2 * MIB])
        wait_for(lambda: gw.app.listeners is not None and gw.app.listeners.budget.used > MIB, 10, "held")
        client.reset_on_close()
    wait_for(lambda: gw.app.listeners is not None and gw.app.listeners.budget.used == 0, 10, "released")
    assert gw.sent == []  # a message cut off mid-DATA is never sent


def test_a_client_gone_after_its_dot_keeps_its_share_until_the_attempt_ends(
    gateway_factory: Callable[..., Running],
) -> None:
    """The session is cancelled when its client leaves after the final dot; the delivery attempt goes on
    with the message (docs/messages.md: its share counts "until its first delivery attempt has ended"). The
    session's cleanup released the share at once: a second scan was taken while the first still held memory.
    The upstream holds the first call until the test lets it go (no http_timeout ends it meanwhile), so the
    second scan meets the attempt in flight however slow the machine is."""
    gw = gateway_factory(limits=SMALL_BUDGET, accounts={"acme": {"http_timeout": 600.0}})
    listeners = gw.app.listeners
    assert listeners is not None
    gw.fault(mode="hold", count=1, kind="send")  # the upstream answers the first call when the test says so
    raw, _ = scan(2 * MIB)  # ~2.7 MiB on the wire: the budget (5 MiB) has room for one
    with RawClient(gw) as client:
        client.open_data()
        client.write(raw + b".\r\n")
        wait_for(lambda: not gw.sandbox.state.faults, 10, "the upstream called")
        client.reset_on_close()
    wait_for(lambda: not listeners.sessions, 10, "the session over")
    assert listeners.budget.used > 2 * MIB  # the attempt still holds the message
    assert submit(gw.port(), raw) == (452, "4.3.1 Too many large messages in progress here; try again later")
    assert len(gw.sent) == 0  # the first call still held: nothing timed out behind the test's back
    gw.clear_faults()  # the upstream answers the first call: its attempt ends, and the share goes then
    wait_for(lambda: listeners.budget.used == 0, 30, "released when the attempt ended")
    assert len(gw.sent) == 1


def traced() -> int:
    """Bytes allocated since tracemalloc started and still held, but the sandbox's (its aiohttp server's)."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, "*/aiohttp/web_*")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_a_client_gone_mid_message_leaves_no_copy_of_it_behind(gateway_factory: Callable[..., Running]) -> None:
    """A session that ends in an exception (its client gone during DATA, or before its reply) stays in a
    reference cycle until the cyclic GC runs, which a busy process does rarely: what it leaves there must not
    hold the message. The cyclic GC is off here, so only what the sessions let go of is freed."""
    gw = gateway_factory(limits=SMALL_BUDGET)
    raw, _ = scan(2 * MIB)  # 2.7 MiB on the wire
    listeners = gw.app.listeners
    assert listeners is not None
    gw.fault(delay=1.0, count=1, kind="send")  # the second client is gone before the upstream answers
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = traced()
        for cut_off_in_data in (True, False):
            with RawClient(gw) as client:
                client.open_data()
                if cut_off_in_data:
                    client.write(raw[: 2 * MIB])
                    wait_for(lambda: listeners.budget.used > MIB, 10, "the data held")
                else:
                    client.write(raw + b".\r\n")
                    wait_for(lambda: not gw.sandbox.state.faults, 10, "the upstream called (its delay taken)")
                client.reset_on_close()
            wait_for(lambda: listeners.budget.used == 0 and not listeners.sessions, 10, "the session over")
        wait_for(lambda: gw.sent, 10, "the second message delivered all the same")
        httpx.delete(f"{gw.sandbox_url}/_sandbox/requests").raise_for_status()  # the sandbox keeps bodies
        left = traced() - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert left < MIB, f"{left} bytes left behind"


TEXT_HEAD = (
    b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: export\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
)


def text_charged(charged: int, char: bytes = b"&") -> bytes:
    """A plain-text message charged exactly `charged` bytes: lines of `char` ("&" grows by 4 once escaped)
    and, to make up the rest, one line of letters (which escaping leaves as they are)."""
    grows = 4 if char == b"&" else 0
    line = char * 74 + b"\r\n"
    lines = (charged - len(TEXT_HEAD)) // (len(line) + 74 * grows) - 1
    raw = TEXT_HEAD + line * lines
    pad = charged - (len(raw) + grows * raw.count(b"&")) - 2
    return raw + b"a" * pad + b"\r\n"


def test_text_of_ampersands_is_charged_by_its_html(gateway_factory: Callable[..., Running]) -> None:
    """A text body made HTML counts against limits.max_large_bytes by what it becomes ("&" is "&amp;"): the
    message's raw size plus what escaping adds. One that could never fit gets the decoded-size refusal,
    one that fits only with other messages' shares free gets 452 4.3.1, as a message past the budget."""
    gw = gateway_factory(limits=SMALL_BUDGET)  # 5 MiB: about 1.07 MiB of "&" text, charged 5 MiB
    listeners = gw.app.listeners
    assert listeners is not None
    before = sample("smtp_gateway_limit_hits_total", limit="max_large_bytes")
    over = text_charged(5 * MIB + 1)
    assert len(over) < 1.1 * MIB  # raw, it would fit five times over
    assert submit(gw.port(), over) == (552, "5.3.4 Message size exceeds fixed limit once decoded")
    assert sample("smtp_gateway_limit_hits_total", limit="max_large_bytes") == before + 1
    assert gw.sent == []
    assert listeners.budget.used == 0
    gw.fault(delay=1.0, count=1, kind="send")  # the message's share held while the upstream answers
    results: list[tuple[int, str]] = []
    under = text_charged(5 * MIB)
    first = threading.Thread(target=lambda: results.append(submit(gw.port(), under)))
    first.start()
    wait_for(lambda: listeners.budget.used > 0, 10, "the message parsed")
    assert listeners.budget.used == 5 * MIB  # charged by its HTML, not its 1.07 MiB
    first.join(30)
    assert results[0][0] == 250, results
    [sent] = gw.sent
    assert str(sent["body"]).count("&amp;") == under.count(b"&")  # the whole text, escaped
    wait_for(lambda: listeners.budget.used == 0, 10, "released")
    listeners.budget.used = 2 * MIB  # as if another large message held part of the budget
    try:
        busy = submit(gw.port(), text_charged(4 * MIB))
    finally:
        listeners.budget.used -= 2 * MIB
    assert busy == (452, "4.3.1 Too many large messages in progress here; try again later")
    assert sample("smtp_gateway_limit_hits_total", limit="max_large_bytes") == before + 2
    assert len(gw.sent) == 1
    wait_for(lambda: listeners.budget.used == 0, 10, "the refused message's share released")


def test_ordinary_text_is_charged_its_raw_size(gateway_factory: Callable[..., Running]) -> None:
    """Text without "&", "<" or ">" grows by nothing once escaped: its limit is the one it had."""
    gw = gateway_factory(limits=SMALL_BUDGET)
    listeners = gw.app.listeners
    assert listeners is not None
    raw = text_charged(3 * MIB, b"x")
    assert len(raw) == 3 * MIB
    gw.fault(delay=1.0, count=1, kind="send")
    results: list[tuple[int, str]] = []
    first = threading.Thread(target=lambda: results.append(submit(gw.port(), raw)))
    first.start()
    wait_for(lambda: not gw.sandbox.state.faults, 10, "the upstream called")
    # What DATA reserved as it came in (a chunk at a time): never more than the raw size.
    assert 2 * MIB < listeners.budget.used <= 3 * MIB
    first.join(30)
    assert results[0][0] == 250, results


def test_a_settle_waiting_for_the_queue_does_not_hold_the_messages_share(
    gateway_factory: Callable[..., Running],
) -> None:
    """Review today8a F4: a large message stored in flight (its call past the inline budget) whose call has
    answered while the queue cannot take the settle: the settle is retried for as long as the queue is out,
    and the message's share stayed held all that time, so new large messages got 452 for the whole outage.
    The share goes once the call's outcome is known: the settle needs only the decision (nor does it hold the
    provider, which a reload's wait for running attempts kept open)."""
    gw = gateway_factory(limits=SMALL_BUDGET, delivery={"inline_budget": 0.5, "lease_seconds": 60.0})
    listeners = gw.app.listeners
    assert listeners is not None
    store: Any = gw.app.store
    real = store.settle
    out = threading.Event()

    async def settle(*args: Any) -> Any:
        if out.is_set():
            raise SpoolUnavailable("queue: database unreachable")
        return await real(*args)

    store.settle = settle
    gw.fault(mode="hold", count=1, kind="send")  # the call answers when the test says so
    raw, _ = scan(2 * MIB)
    with structlog.testing.capture_logs() as logs:
        assert submit(gw.port(), raw)[0] == 250  # past the inline budget: stored in flight
        assert listeners.budget.used > 2 * MIB  # the call still out: the attempt holds the message
        out.set()  # the queue goes away before the call's answer can be settled
        gw.clear_faults()
        wait_for(lambda: [e for e in logs if e["event"] == "queue_settle_failed"] or None, 30, "the settle failing")
        used = listeners.budget.used
        # A reload meanwhile waits for the attempts running then before it closes retired providers: a settle
        # waiting for the queue holds none, so that wait is over while the queue is still out.
        running = asyncio.run_coroutine_threadsafe(gw.app.owner.running(), gw.loop.loop)
        wait_for(lambda: running.done() or None, 20, "running() done with the settling attempt")
        out.clear()
        wait_for(lambda: [e for e in logs if e["event"] == "message_delivered"] or None, 30, "the settle stored")
    assert used == 0, "the share was held while the settle waited for the queue"
    assert len(gw.sent) == 1
