"""The recorder's rows for an upstream's own count of mails sent (DMDS `sent`): short only below the call's
recipients, however its recipient list is written; and the rows the writer counts per table."""

from __future__ import annotations

import pytest

from gateway.core.model import Address, Message, Origin, Principal, Submission
from gateway.core.outcome import Outcome
from gateway.core.records import CallRow, Decision
from gateway.ledger import sql
from gateway.ledger.model import EventRow, RecipientRow, Row
from gateway.ledger.recorder import Recorder

SUBMISSION = Submission(
    principal=Principal(account="acme", login="scanner"),
    mail_from="billing@acme.example",
    rcpt_tos=("ann@example.com", "bob@example.com"),
    message=Message(
        subject="Invoice 42",
        from_=Address("billing@acme.example"),
        sender=None,
        reply_to=None,
        to=(),
        cc=(),
        html="<p>Hello</p>",
        text="Hello",
        attachments=(),
    ),
)


def delivered(recipients: str, sent: int) -> list[Row]:
    rows: list[Row] = []
    calls = {"0": CallRow("0", recipients, "done", "U-1")}
    Recorder(rows.extend, "test").accepted(
        msg_id="M1",
        created=1.0,
        submission=SUBMISSION,
        origin=Origin("smtp", "127.0.0.1:2525", 10),
        reply="250 2.0.0 Ok",
        reply_id="M1",
        calls=calls,
        requests=None,
        decision=Decision("delivered", calls, 1, 0.0, None),
        outcome=Outcome(delivered={"0": "U-1"}, sent={"0": sent}),
    )
    return rows


@pytest.mark.parametrize(
    ("recipients", "sent", "short"),
    [
        ("ann@example.com,bob@example.com", 1, "the upstream says it sent 1 mail(s) for 2 recipient(s)"),
        ("ann@example.com,bob@example.com", 0, "the upstream says it sent 0 mail(s) for 2 recipient(s)"),
        ("ann@example.com,bob@example.com", 2, None),
        ("ann@example.com,bob@example.com", 3, None),  # copies counted too: more is not short
        ("ann@example.com", 1, None),
        ("ann@example.com,,bob@example.com,", 2, None),  # empty pieces are no recipients
        ("ann@example.com,,bob@example.com,", 1, "the upstream says it sent 1 mail(s) for 2 recipient(s)"),
    ],
)
def test_a_count_is_short_only_below_the_calls_recipients(recipients: str, sent: int, short: str | None) -> None:
    rows = delivered(recipients, sent)
    attempt = next(r for r in rows if isinstance(r, EventRow) and r.kind == "attempt")
    assert attempt.detail == short
    assert attempt.data == f'{{"path":"inline","attempt":1,"sent":{sent}}}'
    reasons = {r.address: r.reason for r in rows if isinstance(r, RecipientRow)}
    assert reasons == {address: short for address in recipients.split(",") if address}


def test_rows_are_grouped_by_table_in_the_order_they_came() -> None:
    rows = delivered("ann@example.com,bob@example.com", 2) + delivered("ann@example.com", 1)
    groups = sql.by_table(rows)
    assert [table for table, _ in groups] == ["message", "recipient", "event"]
    recipients = dict(groups)["recipient"]
    assert [(v[0], v[1]) for v in recipients] == [
        ("M1", "ann@example.com"),
        ("M1", "bob@example.com"),
        ("M1", "ann@example.com"),
    ]
    assert [v[4] for v in dict(groups)["event"]] == ["accepted", "attempt", "accepted", "attempt"]
