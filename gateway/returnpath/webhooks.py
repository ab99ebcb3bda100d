"""Webhook deliveries from the shared outbox: each one leased to one instance while it is POSTed (signed JSON,
through the one HTTP client for webhooks), then delivered, retried with exponential backoff and jitter, or
failed for good after the webhook's max_age. Rows another instance left leased when it stopped are taken
over once their lease expires.

At least once: a delivery is POSTed again only when its first POST may have been received without that
being recorded, and that is when a receiver may see it twice (dedupe on the event id): its answer was lost
after the request was sent (a timeout, a reset, an answer that is not HTTP), or the delivery stayed leased
and was taken over after its lease (its instance stopped mid-POST, or the receiver answered 2xx and the
database failed while that was recorded). Both are counted in smtp_gateway_webhook_possible_duplicates_total.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping

import structlog

from gateway import __version__
from gateway.config import WebhookSettings
from gateway.config.urls import shown_url, without_url_parts, without_urls
from gateway.core import signature
from gateway.core.errors import AnswerInvalid, AnswerLost, UpstreamUnavailable
from gateway.core.events import event_id
from gateway.core.waits import woken
from gateway.ledger import model
from gateway.ledger.model import EventRow
from gateway.ledger.returns import Delivery, ReturnStore
from gateway.ledger.store import LedgerUnavailable
from gateway.ops.metrics import (
    INTERNAL_ERRORS,
    WEBHOOK_DUPLICATES,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
    WEBHOOK_SENT,
)
from gateway.upstream.client import HttpClient

log = structlog.get_logger("gateway.webhooks")

BACKOFF_MAX = 3600.0
# What is read of a receiver's answer: its status decides, and its first words go into a failure's text. A 2xx
# with a big page (a framework's debug page, an echo) was taken all the same, so it is never read whole.
ANSWER_KEPT = 200
# smtp_gateway_webhook_failures_total's reasons, by the answer's status class (redirects are not followed: a
# receiver's Location is no place to send a signed event to unasked); a status outside 300-599 is http_other.
_STATUS_REASONS = {3: "http_3xx", 4: "http_4xx", 5: "http_5xx"}
# Every reason the failures are counted under (the docs and the metric's help name these: tested).
FAILURE_REASONS = (
    "http_3xx",
    "http_4xx",
    "http_5xx",
    "http_other",
    "timeout",
    "invalid_answer",
    "connect",
    "internal",
    "expired",
    "removed",
)
# A delivery's lease: its timeout and this margin (renewed by nobody: one POST fits in it).
LEASE_MARGIN = 30.0


def backoff(base: float, attempts: int, rng: random.Random) -> float:
    """Seconds before the next try after `attempts` failed ones: base, doubling, +-50 %, at most an hour (the
    cap after the jitter: the docs promise retries at most an hour apart)."""
    return min(base * 2.0 ** max(attempts - 1, 0) * rng.uniform(0.5, 1.5), BACKOFF_MAX)


class WebhookSender:
    def __init__(
        self,
        returns: ReturnStore,
        http: HttpClient,
        owner: str,
        webhooks: Callable[[], Mapping[str, WebhookSettings]],
        *,
        concurrency: int = 8,
        poll_interval: Callable[[], float] = lambda: 1.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.returns = returns
        self.http = http
        self.owner = owner
        self.webhooks = webhooks
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.clock = clock
        self.rng = rng or random.Random()
        self.wakeup = asyncio.Event()  # this instance recorded deliveries: look now
        self._gauged: set[str] = set()  # webhook names the pending gauge showed at the last count
        self._failing: str | None = None
        self._internal_logged: set[tuple[str, str]] = set()  # (webhook, error type): traceback logged once
        self._turn = 0  # which webhook is asked first for deliveries next time (_start)

    async def run(self) -> None:
        """Deliver until cancelled: each delivery its own task, each webhook's up to its `share` under way (and
        at most `concurrency` in all, but for the deliveries started under a larger share before a reload
        added webhooks, until they end); a slot that frees is refilled at once (a delivery never waits for the
        slowest of those leased with it, and one receiver that never answers, however many events wait for
        it, holds only its share of the slots for its timeout). A removed webhook's deliveries (ended at once,
        no POST) are claimed besides, at most `concurrency` of them under way. Looks again on a wake-up, when
        a delivery ends, or every poll_interval."""
        in_flight: dict[asyncio.Task[None], str] = {}  # each delivery under way, with its webhook's name
        try:
            while True:
                try:
                    self._reap(in_flight)
                    in_flight |= await self._start(Counter(in_flight.values()))
                    if self._failing is not None:
                        log.info("webhook_outbox_recovered")
                        self._failing = None
                except LedgerUnavailable as exc:
                    self._unavailable(exc)
                except Exception as exc:  # a bug: once with its traceback; the loop goes on
                    INTERNAL_ERRORS.labels(where="webhooks").inc()
                    log.error("webhook_internal_error", exc_info=exc)
                await self._idle(in_flight)
        finally:
            # Stopping: the POSTs under way end with the loop; their deliveries stay leased and are taken
            # over after their lease (counted as lease_expired duplicates), as before.
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def round(self) -> int:
        """Lease what is due (each webhook up to its share, and a removed webhook's up to `concurrency`) and
        deliver it, waiting for every one; returns how many were leased. (One pass, for tools and tests: `run`
        does not wait for a batch.)"""
        tasks = await self._start(Counter())
        if tasks:
            await asyncio.gather(*tasks)
        return len(tasks)

    def share(self, webhooks: int) -> int:
        """How many of an instance's `concurrency` slots one webhook's deliveries may hold: an even share,
        at least one. With no more webhooks than slots the shares add up to at most `concurrency`, and a
        webhook below its share may always start more (even while deliveries started under a larger share,
        before a reload added webhooks, still hold slots: the total is then over `concurrency` until they
        end), so every webhook always has its share free, whatever the others' receivers do; a lone webhook
        has every slot. The cost: a busy webhook is held to its share even while the others are idle. With
        more webhooks than slots each has one, at most `concurrency` in all, taken in turn."""
        return max(1, self.concurrency // max(1, webhooks))

    async def _start(self, busy: Counter[str]) -> dict[asyncio.Task[None], str]:
        """Lease due deliveries, each configured webhook's up to its share less its `busy` ones, and a removed
        webhook's (no longer configured: ended at once, without a POST) up to `concurrency` less theirs, and
        start one task for each. With no more webhooks than slots each webhook gets its room (see `share`);
        with more, at most the free slots in all, the webhooks asked in turn from a different one each time
        so that none is always last. The removed webhooks' deliveries never wait for the configured ones'
        backlog (nor for any webhook being configured at all)."""
        hooks = self.webhooks()
        names = sorted(hooks)
        share = self.share(len(names))
        gone = sum(n for name, n in busy.items() if name not in hooks)
        room: dict[str, int] = {}
        if names:
            turn = self._turn % len(names)
            self._turn += 1
            room = {name: share - busy[name] for name in names[turn:] + names[:turn]}
        if len(names) <= self.concurrency:
            limit = sum(max(0, n) for n in room.values())  # every webhook its room, whatever the total
        else:
            limit = max(0, self.concurrency - (sum(busy.values()) - gone))
        removed = max(0, self.concurrency - gone)
        if limit <= 0 and removed <= 0:
            return {}
        lease = max((w.timeout for w in hooks.values()), default=0.0) + LEASE_MARGIN
        deliveries = await self.returns.claim_deliveries(
            self.owner, self.clock(), limit, lease, room=room, removed=removed
        )
        return {asyncio.create_task(self._deliver_one(d, hooks.get(d.webhook))): d.webhook for d in deliveries}

    def _reap(self, in_flight: dict[asyncio.Task[None], str]) -> None:
        """Take the ended deliveries out of `in_flight`; one that met the ledger unavailable says so (once)."""
        for task in [t for t in in_flight if t.done()]:
            del in_flight[task]
            if task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, LedgerUnavailable):
                self._unavailable(exc)
            elif exc is not None:  # _deliver_one lets only LedgerUnavailable through: a bug
                INTERNAL_ERRORS.labels(where="webhooks").inc()
                log.error("webhook_internal_error", exc_info=exc)

    def _unavailable(self, exc: LedgerUnavailable) -> None:
        if self._failing is None:
            log.error("webhook_outbox_unavailable", error=exc.reason, effect="deliveries wait")
        self._failing = exc.reason

    async def _idle(self, in_flight: dict[asyncio.Task[None], str]) -> None:
        """Wait for a wake-up (deliveries recorded by this instance), a delivery to end (a slot freed) or
        poll_interval. Also with every slot taken: a reload may add a webhook, which has its share all the
        same, and a removed webhook's deliveries take no slot."""
        if not in_flight:
            await woken(self.wakeup, self.poll_interval())
            return
        waking = asyncio.ensure_future(self.wakeup.wait())
        try:
            await asyncio.wait({waking, *in_flight}, timeout=self.poll_interval(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waking.cancel()
        self.wakeup.clear()

    async def _deliver_one(self, d: Delivery, hook: WebhookSettings | None) -> None:
        """`deliver`, with an unforeseen error (a bug, a URL the client cannot request) one failed attempt of
        this delivery: it backs off and ends at max_age like any other. Left to the round it would leave the
        delivery leased, taken over later as a false "lease_expired" duplicate, and never reach max_age."""
        try:
            await self.deliver(d, hook)
        except LedgerUnavailable:
            raise  # the round's: every delivery waits for the ledger
        except Exception as exc:
            INTERNAL_ERRORS.labels(where="webhooks").inc()
            kind = (d.webhook, type(exc).__name__)
            if kind not in self._internal_logged:
                self._internal_logged.add(kind)
                log.error("webhook_internal_error", webhook=d.webhook, event_id=d.event_id, exc_info=exc)
            # Without URLs: an error of a URL library quotes it, and a hook's path is often its token.
            await self._fail(d, "internal", without_urls(f"{type(exc).__name__}: {exc}")[:300], hook=hook)

    async def deliver(self, d: Delivery, hook: WebhookSettings | None) -> None:
        if hook is None:
            await self._fail(d, "removed", "the webhook is no longer configured", final=True)
            return
        if d.reclaimed:
            WEBHOOK_DUPLICATES.labels(webhook=d.webhook, cause="lease_expired").inc()
            log.warning("webhook_redelivery", webhook=d.webhook, event_id=d.event_id, cause="lease_expired")
        body = d.body.encode()
        stamp = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"smtp-gateway/{__version__}",
            "X-Gateway-Event": d.type,
            "X-Gateway-Event-Id": d.event_id,
            signature.HEADER: signature.header(hook.key, stamp, body),
        }
        try:
            response = await self.http.request(
                "webhook", "POST", hook.url, headers=headers, content=body, timeout=hook.timeout, keep=ANSWER_KEPT
            )
        except AnswerLost as exc:
            # Sent; no answer (or one that is not HTTP): it may have been received, and the next POST may be a
            # duplicate.
            WEBHOOK_DUPLICATES.labels(webhook=d.webhook, cause="answer_lost").inc()
            await self._fail(
                d, "invalid_answer" if isinstance(exc, AnswerInvalid) else "timeout", exc.reason, hook=hook
            )
            return
        except UpstreamUnavailable as exc:
            await self._fail(d, "connect", exc.reason, hook=hook)
            return
        if 200 <= response.status < 300:
            await self._delivered(d, response.status)
        else:
            text = f"HTTP {response.status}: {response.text(ANSWER_KEPT)}".strip()
            location = response.headers.get("location")
            if 300 <= response.status < 400 and location:
                # Where it moved, for the operator to fix the URL: its scheme and host only (a hook's token is
                # often its path, and an http -> https or trailing-slash redirect repeats that path).
                text = f"HTTP {response.status} to {shown_url(location, path=True)} (not followed)"
            await self._fail(d, _STATUS_REASONS.get(response.status // 100, "http_other"), text, hook=hook)

    async def _delivered(self, d: Delivery, status: int) -> None:
        now = self.clock()
        attempts = d.attempts + 1
        row = self._timeline(d, model.WEBHOOK_DELIVERED, now, f"{d.type} event to {d.webhook}: {status}", attempts)
        if await self.returns.settle_delivery(
            d, "delivered", attempts=attempts, next_attempt=now, error=None, now=now, rows=[row]
        ):
            WEBHOOK_SENT.labels(webhook=d.webhook).inc()
            log.info("webhook_delivered", webhook=d.webhook, event_id=d.event_id, type=d.type, attempts=attempts)

    async def _fail(
        self, d: Delivery, reason: str, error: str, *, hook: WebhookSettings | None = None, final: bool = False
    ) -> None:
        if hook is not None:
            # Kept in the outbox, logged, on the timeline and the API: a receiver's error page (and an HTTP
            # library's error) may repeat the hook's path, where its token lives.
            error = without_url_parts(error, hook.url)
        now = self.clock()
        attempts = d.attempts + 1
        WEBHOOK_FAILED.labels(webhook=d.webhook, reason=reason).inc()
        if hook is not None and not final and now - d.enqueued < hook.max_age:
            wait = backoff(hook.backoff, attempts, self.rng)
            settled = await self.returns.settle_delivery(
                d, "pending", attempts=attempts, next_attempt=now + wait, error=error, now=now
            )
            if settled:
                log.warning(
                    "webhook_delivery_failed",
                    webhook=d.webhook,
                    event_id=d.event_id,
                    reason=reason,
                    error=error,
                    attempts=attempts,
                    next_in=round(wait, 1),
                )
            return
        if not final:  # failed for good because max_age passed (`final`: for its own reason, counted once)
            WEBHOOK_FAILED.labels(webhook=d.webhook, reason="expired").inc()
        row = self._timeline(d, model.WEBHOOK_FAILED, now, f"{d.webhook}: {error}", attempts)
        if await self.returns.settle_delivery(
            d, "failed", attempts=attempts, next_attempt=now, error=error, now=now, rows=[row]
        ):
            log.error("webhook_failed", webhook=d.webhook, event_id=d.event_id, error=error, attempts=attempts)

    def _timeline(self, d: Delivery, kind: str, now: float, detail: str, attempts: int) -> EventRow:
        return EventRow(
            event_id("", kind, d.webhook, d.event_id),
            d.msg_id,
            d.created,
            now,
            kind,
            detail=detail,
            actor=self.owner,
            data=model.json({"webhook": d.webhook, "event": d.event_id, "type": d.type, "attempts": attempts}),
        )

    async def count_pending(self) -> None:
        """The pending gauge, from the shared outbox (every instance's deliveries)."""
        pending = await self.returns.pending_deliveries()
        # Names shown before too: a webhook removed by a reload whose last deliveries have gone reads 0, not
        # its last count for the process's life.
        names = {*self.webhooks(), *pending, *self._gauged}
        for name in names:
            WEBHOOK_PENDING.labels(webhook=name).set(pending.get(name, 0))
        self._gauged = {*self.webhooks(), *pending}
