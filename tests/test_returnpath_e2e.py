"""The return path end to end, on both queue backends: the real gateway, smtplib, the sandbox upstream reporting
each recipient's fate through its event API, a local webhook receiver.

A message to a bouncing address is answered 250, its hard bounce read back makes it `bounced`, its sender
gets a delivery status notice through the same account (the sandbox receives it), a webhook receiver that
fails its first answers gets each event once in the end, correctly signed, and the next RCPT to that
address is refused 550 5.1.1."""

from __future__ import annotations

import json
import smtplib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.core.events import SUPPRESSES
from gateway.ledger.model import Query, Record, SuppressionRow
from gateway.ledger.returns import Suppressed
from tests.docs_blocks import doc_blocks
from tests.harness import PASSWORD, USER, LoopThread, Running
from tests.spool_helpers import message, wait_for
from tests.webhook_receiver import Receiver

SECRET = "whsec-test-secret"
FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}
# Events are read as soon as they exist (the sandbox reports them at once): no lag, polls on demand.
EVENTS = {"enabled": True, "interval": 3600, "lag": 0, "overlap": 30, "page_size": 10}


@pytest.fixture(params=["sqlite", "postgresql"])
def delivery(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "postgresql":
        return {**FAST, "queue_url": request.getfixturevalue("pg_cluster").new_database()}
    return dict(FAST)


@pytest.fixture
def receiver(loop_thread: LoopThread) -> Iterator[Receiver]:
    hook = Receiver(fail_first=2)
    loop_thread.run(hook.start())
    yield hook
    loop_thread.run(hook.stop())


def returning(
    factory: Callable[..., Running],
    delivery: dict[str, Any],
    receiver: Receiver | None = None,
    events: dict[str, Any] | None = None,
    **overrides: Any,
) -> Running:
    """A gateway reading acme's events back (EVENTS, `events` changed), telling `receiver` of every event."""
    hooks = [{"name": "app", "url": receiver.url, "secret": SECRET, "backoff": 0.05, "timeout": 5}] if receiver else []
    return factory(
        delivery=delivery,
        # Notices on (the tests' configuration has them off: tests/configs.py).
        accounts={"acme": {"events": {**EVENTS, **(events or {})}, "dsn": {"notify": "sender"}}},
        webhooks=hooks,
        return_path={"poll_interval": 0.1},
        **overrides,
    )


def send(gw: Running, to: str, subject: str = "Invoice", sender: str = "billing@acme.example") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
        client.login(USER, PASSWORD)
        client.mail(sender)
        code, text = client.rcpt(to)
        if code != 250:
            return code, text.decode()
        code, text = client.data(message(subject, (to,), extra=f"Message-ID: <{subject.replace(' ', '-')}@acme>\r\n"))
    return code, text.decode()


def poll(gw: Running) -> None:
    """Everything recorded so far is written, then every poller reads its events now."""
    assert gw.app.ledger_writer is not None and gw.app.returnpath is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    gw.loop.loop.call_soon_threadsafe(gw.app.returnpath.poll_now)


def record(gw: Running, **query: Any) -> Record:
    assert gw.app.ledger_writer is not None and gw.app.ledger is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    [found] = gw.loop.run(gw.app.ledger.find(Query(**query))).records
    full = gw.loop.run(gw.app.ledger.get(found.id))
    assert full is not None
    return full


def test_a_hard_bounce_is_read_back_told_to_the_sender_and_a_webhook_and_suppressed(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any], receiver: Receiver
) -> None:
    gw = returning(gateway_factory, delivery, receiver)
    code, text = send(gw, "bounce-hard+x@example.com", "Invoice 7")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]

    def bounced() -> Record | None:
        poll(gw)
        found = record(gw, reply_id=eeid)
        return found if found.state == "bounced" else None

    found = wait_for(bounced, what="the hard bounce read back")
    [rcpt] = found.recipients
    assert rcpt.state == "bounced" and rcpt.reason is not None and "User unknown" in rcpt.reason
    kinds = [e.kind for e in found.events]
    assert kinds[:2] == ["accepted", "attempt"] and {"sent", "bounced"} <= set(kinds)
    [bounce] = [e for e in found.events if e.kind == "bounced"]
    assert bounce.upstream_id == eeid and bounce.data is not None and bounce.data["upstream"] == "rebote-hard"

    # The sender is told: a notice through the same account (campaign 22), from the return path's domain.
    notice = wait_for(lambda: [r for r in gw.sent if r["body"].get("asunto", "").startswith("Undelivered")], what="DSN")
    [dsn] = notice
    body = dsn["body"]
    assert body["contacto"]["email"] == "billing@acme.example" and body["campana_id"] == 22
    assert body["remitente"] == "MAILER-DAEMON@nl.acme.example"
    assert "bounce-hard+x@example.com" in body["html"] and "5.1.1" in body["html"]
    assert [(a["nombre"], a["tipo"]) for a in body["adjuntos"]] == [("delivery-status.txt", "message/delivery-status")]
    told = wait_for(lambda: [e for e in record(gw, reply_id=eeid).events if e.kind == "dsn_sent"], what="dsn_sent")
    notice_id = told[0].data["notice"] if told[0].data else None
    assert notice_id == dsn["response"]["eeid"]
    dsn_record = record(gw, reply_id=notice_id)
    assert dsn_record.dsn_of == found.id and dsn_record.mail_from == "" and dsn_record.listener == "notice"

    # The webhook: 503, 503, then each event once (the sent and the bounce), signed.
    def delivered() -> list[Any] | None:
        ok = receiver.accepted()
        return ok if {r.json["type"] for r in ok} >= {"sent", "bounced"} else None

    ok = wait_for(delivered, what="webhook deliveries")
    assert [r.status for r in receiver.received[:2]] == [503, 503]
    ids = [r.json["id"] for r in ok]
    assert len(ids) == len(set(ids))
    hard = next(r for r in ok if r.json["type"] == "bounced")
    assert hard.json["message"]["id"] == found.id and hard.json["recipient"] == "bounce-hard+x@example.com"
    assert hard.json["state"] == "bounced" and hard.json["upstream"] == {"id": eeid, "event": "rebote-hard"}
    assert hard.headers["x-gateway-event-id"] == hard.json["id"] and hard.headers["x-gateway-signature"].startswith(
        "t="
    )
    timeline = wait_for(
        lambda: [e for e in record(gw, reply_id=eeid).events if e.kind == "webhook_delivered"] or None,
        what="webhook_delivered",
    )
    assert timeline
    # The receiver's check, as docs/after-250.md shows it, run on what the receiver got.
    [snippet] = doc_blocks("test_a_hard_bounce_is_read_back_told_to_the_sender_and_a_webhook_and_suppressed")
    scope: dict[str, Any] = {}
    exec(snippet.text, scope)
    verify = scope["verify"]
    for got in ok:
        assert verify(SECRET.encode(), got.headers["x-gateway-signature"], got.body)
    assert not verify(b"another secret", hard.headers["x-gateway-signature"], hard.body)
    assert not verify(SECRET.encode(), hard.headers["x-gateway-signature"], hard.body.replace(b"bounced", b"delivered"))
    stale = hard.headers["x-gateway-signature"].replace("t=", "t=1")  # a timestamp far from now
    assert not verify(SECRET.encode(), stale, hard.body)

    # The address is suppressed: the next RCPT is refused with the reason and the date.
    code, text = send(gw, "bounce-hard+x@example.com", "Again")
    assert code == 550 and text.startswith("5.1.1 <bounce-hard+x@example.com>: recipient suppressed: hard bounce (")
    # The operator takes it off the list; the next poll reads the bounce again (its window's overlap), and the
    # address stays off: an event read again suppresses nothing.
    service = gw.app.returnpath
    assert service is not None

    async def remove() -> int:
        removed = await service.returns.unsuppress("bounce-hard+x@example.com", "acme")
        service.suppressions.remove("bounce-hard+x@example.com", "acme")
        return removed

    assert gw.loop.run(remove()) == 1
    poller = service.pollers["acme"]
    wait_for(lambda: gw.loop.run(poller.poll()) == "ok", what="a whole poll (not busy with the running one)")
    assert send(gw, "bounce-hard+x@example.com", "After the removal")[0] == 250


def test_a_bounce_in_the_vendors_spanish_is_told_to_the_sender(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DMDS writes its bounces in Spanish. Before, the notice could not be made (UnicodeEncodeError in the
    delivery-status part): `failed` for good, the sender never told. The report the sandbox received, read with
    the email package: an ASCII Diagnostic-Code; the words whole in the HTML."""
    import base64
    import email
    from email import policy

    from gateway.providers import fates

    # Short enough not to be folded: a long one was folded into RFC 2047 encoded words (which RFC 3464 has
    # no place for), a short one raised.
    words = "550 5.1.1 Dirección inválida: buzón inexistente"
    monkeypatch.setitem(fates.DETAIL, "rebote-hard", words)
    gw = returning(gateway_factory, dict(FAST))
    code, text = send(gw, "bounce-hard+es@example.com", "Factura 8")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]

    def told() -> list[dict[str, Any]] | None:
        poll(gw)
        return notices(gw) or None

    [dsn] = wait_for(told, what="the notice of a bounce in Spanish")
    body = dsn["body"]
    assert body["contacto"]["email"] == "billing@acme.example"
    assert words in body["html"]
    [attachment] = body["adjuntos"]
    report = base64.b64decode(attachment["contenido"])
    per_message, per_recipient = (
        email.message_from_bytes(block, policy=policy.default) for block in report.strip().split(b"\r\n\r\n")
    )
    assert per_message["Reporting-MTA"]
    assert per_recipient["Final-Recipient"] == "rfc822; bounce-hard+es@example.com"
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "5.1.1")
    assert per_recipient["Diagnostic-Code"] == "X-Gateway; 550 5.1.1 Direccion invalida: buzon inexistente"
    [decision] = wait_for(lambda: decided(gw, eeid) or None, what="the decision")
    assert decision.kind == "dsn_sent"


def notices(gw: Running) -> list[dict[str, Any]]:
    """The notices the sandbox received (sends whose subject says so)."""
    return [
        r
        for r in gw.sent
        if str(r["body"].get("asunto", r["body"].get("content", {}).get("subject"))).startswith("Undelivered")
    ]


def decided(gw: Running, reply_id: str) -> list[Any]:
    return [e for e in record(gw, reply_id=reply_id).events if e.kind in ("dsn_sent", "dsn_skipped")]


def test_not_sent_and_dead_letters_tell_the_sender(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    gw = returning(gateway_factory, delivery)
    code, text = send(gw, "not-sent@example.com", "Statement")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]
    # DMDS said at once that it sent 0 of 1: recorded on the record, resolved when the events come.
    first = record(gw, reply_id=eeid)
    [attempt] = [e for e in first.events if e.kind == "attempt"]
    assert attempt.data is not None and attempt.data["sent"] == 0
    assert attempt.detail == "the upstream says it sent 0 mail(s) for 1 recipient(s)"

    def not_sent() -> Record | None:
        poll(gw)
        found = record(gw, reply_id=eeid)
        return found if found.state == "not_sent" else None

    wait_for(not_sent, what="Not-Sent read back")
    wait_for(lambda: decided(gw, eeid), what="the not-sent notice")
    [dsn] = notices(gw)
    assert "5.7.1" in dsn["body"]["html"] and "not-sent@example.com" in dsn["body"]["html"]

    # A message refused after its 250 (a dead letter): its sender is told too, with the upstream's words.
    gw.fault(status=503, count=1, kind="send")
    gw.fault(mode="err", reason="invalid email", count=1, kind="send")
    code, text = send(gw, "client@example.com", "Refused later")
    assert code == 250
    local = text.rsplit(" ", 1)[1]
    wait_for(lambda: decided(gw, local), what="the dead letter's notice")
    later = [n for n in notices(gw) if "client@example.com" in n["body"]["html"]]
    assert len(later) == 1 and "invalid email" in later[0]["body"]["html"] and "5.0.0" in later[0]["body"]["html"]


def test_no_notice_about_a_notice_nor_for_a_null_sender(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    gw = returning(gateway_factory, delivery)
    # The sender's own address bounces: the notice to it bounces in turn, and that makes no second notice.
    code, text = send(gw, "bounce-hard+r@example.com", "Loop", sender="bounce-hard+s@acme.example")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]

    def notice_bounced() -> Record | None:
        poll(gw)
        sent = [e for e in decided(gw, eeid) if e.kind == "dsn_sent"]
        if not sent or not sent[0].data:
            return None
        found = record(gw, reply_id=sent[0].data["notice"])
        return found if found.state == "bounced" and decided(gw, found.reply_id or "") else None

    loop = wait_for(notice_bounced, what="the notice's own bounce decided")
    [skipped] = decided(gw, loop.reply_id or "")
    assert skipped.kind == "dsn_skipped" and skipped.data is not None and skipped.data["result"] == "notice"
    assert len(notices(gw)) == 1

    # A record with a null sender (the gateway refuses MAIL FROM:<> itself; such a record comes from
    # elsewhere): its failure is decided, and nobody is told.
    from gateway.ledger.model import MessageRow, NoticeRow, RecipientRow

    assert gw.app.ledger is not None
    now = __import__("time").time()
    gw.loop.run(
        gw.app.ledger.write(
            [
                MessageRow("0123456789ABCDEF", now, "acme", "", "Bounce", 10, reply_id="NULL-SENDER"),
                RecipientRow("0123456789ABCDEF", now, "x@example.com", "bounced", now, "E-NULL"),
                NoticeRow("0123456789ABCDEF", now, "x@example.com", now),
            ]
        )
    )
    [null] = wait_for(lambda: decided(gw, "NULL-SENDER"), what="the null sender's decision")
    assert null.data is not None and null.data["result"] == "null_sender" and len(notices(gw)) == 1


def test_one_notice_and_one_delivery_per_event_with_two_instances(
    gateway_factory: Callable[..., Running], pg_cluster: Any, receiver: Receiver
) -> None:
    delivery = {**FAST, "queue_url": pg_cluster.new_database()}
    a = returning(gateway_factory, delivery, receiver)
    b = returning(gateway_factory, delivery, receiver, sandbox=a.sandbox)
    codes = [send(gw, f"bounce-hard+{n}@example.com", f"Twice {n}")[0] for n, gw in enumerate((a, b, a, b))]
    assert codes == [250] * 4

    def about_ours() -> set[str]:
        """The events about the four messages (the notices' own `sent` events come too)."""
        return {r.json["id"] for r in receiver.accepted() if r.json["message"]["subject"].startswith("Twice")}

    def all_told() -> bool:
        for gw in (a, b):
            poll(gw)  # both instances poll, over and over: each window is read by one of them at a time
        return len(notices(a)) >= 4 and len(about_ours()) >= 8

    wait_for(all_told, what="four notices and eight events delivered")
    for gw in (a, b):
        poll(gw)
    assert len(notices(a)) == 4
    for n in range(4):  # one notice per bounced recipient, each about that recipient alone
        assert len([x for x in notices(a) if f"bounce-hard+{n}@" in x["body"]["html"]]) == 1
    ids = [r.json["id"] for r in receiver.accepted()]
    assert len(ids) == len(set(ids)) and len(about_ours()) == 8  # each once; sent + bounced for each of the four


def test_dengage_events_are_read_from_its_report_by_the_gateways_tag(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    from tests.harness import DENGAGE_SENDER, DENGAGE_USER

    gw = returning(
        gateway_factory, delivery, dengage={"events": {**EVENTS, "page_size": 100}, "dsn": {"notify": "sender"}}
    )

    def send_dengage(to: str, subject: str) -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=30) as client:
            client.login(DENGAGE_USER, PASSWORD)
            client.mail(DENGAGE_SENDER)
            code, text = client.rcpt(to)
            if code != 250:
                return code, text.decode()
            head = f"From: {DENGAGE_SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nhello\r\n"
            code, text = client.data(head.encode())
        return code, text.decode()

    code, bounce_id = send_dengage("bounce-hard@example.com", "Your order")
    assert code == 250
    code, delivered_id = send_dengage("someone@example.com", "Your receipt")
    assert code == 250
    [first] = gw.calls("send")[:1]
    assert first["body"]["tags"] == ["erp", "smtp-gateway"]  # the login's tag, then the report's

    def settled() -> bool:
        poll(gw)
        states = {record(gw, reply_id=i.rsplit(" ", 1)[1]).state for i in (bounce_id, delivered_id)}
        return states == {"bounced", "delivered"}

    wait_for(settled, what="dEngage's report read back")
    [report, *_] = gw.calls("report")
    assert report["query"]["tag"] == "smtp-gateway" and report["query"]["limit"] == "100"
    assert len(report["query"]["beginTime"]) == len("2026-01-01 00:00:00")

    def told() -> list[dict[str, Any]]:
        return [s for s in gw.calls("send") if s["body"]["content"].get("subject", "").startswith("Undelivered")]

    [dsn] = wait_for(told, what="the notice through dEngage")
    assert dsn["body"]["send"]["to"] == DENGAGE_SENDER
    assert "bounce-hard@example.com" in dsn["body"]["content"]["html"]
    assert [a["name"] for a in dsn["body"]["attachments"]] == ["delivery-status.txt"]
    assert dsn["body"]["tags"] == ["erp", "smtp-gateway"]  # the message's tags; its own report entries are ours
    code, text = send_dengage("bounce-hard@example.com", "Again")
    assert code == 550 and "recipient suppressed: hard bounce" in text


def test_dmds_invalid_contacts_are_suppressed_minus_the_whitelist(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    import httpx

    gw = returning(gateway_factory, delivery, events={"invalid_interval": 0.2})
    base = gw.sandbox_url
    # DMDS holds two contacts invalid (earlier hard bounces of another system), one of them whitelisted.
    fates = gw.sandbox.state.fates
    httpx.post(
        f"{base}/v1/whitelist/vip@example.com", headers={"Authorization": "test-account-apikey"}
    ).raise_for_status()
    fates.invalid.update({"old-bounce@example.com": 1.0, "vip@example.com": 1.0})

    def listed() -> str | None:
        code, text = send(gw, "old-bounce@example.com", "Hello")
        return text if code == 550 else None

    text = wait_for(listed, what="the invalid contact suppressed")
    assert "recipient suppressed: invalid contact at the upstream" in text
    assert send(gw, "vip@example.com", "Hello")[0] == 250  # whitelisted: never suppressed
    # A hard bounce of a whitelisted contact is recorded, and not suppressed either.
    httpx.post(f"{base}/v1/whitelist/bounce-hard+vip@example.com", headers={"Authorization": "test-account-apikey"})
    code, text = send(gw, "bounce-hard+vip@example.com", "Whitelisted")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]

    def bounced() -> Record | None:
        poll(gw)
        found = record(gw, reply_id=eeid)
        return found if found.state == "bounced" else None

    wait_for(bounced, what="the whitelisted bounce read back")
    assert send(gw, "bounce-hard+vip@example.com", "Again")[0] == 250
    # DMDS revalidates the old contact: it leaves the list at the next read, and mail to it is taken again.
    fates.invalid.pop("old-bounce@example.com")
    wait_for(lambda: send(gw, "old-bounce@example.com", "Back")[0] == 250, what="the contact revalidated")


def test_dmds_revalidation_lifts_what_its_not_sent_made(
    gateway_factory: Callable[..., Running], delivery: dict[str, Any]
) -> None:
    """A contact sent to before the next read of DMDS' list is suppressed by its `Not-Sent` (source not_sent):
    once DMDS revalidates it, the next read of the list lifts that entry too; a contact still listed keeps it."""
    gw = returning(gateway_factory, delivery, events={"invalid_interval": 0.2})
    service = gw.app.returnpath
    assert service is not None
    gw.sandbox.state.fates.invalid["still-invalid@example.com"] = 1.0
    made = time.time()
    rows = [
        SuppressionRow("acme", a, SUPPRESSES[source], source, made)
        for a, source in (
            ("revalidated@example.com", "not_sent"),
            ("still-invalid@example.com", "not_sent"),
            ("invalidated@example.com", "invalidated"),  # DMDS' invalidation event, read back
        )
    ]

    async def suppressed() -> None:  # as the poller writes a Not-Sent's entry
        await service.returns.suppress(rows)
        service.suppressions.add(Suppressed.of(r) for r in rows)

    gw.loop.run(suppressed())
    wait_for(lambda: send(gw, "revalidated@example.com", "Back")[0] == 250, what="the entry lifted")
    assert send(gw, "invalidated@example.com", "Back too")[0] == 250
    code, text = send(gw, "still-invalid@example.com", "Still")
    assert code == 550 and "the upstream did not send to it (invalid contact)" in text
    entries = gw.loop.run(service.returns.suppressions("acme"))
    assert [(e.address, e.source) for e in entries] == [("still-invalid@example.com", "not_sent")]


def test_the_sandbox_takes_fates_from_its_endpoint(gateway_factory: Callable[..., Running]) -> None:
    """docs/sandbox.md's request: an ordinary address told to bounce hard, through the real endpoint."""
    import shlex
    import subprocess

    gw = returning(gateway_factory, dict(FAST))
    [block] = doc_blocks("test_the_sandbox_takes_fates_from_its_endpoint")
    command = block.text.strip().replace("localhost:8025", f"127.0.0.1:{gw.sandbox.port}")
    answer = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(answer.stdout)["fates"] == {"boss@example.com": "bounce-hard"}
    code, text = send(gw, "boss@example.com", "For the boss")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]

    def bounced() -> Record | None:
        poll(gw)
        found = record(gw, reply_id=eeid)
        return found if found.state == "bounced" else None

    wait_for(bounced, what="the chosen fate read back")
    refused = subprocess.run(
        ["curl", "-s", "-X", "POST", f"{gw.sandbox_url}/_sandbox/fate", "-d", '{"address": "x", "fate": "deliver"}'],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(refused.stdout) == {"status": "err", "on": "address: an email address"}


def test_a_reload_turns_polling_and_webhooks_on_and_off(
    gateway_factory: Callable[..., Running], receiver: Receiver
) -> None:
    from gateway.config import load_settings
    from tests.configs import gateway_config

    gw = gateway_factory(delivery=dict(FAST), return_path={"poll_interval": 0.1})
    assert gw.app.returnpath is not None and gw.app.returnpath.pollers == {}

    def reload(**overrides: Any) -> None:
        new = load_settings(None, **gateway_config(gw.tmp, gw.sandbox.port, delivery=dict(FAST), **overrides))
        gw.app.source = lambda: new
        assert gw.loop.run(gw.app.reload())

    hook = {"name": "app", "url": receiver.url, "secret": SECRET, "backoff": 0.05}
    reload(accounts={"acme": {"events": EVENTS}}, webhooks=[hook], return_path={"poll_interval": 0.1})
    assert list(gw.app.returnpath.pollers) == ["acme"]
    code, text = send(gw, "bounce-hard@example.com", "After the reload")
    eeid = text.rsplit(" ", 1)[1]

    def announced() -> list[Any]:
        poll(gw)
        return [r for r in receiver.accepted() if r.json["type"] == "bounced"]

    assert code == 250 and wait_for(announced, what="the new webhook told")[0].json["upstream"]["id"] == eeid
    reload(return_path={"poll_interval": 0.1})
    assert gw.app.returnpath.pollers == {} and not gw.app.returnpath.subscriptions
