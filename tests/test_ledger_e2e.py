"""The message ledger end to end, on both queue backends: the real gateway, smtplib, the sandbox upstream.

A message delivered inline is found by its 250 id, its Message-ID and its recipient; one queued through an
outage shows each attempt; a dead letter names its reason; two instances on one PostgreSQL queue write one
record; a full buffer drops the oldest rows without holding up a reply; retention prunes."""

from __future__ import annotations

import base64
import json
import smtplib
import sqlite3
import time
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest

from gateway.delivery.admin import QueueAdmin
from gateway.ledger import retention
from gateway.ledger.model import MessageRow, Query, Record
from gateway.ledger.recorder import Recorder
from gateway.ledger.writer import LedgerWriter
from gateway.ops.metrics import REGISTRY
from tests.harness import (
    APIKEY,
    DENGAGE_API_PASSWORD,
    DENGAGE_SENDER,
    DENGAGE_USER,
    DENGAGE_USERKEY,
    PASSWORD,
    USER,
    Running,
)
from tests.spool_helpers import send, wait_for

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}


@pytest.fixture(params=["sqlite", "postgresql"])
def delivery(request: pytest.FixtureRequest) -> dict[str, Any]:
    """[delivery] for the backend under test (FAST retries)."""
    if request.param == "postgresql":
        return {**FAST, "queue_url": request.getfixturevalue("pg_cluster").new_database()}
    return dict(FAST)


def flushed(gw: Running) -> None:
    """Everything the gateway recorded so far is in the database (the writer's batch included)."""
    assert gw.app.ledger_writer is not None
    gw.loop.run(gw.app.ledger_writer.flush())


def find(gw: Running, **filters: Any) -> list[Record]:
    flushed(gw)
    assert gw.app.ledger is not None
    return gw.loop.run(gw.app.ledger.find(Query(**filters))).records


def record(gw: Running, msg_id: str) -> Record:
    flushed(gw)
    assert gw.app.ledger is not None
    found = gw.loop.run(gw.app.ledger.get(msg_id))
    assert found is not None, f"no ledger record for {msg_id}"
    return found


def reply_id(text: str) -> str:
    return text.rsplit(" ", 1)[1]


def test_a_message_delivered_inline_is_found_by_its_250_id_message_id_and_recipient(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    gw = gateway_factory(delivery=delivery)
    code, text = send(gw.port(), "Invoice 7", to=("Client@Example.com",), extra="Message-ID: <inv-7@acme.example>\r\n")
    assert code == 250
    eeid = reply_id(text)
    [found] = find(gw, reply_id=eeid)
    assert find(gw, message_id="<inv-7@acme.example>") == [found]
    assert find(gw, recipient="client@example.com") == [found]
    assert find(gw, upstream_id=eeid) == [found]
    full = record(gw, found.id)
    assert (full.state, full.reply, full.account, full.login) == ("sent", f"250 {text}", "acme", "scanner")
    assert full.listener == "plain" and full.peer is not None and full.peer.startswith("127.0.0.1:")
    assert full.subject == "Invoice 7" and full.mail_from == "billing@acme.example" and full.size
    [rcpt] = full.recipients
    # As RCPT TO was accepted: the domain in lower case (the policy's normal form), the local part as given.
    assert (rcpt.address, rcpt.state, rcpt.upstream_id, rcpt.call) == ("Client@example.com", "sent", eeid, "0")
    assert [(e.kind, e.outcome) for e in full.events] == [("accepted", None), ("attempt", "delivered")]
    assert full.events[1].upstream_id == eeid and full.events[1].actor == gw.app.owner.owner  # type: ignore[union-attr]
    # The request as planned: the DMDS body without the key (it travels in a header).
    [request] = full.request
    assert request["path"] == "/v1/envio/send_one_inline/" and request["body"]["contacto"]["email"] == (
        "Client@example.com"
    )
    assert "test-account-apikey" not in str(full.request)


def test_a_message_queued_through_an_outage_shows_every_attempt(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    gw = gateway_factory(delivery=delivery)
    gw.fault(status=503, count=2)  # the inline attempt and the first retry
    code, text = send(gw.port(), "outage")
    assert code == 250
    local = reply_id(text)
    assert len(local) == 16
    wait_for(lambda: gw.sent, what="delivery by the retry worker")

    def attempts() -> list[str | None] | None:
        outcomes = [e.outcome for e in record(gw, local).events if e.kind == "attempt"]
        return outcomes if outcomes and outcomes[-1] == "delivered" else None

    assert wait_for(attempts, what="the delivered attempt recorded") == ["deferred", "deferred", "delivered"]
    full = record(gw, local)
    assert full.reply_id == local and full.state == "sent"
    kinds = [e.kind for e in full.events]
    assert kinds == ["accepted", "attempt", "queued", "attempt", "queued", "attempt"]
    first = full.events[1]
    assert first.data == {"path": "inline", "attempt": 1} and "503" in (first.detail or "")
    assert full.events[5].data == {"path": "queue", "attempt": 3, "sent": 1}  # DMDS' own count of mails sent
    assert full.recipients[0].upstream_id == gw.sent[0]["upstream_id"]


def test_a_dead_letter_names_its_reason(gateway_factory: Callable[..., Running], delivery: dict[str, Any]) -> None:
    gw = gateway_factory(delivery=delivery)
    gw.fault(status=503, count=1)
    gw.fault(mode="err", reason="invalid email", count=1)
    code, text = send(gw.port(), "refused after acceptance")
    assert code == 250
    local = reply_id(text)

    def dead() -> Record | None:
        found = record(gw, local)
        return found if found.state == "dead" else None

    found = wait_for(dead, what="the dead letter recorded")
    [rcpt] = found.recipients
    assert rcpt.state == "dead" and rcpt.reason == "invalid email"
    [last] = [e for e in found.events if e.kind == "dead_lettered"]
    assert last.detail is not None and "refused by upstream" in last.detail and "invalid email" in last.detail
    assert last.data == {"cause": "refused"}
    assert [r.id for r in find(gw, state="dead")] == [local]


def test_two_instances_on_one_postgresql_queue_write_one_record(
    gateway_factory: Callable[..., Running], pg_cluster: Any
) -> None:
    url = pg_cluster.new_database()
    accepting = gateway_factory(delivery={**FAST, "queue_url": url, "instance_name": "a", "retry_schedule": [3600]})
    accepting.fault(status=503, count=None)
    code, text = send(accepting.port(), "accepted by a, delivered by b")
    assert code == 250
    local = reply_id(text)
    # A stops (its writer flushes on the way out); B, on the same queue, delivers once the upstream is back.
    accepting.loop.run(accepting.app.stop(drain_timeout=2.0))
    accepting.clear_faults()
    delivering = gateway_factory(sandbox=accepting.sandbox, delivery={**FAST, "queue_url": url, "instance_name": "b"})
    # An operator makes it due now (A's schedule said an hour), as `smtp-gateway queue retry` does.
    assert delivering.app.store is not None and delivering.app.ledger_writer is not None
    admin = QueueAdmin(delivering.app.store, Recorder(delivering.app.ledger_writer.put, "ops@console"))
    assert delivering.loop.run(admin.retry(local, time.time()))

    def delivered() -> Record | None:
        found = record(delivering, local)
        return found if found.state == "sent" else None

    found = wait_for(delivered, what="delivery by the second instance")
    assert [r.id for r in find(delivering, id=local)] == [local]
    actors = {e.kind: e.actor for e in found.events}
    assert actors["accepted"] is not None and actors["accepted"].startswith("a:")
    assert actors["retried"] == "ops@console"
    assert [e.outcome for e in found.events if e.kind == "attempt"][-1] == "delivered"
    assert [e.actor for e in found.events if e.kind == "attempt"][-1].startswith("b:")  # type: ignore[union-attr]
    assert found.listener == "plain" and found.reply == f"250 {text}"  # what only the accepting instance knew


def test_a_full_buffer_drops_the_oldest_rows_and_never_holds_up_a_reply(
    gateway_factory: Callable[..., Running],
) -> None:
    gw = gateway_factory(delivery=FAST, ledger={"buffer": 1000})
    writer = gw.app.ledger_writer
    assert writer is not None
    send(gw.port(), "first")  # the schema is there, the writer has written once
    flushed(gw)
    # Another process holds the database's write lock: the ledger cannot write (the inline path needs no queue).
    blocker = sqlite3.connect(gw.settings.delivery.spool_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        stuck = _rows("STUCK", 1000)  # taken by the writer as one batch, which waits for the lock
        gw.loop.run(_put(writer, stuck))
        wait_for(lambda: writer.pending == 0, what="the writer holding its batch")
        waiting = _rows("WAIT", 1000)  # the buffer is full now
        gw.loop.run(_put(writer, waiting))
        dropped = _dropped()
        started = time.monotonic()
        code, text = send(gw.port(), "while the ledger is stuck")
        assert code == 250 and time.monotonic() - started < 5.0  # not waiting for the database (10 s busy)
        assert _dropped() - dropped >= 4  # its rows pushed out as many of the oldest waiting ones
        assert writer.pending == 1000
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    [found] = find(gw, reply_id=reply_id(text))
    assert found.subject == "while the ledger is stuck"
    assert not find(gw, id=waiting[0].id)  # the oldest rows were the ones dropped
    assert find(gw, id=waiting[-1].id) and find(gw, id=stuck[0].id)


def _dropped() -> float:
    return REGISTRY.get_sample_value("smtp_gateway_ledger_dropped_rows_total") or 0.0


def _rows(prefix: str, n: int) -> list[MessageRow]:
    now = time.time()
    return [MessageRow(f"{prefix}{i:06d}", now, "acme", "x@acme.example", "filler", 1) for i in range(n)]


async def _put(writer: LedgerWriter, rows: list[MessageRow]) -> None:
    writer.put(rows)


def test_retention_prunes_records_past_their_age(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    gw = gateway_factory(delivery={**delivery, "max_lifetime": 1800}, ledger={"retention": 3600})
    code, text = send(gw.port(), "kept for an hour")
    assert code == 250
    [found] = find(gw, reply_id=reply_id(text))
    store = gw.app.ledger
    assert store is not None
    assert gw.loop.run(retention.prune(store, 3600, time.time())) == 0  # not yet
    assert gw.loop.run(retention.prune(store, 3600, time.time() + 3601)) == 1
    assert find(gw) == [] and gw.loop.run(store.get(found.id)) is None


def _html(provider: str, body: dict[str, Any]) -> Any:
    """The message's text in a request body as each provider's wire has it."""
    return body["html"] if provider == "dmds" else body["content"]["html"]


@pytest.mark.parametrize("provider", ["dmds", "dengage"])
def test_the_kept_request_has_the_texts_size_unless_keep_bodies(
    gateway_factory: Callable[..., Running], provider: str
) -> None:
    """By default the record keeps the request's shape and the HTML's size, not the message's words; with
    `keep_bodies` (applied by a reload) the HTML as sent."""
    gw = gateway_factory(dengage={}) if provider == "dengage" else gateway_factory()
    login, sender = (USER, "billing@acme.example") if provider == "dmds" else (DENGAGE_USER, DENGAGE_SENDER)
    words = "Quarterly figures: confidential-7f3a"

    def sent(tag: str) -> tuple[Record, tuple[Any, Any]]:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = sender, "client@example.net", "figures"
        msg["Message-ID"] = f"<{tag}@test.example>"
        msg.set_content(f"<p>{words} \u00e9t\u00e9</p>", subtype="html")
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
            client.login(login, PASSWORD)
            client.sendmail(sender, ["client@example.net"], msg.as_bytes())
        [found] = find(gw, message_id=f"{tag}@test.example")
        kept = record(gw, found.id)
        [request] = kept.request
        upstream = gw.requests[-1]["body"]  # delivered inline: its call was made before the 250
        return kept, (_html(provider, request["body"]), _html(provider, upstream))

    assert not gw.settings.ledger.keep_bodies  # the default
    whole, (kept, html) = sent("without")
    assert words in html  # the upstream got the text; the ledger its size in UTF-8 bytes (two are 2-byte)
    assert kept == f"({len(html.encode())} bytes, not kept)" and len(html.encode()) == len(html) + 2
    assert words not in json.dumps(whole.to_json())
    on = gw.settings.model_copy(update={"ledger": gw.settings.ledger.model_copy(update={"keep_bodies": True})})
    gw.app.source = lambda: on
    assert gw.loop.run(gw.app.reload())
    _, (kept, html) = sent("with")
    assert kept == html and words in kept


@pytest.mark.parametrize("provider", ["dmds", "dengage"])
def test_the_kept_request_has_no_credential_and_no_attachment_content(
    gateway_factory: Callable[..., Running], provider: str
) -> None:
    gw = gateway_factory(dengage={}) if provider == "dengage" else gateway_factory()  # (one account each)
    login, sender = (USER, "billing@acme.example") if provider == "dmds" else (DENGAGE_USER, DENGAGE_SENDER)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "client@example.net", "With a scan"
    msg.set_content("see attached")
    scan = bytes(range(256)) * 8
    msg.add_attachment(scan, maintype="application", subtype="pdf", filename="scan.pdf")
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(login, PASSWORD)
        client.sendmail(sender, ["client@example.net"], msg.as_bytes())
    [found] = find(gw, sender=sender)
    full = record(gw, found.id)
    [request] = full.request
    kept = json.dumps(full.to_json())
    assert "(2048 bytes, not kept)" in kept and base64.b64encode(scan).decode()[:40] not in kept
    for secret in (APIKEY, DENGAGE_USERKEY, DENGAGE_API_PASSWORD, "Bearer", "Authorization"):
        assert secret not in kept
    if provider == "dmds":
        assert (
            request["path"] == "/v1/envio/send_one_inline/" and request["body"]["adjuntos"][0]["nombre"] == "scan.pdf"
        )
    else:
        assert request["path"] == "/transactional/email" and request["body"]["send"] == {"to": "client@example.net"}
        assert request["body"]["attachments"][0]["name"] == "scan.pdf"
