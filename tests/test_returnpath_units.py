"""The return path's own rules, on a real SQLite ledger, without a gateway: readback's decisions against the
ledger's upsert, a page with an unreadable time, a webhook that cannot be requested, retention of what is still
pending, the notice count, the providers' unrecognised event pages."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from gateway.config import EventSettings
from gateway.config.returnpath import WebhookSettings
from gateway.core.errors import AnswerTooLarge, Deferred, Rejected
from gateway.core.events import EventPage, VendorEvent
from gateway.core.model import Call, Submission
from gateway.core.outcome import Outcome
from gateway.ledger.announce import Subscriptions
from gateway.ledger.backends import open_returns
from gateway.ledger.model import RANK, MessageRow, RecipientRow, replaces
from gateway.ledger.returns import Lease
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.sqlite_returns import SqliteReturns
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.providers.dmds import eventwire
from gateway.returnpath.notices import NoticeSender
from gateway.returnpath.poller import Context, EventPoller
from gateway.upstream.response import HttpResponse

T0 = 1_796_544_000.0


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class ListSource:
    """An EventSource over a list of events the test fills (one page per window)."""

    max_window = 86400.0

    def __init__(self) -> None:
        self.events: list[VendorEvent] = []

    async def page(self, since: float, until: float, number: int) -> EventPage:
        return EventPage([e for e in self.events if since <= e.at < until], more=False)


class DmdsRowsSource:
    """An EventSource answering each page with DMDS ver_eventos JSON rows, read by the real eventwire reader."""

    max_window = 86400.0

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows

    async def page(self, since: float, until: float, number: int) -> EventPage:
        # Every row on the first page and none after, as DMDS answers: a window is read until an empty page.
        body = orjson.dumps({"status": "ok", "eventos": self.rows if number == 0 else []})
        return eventwire.read_events(HttpResponse(200, body, {}), "acme", UTC, 100, number)


async def _ledger(tmp_path: Path) -> SqliteLedger:
    ledger = SqliteLedger(tmp_path / "queue.sqlite3")
    await ledger.open()
    return ledger


async def _sent(ledger: SqliteLedger, msg_id: str, address: str, upstream_id: str, created: float) -> None:
    await ledger.write(
        [
            MessageRow(msg_id, created, "acme", "billing@acme.example", "Invoice", 100, login="scanner"),
            RecipientRow(msg_id, created, address, "sent", created + 1, upstream_id=upstream_id),
        ]
    )


def _poller(ledger: SqliteLedger, source: object, clock: Clock, hooks: Subscriptions) -> EventPoller:
    ctx = Context(open_returns(ledger), "gw-a", lambda: hooks, SuppressionSet(), clock=clock)
    settings = EventSettings(enabled=True)
    return EventPoller("acme", source, None, lambda: settings, lambda: True, ctx)  # type: ignore[arg-type]


def _select(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


# -- readback decides as the ledger's upsert does -----------------------------------------------------------


@pytest.mark.asyncio
async def test_readbacks_rule_is_the_ledgers_upsert_over_every_pair_of_states(tmp_path: Path) -> None:
    """model.replaces (what readback tells) and sql._recipient_conflict (what the ledger keeps) over one table:
    every pair of states, the incoming row older, as old and newer."""
    ledger = await _ledger(tmp_path)
    try:
        cases = list(itertools.product(RANK, RANK, (-1.0, 0.0, 1.0)))
        for n, (old, new, delta) in enumerate(cases):
            msg = f"M{n}"
            await ledger.write(
                [
                    MessageRow(msg, T0, "acme", "billing@acme.example", "Invoice", 100),
                    RecipientRow(msg, T0, "a@example.net", old, T0 + 10, reason="old"),  # type: ignore[arg-type]
                ]
            )
            new_row = RecipientRow(msg, T0, "a@example.net", new, T0 + 10 + delta, reason="new")  # type: ignore[arg-type]
            await ledger.write([new_row])
        kept = dict(_select(tmp_path, "SELECT msg_id, reason FROM ledger_recipients"))
        wrong = [
            (old, new, delta, kept[f"M{n}"])
            for n, (old, new, delta) in enumerate(cases)
            if (kept[f"M{n}"] == "new") != replaces(new, T0 + 10 + delta, old, T0 + 10)
        ]
        assert len(cases) == len(RANK) ** 2 * 3
        assert wrong == []
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_webhook_state_is_the_recipients_state_after_an_out_of_order_event(tmp_path: Path) -> None:
    """docs/after-250.md#webhooks: `state` is the recipient's state after the event. A dEngage Delivered stamped
    before a Bounced already applied (read later) leaves the recipient bounced, and its webhook says so."""
    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        hook = WebhookSettings(name="crm", url="http://127.0.0.1:9/h", secret="s")
        clock, source = Clock(T0), ListSource()
        poller = _poller(ledger, source, clock, Subscriptions([hook]))
        assert await poller.poll() == "ok"  # the cursor starts now
        source.events = [VendorEvent("ev-bounce", "bounced", "Bounced", "a@example.net", T0 + 30, "TX1", "550 5.1.1")]
        clock.t = T0 + 200
        assert await poller.poll() == "ok"
        source.events.append(VendorEvent("ev-deliv", "delivered", "Delivered", "a@example.net", T0 + 10, "TX1"))
        clock.t = T0 + 400
        assert await poller.poll() == "ok"
        record = await ledger.get("M1")
        assert record is not None
        [rcpt] = record.recipients
        assert rcpt.state == "bounced"
        bodies = {r[0]: json.loads(str(r[1])) for r in _select(tmp_path, "SELECT event_id, body FROM webhook_outbox")}
        assert bodies["ev-bounce"]["state"] == "bounced"
        assert bodies["ev-deliv"]["state"] == "bounced"
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_events_of_one_recipient_in_one_page_are_decided_in_turn_and_a_losing_bounce_tells_no_one(
    tmp_path: Path,
) -> None:
    """In one page: a Delivered then an older Bounced (it loses: no notice, its webhook says delivered); for
    another recipient a Bounced then a newer Delivered (each webhook says the state after its own event)."""
    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await _sent(ledger, "M2", "b@example.net", "TX2", T0 - 600)
        hook = WebhookSettings(name="crm", url="http://127.0.0.1:9/h", secret="s")
        clock, source = Clock(T0), ListSource()
        poller = _poller(ledger, source, clock, Subscriptions([hook]))
        assert await poller.poll() == "ok"
        source.events = [
            VendorEvent("a-deliv", "delivered", "Delivered", "a@example.net", T0 + 20, "TX1"),
            VendorEvent("a-bounce", "bounced", "Bounced", "a@example.net", T0 + 10, "TX1", "550 5.1.1"),
            VendorEvent("b-bounce", "bounced", "Bounced", "b@example.net", T0 + 10, "TX2", "550 5.1.1"),
            VendorEvent("b-deliv", "delivered", "Delivered", "b@example.net", T0 + 20, "TX2"),
        ]
        clock.t = T0 + 200
        assert await poller.poll() == "ok"
        states = dict(_select(tmp_path, "SELECT msg_id, state FROM ledger_recipients"))
        assert states == {"M1": "delivered", "M2": "delivered"}
        bodies = {r[0]: json.loads(str(r[1])) for r in _select(tmp_path, "SELECT event_id, body FROM webhook_outbox")}
        told = {k: v["state"] for k, v in bodies.items()}
        assert told == {"a-deliv": "delivered", "a-bounce": "delivered", "b-bounce": "bounced", "b-deliv": "delivered"}
        # M2's bounce won when it was read (its notice decides against the ledger's state later); M1's lost.
        assert [r[0] for r in _select(tmp_path, "SELECT msg_id FROM ledger_notices")] == ["M2"]
    finally:
        await ledger.close()


# -- an unreadable time is one unreadable row --------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [1_796_544_030_000_000, "1796544030000000", "0001-01-01T00:00:00+03:00", "9999-12-31T23:59:59-05:00", 10**400],
    ids=["epoch-us", "epoch-us-text", "year-1-east", "year-9999-west", "huge-int"],
)
def test_a_time_no_date_can_hold_is_no_time(value: object) -> None:
    from gateway.core.events import vendor_time

    assert vendor_time(value, UTC) is None


@pytest.mark.asyncio
async def test_one_event_with_an_out_of_range_time_does_not_stall_the_accounts_events(tmp_path: Path) -> None:
    """One matched DMDS row stamped in epoch microseconds (read as ms: 1.8e12 s, beyond any date) is one
    unreadable row: the hard bounce in the same page is recorded and the cursor moves on."""
    from gateway.ops.metrics import EVENTS_UNREADABLE

    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "E1", T0 - 600)
        await _sent(ledger, "M2", "b@example.net", "E2", T0 - 600)
        rows: list[dict[str, object]] = [
            {"evento": "rebote-hard", "email": "a@example.net", "timestamp": "2026-12-06 08:00:30", "eeid": "E1"},
            {"evento": "view", "email": "b@example.net", "timestamp": 1_796_544_030_000_000, "eeid": "E2"},
        ]
        before = EVENTS_UNREADABLE.labels(account="acme")._value.get()
        clock = Clock(T0)
        poller = _poller(ledger, DmdsRowsSource(rows), clock, Subscriptions())
        await poller.poll()
        results = []
        for step in (1, 2, 3):
            clock.t = T0 + 200 * step
            results.append(await poller.poll())
        record = await ledger.get("M1")
        assert record is not None
        assert results == ["ok", "ok", "ok"]
        assert record.recipients[0].state == "bounced"
        assert EVENTS_UNREADABLE.labels(account="acme")._value.get() > before
    finally:
        await ledger.close()


# -- a webhook delivery that raises is one failed attempt --------------------------------------------------


def test_http_webhook_urls_go_only_to_loopback() -> None:
    for url in ("http://127.0.0.1:8080/h", "http://127.1.2.3/h", "http://localhost/h", "http://[::1]/h"):
        WebhookSettings(name="crm", url=url, secret="s")


@pytest.mark.asyncio
async def test_a_webhook_whose_url_cannot_be_requested_fails_for_good_after_max_age(tmp_path: Path) -> None:
    """A URL the HTTP client refuses at each POST (a port out of range: config refuses it now, built here as if
    it had not) raises outside the errors a delivery expects: each round is one failed attempt of that
    delivery (counted, the traceback logged once), never a lease left to expire, and max_age ends it."""
    from pydantic import SecretStr

    from gateway.ledger.model import OutboxRow
    from gateway.ops.metrics import WEBHOOK_DUPLICATES, WEBHOOK_FAILED
    from gateway.returnpath.webhooks import WebhookSender
    from gateway.upstream.client import HttpClient

    ledger = await _ledger(tmp_path)
    http = HttpClient("", upstream="webhook", account="webhooks", timeout=30.0)
    try:
        await _sent(ledger, "M1", "a@example.net", "TX1", T0 - 600)
        await ledger.write([OutboxRow("crm", "ev1", "M1", T0 - 600, T0, "bounced", '{"id": "ev1"}')])
        good = WebhookSettings(name="crm", url="https://hooks.example/h", secret="s", max_age=150, timeout=1, backoff=1)
        hook = good.model_copy(update={"url": "https://hooks.example:99999/h", "secret": SecretStr("s")})
        duplicates = WEBHOOK_DUPLICATES.labels(webhook="crm", cause="lease_expired")._value.get()
        internal = WEBHOOK_FAILED.labels(webhook="crm", reason="internal")._value.get()
        clock = Clock(T0)
        sender = WebhookSender(open_returns(ledger), http, "gw-a", lambda: {"crm": hook}, clock=clock)
        for step in range(4):
            clock.t = T0 + step * 100.0
            await sender.round()  # raises nothing
        [(state, attempts)] = _select(tmp_path, "SELECT state, attempts FROM webhook_outbox")
        assert (state, attempts) == ("failed", 3)  # at T0, T0+100, and T0+200 (past max_age)
        assert WEBHOOK_FAILED.labels(webhook="crm", reason="internal")._value.get() == internal + 3
        assert WEBHOOK_DUPLICATES.labels(webhook="crm", cause="lease_expired")._value.get() == duplicates
    finally:
        await http.aclose()
        await ledger.close()


# -- retention keeps what is still pending -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_retention_keeps_a_message_whose_webhook_delivery_or_notice_is_pending(tmp_path: Path) -> None:
    """A delivery still pending (its receiver down, well inside max_age) and a notice still to decide keep
    their message past its retention; once settled, the next prune takes it."""
    from gateway.ledger import retention
    from gateway.ledger.model import NoticeRow, OutboxRow

    ledger = await _ledger(tmp_path)
    try:
        day = 86400.0
        old = T0 - 7 * day + 60
        for msg in ("M1", "M2", "M3"):
            await _sent(ledger, msg, "a@example.net", f"TX-{msg}", old)
        await ledger.write([OutboxRow("crm", "ev1", "M1", old, T0 - 60, "bounced", '{"id": "ev1"}')])
        await ledger.write([NoticeRow("M2", old, "a@example.net", T0 - 60)])
        assert await retention.prune(ledger, 7 * day, T0 + 120) == 1  # M3 only
        assert _select(tmp_path, "SELECT msg_id, state FROM webhook_outbox") == [("M1", "pending")]
        assert _select(tmp_path, "SELECT msg_id, state FROM ledger_notices") == [("M2", "pending")]
        assert sorted(r[0] for r in _select(tmp_path, "SELECT id FROM ledger_messages")) == ["M1", "M2"]
        db = sqlite3.connect(tmp_path / "queue.sqlite3")
        db.execute("UPDATE webhook_outbox SET state = 'failed'")
        db.execute("UPDATE ledger_notices SET state = 'sent'")
        db.commit()
        db.close()
        assert await retention.prune(ledger, 7 * day, T0 + 180) == 2
    finally:
        await ledger.close()


# -- a notice the queue could not take does not use up the sender's count -----------------------------------


class BusyOwner:
    """A delivery owner answering every notice 451 (the queue busy), until told to take them."""

    def __init__(self) -> None:
        self.taking = False
        self.submitted = 0

    async def submit(self, *args: object, **kwargs: object) -> object:
        from gateway.core.replies import Reply

        self.submitted += 1
        if self.taking:
            return Reply(250, "2.0.0", f"queued as N{self.submitted}")
        return Reply(451, "4.3.1", "the queue is busy, try again later")


async def _notice_sender(
    tmp_path: Path,
    owner: object,
    clock: Clock,
    messages: list[str],
    address: str = "a@example.net",
    reason: str = "550 5.1.1 unknown",
) -> tuple[NoticeSender, SqliteLedger]:
    """A NoticeSender over a SQLite ledger holding, for each of `messages`, one bounced recipient (`address`,
    the vendor's words `reason`) whose sender is to be told (per_sender 1); returns it and the ledger (to
    close)."""
    from gateway.config import load_settings
    from gateway.ledger.model import NoticeRow
    from gateway.ledger.notice import NoticeData
    from gateway.providers import registry
    from tests.configs import gateway_config

    settings = load_settings(
        None,
        **gateway_config(tmp_path, listeners=[], accounts={"acme": {"dsn": {"notify": "sender", "per_sender": 1}}}),
    )
    provider = registry.build("acme", settings.accounts["acme"])
    ledger = await _ledger(tmp_path)
    created = T0 - 600
    for n, msg_id in enumerate(messages):
        notice = NoticeData(to=f"billing{n}@acme.example", login="scanner", params={"campaign": 22}).to_json()
        await ledger.write(
            [
                MessageRow(
                    msg_id, created, "acme", "billing@acme.example", "Invoice", 100, login="scanner", notice=notice
                ),
                RecipientRow(msg_id, created, address, "bounced", T0 - 60, reason=reason),
                NoticeRow(msg_id, created, address, T0 - 60),
            ]
        )
    sender = NoticeSender(
        open_returns(ledger),
        owner,  # type: ignore[arg-type]
        lambda: {"acme": provider},
        lambda: settings,
        SuppressionSet(),
        actor="gw-a",
        clock=clock,
    )
    return sender, ledger


@pytest.mark.asyncio
async def test_a_notice_put_off_by_a_busy_queue_keeps_the_senders_count(tmp_path: Path) -> None:
    """per_sender is 1: a notice answered 4xx several times (each retried a minute later) is still sent once
    the queue takes it, instead of ending skipped/rate_limited after the first retry."""
    from gateway.returnpath.notices import RETRY_LATER

    owner, clock = BusyOwner(), Clock(T0)
    sender, ledger = await _notice_sender(tmp_path, owner, clock, ["M1"])
    try:
        for step in range(3):
            clock.t = T0 + step * (RETRY_LATER + 1)
            assert await sender.round() == 1
        assert owner.submitted == 3
        [(state,)] = _select(tmp_path, "SELECT state FROM ledger_notices")
        assert state not in ("skipped", "sent", "failed")  # put off, still to decide
        owner.taking = True
        clock.t = T0 + 3 * (RETRY_LATER + 1)
        assert await sender.round() == 1
        assert _select(tmp_path, "SELECT state, notice_id FROM ledger_notices") == [("sent", "N4")]
    finally:
        await ledger.close()


class BuggyOwner:
    """A delivery owner that raises (a bug) for the first notice it is given and takes the others."""

    def __init__(self) -> None:
        self.submitted = 0

    async def submit(self, *args: object, **kwargs: object) -> object:
        from gateway.core.replies import Reply

        self.submitted += 1
        if self.submitted == 1:
            raise RuntimeError("a bug in the delivery owner")
        return Reply(250, "2.0.0", f"queued as N{self.submitted}")


@pytest.mark.asyncio
async def test_a_bug_with_one_notice_fails_it_and_the_others_claimed_with_it_go(tmp_path: Path) -> None:
    """Before, the exception ended the round: every notice claimed with it waited for its lease, and the
    notice came back first in the next batch at every lease, for ever."""
    from structlog.testing import capture_logs

    from gateway.ops.metrics import INTERNAL_ERRORS

    owner = BuggyOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(T0), ["M1", "M2", "M3"])
    bugs = INTERNAL_ERRORS.labels(where="notices")._value.get()
    try:
        with capture_logs() as logs:
            assert await sender.round() == 3
        states = _select(tmp_path, "SELECT state FROM ledger_notices")
        assert sorted(state for (state,) in states) == ["failed", "sent", "sent"]
        assert owner.submitted == 3
        assert INTERNAL_ERRORS.labels(where="notices")._value.get() == bugs + 1
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["notice_internal_error"]
    finally:
        await ledger.close()


class TakingOwner:
    """A delivery owner taking every notice, keeping what it was given."""

    def __init__(self) -> None:
        self.submissions: list[Submission] = []

    async def submit(self, submission: Submission, *args: object, **kwargs: object) -> object:
        from gateway.core.replies import Reply

        self.submissions.append(submission)
        return Reply(250, "2.0.0", f"queued as N{len(self.submissions)}")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("address", "reason", "final_recipient", "diagnostic"),
    [
        # DMDS answers in Spanish: its words are the recipient's reason.
        (
            "jose@example.net",
            "Dirección de correo inválida: buzón inexistente",
            "rfc822; jose@example.net",
            "X-Gateway; Direccion de correo invalida: buzon inexistente",
        ),
        # An SMTPUTF8 recipient: RFC 6533's utf-8 address type, xtext form.
        (
            "josé@exämple.net",
            "550 5.1.1 user unknown",
            "utf-8; jos\\x{E9}@ex\\x{E4}mple.net",
            "X-Gateway; 550 5.1.1 user unknown",
        ),
    ],
)
async def test_a_notice_with_non_ascii_words_or_recipient_is_sent(
    tmp_path: Path, address: str, reason: str, final_recipient: str, diagnostic: str
) -> None:
    """Before, dsn.build raised UnicodeEncodeError: the notice `failed` for good as an internal error and the
    sender was never told. The delivery-status part the upstream gets, read with the email package."""
    import email
    from email import policy

    owner = TakingOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(T0), ["M1"], address, reason)
    try:
        assert await sender.round() == 1
        assert _select(tmp_path, "SELECT state, notice_id FROM ledger_notices") == [("sent", "N1")]
        [submission] = owner.submissions
        [report] = submission.message.attachments
        assert (report.filename, report.content_type) == ("delivery-status.txt", "message/delivery-status")
        per_message, per_recipient = (
            email.message_from_bytes(block, policy=policy.default)
            for block in report.decoded().strip().split(b"\r\n\r\n")
        )
        assert per_message["Reporting-MTA"]
        assert per_recipient["Final-Recipient"] == final_recipient
        assert " ".join(per_recipient["Diagnostic-Code"].split()) == diagnostic
        assert address in submission.message.html and reason in submission.message.html
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_notice_that_cannot_be_made_takes_nothing_from_the_senders_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """per_sender is 1: a notice failed by a bug while it was made leaves the count as it was, so the
    sender's next notice goes."""
    from gateway.ledger import dsn

    def broken(**kwargs: object) -> bytes:
        raise RuntimeError("a bug in the notice's making")

    monkeypatch.setattr(dsn, "build", broken)
    sender, ledger = await _notice_sender(tmp_path, TakingOwner(), Clock(T0), ["M1"])
    try:
        assert await sender.round() == 1
        assert _select(tmp_path, "SELECT state FROM ledger_notices") == [("failed",)]
        assert _select(tmp_path, "SELECT n FROM notice_counts") in ([], [(0,)])
    finally:
        await ledger.close()


class RefusingAfterAcceptance:
    """A Deliverer of one call: the inline attempt is deferred (the message is queued), every later one
    refused for good (a dead letter, whose sender is told)."""

    account = "acme"

    def __init__(self) -> None:
        self.attempts = 0

    def plan(self, submission: Submission) -> tuple[Call, ...]:
        return (Call("0", submission.rcpt_tos),)

    def requests(self, submission: Submission, *, bodies: bool = True) -> list[dict[str, object]]:
        return []

    async def deliver(self, submission: Submission, done: object, before_send: object = None) -> Outcome:
        self.attempts += 1
        outcome = Outcome()
        if self.attempts == 1:
            outcome.defer("0", Deferred("503 try later"))
        else:
            outcome.reject("0", Rejected("550 5.1.1 unknown"))
        return outcome


HEADERS = "From: Billing <billing@acme.example>\r\nTo: a@example.net\r\nSubject: Invoice 7\r\nX-Ref: inv-7\r\n"


async def _accepted_by_a_dead_instance(
    tmp_path: Path, msg_id_rows: list[object], kept: bool, notify: str | None = "billing@acme.example"
) -> str:
    """A message accepted (250) by instance A, which dies before writing its ledger record (its recorder
    writes nothing), then claimed by instance B, whose attempt dead-letters it: B's rows (the record rebuilt
    from the queue) go into the ledger. `kept` False: the queue row holds no notice data (a row stored before
    the queue kept it). `notify`: whom A's pipeline names (notice.target: None for notify = off). Returns the
    message's id."""
    from gateway.config import DeliverySettings
    from gateway.core.model import Address, Message, Origin, Principal, StoredData
    from gateway.delivery.health import AccountHealth
    from gateway.delivery.owner import DeliveryOwner
    from gateway.ledger.recorder import Recorder
    from gateway.queue.sqlite import SqliteQueue

    path = tmp_path / "queue.sqlite3"
    store = SqliteQueue(path)
    settings = DeliverySettings(spool_path=path, retry_schedule=[3600.0], retry_jitter=0.0)
    provider = RefusingAfterAcceptance()
    submission = Submission(
        principal=Principal("acme", "scanner", extra=StoredData({"campaign": 22})),
        mail_from="billing@acme.example",
        rcpt_tos=("a@example.net",),
        message=Message(
            subject="Invoice 7",
            from_=Address("billing@acme.example", "Billing"),
            sender=None,
            reply_to=None,
            to=(Address("a@example.net"),),
            cc=(),
            html="<p>invoice</p>",
            text=None,
            attachments=(),
            message_id="<inv-7@acme.example>",
        ),
        params=StoredData({"campaign": 22}),
    )
    origin = Origin(listener="plain", peer="127.0.0.1:1", size=300, notify=notify, headers=HEADERS)
    try:
        await store.open()
        accepting = DeliveryOwner({"acme": provider}, store, settings, AccountHealth(["acme"]), owner="a")
        reply = await accepting.submit(submission, provider.plan(submission), structlog.get_logger(), origin=origin)
        assert reply.code == 250
        msg_id = reply.text.rsplit(" ", 1)[-1]
        if not kept:
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("UPDATE messages SET notice = NULL")
                db.commit()
        rows: list[object] = []
        claiming = DeliveryOwner(
            {"acme": provider},
            store,
            settings,
            AccountHealth(["acme"]),
            owner="b",
            ledger=Recorder(rows.extend, "b"),
        )
        [item] = await store.claim("b", "acme", time.time() + 7200, 1, lease=60)
        await claiming.run_claimed(item)
        msg_id_rows += rows
        return msg_id
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_message_whose_accepting_instance_died_before_its_record_still_gets_its_notice(
    tmp_path: Path,
) -> None:
    """A message whose accepting instance died after its 250 and before writing its ledger record: the
    claiming instance writes the record from what the queue holds, and the queue keeps, with the message,
    whom to tell and the header block (notice.queued). Its dead letter is told to its sender, quoting its
    headers, as if the accepting instance had written the record; before, it was skipped as `rebuilt`."""
    from gateway.ops.metrics import NOTICES

    rows: list[object] = []
    msg_id = await _accepted_by_a_dead_instance(tmp_path, rows, kept=True)
    owner = TakingOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(time.time() + 60), [])
    sent = NOTICES.labels(account="acme", result="sent")._value.get()
    try:
        await ledger.write(rows)  # type: ignore[arg-type]
        record = await ledger.get(msg_id)
        assert record is not None and record.reply is None and record.listener is None  # rebuilt: not A's
        assert await sender.round() == 1
        [(state, reason)] = _select(tmp_path, "SELECT state, reason FROM ledger_notices")
        assert state == "sent", reason
        assert NOTICES.labels(account="acme", result="sent")._value.get() == sent + 1
        [notice] = owner.submissions
        assert notice.rcpt_tos == ("billing@acme.example",) and notice.mail_from == ""
        assert (notice.principal.account, notice.principal.login) == ("acme", "scanner")
        # The header block as received, quoted (the parsed notice's text holds its text/rfc822-headers part).
        assert notice.message.text is not None
        assert HEADERS.replace("\r\n", "\n") in notice.message.text.replace("\r\n", "\n")
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_record_rebuilt_from_a_queue_row_stored_before_notices_were_kept_is_skipped_as_rebuilt(
    tmp_path: Path,
) -> None:
    """A queue row stored before the queue kept notice data (the column NULL: an older version accepted it):
    the record rebuilt from it has none, and its bounce tells nobody, as `rebuilt`, not `notify_off` (a false
    claim that nobody was to be told). A record written on acceptance (a reply) without notice data is
    notify = off."""
    from gateway.ledger.model import NoticeRow
    from gateway.ops.metrics import NOTICES

    rows: list[object] = []
    msg_id = await _accepted_by_a_dead_instance(tmp_path, rows, kept=False)
    sender, ledger = await _notice_sender(tmp_path, TakingOwner(), Clock(time.time() + 60), [])
    created = T0 - 600
    rows += [
        MessageRow("OFF", created, "acme", "billing@acme.example", "Invoice", 100, login="scanner", reply="250 ok"),
        RecipientRow("OFF", created, "a@example.net", "bounced", T0 - 60, reason="550 5.1.1 unknown"),
        NoticeRow("OFF", created, "a@example.net", T0 - 60),
    ]
    counts = {r: NOTICES.labels(account="acme", result=r)._value.get() for r in ("rebuilt", "notify_off")}
    try:
        await ledger.write(rows)  # type: ignore[arg-type]
        assert await sender.round() == 2
        found = dict(_select(tmp_path, "SELECT msg_id, state || ': ' || reason FROM ledger_notices"))
        assert found[msg_id].startswith("skipped: its record was rebuilt from the queue")
        assert found["OFF"] == "skipped: nobody is to be told (notify = off)"
        assert {r: NOTICES.labels(account="acme", result=r)._value.get() - n for r, n in counts.items()} == {
            "rebuilt": 1,
            "notify_off": 1,
        }
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_notify_off_message_rebuilt_by_a_current_instance_is_skipped_as_notify_off(tmp_path: Path) -> None:
    """notify = off, and the accepting instance died before its record: the claiming instance (this version)
    rebuilds the record from a queue row that says nobody is to be told (notice.NOBODY), and its bounce is
    skipped as `notify_off`, the accepting instance's own record's reason. Before, the row held nothing, as an
    older version's does, and it was counted `rebuilt`, blamed on "a version before" that never ran (review
    today4a F1)."""
    from gateway.ops.metrics import NOTICES

    rows: list[object] = []
    msg_id = await _accepted_by_a_dead_instance(tmp_path, rows, kept=True, notify=None)
    sender, ledger = await _notice_sender(tmp_path, TakingOwner(), Clock(time.time() + 60), [])
    counts = {r: NOTICES.labels(account="acme", result=r)._value.get() for r in ("rebuilt", "notify_off")}
    try:
        await ledger.write(rows)  # type: ignore[arg-type]
        record = await ledger.get(msg_id)
        assert record is not None and record.reply is None  # rebuilt: not A's
        assert await sender.round() == 1
        [(found,)] = _select(tmp_path, "SELECT state || ': ' || reason FROM ledger_notices")
        assert found == "skipped: nobody is to be told (notify = off)"
        assert {r: NOTICES.labels(account="acme", result=r)._value.get() - n for r, n in counts.items()} == {
            "rebuilt": 0,
            "notify_off": 1,
        }
    finally:
        await ledger.close()


# -- an unrecognised event page keeps the cursor -------------------------------------------------------------


class DmdsBodySource:
    """An EventSource answering each page with the JSON object the test sets, read by the real DMDS reader."""

    max_window = 86400.0

    def __init__(self, body: dict[str, object]) -> None:
        self.body = body

    async def page(self, since: float, until: float, number: int) -> EventPage:
        # The body on the first page, an empty page after (a window is read until an empty page).
        body = self.body if number == 0 else {"status": "ok", "eventos": []}
        return eventwire.read_events(HttpResponse(200, orjson.dumps(body), {}), "acme", UTC, 100, number)


@pytest.mark.asyncio
async def test_an_unrecognised_event_page_fails_its_window_and_the_cursor_waits(tmp_path: Path) -> None:
    """A 200 object with the events under a name no table knows fails the poll (counted, logged once per
    episode with the keys seen); the window is read again, and once the answer is readable its bounce counts."""
    from gateway.ops.metrics import EVENT_POLLS

    ledger = await _ledger(tmp_path)
    try:
        await _sent(ledger, "M1", "a@example.net", "E1", T0 - 600)
        row = {"evento": "rebote-hard", "email": "a@example.net", "timestamp": "2026-12-06 08:00:30", "eeid": "E1"}
        source = DmdsBodySource({"status": "ok", "eventos": []})
        clock = Clock(T0)
        poller = _poller(ledger, source, clock, Subscriptions())
        assert await poller.poll() == "ok"
        source.body = {"status": "ok", "registros": [row]}
        failed = EVENT_POLLS.labels(account="acme", result="failed")._value.get()
        clock.t = T0 + 200
        assert await poller.poll() == "failed"
        assert EVENT_POLLS.labels(account="acme", result="failed")._value.get() == failed + 1
        source.body = {"status": "ok", "eventos": [row]}
        clock.t = T0 + 400
        assert await poller.poll() == "ok"
        record = await ledger.get("M1")
        assert record is not None and record.recipients[0].state == "bounced"
    finally:
        await ledger.close()


class TooLargeSource:
    """An EventSource whose upstream answers every page with more than the client reads."""

    max_window = 86400.0

    async def page(self, since: float, until: float, number: int) -> EventPage:
        raise AnswerTooLarge("DMDS answered with more than 1048576 bytes, not read")


@pytest.mark.asyncio
async def test_an_event_page_too_large_to_read_fails_its_poll_naming_page_size(tmp_path: Path) -> None:
    """The same window is asked for again at each poll, so the reason logged says what would help."""
    from structlog.testing import capture_logs

    ledger = await _ledger(tmp_path)
    try:
        clock = Clock(T0)
        poller = _poller(ledger, TooLargeSource(), clock, Subscriptions())
        assert await poller.poll() == "ok"  # the first poll sets the cursor; the next one reads a window
        clock.t = T0 + 200
        with capture_logs() as logs:
            assert await poller.poll() == "failed"
        failed = [e for e in logs if e["event"] == "events_poll_failed"]
        assert len(failed) == 1
        assert failed[0]["error"].endswith("lower accounts.acme.events.page_size (now 100)")
    finally:
        await ledger.close()


# -- the cursor's age through a ledger outage ---------------------------------------------------------------


class DownReturns(SqliteReturns):
    """The return tables of a SQLite ledger whose cursor and page writes fail while `down` is set."""

    down = False

    async def lease_cursor(
        self, name: str, account: str, owner: str, now: float, lease: float, start: float
    ) -> tuple[Lease | None, float]:
        if self.down:
            raise LedgerUnavailable("OperationalError: disk I/O error")
        return await super().lease_cursor(name, account, owner, now, lease, start)

    async def apply(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise LedgerUnavailable("OperationalError: disk I/O error")
        return await super().apply(*args, **kwargs)


@pytest.mark.asyncio
async def test_the_cursor_age_grows_while_the_ledger_cannot_be_written(tmp_path: Path) -> None:
    """smtp_gateway_events_cursor_age_seconds is now minus the last position stored, at every poll, failed ones
    too: it was set only by a poll that leased the cursor, so it stood still through a ledger outage."""
    from structlog.testing import capture_logs

    from gateway.ops.metrics import EVENTS_CURSOR_AGE

    ledger = await _ledger(tmp_path)
    try:
        returns = DownReturns(ledger)
        clock = Clock(T0)
        ctx = Context(returns, "gw-a", lambda: Subscriptions(), SuppressionSet(), clock=clock)
        settings = EventSettings(enabled=True)
        poller = EventPoller("account-down", ListSource(), None, lambda: settings, lambda: True, ctx)
        age = EVENTS_CURSOR_AGE.labels(account="account-down")
        assert await poller.poll() == "ok"  # the cursor starts at T0
        clock.t = T0 + 300
        assert await poller.poll() == "ok"  # read up to T0 + 300 - lag
        assert age._value.get() == settings.lag
        returns.down = True
        with capture_logs():
            for step in (1, 2):
                clock.t = T0 + 300 + 600 * step
                assert await poller.poll() == "failed"
                assert age._value.get() == 600 * step + settings.lag
        returns.down = False
        clock.t = T0 + 1500
        assert await poller.poll() == "ok"
        assert age._value.get() == settings.lag
    finally:
        await ledger.close()
