"""DeliveryOwner: the one owner of every delivery attempt of this process, inline or from the queue.

An attempt is a task of the owner, not of the SMTP session: when the client disconnects while its
inline call runs, the call goes on and its outcome is recorded like any other (log line, metrics; queued
when it failed). What follows an outcome is decided by gateway/delivery/transition.py; the queue store
only stores it, under the lease token this owner holds.

Inline (a new message):   call  --within inline_budget-->  delivered 250 <id> | refused 5xx | queued 250
                          call  --budget over-->  stored in flight (leased to us), 250 <local id>; the call
                          runs on and its outcome settles the stored message
Queued (the retry worker): claim (lease) -> resume calls an expired lease left 'sending' (ambiguous)
                          -> deliver the calls not done -> settle under the claim's token
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from gateway.config import DeliverySettings
from gateway.core import replies
from gateway.core.episode import Episode
from gateway.core.errors import Deferred, Fenced, GatewayError, SpoolUnavailable
from gateway.core.model import Call, Origin, Receipt, Submission
from gateway.core.outcome import Deliverer, Outcome
from gateway.core.records import CallRow, Decision, DeliveryState, RetryPolicy
from gateway.core.replies import Reply
from gateway.core.waits import idle
from gateway.delivery import transition
from gateway.delivery.health import AccountHealth
from gateway.delivery.keys import IdempotencyKeys
from gateway.delivery.leaseowners import owner_id
from gateway.ledger import notice
from gateway.ledger.recorder import Recorder
from gateway.ops import logs
from gateway.ops.metrics import (
    AMBIGUOUS,
    CLIENT_GONE,
    DEAD_LETTERS,
    DELIVERIES,
    FENCED,
    INTERNAL_ERRORS,
    QUEUE_COMMIT_UNKNOWN,
    QUEUE_STORE_FAILURES,
    RESENDS,
)
from gateway.queue import codec
from gateway.queue.store import Claimed, CommitUnknown, KeyTakenOver, NewMessage, QueueStore

log = structlog.get_logger("gateway.delivery")
# An attempt's result offered to a queue that cannot take it: again after SETTLE_FIRST_WAIT s, doubling up to
# SETTLE_MAX_WAIT s, for as long as the process lives (its lease renewed meanwhile: _store_decision).
SETTLE_FIRST_WAIT = 0.2
SETTLE_MAX_WAIT = 5.0


# A new message whose insert's COMMIT answer was lost: how often the queue is asked whether it is there before
# the client is answered (waits of settle_backoff: about 3 s in all; the circuit's probe asks every second).
LANDED_TRIES = 5


def settle_backoff(tries: int) -> float:
    """Seconds to wait after the `tries`-th failed settle: 0.2, 0.4, 0.8, ... capped at SETTLE_MAX_WAIT."""
    return min(SETTLE_MAX_WAIT, SETTLE_FIRST_WAIT * 2.0 ** min(tries - 1, 16))


# Queue ids drawn from the OS's random source 256 at a time (one getrandom call, not one per message): as
# unguessable, each id eight bytes used once. A forked worker starts with none (it must not repeat its parent's).
_POOLED_IDS = 256
_id_pool: list[str] = []
os.register_at_fork(after_in_child=_id_pool.clear)


def new_id() -> str:
    """A local queue id: 16 upper-case hex digits (distinct from the upstreams' UUIDs)."""
    try:
        return _id_pool.pop()  # atomic: threads never share an id
    except IndexError:
        digits = os.urandom(8 * _POOLED_IDS).hex().upper()
        _id_pool.extend(digits[i : i + 16] for i in range(0, len(digits), 16))
        return _id_pool.pop()


@functools.lru_cache(maxsize=1024)
def _delivered(account: str, path: str, verdict: str) -> Any:
    """The deliveries counter's child, bound once per label set (labels() takes a lock and walks a dict)."""
    return DELIVERIES.labels(account=account, path=path, verdict=verdict)


# A message's account that is not configured: its deferral reason, and the dead letter's last error.
NOT_CONFIGURED = "is no longer configured (removed by a reload, or before a restart)"


# The longest upstream id a 250 names: an id is the upstream's to choose ([I] for both drivers), and a reply
# line holds at most 512 octets (RFC 5321 4.5.3.1.5); a longer one, or one with characters outside printable
# ASCII (a space, a control character, UTF-8), is kept whole in the queue and the ledger, and the 250 names the
# local queue id instead.
MAX_REPLY_ID = 200
_unreplyable_logged: set[str] = set()  # "logged once": per process, by the id's problem


def reply_id_problem(upstream_id: str) -> str | None:
    """Why an upstream id cannot stand in a 250 line (None: it can)."""
    if len(upstream_id) > MAX_REPLY_ID:
        return "too_long"
    if not all(33 <= ord(c) <= 126 for c in upstream_id):
        return "not_printable_ascii"
    return None


@dataclass
class InlineAttempt:
    """One new message's first attempt."""

    msg_id: str
    submission: Submission
    before: DeliveryState
    log: structlog.typing.FilteringBoundLogger
    started: set[str] = field(default_factory=set)  # call keys handed to the upstream
    token: int | None = None  # set once the message is stored in flight
    client_gone: bool = False
    idempotency_key: str | None = None
    digest: str | None = None  # what the message says, kept with its idempotency key
    receipt: Receipt = field(default_factory=Receipt)  # what the session's transaction line reports
    reply_id: str | None = None  # the id its 250 named: what a resend with its idempotency key is told
    origin: Origin | None = None  # listener, client, size: for the ledger record
    # The provider the session started with: a reload that replaces or removes the account does not change
    # the message it was sending (docs/operations/reload.md); None: the owner's current one.
    provider: Deliverer | None = None

    def queued(self, reply_id: str) -> Reply:
        """The 250 naming `reply_id` (the local queue id when the upstream's cannot stand in a reply line:
        reply_id_problem), remembered for the idempotency key."""
        problem = reply_id_problem(reply_id) if reply_id != self.msg_id else None
        if problem is not None:
            if problem not in _unreplyable_logged:
                _unreplyable_logged.add(problem)
                self.log.warning(
                    "upstream_id_not_in_reply",
                    problem=problem,
                    length=len(reply_id),
                    note="the 250 names the local queue id; the upstream's id is kept whole in the queue and ledger",
                )
            reply_id = self.msg_id
        self.reply_id = reply_id
        return replies.queued(reply_id)


class DeliveryOwner:
    def __init__(
        self,
        providers: Mapping[str, Deliverer],
        store: QueueStore,
        settings: DeliverySettings,
        health: AccountHealth,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        ledger: Recorder | None = None,
    ) -> None:
        self.providers = providers
        self.store = store
        self.settings = settings
        self.health = health
        self.owner = owner or owner_id(settings.instance_name)
        self.policy = RetryPolicy(
            tuple(settings.retry_schedule), settings.retry_jitter, settings.max_lifetime, settings.ambiguous
        )
        self.clock = clock
        self.ledger = ledger or Recorder.off()  # the message ledger: every 250, every attempt after it
        self.rng = random.Random()
        self.wakeup = asyncio.Event()  # something became due sooner than the retry worker expects
        self.held: dict[str, int] = {}  # message id -> token of the leases this owner holds
        self._tasks: set[asyncio.Task[None]] = set()
        # Tasks past their upstream calls (storing a decision, withdrawing): they hold no provider, and a reload
        # need not wait for them (a settle retried through a queue outage) before closing retired ones.
        self._calls_over: set[asyncio.Task[Any]] = set()
        self._calls_over_wake: asyncio.Future[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._renewals_failing = Episode()
        # The queue refusing to store messages: spool_unavailable once per outage (each refused message has its
        # own summary line, message_deferred, with the reason).
        self._spool_failing = Episode()
        # Past the inline budget (+ time to store) a first attempt has answered, or its process is gone.
        self.keys = IdempotencyKeys(store, settings.idempotency_window, settings.inline_budget + 60.0, clock)

    # -- inline ----------------------------------------------------------------------------------------

    async def submit(
        self,
        submission: Submission,
        plan: Sequence[Call],
        bound: structlog.typing.FilteringBoundLogger,
        idempotency_key: str | None = None,
        receipt: Receipt | None = None,
        on_done: Callable[[], None] | None = None,
        origin: Origin | None = None,
        digest: str | None = None,
        on_gone: Callable[[Reply | None], None] | None = None,
        provider: Deliverer | None = None,
    ) -> Reply:
        """The reply to a new message. The attempt is ours: if the session is cancelled (client gone),
        the attempt goes on and records its outcome. `receipt` learns the queue id or upstream ids; `on_done`
        is called when the first attempt has ended. `digest`: what the message says (idempotency.digest_of),
        kept with its key: a key reused for different content is refused. `on_gone`: if the session is
        cancelled, called once with the reply its first attempt decided (when it has one), or None when
        nothing was sent (what a per-login quota must know of a message whose client left). `provider`: the
        one the session started with (a reload may have replaced or removed its account since).

        `on_done` is ours from the call on, however submit ends: called when the first attempt has ended, or
        at once when there is none (a resend answered from its key; cancelled or failed before the attempt
        started). The caller must not release what it frees: a session cancelled while the attempt runs
        would free the message's memory budget while the attempt still holds the message."""
        now = self.clock()
        taken = False  # on_done handed to the first attempt
        try:
            attempt = InlineAttempt(
                new_id(),
                submission,
                transition.fresh(plan, now, self.policy),
                bound,
                idempotency_key=idempotency_key,
                digest=digest,
                receipt=receipt if receipt is not None else Receipt(),
                origin=origin,
                provider=provider,
            )
            if idempotency_key is not None:
                try:
                    resent = await self._resent(attempt, now)
                except asyncio.CancelledError:
                    if on_gone is not None:
                        on_gone(None)  # gone before the message was taken: nothing is sent
                    raise
                if resent is not None:
                    return resent
            decided: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            if idempotency_key is not None:
                decided.add_done_callback(lambda f: self._spawn(self._finish_key(attempt)))
            self._spawn(self._first_attempt(attempt, decided, on_done))
            taken = True
        finally:
            if not taken and on_done is not None:
                on_done()  # no attempt holds the message: a resend answered from its key, or ended before one
        try:
            return await asyncio.shield(decided)
        except asyncio.CancelledError:
            attempt.client_gone = True
            if on_gone is not None:
                decided.add_done_callback(functools.partial(_decided_for, on_gone))
            raise

    async def _resent(self, attempt: InlineAttempt, now: float) -> Reply | None:
        """A resend of a message already taken (same idempotency key within the window): its reply."""
        account, key = attempt.submission.principal.account, attempt.idempotency_key
        assert key is not None
        hit = await self.keys.claim(account, key, attempt.msg_id, now, attempt.digest)
        if isinstance(hit, KeyTakenOver):
            # The earlier message claimed the key and never answered within inline_budget + 60 s, and was
            # never queued: its process died, most likely between an inline delivery and recording its
            # answer. This one is sent: a duplicate if the earlier one's calls went out (the at-least-once
            # window of a key whose answer was lost, counted with the others).
            AMBIGUOUS.labels(account=account, cause="key_taken_over").inc()
            attempt.log.warning(
                "delivery_ambiguous",
                queue_id=attempt.msg_id,
                cause="key_taken_over",
                key=key[:12],
                first_queue_id=hit.msg_id,
            )
            return None
        if hit is None:
            return None
        if hit.digest is not None and attempt.digest is not None and hit.digest != attempt.digest:
            # The key of an earlier message on different content: a client bug, or two messages given one
            # key. Refused for good, as payment APIs refuse a key reused with other parameters.
            RESENDS.labels(account=account, result="conflict").inc()
            attempt.log.warning("message_resend_conflict", key=key[:12], first_queue_id=hit.msg_id)
            attempt.receipt.reason = f"idempotency key of {hit.msg_id} reused for a different message"
            return replies.IDEMPOTENCY_CONFLICT
        RESENDS.labels(account=account, result="in_progress" if hit.reply_id is None else "answered").inc()
        attempt.log.info("message_resend_not_sent", key=key[:12], first_queue_id=hit.msg_id, reply_id=hit.reply_id)
        if hit.reply_id is None:
            attempt.receipt.reason = "a message with this idempotency key is being delivered"
            return replies.RESEND_IN_PROGRESS
        attempt.receipt.reason = f"resend of {hit.msg_id}: not sent again"
        attempt.receipt.resend_of = hit.msg_id
        self._record(self.ledger.resend, msg_id=hit.msg_id, reply_id=hit.reply_id)
        return replies.queued(hit.reply_id)

    async def _finish_key(self, attempt: InlineAttempt) -> None:
        """Remember the id the 250 carried, or forget the key when the message was not taken (no 250)."""
        key = attempt.idempotency_key
        assert key is not None
        account = attempt.submission.principal.account
        await self.keys.finish(account, key, attempt.msg_id, attempt.reply_id, attempt.digest)

    async def _first_attempt(
        self, attempt: InlineAttempt, decided: asyncio.Future[Reply], on_done: Callable[[], None] | None = None
    ) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released and on_done is not None:
                released = True
                on_done()  # the message's memory may go now (it is delivered, refused or stored)

        try:
            await self._inline(attempt, decided, release)
        except GatewayError as exc:  # expected, and logged where it was raised (the queue cannot store)
            attempt.receipt.reason = attempt.receipt.reason or exc.reason
            if not decided.done():
                decided.set_result(exc.reply)
        except Exception as exc:  # a bug: once with its traceback, counted; the client may retry
            INTERNAL_ERRORS.labels(where="inline_delivery").inc()
            attempt.log.error("delivery_internal_error", queue_id=attempt.msg_id, exc_info=exc)
            DELIVERIES.labels(
                account=attempt.submission.principal.account, path="inline", verdict="internal_error"
            ).inc()
            if not decided.done():
                attempt.receipt.reason = "internal error (logged as delivery_internal_error)"
                decided.set_result(replies.INTERNAL_ERROR)
        finally:
            release()

    async def _inline(
        self, attempt: InlineAttempt, decided: asyncio.Future[Reply], release: Callable[[], None] = lambda: None
    ) -> None:
        """The first attempt. `release`: frees the message's memory (its budget share and spill file) once
        nothing left needs it; called here as soon as a call stored in flight has its outcome, so a settle
        retried through a queue outage does not keep new large messages refused for the whole outage."""
        provider = attempt.provider or self.providers.get(attempt.submission.principal.account)
        if provider is None:  # a notice of an account a reload removed (a session passes its own provider)
            raise Deferred(f"account {attempt.submission.principal.account} {NOT_CONFIGURED}")

        async def before_send(keys: Sequence[str]) -> None:
            # Not stored yet (no token): nobody else can have the message, nothing to check. Stored in flight
            # (the budget ran out): leased to us, and checked like a claimed message's calls.
            if attempt.token is not None:
                await self._fence(provider.account, attempt.msg_id, attempt.token, keys)
            attempt.started.update(keys)

        call = asyncio.ensure_future(provider.deliver(attempt.submission, {}, before_send))
        done, _ = await asyncio.wait({call}, timeout=self.settings.inline_budget)
        if call in done:
            outcome = call.result()
            if outcome.failed and not outcome.delivered:
                # A bug and nothing delivered: the client's retry after a 451 sends the message again (a
                # call the bug struck after its request went may be out: counted). Once a call was
                # delivered, the message is queued with the rest pending instead (_decide), as for any
                # partial delivery.
                account = attempt.submission.principal.account
                AMBIGUOUS.labels(account=account, cause="internal_error").inc(len(outcome.failed))
                raise next(iter(outcome.failed.values()))
            decision = self._decide(attempt.before, outcome, attempt.submission, "inline", self._bound(attempt))
            reply = await self._conclude(attempt, decision, outcome)
            decided.set_result(reply)
            if reply.code == 250:
                self._accepted(attempt, reply, decision.calls, decision, outcome)
            return
        if self.settings.mode == "passthrough":
            # The client hears 451 now and will resend; if this call then succeeds, that resend is a
            # duplicate: counted as ambiguous (cause "passthrough_late").
            attempt.receipt.reason = "upstream did not answer within the inline budget"
            decided.set_result(replies.UPSTREAM_SLOW)
            self._gone(attempt, "deferred")
            decision = self._decide(attempt.before, await call, attempt.submission, "inline", self._bound(attempt))
            if decision.first_id is not None:
                AMBIGUOUS.labels(account=provider.account, cause="passthrough_late").inc()
            attempt.log.warning(
                "late_answer_after_451",
                verdict=decision.verdict,
                upstream_id=decision.first_id,
                error=decision.last_error,
            )
            return
        try:
            await self._store_inflight(attempt)
        except SpoolUnavailable as exc:
            # Cannot store it: the running call's answer is all there is (bounded by the HTTP timeout).
            QUEUE_STORE_FAILURES.inc()
            if self._spool_failing.occurred():
                attempt.log.error("spool_unavailable", queue_id=attempt.msg_id, error=exc.reason)
            outcome = await call
            decision = self._decide(attempt.before, outcome, attempt.submission, "inline", self._bound(attempt))
            decided.set_result(self._unstored(attempt, decision, outcome, exc))
            return
        self._stored()
        attempt.receipt.queue_id = attempt.msg_id
        reply = attempt.queued(attempt.msg_id)
        decided.set_result(reply)
        self._gone(attempt, "queued")
        attempt.log.info(
            "message_spooled",
            queue_id=attempt.msg_id,
            inflight=True,
            reason="upstream did not answer within the inline budget",
        )
        stored = replace(
            attempt.before,
            calls={
                k: replace(r, state="sending") if k in attempt.started else r for k, r in attempt.before.calls.items()
            },
        )
        self._accepted(attempt, reply, stored.calls)
        try:
            outcome = await call
        except Exception as exc:
            release()  # what is stored needs only the state before the call
            await self._internal_error(
                attempt.msg_id, attempt.token or 0, stored, exc, "inline_delivery", attempt.submission.principal.account
            )
        else:
            decision = self._decide(stored, outcome, attempt.submission, "inline", self._bound(attempt))
            release()  # the settle below needs only the decision, however long the queue takes to answer
            await self._settle(
                attempt.msg_id,
                attempt.token or 0,
                decision,
                attempt.log,
                stored.created,
                outcome,
                path="inline",
                account=attempt.submission.principal.account,
            )
        finally:
            self._release(attempt.msg_id, attempt.token or 0)

    def _unstored(self, attempt: InlineAttempt, decision: Decision, outcome: Outcome, exc: SpoolUnavailable) -> Reply:
        """The reply to a first attempt that outlived the budget while the queue could not store it: the
        outcome's own, as within the budget (_conclude), when nothing is left to send: delivered, a 250;
        refused, the upstream's 5xx (the client keeps the message and sees why; a 452 had it resend a message
        refused for good); some delivered and the rest refused, the 250 (a 452 had the client resend to the
        delivered recipients too), with the refusal in its summary line and the ledger, though no dead letter
        can be kept. Only a message with calls still pending, which nothing but the queue could keep, is 452."""
        verdict, receipt = decision.verdict, attempt.receipt
        if verdict == "refused":
            assert decision.refusal is not None
            self._gone(attempt, verdict)
            receipt.reason = decision.refusal.reason
            return decision.refusal.reply
        if verdict == "delivered" or (verdict == "dead" and decision.dead_cause == "refused"):
            # "dead" and "refused": nothing pending (transition.decide); any other dead letter may have some.
            self._gone(attempt, verdict)
            receipt.upstream_ids = _ids(decision)
            receipt.upstream_sent = outcome.sent_total()
            if verdict == "dead":  # logged and counted as the dead letter it would be, for the operators
                receipt.reason = decision.dead_reason
                DEAD_LETTERS.labels(cause=dead_cause(decision)).inc()
                attempt.log.error(
                    "message_dead_lettered", queue_id=attempt.msg_id, reason=decision.dead_reason, stored=False
                )
            reply = attempt.queued(decision.first_id or attempt.msg_id)
            self._accepted(attempt, reply, decision.calls, decision, outcome)
            return reply
        receipt.reason = f"queue unavailable: {exc.reason}"
        self._unqueued(attempt, decision)
        return replies.SPOOL_FULL

    async def _store_inflight(self, attempt: InlineAttempt) -> None:
        now = self.clock()
        snapshot = set(attempt.started)
        calls = {k: replace(r, state="sending") if k in snapshot else r for k, r in attempt.before.calls.items()}
        decision = Decision("queued", calls, 0, now, None)
        attempt.token = await self._insert(self._new(attempt, decision, inflight=True))
        self.held[attempt.msg_id] = attempt.token
        self._start_heartbeat()
        late = attempt.started - snapshot  # handed over while the insert ran
        if late:
            await self._mark_sending(attempt.msg_id, attempt.token, sorted(late))

    async def _conclude(self, attempt: InlineAttempt, decision: Decision, outcome: Outcome) -> Reply:
        """The reply for a first attempt that finished within the budget; stores what must be kept."""
        bound, verdict = attempt.log, decision.verdict
        self._gone(attempt, verdict)
        receipt = attempt.receipt
        receipt.upstream_sent = outcome.sent_total()
        if verdict == "delivered":
            receipt.upstream_ids = _ids(decision)
            if attempt.client_gone:  # no summary line will carry the ids
                bound.info("message_sent", **self._sent(receipt, decision, outcome))
            elif logs.enabled("debug"):  # the session's summary line (message_accepted) carries the same at info
                bound.debug("message_sent", **self._sent(receipt, decision, outcome))
            return attempt.queued(decision.first_id or attempt.msg_id)
        if verdict == "refused":
            assert decision.refusal is not None
            receipt.reason = decision.refusal.reason
            return decision.refusal.reply
        if verdict == "queued" and self.settings.mode == "passthrough" and decision.first_id is None:
            first = next(iter(outcome.deferred.values()), None)
            receipt.reason = decision.last_error
            return first.reply if first is not None else replies.UPSTREAM_UNAVAILABLE
        try:
            await self._insert(self._new(attempt, decision, inflight=False))
        except SpoolUnavailable as exc:
            QUEUE_STORE_FAILURES.inc()
            if self._spool_failing.occurred():
                bound.error(
                    "spool_unavailable",
                    queue_id=attempt.msg_id,
                    error=exc.reason,
                    delivered=sorted(k for k, c in decision.calls.items() if c.state == "done"),
                )
            self._unqueued(attempt, decision)  # a partial delivery is logged per message (delivery_ambiguous)
            raise
        self._stored()
        receipt.queue_id = attempt.msg_id
        receipt.upstream_ids = _ids(decision)
        receipt.reason = decision.dead_reason if verdict == "dead" else decision.last_error
        if verdict == "dead":
            DEAD_LETTERS.labels(cause=dead_cause(decision)).inc()
            bound.error("message_dead_lettered", queue_id=attempt.msg_id, reason=decision.dead_reason)
        else:
            self.wakeup.set()
            bound.info(
                "message_spooled", queue_id=attempt.msg_id, upstream_ids=_ids(decision), reason=decision.last_error
            )
        return attempt.queued(decision.first_id or attempt.msg_id)

    async def _insert(self, message: NewMessage) -> int:
        """store.insert, and when its COMMIT's answer was lost (CommitUnknown), whether the message is there:
        found, it is stored (its token: 1 in flight, 0 queued; the caller goes on as for any insert); not
        found, SpoolUnavailable (452: nothing was written, the client's resend is no duplicate); the queue not
        answering within ~3 s, SpoolUnavailable too, and the message is withdrawn once the queue answers (a
        452'd message left in the queue would be delivered, and the client's resend with it)."""
        token = 1 if message.inflight_owner is not None else 0
        try:
            return await self.store.insert(message)
        except CommitUnknown as exc:
            bound = log.bind(queue_id=message.id)
            landed = await self._landed(message.id, exc.xid)
            result = "unknown" if landed is None else "stored" if landed else "absent"
            # The message's insert may or may not have committed: what the queue said when asked again.
            bound.warning("queue_commit_unknown", result=result, error=exc.reason)
            if landed:
                QUEUE_COMMIT_UNKNOWN.labels(result="stored").inc()
                return token
            if landed is None:
                self._spawn(self._withdraw(message.id, token, bound, exc.xid))
            else:
                QUEUE_COMMIT_UNKNOWN.labels(result="absent").inc()
            raise

    async def _landed(self, msg_id: str, xid: int | None) -> bool | None:
        """Whether a message whose insert's COMMIT answer was lost is in the queue; None: the queue did not say
        (it did not answer, or the COMMIT was still finishing) within ~3 s. Asked by the transaction's own
        state where the queue keeps one (PostgreSQL, `xid`): the row alone is not enough, as a COMMIT still
        waiting for a synchronous standby (or a slow WAL flush) has a row no other session sees yet, which
        then lands after the client was told 452. Only when the queue cannot tell (no xid, one too old, or
        one the server has not reached: a standby promoted before the insert's WAL reached it) is the row's
        presence the answer: the transaction is then long over, or never reached this server. "Committed"
        needs the row too (else None): after such a failover the id may be another transaction's. A bug
        while asking is logged (queue_commit_check_failed) and taken for None."""
        for tries in range(1, LANDED_TRIES + 1):
            try:
                state = None if xid is None else await self.store.commit_state(xid)
                if state == "aborted":  # nothing was written, for good
                    return False
                if state != "in progress":
                    found = await self.store.token_of(msg_id) is not None
                    # Committed is confirmed by the row (seen from now on): a transaction id means something
                    # only on the server that gave it, and a standby promoted before the insert's WAL reached
                    # it gives that id to transactions of its own. Committed and no row: not known (452, and
                    # withdrawn should it land after all). Not known by the server: the row decides.
                    if found:
                        return True
                    return None if state == "committed" else False
            except SpoolUnavailable:
                pass
            except Exception as exc:  # a bug: not known, so the client hears 452 and the message is withdrawn
                self._commit_check_failed(msg_id, "landed", exc)
                return None
            if tries < LANDED_TRIES:
                await asyncio.sleep(settle_backoff(tries))
        return None

    async def _withdraw(
        self, msg_id: str, token: int, bound: structlog.typing.FilteringBoundLogger, xid: int | None = None
    ) -> None:
        """Delete a message answered 452 whose insert may have committed, once the queue answers, if still ours
        (its token unchanged: nobody claimed it). Held meanwhile: a message stored in flight is leased to us,
        and the heartbeat renews that lease as soon as the queue answers, so nobody claims it before this does.
        While the insert's COMMIT is still finishing (`xid` in progress: its row not seen yet, so a withdraw
        would find it "absent" and it would land after), asked again. The window left: the queue out, or the
        COMMIT finishing, for longer than the lease (in flight) or the message's first retry delay (queued),
        or the process stopped first (counted: claimed, abandoned)."""
        self._past_calls()
        self.held.setdefault(msg_id, token)
        self._start_heartbeat()
        tries = 0
        failed = False  # a bug met: logged the first time only
        try:
            while True:
                asking = "commit_state"
                try:
                    state = None if xid is None else await self.store.commit_state(xid)
                    if state == "aborted":  # never landed: nothing to withdraw, for good
                        result = "absent"
                        break
                    if state != "in progress":  # committed or not known: the row decides
                        asking = "withdraw"
                        result = await self.store.withdraw(msg_id, token)
                        break
                except SpoolUnavailable:  # CommitUnknown too: asked again, "absent" then means it was deleted
                    pass
                except Exception as exc:  # a bug: the message stays held, and is not left unwithdrawn
                    if not failed:
                        self._commit_check_failed(msg_id, "withdraw", exc)
                    failed = True
                    if asking == "commit_state":
                        xid = None  # its state is not to be had: the row decides, at once
                        continue
                tries += 1
                await asyncio.sleep(settle_backoff(tries))
        except asyncio.CancelledError:
            QUEUE_COMMIT_UNKNOWN.labels(result="abandoned").inc()
            # Stopped before the queue answered: the message, if stored, is delivered after its lease though
            # its client heard 452.
            bound.error("queue_commit_unknown_left", result="abandoned")
            raise
        finally:
            self._release(msg_id, token)
        if result == "claimed":
            QUEUE_COMMIT_UNKNOWN.labels(result="claimed").inc()
            # Claimed by another owner before it could be withdrawn: it may be delivered, its client told 452.
            bound.error("queue_commit_unknown_left", result="claimed")
        else:
            # "absent": it never landed, or (queued, its first retry due before the queue answered us) it was
            # claimed and delivered meanwhile: the window, not told apart.
            QUEUE_COMMIT_UNKNOWN.labels(result=result).inc()
            bound.info("queue_commit_withdrawn", found=result == "withdrawn")

    @staticmethod
    def _commit_check_failed(msg_id: str, step: str, exc: Exception) -> None:
        """An unexpected error asking the queue about an insert whose COMMIT's answer was lost: once with its
        traceback, counted; the caller goes on as for "not known" (452, the message withdrawn)."""
        INTERNAL_ERRORS.labels(where="queue_commit_unknown").inc()
        # A bug (or an answer the queue was not expected to give) while asking whether the insert committed:
        # taken for "not known", so the client hears 452 and the message is withdrawn if it landed.
        log.error("queue_commit_check_failed", queue_id=msg_id, step=step, exc_info=exc)

    def _stored(self) -> None:
        """The queue took a message: an episode of spool_unavailable is over."""
        if (over := self._spool_failing.ended()) is not None:
            log.info("spool_available", failed_for=over.lasted, failures=over.seen)

    def _unqueued(self, attempt: InlineAttempt, decision: Decision) -> None:
        """A message partly delivered whose rest the queue cannot take: its reply is a 4xx (nothing else keeps
        the rest), and the client's resend of the whole message duplicates the calls already delivered. No
        better reply exists; the window is counted (cause "partial_unqueued") and logged with their ids."""
        done = sorted(k for k, c in decision.calls.items() if c.state == "done")
        if not done:
            return
        account = attempt.submission.principal.account
        AMBIGUOUS.labels(account=account, cause="partial_unqueued").inc(len(done))
        attempt.log.warning(
            "delivery_ambiguous",
            queue_id=attempt.msg_id,
            cause="partial_unqueued",
            calls=done,
            upstream_ids=_ids(decision),
            policy=self.policy.ambiguous,
        )

    @staticmethod
    def _sent(receipt: Receipt, decision: Decision, outcome: Outcome) -> dict[str, Any]:
        """message_sent's fields."""
        return {"upstream_ids": receipt.upstream_ids, "calls": len(decision.calls), **_sent_field(outcome)}

    def _new(self, attempt: InlineAttempt, decision: Decision, *, inflight: bool) -> NewMessage:
        s = attempt.submission
        record, blobs = codec.encode(s)
        return NewMessage(
            id=attempt.msg_id,
            account=s.principal.account,
            mail_from=s.mail_from,
            subject=s.message.subject,
            submission=record,
            blobs=blobs,
            decision=decision,
            inflight_owner=self.owner if inflight else None,
            lease_until=self.clock() + self.settings.lease_seconds,
            created=attempt.before.created,
            expires=attempt.before.expires,
            idempotency_key=attempt.idempotency_key,
            notice=notice.queued(attempt.origin),
        )

    def _accepted(
        self,
        attempt: InlineAttempt,
        reply: Reply,
        calls: Mapping[str, CallRow],
        decision: Decision | None = None,
        outcome: Outcome | None = None,
    ) -> None:
        """The ledger record of a message answered 250 (with its first attempt, when that has ended)."""
        if not self.ledger.enabled:
            return
        provider = attempt.provider or self.providers.get(attempt.submission.principal.account)
        self._record(
            self.ledger.accepted,
            msg_id=attempt.msg_id,
            created=attempt.before.created,
            submission=attempt.submission,
            origin=attempt.origin,
            reply=str(reply),
            reply_id=attempt.reply_id or attempt.msg_id,
            calls=calls,
            requests=(
                provider.requests(attempt.submission, bodies=self.ledger.keep_bodies)
                if provider and self.ledger.keep_requests
                else None
            ),
            decision=decision,
            outcome=outcome,
        )

    def _record(self, record: Callable[..., None], **fields: Any) -> None:
        """Tell the ledger (rows into its buffer): a failure there is a bug to log, never the message's."""
        try:
            record(**fields)
        except Exception as exc:
            INTERNAL_ERRORS.labels(where="ledger_record").inc()
            log.error("ledger_record_failed", queue_id=fields.get("msg_id"), exc_info=exc)

    @staticmethod
    def _bound(attempt: InlineAttempt) -> structlog.typing.FilteringBoundLogger:
        return attempt.log.bind(queue_id=attempt.msg_id)

    def _gone(self, attempt: InlineAttempt, verdict: str) -> None:
        if attempt.client_gone:
            CLIENT_GONE.labels(verdict=verdict).inc()
            attempt.log.warning("client_gone_during_delivery", queue_id=attempt.msg_id, verdict=verdict)

    # -- from the queue --------------------------------------------------------------------------------

    async def run_claimed(self, item: Claimed) -> None:
        """One attempt of a message the retry worker leased; never raises."""
        self.held[item.id] = item.token
        self._start_heartbeat()
        bound = log.bind(queue_id=item.id, account=item.account)
        try:
            await self._attempt_claimed(item, bound)
        except Exception as exc:
            await self._internal_error(item.id, item.token, item.before, exc, "queue_delivery", item.account)
        finally:
            self._release(item.id, item.token)

    async def _attempt_claimed(self, item: Claimed, bound: structlog.typing.FilteringBoundLogger) -> None:
        now = self.clock()
        try:
            submission = codec.decode(item.submission, item.blobs)
        except codec.CodecError as exc:
            reason = f"corrupt queue record: {exc}"
            await self._settle(
                item.id,
                item.token,
                Decision(
                    "dead",
                    dict(item.before.calls),
                    item.before.attempts,
                    now,
                    reason,
                    dead_reason=reason,
                    dead_cause="corrupt",
                ),
                bound,
                item.before.created,
                account=item.account,
            )
            return
        before, lost = transition.resume(item.before)
        if lost:
            AMBIGUOUS.labels(account=item.account, cause="lease_expired").inc(len(lost))
            done_ids = [r.upstream_id for r in before.calls.values() if r.state == "done" and r.upstream_id]
            bound.warning(
                "delivery_ambiguous",
                cause="lease_expired",
                calls=lost,
                upstream_ids=done_ids,
                policy=self.policy.ambiguous,
            )
            self._record(self.ledger.ambiguous, msg_id=item.id, created=before.created, calls=before.calls, keys=lost)
            if self.policy.ambiguous == "hold":
                hold = transition.hold(before, lost, now)
                await self._settle(
                    item.id, item.token, hold, bound, before.created, submission=submission, notice_kept=item.notice
                )
                return
        provider = self.providers.get(item.account)
        if provider is None:
            outcome = Outcome(
                deferred={
                    # Retried on the schedule (the account may come back) and dead at max_lifetime, this as its
                    # last error: the worker claims the messages of accounts no longer configured too.
                    k: Deferred(f"account {item.account} {NOT_CONFIGURED}")
                    for k, r in before.calls.items()
                    if r.state == "pending"
                }
            )
        else:
            plan_keys = {c.key for c in provider.plan(submission)}
            if plan_keys != set(before.calls):
                raise RuntimeError(f"stored calls {sorted(before.calls)} differ from the plan {sorted(plan_keys)}")
            done = {k: r.upstream_id or "" for k, r in before.calls.items() if r.state == "done"}

            async def before_send(keys: Sequence[str]) -> None:
                await self._fence(item.account, item.id, item.token, keys)

            outcome = await provider.deliver(submission, done, before_send)
        decision = self._decide(before, outcome, submission, "queue", bound)
        await self._settle(
            item.id,
            item.token,
            decision,
            bound,
            before.created,
            outcome,
            submission=submission,
            notice_kept=item.notice,
        )

    # -- shared ----------------------------------------------------------------------------------------

    def _decide(
        self,
        before: DeliveryState,
        outcome: Outcome,
        submission: Submission,
        path: str,
        bound: structlog.typing.FilteringBoundLogger,
    ) -> Decision:
        account = submission.principal.account
        self._bugs(outcome, account, path, bound)
        if outcome.delivered and self.health.succeeded(account):
            self._spawn(self._wake(account))
        first_deferral = next(iter(outcome.deferred.values()), None)
        if first_deferral is not None:
            self.health.failed(account, first_deferral)
        fenced = sorted(k for k, e in outcome.deferred.items() if isinstance(e, Fenced))
        if fenced:
            # Calls this attempt did not send because its lease was over (or could not be checked).
            bound.warning("delivery_fenced", calls=fenced, reason=outcome.deferred[fenced[0]].reason)
        lost = outcome.ambiguous
        decision = transition.decide(before, outcome, self.policy, self.clock(), self.rng)
        if lost:
            AMBIGUOUS.labels(account=account, cause="answer_lost").inc(len(lost))
            bound.warning(
                "delivery_ambiguous",
                cause="answer_lost",
                calls=sorted(lost),
                upstream_ids=_ids(decision),
                policy=self.policy.ambiguous,
            )
        if lost and self.policy.ambiguous == "hold" and decision.verdict == "queued":
            decision = transition.hold(replace(before, calls=decision.calls), sorted(lost), self.clock())
        _delivered(account, path, decision.verdict).inc()
        return decision

    @staticmethod
    def _bugs(outcome: Outcome, account: str, path: str, bound: structlog.typing.FilteringBoundLogger) -> None:
        """Calls that met a bug: each one alone is an internal error (logged once with its traceback, counted;
        the others keep their answers), and ambiguous: the bug may have struck after its request went, and
        the call is tried again."""
        for key, bug in list(outcome.failed.items()):
            INTERNAL_ERRORS.labels(where=f"{path}_delivery").inc()
            bound.error("delivery_internal_error", call=key, exc_info=bug)
            outcome.failed[key] = bug.with_traceback(None)  # logged: its frames (and the message) may go
        if outcome.failed:
            AMBIGUOUS.labels(account=account, cause="internal_error").inc(len(outcome.failed))

    async def _settle(
        self,
        msg_id: str,
        token: int,
        decision: Decision,
        bound: structlog.typing.FilteringBoundLogger,
        created: float,
        outcome: Outcome | None = None,
        *,
        submission: Submission | None = None,
        path: str = "queue",
        account: str = "",
        notice_kept: str | None = None,
    ) -> None:
        """Store the attempt's decision under our token, then tell the ledger (what the calls answered, and,
        when the decision was stored, what follows: queued again or dead). `submission`, `notice_kept`: a claimed
        message's, and what the queue kept for a notice about it (its record rebuilt from them if the
        accepting instance never wrote it)."""
        settled = await self._store_decision(msg_id, token, decision, bound, outcome)
        self._record(
            self.ledger.attempt,
            msg_id=msg_id,
            created=created,
            decision=decision,
            outcome=outcome,
            path=path,
            settled=settled,
            submission=submission,
            account=account,
            notice_kept=notice_kept,
        )

    async def _store_decision(
        self,
        msg_id: str,
        token: int,
        decision: Decision,
        bound: structlog.typing.FilteringBoundLogger,
        outcome: Outcome | None = None,
    ) -> bool:
        """Store the decision under our token, trying again for as long as the queue cannot take it. The message
        stays in `held` meanwhile (its caller releases it when this returns), so the heartbeat renews its lease the
        moment the queue is back: nobody else may claim it while we hold its answer, and giving up early had
        it resent after its lease (a duplicate counted lease_expired) although this owner held the only token.
        Ends when stored, when fenced (another owner claimed it: the queue was out longer than the lease, so it
        was reaped; its resend is then counted lease_expired) or when the task is cancelled at shutdown (the
        lease is then ended by stop() or runs out, and the next claim counts the calls lease_expired)."""
        self._past_calls()
        failed_since: float | None = None
        tries = 0
        unknown = False  # a try's COMMIT answer was lost: it may have landed
        while True:
            try:
                settled = await self.store.settle(msg_id, token, decision, self.clock())
                if not settled and unknown and decision.verdict == "delivered":
                    # A delivered settle deletes the message: gone after a lost COMMIT answer, it was ours.
                    settled = await self.store.token_of(msg_id) is None
                break
            except SpoolUnavailable as exc:
                unknown = unknown or isinstance(exc, CommitUnknown)
                tries += 1
                if failed_since is None:  # once per message, not per try
                    failed_since = time.monotonic()
                    # The attempt's answer is only in memory: offered again (backoff up to 5 s) while the
                    # lease is renewed; lost only if the queue stays out past lease_seconds (reaped, resent:
                    # lease_expired) or the process stops first.
                    bound.error("queue_settle_failed", error=exc.reason, verdict=decision.verdict)
                await asyncio.sleep(settle_backoff(tries))
        if failed_since is not None:
            # The answer that waited is stored (stored=False: fenced, another owner claimed the message).
            bound.info(
                "queue_settle_recorded",
                tries=tries + 1,
                failed_for=round(time.monotonic() - failed_since, 1),
                stored=settled,
            )
        if not settled:
            bound.warning(
                "settle_fenced",
                verdict=decision.verdict,
                reason="the lease expired and another owner claimed the message",
            )
            return False
        verdict = decision.verdict
        if verdict == "delivered":
            bound.info("message_delivered", upstream_ids=_ids(decision), **_sent_field(outcome))
        elif verdict == "queued":
            self.wakeup.set()
            bound.info(
                "message_retry_scheduled",
                attempts=decision.attempts,
                error=decision.last_error,
                next_in=round(decision.next_attempt - self.clock(), 1),
            )
        else:
            DEAD_LETTERS.labels(cause=dead_cause(decision)).inc()
            bound.error("message_dead_lettered", reason=decision.dead_reason)
        return True

    async def _internal_error(
        self, msg_id: str, token: int, before: DeliveryState, exc: Exception, where: str, account: str
    ) -> None:
        INTERNAL_ERRORS.labels(where=where).inc()
        bound = log.bind(queue_id=msg_id)
        bound.error("delivery_internal_error", exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"
        decision = transition.internal_error(before, reason, self.policy, self.clock(), self.rng)
        path = "inline" if where == "inline_delivery" else "queue"
        await self._settle(msg_id, token, decision, bound, before.created, path=path, account=account)

    async def _fence(self, account: str, msg_id: str, token: int, keys: Sequence[str]) -> None:
        """The fencing check, right before calls go to the upstream (after every wait for the rate limiter,
        a token or a connection): the message must still carry our token and a lease that runs past a third
        of `lease_seconds` (a process paused past its lease, by SIGSTOP, a GC or a frozen VM, may find a
        sibling sending the message already). Marks the calls as being sent; raises Fenced: not sent."""
        lease_past = self.clock() + self.settings.lease_seconds / 3
        try:
            held = await self.store.mark_sending(msg_id, token, keys, lease_past)
        except SpoolUnavailable as exc:
            FENCED.labels(account=account, reason="unchecked").inc(len(keys))
            raise Fenced(f"the lease could not be checked ({exc.reason}): not sent", checked=False) from None
        if not held:
            FENCED.labels(account=account, reason="lease_lost").inc(len(keys))
            raise Fenced("the lease is over (this process was paused past it): not sent")

    async def _mark_sending(self, msg_id: str, token: int, keys: Sequence[str]) -> None:
        """Calls that went out while the message was being stored in flight: marked once it is."""
        try:
            await self.store.mark_sending(msg_id, token, keys)
        except SpoolUnavailable as exc:
            # If this process dies before settling, a resend of these will not be counted as ambiguous.
            log.error("queue_mark_sending_failed", queue_id=msg_id, error=exc.reason)

    async def _wake(self, account: str) -> None:
        with contextlib.suppress(SpoolUnavailable):
            woken = await self.store.wake(account, self.clock())
            if woken:
                log.info("queue_woken", account=account, messages=woken)
                self.wakeup.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_claimed(self, item: Claimed) -> asyncio.Task[None]:
        """The retry worker's way in: the attempt is this owner's task (waited for at shutdown)."""
        return self._spawn(self.run_claimed(item))

    # -- leases ----------------------------------------------------------------------------------------

    def _release(self, msg_id: str, token: int) -> None:
        """An attempt (or a withdraw) is over: forget the message in `held` only if the entry is still this
        attempt's token. A newer attempt of the same message (this process's retry worker claimed it after the
        old one's lease ran out, or while a withdraw waited) owns the entry then, and dropping it stopped the
        heartbeat renewing that attempt's lease while its call was out."""
        if self.held.get(msg_id) == token:
            del self.held[msg_id]

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        """Renew this owner's leases while it holds any: a lease only expires when its owner is gone."""
        interval = self.settings.lease_seconds / 3
        while self.held:
            await idle(interval)
            try:
                await self.store.renew(self.owner, self.clock() + self.settings.lease_seconds)
            except SpoolUnavailable as exc:
                if self._renewals_failing.occurred():  # once per outage, not once per heartbeat
                    log.error("queue_lease_renew_failed", error=exc.reason)
            else:
                if (over := self._renewals_failing.ended()) is not None:
                    log.info("queue_lease_renewed_again", failed_for=over.lasted, failures=over.seen)

    def _past_calls(self) -> None:
        """The current task makes no more upstream calls (it stores a decision or withdraws a message): it
        holds no provider, and running() stops waiting for it."""
        task = asyncio.current_task()
        if task is None or task not in self._tasks:
            return
        self._calls_over.add(task)
        task.add_done_callback(self._calls_over.discard)
        if self._calls_over_wake is not None and not self._calls_over_wake.done():
            self._calls_over_wake.set_result(None)

    async def running(self) -> None:
        """Wait for the attempts running now (not those started later) to be done with their providers:
        ended, or past their calls (a settle retried while the queue is out, a withdraw: they hold no
        provider). After a reload, the retired providers can then be closed."""
        waiting = set(self._tasks)
        while waiting := {t for t in waiting if not t.done() and t not in self._calls_over}:
            if self._calls_over_wake is None or self._calls_over_wake.done():
                self._calls_over_wake = asyncio.get_running_loop().create_future()
            await asyncio.wait({*waiting, self._calls_over_wake}, return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, timeout: float) -> None:
        """Let running attempts finish and record within `timeout`; the rest stay leased (reaped later)."""
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if pending:
            # Calls cut short may have reached the upstream: end our leases now, so that whoever claims
            # these messages next (another instance, or this one restarted) counts them as ambiguous.
            with contextlib.suppress(SpoolUnavailable):
                await self.store.expire_owners([self.owner], self.clock())
        await self.keys.stop()


def dead_cause(decision: Decision) -> str:
    """The dead-letter metric's cause label, as the transition (or the owner, for a corrupt record) set it."""
    return decision.dead_cause or "other"


def _ids(decision: Decision) -> list[str]:
    return [c.upstream_id for c in decision.calls.values() if c.state == "done" and c.upstream_id]


def _sent_field(outcome: Outcome | None) -> dict[str, int]:
    """`upstream_sent` for a log line: mails the upstream says this attempt's calls sent (DMDS `sent`), when
    it says; a count of sends, never of deliveries."""
    total = outcome.sent_total() if outcome is not None else None
    return {} if total is None else {"upstream_sent": total}


def _decided_for(on_gone: Callable[[Reply | None], None], decided: asyncio.Future[Reply]) -> None:
    """on_gone with the first attempt's reply (None if it ended without one: a bug, logged where it failed)."""
    on_gone(None if decided.cancelled() or decided.exception() is not None else decided.result())
