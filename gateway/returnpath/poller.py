"""One account's event poller: the vendor's events read back by time window, page by page, into the ledger.

Every `interval` an instance leases the account's cursor (one instance at a time; the lease carries a
fencing token, renewed with each page). A window runs from the cursor's position minus `overlap` to now
minus `lag` (at most the vendor's longest window; a backlog is read window after window). Each page's rows
(timeline events, recipient states, suppressions, notices, webhook deliveries) and the window's progress
(the next page) are written in one transaction, fenced: an instance whose lease was taken over writes
nothing more. An instance that stops mid-window leaves its window and page in the cursor, and whoever
leases it next (itself after a restart, or another) goes on from there. An event read twice (the overlap, a
page read again) has the same id and changes nothing the second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from gateway.config import EventSettings
from gateway.core.errors import AnswerTooLarge, GatewayError
from gateway.core.events import SUPPRESSES, Contacts, EventSource, VendorEvent
from gateway.core.waits import woken
from gateway.ledger import announce, readback
from gateway.ledger.model import SuppressionRow, address_key
from gateway.ledger.returns import Match, ReturnStore, Suppressed
from gateway.ledger.store import LedgerUnavailable
from gateway.ledger.suppression import SuppressionSet
from gateway.ops.metrics import (
    EVENT_POLLS,
    EVENTS_CURSOR_AGE,
    EVENTS_MATCHED_LOST,
    EVENTS_READ,
    EVENTS_UNMATCHED,
    EVENTS_UNREADABLE,
    INTERNAL_ERRORS,
)

log = structlog.get_logger("gateway.events")

# Events that name no upstream id are matched by address among the recipients sent this long before.
ADDRESS_LOOKBACK = 30 * 24 * 3600.0
# Unmatched event ids remembered so that a window read again does not count them again.
UNMATCHED_SEEN = 100_000
# Ids of the rows counted in smtp_gateway_events_total / _unreadable_total / _matched_lost_total, so that the
# overlapping windows count each row once.
COUNTED_SEEN = 100_000


@dataclass
class Context:
    """What the pollers of one process share: the ledger's return tables, this instance's name, the webhooks,
    the suppression copy RCPT TO reads, and whom to wake when rows were written."""

    returns: ReturnStore
    owner: str
    subscriptions: Callable[[], announce.Subscriptions]
    suppressions: SuppressionSet
    written: Callable[[], None] = lambda: None  # webhooks and notices may be due
    clock: Callable[[], float] = time.time
    unknown_logged: set[tuple[str, str]] = field(default_factory=set)
    unreadable_logged: set[str] = field(default_factory=set)  # accounts


class EventPoller:
    def __init__(
        self,
        account: str,
        source: EventSource,
        contacts: Contacts | None,
        settings: Callable[[], EventSettings],
        suppress: Callable[[], bool],
        ctx: Context,
    ) -> None:
        self.account = account
        self.source = source
        self.contacts = contacts
        self.settings = settings
        self.suppress = suppress
        self.ctx = ctx
        self.wakeup = asyncio.Event()
        self._failing: str | None = None
        self._unmatched: dict[str, None] = {}
        self._counted: dict[str, None] = {}  # ids of the rows counted in the events metrics (insertion order)
        self._lost_counted: dict[str, None] = {}  # ids of the events counted in _matched_lost_total
        # The cursor's position as last read from or stored in the ledger: its age is shown from it at every
        # poll, a failed one too (a ledger outage fails the lease itself, and the age must keep growing).
        self._position: float | None = None

    async def run(self) -> None:
        while True:
            await self.poll()
            await woken(self.wakeup, self.settings().interval)

    async def poll(self) -> str:
        """One poll: every window up to now minus the lag. Returns its result (the metric's label); never raises."""
        try:
            result = await self._poll()
        except (GatewayError, LedgerUnavailable) as exc:
            reason = exc.reason
            if isinstance(exc, AnswerTooLarge):  # the same page is asked for again at each poll: say what helps
                reason += f"; lower accounts.{self.account}.events.page_size (now {self.settings().page_size})"
            if self._failing is None:
                log.warning("events_poll_failed", account=self.account, error=reason, retry_in=self.settings().interval)
            self._failing = reason
            result = "failed"
        except Exception as exc:  # a bug: once with its traceback; the next poll goes on
            INTERNAL_ERRORS.labels(where="events_poll").inc()
            log.error("events_poll_internal_error", account=self.account, exc_info=exc)
            result = "failed"
        else:
            if self._failing is not None and result == "ok":
                log.info("events_poll_recovered", account=self.account)
                self._failing = None
        self._show_age()
        EVENT_POLLS.labels(account=self.account, result=result).inc()
        return result

    async def _poll(self) -> str:
        settings, returns, ctx = self.settings(), self.ctx.returns, self.ctx
        now = ctx.clock()
        lease, position = await returns.lease_cursor(self.account, self.account, ctx.owner, now, settings.lease, now)
        self._position = position
        self._show_age()
        if lease is None:
            return "busy"
        name, token = lease.name, lease.token
        target = now - settings.lag  # this poll reads up to here (window after window when behind)
        try:
            since, until, page = lease.window_since, lease.window_until, lease.page
            while True:
                if since is None or until is None:
                    since = position - settings.overlap
                    until = min(target, since + self.source.max_window)
                    page = 0
                    if until <= position:
                        return "ok"  # nothing new to read yet
                while True:
                    more = await self._page(name, token, since, until, page, settings)
                    if more is None:
                        return "fenced"
                    if not more:
                        break
                    page += 1
                if not await returns.complete(name, token, until, ctx.clock(), settings.lease):
                    return "fenced"
                position = self._position = until
                self._show_age()  # as each window of a backlog is stored
                since = until = None  # the next window, if the backlog goes on
        finally:
            with contextlib.suppress(LedgerUnavailable):
                await returns.release(name, token)

    async def _page(
        self, name: str, token: int, since: float, until: float, page: int, settings: EventSettings
    ) -> bool | None:
        """Read and apply one page; whether another follows (None: fenced, nothing written)."""
        ctx = self.ctx
        read = await self.source.page(since, until, page)
        if read.unreadable:
            # Rows counted once each (the windows overlap: the same rows are read at several polls); a source
            # that gives no ids for them has each read counted.
            fresh = self._first_counted(read.unreadable_ids) + read.unreadable - len(read.unreadable_ids)
            EVENTS_UNREADABLE.labels(account=self.account).inc(fresh)
            if self.account not in ctx.unreadable_logged:
                ctx.unreadable_logged.add(self.account)
                log.warning(
                    "events_unreadable",
                    account=self.account,
                    count=read.unreadable,
                    note="rows without a type, an address or a usable time: counted, not recorded",
                )
        for raw, count in read.unknown.items():
            ids = [ident for name, ident in read.unknown_ids if name == raw]
            fresh = self._first_counted(ids) + count - len(ids)
            EVENTS_READ.labels(account=self.account, type="unknown").inc(fresh)
            if (self.account, raw) not in ctx.unknown_logged:
                ctx.unknown_logged.add((self.account, raw))
                log.warning("events_unknown_type", account=self.account, name=raw, note="counted, not recorded")
        candidates = await self._candidates(read.events)
        suppress = self.suppress()
        whitelisted = await self._whitelisted(read.events, candidates) if suppress else frozenset()
        now = ctx.clock()
        applied = readback.apply(
            read.events,
            candidates,
            account=self.account,
            actor=ctx.owner,
            now=now,
            subscriptions=ctx.subscriptions(),
            suppress=suppress,
            whitelisted=whitelisted,
        )
        written = await ctx.returns.apply(
            name, token, applied.rows, since=since, until=until, page=page + 1, now=now, lease=settings.lease
        )
        if written is None:
            return None
        # Each event once, at the first poll that reads and writes it (not at every overlapping poll after).
        for event in read.events:
            if self._first_counted([event.id]):
                EVENTS_READ.labels(account=self.account, type=event.type).inc()
        self._count_unmatched(applied.unmatched)
        lost = self._first_counted(applied.lost, self._lost_counted)
        if lost:
            EVENTS_MATCHED_LOST.labels(account=self.account).inc(lost)
        ctx.suppressions.add(Suppressed.of(row) for row in written if isinstance(row, SuppressionRow))
        if applied.matched:
            ctx.written()
            log.debug(
                "events_read",
                account=self.account,
                page=page,
                matched=applied.matched,
                matched_lost=len(applied.lost),
                unmatched=len(applied.unmatched),
            )
        return read.more

    async def _candidates(self, events: list[VendorEvent]) -> list[Match]:
        returns = self.ctx.returns
        ids = [e.upstream_id for e in events if e.upstream_id]
        found = await returns.match_ids(ids) if ids else []
        bare = [e for e in events if not e.upstream_id]
        if bare:
            since = min(e.at for e in bare) - ADDRESS_LOOKBACK
            found += await returns.match_addresses([e.address for e in bare], since)
        # Events no recipient answers by id and address (or with no id): one may be about a call whose answer
        # was lost, whose id the gateway never learnt (readback.lost_pick matches it by address and time). By
        # id and address: a DMDS eeid learnt for one recipient of a lost call is not its other recipients'.
        known = {(m.upstream_id, m.rcpt) for m in found}
        orphans = [e for e in events if not e.upstream_id or (e.upstream_id, address_key(e.address)) not in known]
        if orphans:
            since = min(e.at for e in orphans) - readback.LOST_WINDOW
            found += await returns.match_lost([e.address for e in orphans], since)
        return found

    async def _whitelisted(self, events: list[VendorEvent], candidates: list[Match]) -> frozenset[str]:
        """Addresses an event would suppress that the vendor's whitelist protects (DMDS); a check that fails
        fails the page (read again at the next poll), never suppresses a whitelisted contact."""
        if self.contacts is None:
            return frozenset()
        known = {m.rcpt for m in candidates}
        wanted = {address_key(e.address) for e in events if e.type in SUPPRESSES} & known
        protected = set()
        for address in sorted(wanted):
            if await self.contacts.whitelisted(address):
                protected.add(address)
        return frozenset(protected)

    def _show_age(self) -> None:
        """smtp_gateway_events_cursor_age_seconds: now minus the last position known (none yet: not shown)."""
        if self._position is not None:
            EVENTS_CURSOR_AGE.labels(account=self.account).set(max(0.0, self.ctx.clock() - self._position))

    def _first_counted(self, ids: list[str], seen: dict[str, None] | None = None) -> int:
        """How many of these rows' ids were never counted before in `seen` (the events metrics' by default),
        and are now, remembering the last COUNTED_SEEN: more than that many rows within one `overlap` would be
        counted again."""
        seen = self._counted if seen is None else seen
        fresh = 0
        for ident in ids:
            if ident not in seen:
                seen[ident] = None
                fresh += 1
        while len(seen) > COUNTED_SEEN:
            del seen[next(iter(seen))]
        return fresh

    def _count_unmatched(self, events: list[VendorEvent]) -> None:
        fresh = [e for e in events if e.id not in self._unmatched]
        if fresh:
            EVENTS_UNMATCHED.labels(account=self.account).inc(len(fresh))
        for e in fresh:
            self._unmatched[e.id] = None
        while len(self._unmatched) > UNMATCHED_SEEN:
            del self._unmatched[next(iter(self._unmatched))]
