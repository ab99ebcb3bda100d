"""Pure: the message ledger's rows (what is written), records (what is read) and queries.

A record is one message answered 250, keyed by its local id (the queue id the delivery owner generates
for every message, queued or not). Each recipient has its own state:

    accepted   the 250 was given; no call for this recipient has been answered yet
    deferred   its call failed for now (the upstream was down, slow, rate-limiting); it will be retried
    sent       the upstream accepted its call (upstream_id); the vendor has not reported more (yet)
    delivered  the vendor reported it delivered                        } read back from the vendor's
    bounced    the vendor reported a bounce                            } events (gateway/ledger's
    not_sent   the vendor reported it did not send it (DMDS Not-Sent)  } pollers)
    dead       it will not be sent: its call was refused for good, or the message expired, was held
               (ambiguous) or deleted by an operator; `reason` says which
    test       a test-mode login's message: taken and checked, never sent (its record keeps the requests
               that would have gone out)

Rows of one message may be written by several instances in any order (the one that accepted it, the one
that claimed it from the queue, a late answer to an instance whose lease had expired). A recipient's row
therefore only moves forward (RANK), or within one rank to a newer state; the one way back is from
`dead`, by a newer row (an operator requeued the dead letter; readback: the vendor's event about a
recipient whose call's answer was lost, stamped after the `dead`), never by an `accepted` (a fenced
attempt's). An upstream event stamped by the vendor's clock still advances `sent`, and a stale `deferred`
never undoes a `sent`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

import orjson

from gateway.policy.senders import ascii_address

RecipientState = Literal["accepted", "deferred", "sent", "delivered", "bounced", "not_sent", "dead", "test"]
STATES: tuple[RecipientState, ...] = (
    "accepted",
    "deferred",
    "sent",
    "delivered",
    "bounced",
    "not_sent",
    "dead",
    "test",
)
# How far a state is along its way; a row keeps a further state even when an older update arrives last.
RANK: Mapping[str, int] = {
    "accepted": 0,
    "deferred": 1,
    "sent": 2,
    "delivered": 3,
    "bounced": 3,
    "not_sent": 3,
    "dead": 3,
    "test": 3,
}


def replaces(state: str, at: float, old_state: str, old_at: float) -> bool:
    """Whether a recipient row `state` stamped `at` replaces the one the ledger holds (`old_state`, `old_at`):
    further along (RANK), or as far and not older, or not older than a `dead` it replaces (an operator's
    requeue: `deferred`; an upstream's answer or event: `sent` and further) unless it is `accepted`: that says
    no call has answered yet, so after a `dead` it can only be a fenced attempt's (its lease lost, the answer
    not a verdict: recorder.recipient_state), which must not undo the lease holder's dead letter and with it
    the notice to the sender (review today6a F3). The ledger's upsert applies the same rule in SQL
    (sql._recipient_conflict); a test holds the two to one table of cases, so what readback tells (a
    webhook's state, a notice) is what the ledger keeps."""
    new, old = RANK[state], RANK[old_state]
    return new > old or (at >= old_at and (new == old or (old_state == "dead" and state != "accepted")))


# Timeline event kinds written by the gateway itself (other parts add theirs: upstream events read back,
# dsn_sent, webhook_delivered, ...; a kind is any short snake_case name).
ACCEPTED = "accepted"  # the 250 (detail: the reply)
ATTEMPT = "attempt"  # one call of one attempt: outcome delivered | deferred | refused | ambiguous
INFLIGHT = "inflight"  # the inline budget ran out: stored in the queue while the call runs on
QUEUED = "queued"  # a later attempt is scheduled (detail: when and why)
AMBIGUOUS = "ambiguous"  # a claimed message's call may have been sent by an owner that died
DEAD_LETTERED = "dead_lettered"  # the message became a dead letter (detail: the reason)
RESEND = "resend"  # a resend with this message's idempotency key was answered with its id, not sent again
RETRIED = "retried"  # operator: `queue retry` (due now)
REQUEUED = "requeued"  # operator: `queue requeue` (a dead letter back in the queue)
DELETED = "deleted"  # operator: `queue delete`
DSN_SENT = "dsn_sent"  # a delivery status notice about recipients of this message was sent (data: its id)
DSN_SKIPPED = "dsn_skipped"  # no notice for these recipients (detail: why)
WEBHOOK_DELIVERED = "webhook_delivered"  # a webhook took an event (data: webhook, event, attempts)
WEBHOOK_FAILED = "webhook_failed"  # a webhook never took an event within its max_age (data: last error)
# Why an operator's `queue delete` made recipients dead (no notice is sent for those).
DELETED_BY_OPERATOR = "deleted by an operator"
# Why a `queue delete` made dead the recipients of a call whose answer was lost: nothing will retry them (a
# `deferred` would say it will), but the upstream may have them. Events read back may still tell
# (readback: a recipient whose call was lost takes the vendor's word over this `dead`).
DELETED_ANSWER_LOST = "deleted by an operator; its call's answer had been lost: the upstream may have sent it"
DELETED_REASONS = (DELETED_BY_OPERATOR, DELETED_ANSWER_LOST)  # neither is told to the sender in a notice
# Why a notice decision was skipped for a recipient no longer failed when it was decided (a newer Delivered
# overruled its bounce, an operator requeued its dead letter): if it fails again, its decision is pending
# again (sql.notice_insert), so a later failure is still told.
NO_LONGER_FAILED = "the recipient is no longer failed (delivered, or requeued, since it failed)"
TEST_MODE = "test_mode"  # a test-mode login's message: answered with a TEST- id, not sent

Outcome = Literal["delivered", "deferred", "refused", "ambiguous"]


# -- rows: what the writer stores --------------------------------------------------------------------------
# Tuples of plain values (JSON already text): the writer's buffer holds thousands of them, and tuples of
# atoms are left alone by Python's garbage collector, where objects would be walked by every collection.


class MessageRow(NamedTuple):
    """A message's own row. Written by the instance that accepted it, and again (filling only what is
    missing) by any instance that claims it from the queue, so the record exists whoever flushes first."""

    id: str
    created: float
    account: str
    mail_from: str
    subject: str
    size: int | None
    login: str | None = None
    listener: str | None = None
    peer: str | None = None
    message_id: str | None = None
    reply_id: str | None = None
    reply: str | None = None
    # JSON text: the upstream requests as planned, secrets removed, attachments as name/type/size.
    request: str | None = None
    dsn_of: str | None = None  # a delivery status notice: the local id of the message it is about
    # JSON text (notice.py): what a notice about this message needs later (its original headers, the
    # provider's data, whom to tell); None when nobody would be told (null sender, notify off, a notice),
    # notice.NOBODY for that in a record rebuilt from the queue (None there: an older version's queue row).
    notice: str | None = None


class RecipientRow(NamedTuple):
    msg_id: str
    created: float
    address: str
    state: RecipientState
    at: float
    upstream_id: str | None = None
    call: str | None = None
    reason: str | None = None

    @property
    def key(self) -> str:
        return address_key(self.address)


class EventRow(NamedTuple):
    """A timeline row. `id` is stable: writing the same event twice stores it once (an upstream event read
    in two overlapping polls, a batch written again after a failed commit). `data`: JSON text (`json`)."""

    id: str
    msg_id: str
    created: float
    at: float
    kind: str
    recipient: str | None = None
    call: str | None = None
    outcome: str | None = None
    upstream_id: str | None = None
    detail: str | None = None
    actor: str | None = None  # who wrote it: the instance's lease owner name, or "operator@host"
    data: str | None = None


def json(value: Any) -> str:
    """JSON text for a row's `request` or `data`."""
    return orjson.dumps(value, default=str).decode()


class OutboxRow(NamedTuple):
    """A webhook delivery to make: written with the event it announces, once per (webhook, event id)."""

    webhook: str
    event_id: str
    msg_id: str
    created: float  # the message's acceptance time (retention)
    enqueued: float
    type: str
    body: str  # the JSON POSTed, fixed when the event is recorded (each retry sends the same bytes)


# The source of the entries the vendor's invalid-contacts list made (gateway/returnpath/contacts.py): the
# least specific, replaced by any other (suppression_replaces).
INVALID_LIST = "invalid_list"


def suppression_replaces(new: str, old: str) -> bool:
    """Whether an entry from source `new` replaces the entry from `old` already held for its address. The first
    entry is kept, but for one only the vendor's invalid list made: an event read back (a hard bounce, with its
    message and the vendor's words) says why and where, and the list's sync and a read-back event race in one
    poll (which is written first is chance). The database's upsert (sql.suppression_insert) says the same."""
    return old == INVALID_LIST and new != INVALID_LIST


class SuppressionRow(NamedTuple):
    """An address the account will not take mail for (the first reason recorded is kept, but one only the
    invalid list made is replaced: suppression_replaces)."""

    account: str
    address: str  # address_key
    reason: str  # in the operator's words, told to clients at RCPT TO
    source: str  # what added it: an event type read back, `invalid_list`, `operator`
    created: float
    msg_id: str | None = None
    detail: str | None = None
    # The event read back that added it (not stored): an event read again (the next window's overlap) adds
    # nothing, so an entry an operator or the invalid-contacts list removed stays removed.
    event_id: str | None = None


class NoticeRow(NamedTuple):
    """A recipient that failed for good (bounced, not sent, its message dead): its notice is to be decided,
    once (a second row for the same message and recipient changes nothing)."""

    msg_id: str
    created: float  # the message's acceptance time (retention)
    address: str
    at: float

    @property
    def key(self) -> str:
        return address_key(self.address)


Row = MessageRow | RecipientRow | EventRow | OutboxRow | SuppressionRow | NoticeRow


def address_key(address: str) -> str:
    """How an address is stored and searched: as RCPT TO compares it (policy.senders.ascii_address), in lower
    case and an internationalized domain in its IDNA (xn--) form: `User@Bücher.example` finds
    `user@xn--bcher-kva.example`, the form RCPT TO checked and readback recorded."""
    return ascii_address(address)


def address_keys(address: str) -> tuple[str, ...]:
    """The keys a row of `address` may be stored under: address_key's, and (a Unicode domain) the lower-cased
    address as typed, which rows written before the keys were IDNA kept (schema 6 and older): a removal finds
    both."""
    old = address.strip().lower()
    new = address_key(address)
    return (new,) if old == new else (new, old)


def message_id_key(message_id: str) -> str:
    """A Message-ID as stored and searched: without its angle brackets."""
    return message_id.strip().removeprefix("<").removesuffix(">").strip()


# -- records: what is read ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    state: RecipientState
    at: float
    upstream_id: str | None = None
    call: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    at: float
    kind: str
    recipient: str | None = None
    call: str | None = None
    outcome: str | None = None
    upstream_id: str | None = None
    detail: str | None = None
    actor: str | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """A message as the ledger knows it. Search results leave out `events` and `request`."""

    id: str
    created: float
    account: str
    mail_from: str
    subject: str
    size: int | None
    login: str | None = None
    listener: str | None = None
    peer: str | None = None
    message_id: str | None = None
    reply_id: str | None = None
    reply: str | None = None
    recipients: tuple[Recipient, ...] = ()
    events: tuple[Event, ...] = ()
    request: Any = None
    dsn_of: str | None = None

    @property
    def state(self) -> str:
        return summary_state([r.state for r in self.recipients])

    def to_json(self, *, full: bool = True) -> dict[str, Any]:
        """The record as the API and `status --json` give it (times as ISO 8601 UTC)."""
        out: dict[str, Any] = {
            "id": self.id,
            "reply_id": self.reply_id,
            "reply": self.reply,
            "state": self.state,
            "created": iso(self.created),
            "account": self.account,
            "login": self.login,
            "listener": self.listener,
            "peer": self.peer,
            "mail_from": self.mail_from,
            "message_id": self.message_id,
            "subject": self.subject,
            "size": self.size,
            "dsn_of": self.dsn_of,
            "recipients": [
                {
                    "address": r.address,
                    "state": r.state,
                    "at": iso(r.at),
                    "upstream_id": r.upstream_id,
                    "call": r.call,
                    "reason": r.reason,
                }
                for r in self.recipients
            ],
        }
        if full:
            out["events"] = [
                {
                    "id": e.id,
                    "at": iso(e.at),
                    "kind": e.kind,
                    "recipient": e.recipient,
                    "call": e.call,
                    "outcome": e.outcome,
                    "upstream_id": e.upstream_id,
                    "detail": e.detail,
                    "actor": e.actor,
                    **({"data": dict(e.data)} if e.data else {}),
                }
                for e in self.events
            ]
            out["request"] = self.request
        return out


def summary_state(states: Sequence[str]) -> str:
    """One word for a message: `deferred` (or `accepted`) while any recipient still waits; then `dead`,
    `bounced` or `not_sent` if any recipient ended so; else `delivered` when all were, else `sent`; `test`
    for a test-mode login's message."""
    present = set(states)
    if present == {"test"}:
        return "test"
    for state in ("deferred", "accepted", "dead", "bounced", "not_sent"):
        if state in present:
            return state
    if present and present == {"delivered"}:
        return "delivered"
    return "sent" if present else "accepted"


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- queries -----------------------------------------------------------------------------------------------

MAX_LIMIT = 500


class BadQuery(ValueError):
    """A filter or cursor that cannot be used; the text says which."""


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page ended: results are ordered newest first by (created, id)."""

    created: float
    id: str

    def encode(self) -> str:
        raw = orjson.dumps([self.created, self.id])
        return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")

    @staticmethod
    def decode(text: str) -> Cursor:
        try:
            value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            created, msg_id = value
            if not isinstance(created, (int, float)) or not isinstance(msg_id, str):
                raise TypeError
        except (ValueError, TypeError, binascii.Error):
            raise BadQuery("cursor: not one this gateway gave (pass `next` from the previous page as it is)") from None
        return Cursor(float(created), msg_id)


@dataclass(frozen=True, slots=True)
class Query:
    """Filters, all optional, combined with AND; newest first, `limit` at most MAX_LIMIT."""

    id: str | None = None  # the local id
    ids: tuple[str, ...] = ()  # any of these local ids (at most MAX_LIMIT)
    reply_id: str | None = None  # the id a 250 named
    upstream_id: str | None = None  # any call's upstream id (a DMDS eeid may be shared by a batch)
    message_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    login: str | None = None
    account: str | None = None
    state: str | None = None  # messages with a recipient in this state
    since: float | None = None
    until: float | None = None
    limit: int = 50
    cursor: Cursor | None = None
    filters: Mapping[str, str] = field(default_factory=dict, compare=False)  # as given, for echoing back

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise BadQuery(f"limit: between 1 and {MAX_LIMIT}")
        if self.state is not None and self.state not in STATES:
            raise BadQuery(f"state: one of {', '.join(STATES)}")
        if len(self.ids) > MAX_LIMIT:
            raise BadQuery(f"ids: at most {MAX_LIMIT}")


@dataclass(frozen=True, slots=True)
class Page:
    records: list[Record]
    next: Cursor | None = None


@dataclass(frozen=True, slots=True)
class Tally:
    """What the ledger counted since a time: messages by (account, login) with the newest one's time, and
    recipients by (account, login, state) as they are now."""

    since: float
    messages: Mapping[tuple[str, str | None], tuple[int, float]]
    recipients: Mapping[tuple[str, str | None, str], int]

    def by_account(self) -> dict[str, dict[str, int]]:
        """Per account: `messages` accepted, and recipients by state."""
        out: dict[str, dict[str, int]] = {}
        for (account, _), (count, _) in self.messages.items():
            row = out.setdefault(account, {})
            row["messages"] = row.get("messages", 0) + count
        for (account, _, state), count in self.recipients.items():
            row = out.setdefault(account, {})
            row[state] = row.get(state, 0) + count
        return out

    def by_login(self) -> dict[tuple[str, str | None], dict[str, float]]:
        """Per (account, login): `messages`, `last` (the newest one's time) and recipients by state."""
        out: dict[tuple[str, str | None], dict[str, float]] = {}
        for key, (count, last) in self.messages.items():
            out[key] = {"messages": count, "last": last}
        for (account, login, state), count in self.recipients.items():
            row = out.setdefault((account, login), {"messages": 0})
            row[state] = row.get(state, 0) + count
        return out
