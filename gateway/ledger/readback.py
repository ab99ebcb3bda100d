"""Pure: upstream events read back, matched to the recipients the gateway sent and turned into ledger rows: a
timeline event, the recipient's new state, its notice to decide, the suppression and the webhook deliveries it
causes. Written in one transaction with the poll's progress, so a window read again changes nothing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.core.events import STATE_OF, SUPPRESSES, VendorEvent
from gateway.ledger import announce, model
from gateway.ledger.model import RANK, EventRow, NoticeRow, RecipientRow, Row, SuppressionRow, address_key
from gateway.ledger.recorder import TICK
from gateway.ledger.returns import Match

# A vendor's time may be a little behind the gateway's (whole seconds, another clock): a match may have been
# accepted this long after the event's time.
SKEW = 120.0
# Event types that mean the recipient will not get the message: its sender is told (a notice).
NOTICE_TYPES = ("bounced", "not_sent")


# An event whose recipient's call answer was lost (no upstream id learnt) is matched by address and time
# only: to a recipient of this account at its address accepted at most this long before the event (a queued
# message's lifetime and the vendor's delay both fit), when exactly one fits.
LOST_WINDOW = 7 * 24 * 3600.0


def pick(event: VendorEvent, candidates: Iterable[Match], account: str) -> Match | None:
    """The recipient an event is about: this account's, with the event's address (and upstream id when it
    names one); of several (a batch id shared by messages), the latest accepted before the event. None of
    those: the one recipient whose call's answer was lost that fits (lost_pick)."""
    key = address_key(event.address)
    mine = [m for m in candidates if m.rcpt == key and (m.account is None or m.account == account)]
    found = [m for m in mine if not m.lost and (event.upstream_id is None or m.upstream_id == event.upstream_id)]
    before = [m for m in found if m.created <= event.at + SKEW]
    pool = before or found
    if pool:
        return max(pool, key=lambda m: (m.created, m.msg_id))
    return lost_pick(event, mine)


def lost_pick(event: VendorEvent, candidates: Iterable[Match]) -> Match | None:
    """The recipient whose call's answer was lost that `event` is about, by address and time only (the id the
    event names was never learnt; `candidates`: the account's at the event's address): the one accepted
    within LOST_WINDOW before it. Two or more: None, never a guess (the event stays unmatched)."""
    fits = {
        (m.msg_id, m.rcpt): m for m in candidates if m.lost and event.at - LOST_WINDOW <= m.created <= event.at + SKEW
    }
    return next(iter(fits.values())) if len(fits) == 1 else None


@dataclass
class Applied:
    """What a batch of events made: the rows, and what the poller counts and logs."""

    rows: list[Row] = field(default_factory=list)
    matched: int = 0
    # Of `matched`, the ids of the events matched to a recipient whose call's answer was lost (lost_pick): the
    # poller counts each id once (an event naming no id leaves the recipient lost, and is matched again by the
    # next overlapping window).
    lost: list[str] = field(default_factory=list)
    unmatched: list[VendorEvent] = field(default_factory=list)


def apply(
    events: Sequence[VendorEvent],
    candidates: Sequence[Match],
    *,
    account: str,
    actor: str,
    now: float,
    subscriptions: announce.Subscriptions,
    suppress: bool,
    whitelisted: frozenset[str] = frozenset(),
) -> Applied:
    """The rows of `events` (their matches among `candidates`). `suppress`: the account keeps a suppression
    list; `whitelisted` addresses never join it."""
    out = Applied()
    # Each recipient's state as the ledger will hold it after the events so far: two events about one
    # recipient in a page are decided one after the other, as the upserts apply them in order.
    states: dict[tuple[str, str], tuple[str, float]] = {}
    for n, event in enumerate(events):
        match = pick(event, candidates, account)
        if match is None:
            out.unmatched.append(event)
            continue
        out.matched += 1
        if match.lost:
            out.lost.append(event.id)
        key = (match.msg_id, match.rcpt)
        current = states.get(key, (match.state, match.state_at))
        rows, states[key] = _rows(event, match, current, account, actor, now, subscriptions, n)
        out.rows += rows
        reason = SUPPRESSES.get(event.type)
        if reason is not None and suppress and match.rcpt not in whitelisted:
            out.rows.append(
                SuppressionRow(account, match.rcpt, reason, event.type, event.at, match.msg_id, event.detail, event.id)
            )
    return out


def unread(rows: Sequence[Row], known: Iterable[str]) -> list[Row]:
    """`rows` without the suppressions of events the ledger holds already (`known`: their ids). An event read
    again suppresses nothing: the operator, or the vendor's invalid-contacts list, may have removed its entry
    since it was first read. Its other rows stay (each is an idempotent upsert)."""
    seen = set(known)
    if not seen:
        return list(rows)
    return [r for r in rows if not (isinstance(r, SuppressionRow) and r.event_id in seen)]


def event_ids(rows: Iterable[Row]) -> list[str]:
    """The ids of the timeline events among `rows` (to ask the ledger which it holds)."""
    return [r.id for r in rows if isinstance(r, EventRow)]


def _rows(
    event: VendorEvent,
    match: Match,
    current: tuple[str, float],
    account: str,
    actor: str,
    now: float,
    subscriptions: announce.Subscriptions,
    n: int,
) -> tuple[list[Row], tuple[str, float]]:
    """The rows of one matched event, and the recipient's (state, state_at) after it. `current`: its state
    before this event (the ledger's, or the one an earlier event of the page left)."""
    upstream_id = event.upstream_id or match.upstream_id
    # On the timeline an upstream event follows what the gateway recorded of the recipient (vendors write
    # whole seconds, on another clock); the vendor's own time is kept beside it.
    at = max(event.at, match.state_at) + n * TICK
    rows: list[Row] = [
        EventRow(
            event.id,
            match.msg_id,
            match.created,
            at,
            event.type,
            recipient=match.address,
            upstream_id=upstream_id,
            detail=event.detail,
            actor=actor,
            data=model.json({"upstream": event.raw_type, "upstream_at": model.iso(event.at)}),
        )
    ]
    state = STATE_OF.get(event.type)
    after, after_at = current
    won = False
    # A recipient whose call's answer was lost that the gateway gave up on (held, or deleted) is `dead` because
    # nothing more would be tried, not because the upstream refused it: the vendor's word is what happened.
    overrules = match.lost and after == "dead"
    if state is not None and (RANK[state] >= RANK[after] or overrules):
        if state == "sent":
            # Confirms the send (and clears "upstream reported N of M sent"); a whole-second vendor time may
            # be older than the state it confirms.
            at, reason = max(event.at, after_at + TICK), None
        else:
            at, reason = event.at, event.detail or f"the upstream reported {event.raw_type}"
        if overrules:
            at = max(at, after_at + TICK)  # the `dead` it replaces was written after the vendor's event
        # Only a row the ledger's upsert keeps is written and told: an older event of the same rank (a
        # Delivered read after a later Bounced) loses, and the recipient stays as it is.
        won = model.replaces(state, at, after, after_at)
        if won:
            rows.append(RecipientRow(match.msg_id, match.created, match.address, state, at, upstream_id, reason=reason))  # type: ignore[arg-type]
            after, after_at = state, at
    if event.type in NOTICE_TYPES and won:
        # A bounce that loses (the recipient is shown delivered, or bounced by a newer event) tells no one.
        rows.append(NoticeRow(match.msg_id, match.created, match.address, event.at))
    if subscriptions:
        about = announce.About(
            match.msg_id,
            match.created,
            account,
            match.reply_id,
            match.message_id,
            match.mail_from,
            match.subject,
            match.login,
        )
        text = announce.body(
            event.id,
            event.type,
            event.at,
            about,
            match.address,
            after,
            upstream_id=upstream_id,
            upstream_event=event.raw_type,
            detail=event.detail,
        )
        rows += announce.outbox(subscriptions, event.type, event.id, about, now, text)
    return rows, (after, after_at)
