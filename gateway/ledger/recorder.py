"""Recorder: what the delivery owner and operators tell the ledger, turned into rows for a sink (the
writer's buffer in a server, a direct write in the CLI). Building rows takes microseconds and no I/O.

    accepted  the 250: the message's row, its recipients (their calls' states), `accepted`, and the
              inline attempt's calls when it ended within the budget (else `inflight`)
    attempt   one attempt's calls (`attempt` events) and what followed (`queued`, `dead_lettered`)
    ambiguous calls a dead owner may have sent (a claimed message whose lease had expired)
    operator  retry now, requeue, delete (with the recipients they change)
    resend    a resend answered with this message's id (its idempotency key), not sent again
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gateway.core.model import Origin, Submission
from gateway.core.outcome import Outcome
from gateway.core.records import CallRow, Decision
from gateway.ledger import announce, model, notice
from gateway.ledger.model import EventRow, MessageRow, NoticeRow, RecipientRow, RecipientState, Row

Sink = Callable[[Sequence[Row]], None]


_NONCE = secrets.token_hex(4)  # this process's part of every id it makes (a forked child makes its own)
_SEQUENCE = itertools.count()


def _new_nonce() -> None:
    global _NONCE
    _NONCE = secrets.token_hex(4)


os.register_at_fork(after_in_child=_new_nonce)


def event_id() -> str:
    """Unique (time, this process, a counter) and in time order: new ids go at the end of the events' key
    index, not anywhere in it. No system call: ids are made for every message."""
    return f"{time.time_ns() // 1000:014x}{_NONCE}{next(_SEQUENCE) & 0xFFFFFF:06x}"


# Events written together are a microsecond apart, so the timeline (ordered by time) keeps their order.
TICK = 1e-6


def addresses(call: CallRow) -> list[str]:
    """The recipients of a stored call (the queue keeps them comma-joined)."""
    return [a for a in call.recipients.split(",") if a]


def recipient_state(call: CallRow, decision: Decision | None) -> tuple[RecipientState, str | None]:
    """A recipient's state from its call's after an attempt (and the message's verdict)."""
    if call.state == "done":
        return "sent", None
    if call.state == "rejected":
        return "dead", call.error
    if decision is not None and decision.verdict in ("dead", "refused"):
        return "dead", decision.dead_reason
    if decision is None or call.state == "sending":
        return "accepted", None
    return "deferred", call.error or decision.last_error


class Recorder:
    def __init__(
        self,
        sink: Sink,
        actor: str,
        *,
        enabled: bool = True,
        keep_requests: bool = True,
        keep_bodies: bool = False,
        clock: Callable[[], float] = time.time,
        subscriptions: announce.Subscriptions | None = None,
    ):
        self.sink = sink
        self.actor = actor
        self.enabled = enabled
        self.keep_requests = keep_requests  # whether `accepted` wants the planned requests
        self.keep_bodies = keep_bodies  # and in them the message's text, or only its size
        self.clock = clock
        # The webhooks told of dead letters (their deliveries are written with the dead letter's rows).
        self.subscriptions = subscriptions or announce.Subscriptions()

    @classmethod
    def off(cls) -> Recorder:
        return cls(lambda rows: None, "", enabled=False)

    def _event(
        self,
        msg_id: str,
        created: float,
        at: float,
        kind: str,
        *,
        recipient: str | None = None,
        call: str | None = None,
        outcome: str | None = None,
        upstream_id: str | None = None,
        detail: str | None = None,
        data: str | None = None,
    ) -> EventRow:
        """A new timeline row of ours (a fresh id, this recorder as its actor). Built positionally: a row is
        made for every event of every message, and a named tuple takes keywords the slow way."""
        return EventRow(
            event_id(), msg_id, created, at, kind, recipient, call, outcome, upstream_id, detail, self.actor, data
        )

    # -- the delivery owner -------------------------------------------------------------------------------

    def accepted(
        self,
        *,
        msg_id: str,
        created: float,
        submission: Submission,
        origin: Origin | None,
        reply: str,
        reply_id: str,
        calls: Mapping[str, CallRow],
        requests: Any,
        decision: Decision | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        """A 250. `decision`/`outcome`: the inline attempt ended within the budget (else the call runs on
        and `attempt` follows)."""
        if not self.enabled:
            return
        now = self.clock()
        message = submission.message
        rows: list[Row] = [
            _message_row(
                msg_id,
                created,
                submission,
                origin,
                reply,
                reply_id,
                request=None if requests is None else model.json(requests),
                notice=notice.of(submission, origin),
            ),
            self._event(msg_id, created, now, model.ACCEPTED, detail=reply),
        ]
        now += TICK
        if outcome is None:
            rows += self._recipients(msg_id, created, calls, None, now)
            rows.append(
                self._event(
                    msg_id,
                    created,
                    now,
                    model.INFLIGHT,
                    detail="the upstream did not answer within the inline budget: stored, the call runs on",
                )
            )
        else:
            assert decision is not None

            def about() -> announce.About:
                return announce.About(
                    msg_id,
                    created,
                    submission.principal.account,
                    reply_id,
                    message.message_id,
                    submission.mail_from,
                    message.subject,
                    submission.principal.login,
                )

            rows += self._attempt(msg_id, created, decision, outcome, "inline", now, settled=True, about=about)
        self.sink(rows)

    def test_message(
        self, *, msg_id: str, submission: Submission, origin: Origin | None, reply: str, requests: Any
    ) -> None:
        """A test-mode login's message (gateway/delivery/testmode.py): its record with the requests that would
        have been sent (kept whatever `keep_requests` says: they are what a test login is for), never sent."""
        if not self.enabled:
            return
        now = self.clock()
        rows: list[Row] = [
            _message_row(msg_id, now, submission, origin, reply, msg_id, request=model.json(requests), notice=None),
            self._event(msg_id, now, now, model.ACCEPTED, detail=reply),
            self._event(msg_id, now, now + TICK, model.TEST_MODE, detail="test mode: nothing was sent upstream"),
        ]
        rows += [
            RecipientRow(msg_id, now, address, "test", now + TICK, None, None, "test mode: not sent")
            for address in submission.rcpt_tos
        ]
        self.sink(rows)

    def attempt(
        self,
        *,
        msg_id: str,
        created: float,
        decision: Decision,
        outcome: Outcome | None,
        path: str,
        settled: bool,
        submission: Submission | None = None,
        size: int | None = None,
        account: str = "",
        notice_kept: str | None = None,
    ) -> None:
        """An attempt that settled a stored message (`settled` False: fenced, another owner has it now: its
        verdict is not ours to record, the calls' answers are). `submission`: a claimed message's, so
        its record exists even if the accepting instance never wrote it; `notice_kept`: what the queue kept
        with it for a notice (notice.queued), so that record's notice data is the one acceptance made."""
        if not self.enabled:
            return
        now = self.clock()
        rows: list[Row] = []
        about = announce.About(msg_id, created, account)
        if submission is not None:
            message = submission.message
            about = announce.About(
                msg_id,
                created,
                submission.principal.account,
                None,
                message.message_id,
                submission.mail_from,
                message.subject,
                submission.principal.login,
            )
        if submission is not None:
            rows.append(
                MessageRow(
                    id=msg_id,
                    created=created,
                    account=submission.principal.account,
                    mail_from=submission.mail_from,
                    subject=submission.message.subject,
                    size=size,
                    login=submission.principal.login,
                    message_id=submission.message.message_id,
                    notice=notice.rebuilt(submission, notice_kept),
                )
            )
        rows += self._attempt(msg_id, created, decision, outcome, path, now, settled=settled, about=lambda: about)
        self.sink(rows)

    def ambiguous(self, *, msg_id: str, created: float, calls: Mapping[str, CallRow], keys: Iterable[str]) -> None:
        if not self.enabled:
            return
        now = self.clock()
        self.sink(
            [
                self._event(
                    msg_id,
                    created,
                    now,
                    model.AMBIGUOUS,
                    recipient=calls[key].recipients,
                    call=key,
                    outcome="ambiguous",
                    detail="the owner that sent this call stopped before its answer was recorded (lease expired)",
                )
                for key in keys
            ]
        )

    def resend(self, *, msg_id: str, reply_id: str) -> None:
        """A resend with this message's idempotency key got its 250 and was not sent again."""
        if not self.enabled:
            return
        now = self.clock()
        detail = f"a resend with the same idempotency key was answered {reply_id} and not sent again"
        self.sink([self._event(msg_id, now, now, model.RESEND, detail=detail)])

    # -- operators ---------------------------------------------------------------------------------------

    def operator(
        self,
        *,
        msg_id: str,
        created: float,
        action: str,
        detail: str,
        changed: Mapping[str, tuple[RecipientState, str | None]] | None = None,
        unknown: Sequence[CallRow] = (),
    ) -> None:
        """`action`: model.RETRIED, REQUEUED or DELETED; `changed`: address -> (state, reason) it sets;
        `unknown`: calls the action ended whose answer was lost (they may have been sent), each an
        `ambiguous` event (their recipients' state is in `changed`: a delete makes them dead, saying so)."""
        if not self.enabled:
            return
        now = self.clock()
        rows: list[Row] = [self._event(msg_id, created, now, action, detail=detail)]
        for address, (state, reason) in (changed or {}).items():
            rows.append(RecipientRow(msg_id, created, address, state, now, reason=reason))
        for n, call in enumerate(unknown, 1):
            rows.append(
                self._event(
                    msg_id,
                    created,
                    now + n * TICK,
                    model.AMBIGUOUS,
                    recipient=call.recipients,
                    call=call.key,
                    outcome="ambiguous",
                    detail=f"{detail}: an earlier answer to this call was lost, the upstream may have sent it",
                )
            )
        self.sink(rows)

    # -- rows --------------------------------------------------------------------------------------------

    def _recipients(
        self,
        msg_id: str,
        created: float,
        calls: Mapping[str, CallRow],
        decision: Decision | None,
        now: float,
        short: Mapping[str, str] | None = None,
    ) -> list[Row]:
        """Each recipient's row; `short`: call key -> why its recipients' sends are in doubt (the upstream said
        it sent fewer mails than the call named), until events say which were sent."""
        rows: list[Row] = []
        for call in calls.values():
            state, reason = recipient_state(call, decision)
            if short and state == "sent" and call.key in short:
                reason = short[call.key]
            rows += [
                RecipientRow(msg_id, created, address, state, now, call.upstream_id, call.key, reason)
                for address in addresses(call)
            ]
        return rows

    def _attempt(
        self,
        msg_id: str,
        created: float,
        decision: Decision,
        outcome: Outcome | None,
        path: str,
        now: float,
        *,
        settled: bool,
        about: Callable[[], announce.About],
    ) -> list[Row]:
        """`about`: the message, for the webhooks told of a dead letter (made only for one)."""
        short = _short(decision.calls, outcome)
        rows = self._recipients(msg_id, created, decision.calls, decision if settled else None, now, short)
        lost = outcome.ambiguous if outcome is not None else set()
        ticks = itertools.count()
        plain: list[str] = []  # the data of a call without a count, made once when the first one needs it

        def call_event(
            key: str, result: str, upstream_id: str | None = None, detail: str | None = None, sent: int | None = None
        ) -> None:
            call = decision.calls.get(key)
            # The upstream's own count of mails the call sent (DMDS `sent`), where it gives one.
            if sent is not None:
                data = model.json({"path": path, "attempt": decision.attempts, "sent": sent})
            else:
                if not plain:
                    plain.append(model.json({"path": path, "attempt": decision.attempts}))
                data = plain[0]
            rows.append(
                self._event(
                    msg_id,
                    created,
                    now + next(ticks) * TICK,
                    model.ATTEMPT,
                    recipient=call.recipients if call else None,
                    call=key,
                    outcome=result,
                    upstream_id=upstream_id,
                    detail=detail,
                    data=data,
                )
            )

        if outcome is not None:
            for key, upstream_id in outcome.delivered.items():
                sent = outcome.sent.get(key)
                call_event(key, "delivered", upstream_id=upstream_id or None, detail=short.get(key), sent=sent)
            for key, deferral in outcome.deferred.items():
                call_event(key, "ambiguous" if key in lost else "deferred", detail=deferral.reason)
            for key, refusal in outcome.rejected.items():
                call_event(key, "refused", detail=refusal.reason)
        if not settled:
            return rows
        if decision.verdict == "queued":
            when = model.iso(decision.next_attempt)
            rows.append(
                self._event(
                    msg_id,
                    created,
                    now + next(ticks) * TICK,
                    model.QUEUED,
                    detail=f"next attempt at {when}",
                    data=model.json({"attempts": decision.attempts, "next_attempt": when}),
                )
            )
        elif decision.verdict in ("dead", "refused"):
            dead = self._event(
                msg_id,
                created,
                now + next(ticks) * TICK,
                model.DEAD_LETTERED,
                detail=decision.dead_reason,
                data=model.json({"cause": decision.dead_cause or "refused"}),
            )
            rows.append(dead)
            rows += self._dead_recipients(dead, decision, about(), now)
        return rows

    def _dead_recipients(self, dead: EventRow, decision: Decision, about: announce.About, now: float) -> list[Row]:
        """A dead letter's recipients not sent: each one's notice to decide, and the webhooks told of it."""
        rows: list[Row] = []
        n = 0
        for call in decision.calls.values():
            if call.state == "done":
                continue
            reason = call.error if call.state == "rejected" else decision.dead_reason
            for address in addresses(call):
                rows.append(NoticeRow(dead.msg_id, dead.created, address, dead.at))
                if self.subscriptions and about.account:
                    event_id = f"{dead.id}.{n}"
                    text = announce.body(event_id, "dead", dead.at, about, address, "dead", detail=reason)
                    rows += announce.outbox(self.subscriptions, "dead", event_id, about, now, text)
                n += 1
        return rows


def _short(calls: Mapping[str, CallRow], outcome: Outcome | None) -> dict[str, str]:
    """Calls the upstream said sent fewer mails than their recipients (DMDS `sent`): call key -> the words, on
    the call's attempt event and as each of its recipients' reason until the events say which were sent."""
    counts: Mapping[str, int] = outcome.sent if outcome is not None else {}
    out = {}
    for key, sent in counts.items():
        call = calls.get(key)
        # A call names at most one recipient more than its commas: a count above them is not short (most are
        # not), known without splitting the recipients.
        if call is None or sent > call.recipients.count(","):
            continue
        wanted = len(addresses(call))
        if sent < wanted:
            out[key] = f"the upstream says it sent {sent} mail(s) for {wanted} recipient(s)"
    return out


_NO_ORIGIN = (None, None, None, None)


def _message_row(
    msg_id: str,
    created: float,
    submission: Submission,
    origin: Origin | None,
    reply: str,
    reply_id: str,
    *,
    request: str | None,
    notice: str | None,
) -> MessageRow:
    """A message's own row from what the SMTP session took and where it came from (built positionally, in
    MessageRow's order: one is made for every message)."""
    principal, message = submission.principal, submission.message
    size, listener, peer, dsn_of = (origin.size, origin.listener, origin.peer, origin.dsn_of) if origin else _NO_ORIGIN
    return MessageRow(
        msg_id,
        created,
        principal.account,
        submission.mail_from,
        message.subject,
        size,
        principal.login,
        listener,
        peer,
        message.message_id,
        reply_id,
        reply,
        request,
        dsn_of,
        notice,
    )
