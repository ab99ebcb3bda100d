"""Notice decisions against the ledger as it is when they are taken (review after250c F1), and a decision
taken over after its notice was handed to the queue (F3)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_settings
from gateway.config.returnpath import WebhookSettings
from gateway.core.events import VendorEvent
from gateway.core.records import CallRow, Decision
from gateway.core.replies import Reply
from gateway.ledger.announce import Subscriptions
from gateway.ledger.backends import open_returns
from gateway.ledger.model import NO_LONGER_FAILED, MessageRow, NoticeRow, RecipientRow
from gateway.ledger.notice import NoticeData
from gateway.ledger.recorder import Recorder
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.providers import registry
from gateway.returnpath.notices import LEASE, NoticeSender
from tests.configs import gateway_config
from tests.test_returnpath_units import T0, Clock, ListSource, TakingOwner, _ledger, _notice_sender, _poller


def _decisions(tmp_path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(tmp_path / "queue.sqlite3")
    try:
        return db.execute("SELECT state, notice_id, reason FROM ledger_notices ORDER BY msg_id, rcpt").fetchall()
    finally:
        db.close()


@pytest.mark.asyncio
async def test_no_failure_notice_for_a_recipient_now_shown_delivered(tmp_path: Path) -> None:
    owner = TakingOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(T0), ["M1"])
    try:
        # A newer Delivered (the vendor retried after the bounce it reported) overrules the bounce.
        await ledger.write([RecipientRow("M1", T0 - 600, "a@example.net", "delivered", T0 - 30)])
        record = await ledger.get("M1")
        assert record is not None and record.state == "delivered"
        assert await sender.round() == 1
        assert owner.submissions == []
        assert _decisions(tmp_path) == [("skipped", None, NO_LONGER_FAILED)]
        record = await ledger.get("M1")
        assert record is not None
        skipped = [e for e in record.events if e.kind == "dsn_skipped"]
        assert [e.detail for e in skipped] == [NO_LONGER_FAILED]
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_one_page_bounced_then_newer_delivered_tells_no_one(tmp_path: Path) -> None:
    """Through the real poller: one page holds a Bounced and a newer Delivered for one recipient. The bounce
    made a notice decision when it was read; the ledger shows `delivered`, and nobody is told it failed."""
    settings = load_settings(
        None, **gateway_config(tmp_path, listeners=[], accounts={"acme": {"dsn": {"notify": "sender"}}})
    )
    provider = registry.build("acme", settings.accounts["acme"])
    ledger = await _ledger(tmp_path)
    try:
        notice = NoticeData(to="billing@acme.example", login="scanner", params={"campaign": 22}).to_json()
        created = T0 - 600
        await ledger.write(
            [
                MessageRow(
                    "M2", created, "acme", "billing@acme.example", "Invoice", 100, login="scanner", notice=notice
                ),
                RecipientRow("M2", created, "b@example.net", "sent", created + 1, upstream_id="TX2"),
            ]
        )
        hook = WebhookSettings(name="crm", url="http://127.0.0.1:9/h", secret="s")
        clock, source = Clock(T0), ListSource()
        poller = _poller(ledger, source, clock, Subscriptions([hook]))
        assert await poller.poll() == "ok"
        source.events = [
            VendorEvent("b-bounce", "bounced", "Bounced", "b@example.net", T0 + 10, "TX2", "550 5.1.1"),
            VendorEvent("b-deliv", "delivered", "Delivered", "b@example.net", T0 + 20, "TX2"),
        ]
        clock.t = T0 + 200
        assert await poller.poll() == "ok"
        record = await ledger.get("M2")
        assert record is not None and record.state == "delivered"
        owner = TakingOwner()
        sender = NoticeSender(
            open_returns(ledger),
            owner,  # type: ignore[arg-type]
            lambda: {"acme": provider},
            lambda: settings,
            SuppressionSet(),
            actor="gw-a",
            clock=clock,
        )
        assert await sender.round() == 1
        assert owner.submissions == []
        assert _decisions(tmp_path) == [("skipped", None, NO_LONGER_FAILED)]
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_requeued_dead_letter_is_told_only_if_it_fails_again(tmp_path: Path) -> None:
    """A dead letter an operator requeued before its notice was decided: nothing while it is under way (or
    once delivered); if it dies again, its decision is pending again and the notice goes then."""
    owner, clock = TakingOwner(), Clock(T0)
    sender, ledger = await _notice_sender(tmp_path, owner, clock, ["M3"])
    created = T0 - 600
    try:
        await ledger.write([RecipientRow("M3", created, "a@example.net", "dead", T0 - 50, reason="expired")])
        await ledger.write([RecipientRow("M3", created, "a@example.net", "deferred", T0 - 40)])  # requeued
        assert await sender.round() == 1
        assert owner.submissions == []
        assert _decisions(tmp_path) == [("skipped", None, NO_LONGER_FAILED)]
        # It dies again: a new failure, told this time.
        await ledger.write(
            [
                RecipientRow("M3", created, "a@example.net", "dead", T0 - 10, reason="expired again"),
                NoticeRow("M3", created, "a@example.net", T0 - 10),
            ]
        )
        clock.t = T0 + 1
        assert await sender.round() == 1
        assert len(owner.submissions) == 1
        assert _decisions(tmp_path)[0][:2] == ("sent", "N1")
        # The timeline keeps both decisions: the skip, then the notice (the later row was dropped as already
        # written, under the same id: review follow6 3).
        record = await ledger.get("M3")
        assert record is not None
        told = [(e.kind, e.detail) for e in record.events if e.kind in ("dsn_skipped", "dsn_sent")]
        assert [k for k, _ in told] == ["dsn_skipped", "dsn_sent"], told
        assert told[0][1] == NO_LONGER_FAILED
        # A decision already sent is not made pending again by another failure row.
        await ledger.write([NoticeRow("M3", created, "a@example.net", T0)])
        assert _decisions(tmp_path)[0][0] == "sent"
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_requeued_dead_letter_then_delivered_tells_no_one(tmp_path: Path) -> None:
    owner = TakingOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(T0), ["M4"])
    created = T0 - 600
    try:
        await ledger.write([RecipientRow("M4", created, "a@example.net", "dead", T0 - 50, reason="expired")])
        await ledger.write([RecipientRow("M4", created, "a@example.net", "deferred", T0 - 40)])  # requeued
        await ledger.write([RecipientRow("M4", created, "a@example.net", "delivered", T0 - 30)])
        assert await sender.round() == 1
        assert owner.submissions == []
        assert _decisions(tmp_path) == [("skipped", None, NO_LONGER_FAILED)]
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_failed_recipient_is_told_without_its_delivered_sibling(tmp_path: Path) -> None:
    """Two recipients failed; one is delivered since: the notice names only the one still failed."""
    owner = TakingOwner()
    sender, ledger = await _notice_sender(tmp_path, owner, Clock(T0), ["M5"])
    created = T0 - 600
    try:
        await ledger.write(
            [
                RecipientRow("M5", created, "b@example.net", "bounced", T0 - 60, reason="550 5.1.1 unknown"),
                NoticeRow("M5", created, "b@example.net", T0 - 60),
            ]
        )
        await ledger.write([RecipientRow("M5", created, "b@example.net", "delivered", T0 - 30)])
        assert await sender.round() == 2
        assert len(owner.submissions) == 1
        text = owner.submissions[0].message.html or ""
        assert "a@example.net" in text and "b@example.net" not in text
        assert _decisions(tmp_path) == [
            ("sent", "N1", "a notice (N1) went to billing0@acme.example"),
            (
                "skipped",
                None,
                NO_LONGER_FAILED,
            ),
        ]
    finally:
        await ledger.close()


class KeyedOwner(TakingOwner):
    """Answers a resend under a key it took with the first id, as DeliveryOwner's idempotency keys do."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: dict[str, str] = {}

    async def submit(self, submission: Any, plan: object, log: object, key: str, *args: object, **kw: object) -> Reply:
        if key in self.keys:
            return Reply(250, "2.0.0", f"queued as {self.keys[key]}")
        self.submissions.append(submission)
        self.keys[key] = f"N{len(self.submissions)}"
        return Reply(250, "2.0.0", f"queued as {self.keys[key]}")


def _lose_the_first_record(sender: Any) -> None:
    """Recording the first decision fails after its notice was handed over (the database went away, or a
    SIGKILL there); later ones are recorded."""
    real_finish = sender.returns.finish_notices
    calls = 0

    async def finish_once_lost(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise LedgerUnavailable("the database went away while the decision was recorded")
        return await real_finish(*args, **kwargs)

    sender.returns.finish_notices = finish_once_lost


@pytest.mark.asyncio
async def test_a_notice_decided_again_after_its_record_was_lost_is_recorded_sent_and_counted_once(
    tmp_path: Path,
) -> None:
    """The notice was handed to the queue, then recording the decision failed (the database, or a SIGKILL
    there); the decision taken over after its lease finds the first hand-off: recorded sent with the first
    notice's id, not skipped as rate_limited (per_sender is 1), and the sender's limit counted once."""
    owner, clock = KeyedOwner(), Clock(T0)
    sender, ledger = await _notice_sender(tmp_path, owner, clock, ["M1"])  # per_sender = 1
    try:
        _lose_the_first_record(sender)
        with pytest.raises(LedgerUnavailable):
            await sender.round()
        assert len(owner.submissions) == 1  # handed over: it goes out
        clock.t = T0 + LEASE + 1  # its lease ends; the decision is taken over
        assert await sender.round() == 1
        assert _decisions(tmp_path) == [("sent", "N1", "a notice (N1) went to billing0@acme.example")]
        assert len(owner.submissions) == 1
        db = sqlite3.connect(tmp_path / "queue.sqlite3")
        try:
            assert db.execute("SELECT n FROM notice_tally").fetchall() == [(1,)]
        finally:
            db.close()
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_fenced_attempt_after_a_dead_letter_neither_shows_it_accepted_nor_cancels_its_notice(
    tmp_path: Path,
) -> None:
    """Review today6a F3. B holds the lease: its call refused for good, the recipient dead (notice pending). A,
    whose lease had run out while its call of the same message was slow, records its fenced attempt later
    (settled=False: `accepted`, its answer being no verdict). That row undid the `dead` (the ledger and API
    said accepted for a dead letter) and the decision was skipped no_longer_failed: the sender never told."""
    owner, clock = TakingOwner(), Clock(T0)
    sender, ledger = await _notice_sender(tmp_path, owner, clock, ["M4"])
    created = T0 - 600
    try:
        await ledger.write([RecipientRow("M4", created, "a@example.net", "dead", T0 - 50, reason="550 refused")])
        rows: list[Any] = []
        recorder = Recorder(rows.extend, "gw-a", clock=lambda: T0 - 40)
        calls = {"c1": CallRow("c1", "a@example.net", "pending", None, "451 try later")}
        decision = Decision("queued", calls, 1, T0 + 60, "451 try later")
        recorder.attempt(msg_id="M4", created=created, decision=decision, outcome=None, path="queue", settled=False)
        assert [r.state for r in rows if isinstance(r, RecipientRow)] == ["accepted"]
        await ledger.write(rows)
        record = await ledger.get("M4")
        assert record is not None
        assert [(r.state, r.reason) for r in record.recipients] == [("dead", "550 refused")]
        assert await sender.round() == 1
        assert _decisions(tmp_path)[0][0] == "sent", _decisions(tmp_path)
        assert len(owner.submissions) == 1
    finally:
        await ledger.close()


@pytest.mark.asyncio
async def test_a_decision_taken_over_after_its_notice_went_out_is_sent_though_the_recipient_was_requeued(
    tmp_path: Path,
) -> None:
    """Review today6a F4. The notice was handed to the queue (counted under its key), then recording the
    decision failed; before the takeover an operator requeued the recipient. The takeover recorded it
    skipped no_longer_failed though its notice went out: the counted key says it went, so it is sent (N1)."""
    owner, clock = KeyedOwner(), Clock(T0)
    sender, ledger = await _notice_sender(tmp_path, owner, clock, ["M1"])
    try:
        await ledger.write([RecipientRow("M1", T0 - 600, "a@example.net", "dead", T0 - 50, reason="550 refused")])
        _lose_the_first_record(sender)
        with pytest.raises(LedgerUnavailable):
            await sender.round()
        assert len(owner.submissions) == 1  # handed over: it goes out
        await ledger.write([RecipientRow("M1", T0 - 600, "a@example.net", "deferred", T0 + 5)])  # requeued
        clock.t = T0 + LEASE + 1  # its lease ends; the decision is taken over
        assert await sender.round() == 1
        assert _decisions(tmp_path) == [("sent", "N1", "a notice (N1) went to billing0@acme.example")]
        assert len(owner.submissions) == 1
    finally:
        await ledger.close()
