"""Per-client limits that hold across connections: sessions per IP, AUTH failures per IP (slowed, then
locked out) and messages per login. State with a clock: the SMTP edge asks before and reports after.

Postfix keeps the same counts in its anvil server (smtpd_client_connection_count_limit,
smtpd_client_auth_rate_limit). Sessions and message rates live in the process (with `serve --workers N`
each worker counts its own, docs/limits.md); AUTH failures are shared through the queue store by every
process and instance on the queue.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway.config import LimitsSettings
from gateway.core import authcount, tokenbucket
from gateway.core.authcount import Verdict
from gateway.core.cache import ExpiringLru
from gateway.core.episode import Episode
from gateway.core.errors import Deferred

log = structlog.get_logger("gateway.limits")
Clock = Callable[[], float]
AuthVerdict = Verdict  # what an AUTH attempt is told before its check (gateway.core.authcount)
# Logins whose message rate is tracked at once (a bucket is forgotten once full again).
MAX_TRACKED_LOGINS = 100_000


@functools.lru_cache(maxsize=4096)  # the same clients connect again and again: parsed once each
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address (None: not an IP address); an IPv4 client seen by a dual-stack listener as
    ::ffff:a.b.c.d is that IPv4 address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """What a per-IP limit counts: the IPv4 address, or the IPv6 /64 (one subscriber's LAN: anyone holding
    one has 2^64 addresses to rotate through)."""
    address = client_ip(ip)
    if address is None:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class SessionCounter:
    """Open sessions per client key; holds only keys with a session open (bounded by max_sessions)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def admit(self, key: str, limit: int) -> bool:
        count = self._open.get(key, 0)
        if count >= limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)

    def open(self, key: str) -> int:
        return self._open.get(key, 0)


class AuthLedger(Protocol):
    """Where the AUTH records of the processes and instances on one queue are kept (the queue store): each
    method applies gateway.core.authcount under the record's lock and returns the record after it, with the
    store's clock (the one clock of every process sharing it). Raises Deferred when it cannot be reached."""

    async def auth_begin(self, client: str, rules: authcount.Rules) -> tuple[authcount.Record, Verdict, float]: ...

    async def auth_end(
        self, client: str, rules: authcount.Rules, failed: bool, in_flight: bool
    ) -> tuple[authcount.Record, bool, float]: ...

    async def auth_lift(self, client: str, rules: authcount.Rules) -> bool:
        """Forget the client's failures and lockout (an operator's decision); False: nothing was held."""
        ...

    async def auth_peek(self, client: str) -> tuple[authcount.Record, float] | None:
        """The client's record as it is, and the store's clock (one read, no lock); None: nothing held."""
        ...

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, authcount.Record, float]]:
        """At most `limit` clients with failures or a lockout, locked out first, with the store's clock: of
        those whose key starts with `prefix` and with none of `besides`."""
        ...


# The scopes other than SMTP AUTH that count their failures in the same shared ledger, each under keys of its
# own (`<scope>:<client key>`): a client locked out of the console is not locked out of SMTP AUTH, and the
# reverse, as with one process's guards (docs/limits.md).
SCOPES = ("console", "api")


class ScopedLedger:
    """The shared AUTH ledger as one scope sees it: `scope` None is SMTP AUTH's (its keys are bare client keys,
    the rows of the other scopes left out of its list); any other scope's keys are prefixed `<scope>:`, so the
    console's sign-in and the API's tokens are counted, locked out and lifted for every process and instance on
    the queue exactly as SMTP AUTH is, apart from it."""

    def __init__(self, ledger: AuthLedger, scope: str | None) -> None:
        self._ledger = ledger
        self._prefix = f"{scope}:" if scope else ""

    def _mine(self, key: str) -> bool:
        if self._prefix:
            return key.startswith(self._prefix)
        return not key.startswith(tuple(f"{s}:" for s in SCOPES))

    async def auth_begin(self, client: str, rules: authcount.Rules) -> tuple[authcount.Record, Verdict, float]:
        return await self._ledger.auth_begin(self._prefix + client, rules)

    async def auth_end(
        self, client: str, rules: authcount.Rules, failed: bool, in_flight: bool
    ) -> tuple[authcount.Record, bool, float]:
        return await self._ledger.auth_end(self._prefix + client, rules, failed, in_flight)

    async def auth_lift(self, client: str, rules: authcount.Rules) -> bool:
        return await self._ledger.auth_lift(self._prefix + client, rules)

    async def auth_peek(self, client: str) -> tuple[authcount.Record, float] | None:
        return await self._ledger.auth_peek(self._prefix + client)

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, authcount.Record, float]]:
        # This scope's rows only, chosen by the store's query: read from one list of every scope's and split
        # here, a flood of one scope's records pushed another's past `limit`, off the operator's list.
        others = () if self._prefix else tuple(f"{s}:" for s in SCOPES)
        rows = await self._ledger.auth_held(limit, prefix=self._prefix + prefix, besides=(*others, *besides))
        return [(key[len(self._prefix) :], record, now) for key, record, now in rows if self._mine(key)]


@dataclass(frozen=True, slots=True)
class AuthTicket:
    """One AUTH attempt let through: where it is counted. `local`: this process's record (no shared ledger,
    or it could not be reached); `shared`: the shared record, in flight there; `unreserved`: counted nowhere
    yet (a client with nothing against it, no other attempt of it running here): its failure is written;
    `none`: a failure of an attempt that never began (refused before its check could start)."""

    key: str
    where: str


# Seconds a shared record read empty is taken as still empty by `AuthGuard.check`: a lockout another process
# writes meanwhile refuses here after at most this long (its failures, written here, are refused at once).
NOTHING_HELD_FOR = 1.0
# The operator's list of held-back clients read from a shared ledger: at most this many, locked out first (an
# attack from many addresses must not make the console's page as big as the attack).
MAX_LISTED = 500


class AuthGuard:
    """AUTH failures per client key, and the attempts in flight, counted together toward a lockout.

    From `auth_failures_per_ip` failures on, every attempt waits first (1 s, doubling, at most
    `auth_delay_max`); at `auth_lockout_failures` (failures and attempts in flight together) the key is
    locked out for `auth_lockout_time`: its attempts are refused before any password hash or upstream lookup
    is spent. With a shared ledger (the queue store) the records are those of every process and instance on
    the queue: `check`, at the start of every AUTH, reads the client's shared record (one primary-key read,
    nothing written), so a lockout made by any process refuses here too and one lifted anywhere (the record
    deleted) is lifted here. Then a client with nothing against it is not reserved (one attempt at a time per
    process goes unreserved, its failure written at once); any other attempt is reserved in the shared record
    first. So a client gets at most one guess per other process past the limit (attempts that read the record
    before the lockout was written). At most `max_tracked_ips` keys are remembered here.
    """

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic, shared: AuthLedger | None = None) -> None:
        self._clock = clock
        self.shared = shared
        # This process's own records, or (shared) the last shared record seen, in this process's clock.
        self._records: ExpiringLru[str, authcount.Record] = ExpiringLru(limits.max_tracked_ips, clock)
        self._running: dict[str, int] = {}  # attempts in flight in this process, by key
        # Keys whose shared record was read and held nothing, for NOTHING_HELD_FOR seconds: a printer opening
        # a connection per message does not cost a store read per AUTH (a key with a record is read each time).
        self._clear: ExpiringLru[str, bool] = ExpiringLru(limits.max_tracked_ips, clock)
        self._unreachable = Episode(clock)
        self.configure(limits)

    def configure(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self.rules = authcount.Rules(
            limits.auth_failure_window,
            limits.auth_failures_per_ip,
            limits.auth_delay_max,
            limits.auth_lockout_failures,
            limits.auth_lockout_time,
        )
        self._records.resize(limits.max_tracked_ips)
        self._clear.resize(limits.max_tracked_ips)

    def __len__(self) -> int:
        return len(self._records)

    def before(self, key: str) -> Verdict:
        """What this process knows now, without asking anyone: a lockout refuses the attempt at once."""
        record = self._records.get(key) or authcount.NEW
        if self.shared is None:
            return authcount.verdict(record, self._clock(), self.rules)
        now = self._clock()
        return Verdict(locked_for=record.locked_until - now) if record.locked_until > now else Verdict()

    async def check(self, key: str) -> Verdict:
        """Before an AUTH attempt: `before`, with this process's memory first brought up to date from the shared
        record (the store's word is the one of every process: a lockout lifted on any console has deleted it).
        While the store cannot be reached, this process's memory answers alone."""
        if self.shared is None or (self._clear.get(key) and self._records.get(key) is None):
            return self.before(key)
        try:
            found = await self.shared.auth_peek(key)
        except Deferred as exc:
            self._lost(exc)
            return self.before(key)
        self._reached()
        if found is None:
            self._records.pop(key)  # nothing held any more (lifted, or its time is up)
            self._clear.put(key, True, NOTHING_HELD_FOR)
        else:
            self._clear.pop(key)
            self._remember(key, *found)
        return self.before(key)

    async def begin(self, key: str) -> tuple[AuthTicket | None, Verdict]:
        """An attempt starts: its ticket (give it to `end`), or None when it is refused (`locked_for`)."""
        now = self._clock()
        record = authcount.current(self._records.get(key) or authcount.NEW, now, self.rules)
        if self.shared is not None and record.locked_until <= now:
            if record.clean() and not self._running.get(key):
                return self._started(AuthTicket(key, "unreserved")), Verdict()
            try:
                shared, verdict, then = await self.shared.auth_begin(key, self.rules)
            except Deferred as exc:
                self._lost(exc)
            else:
                self._reached()
                self._remember(key, shared, then)
                return (None if verdict.locked_for else self._started(AuthTicket(key, "shared"))), verdict
        record, verdict = authcount.begin(record, now, self.rules)
        if verdict.locked_for:
            return None, verdict
        self._keep(key, record)
        return self._started(AuthTicket(key, "local")), verdict

    async def end(self, ticket: AuthTicket, failed: bool) -> bool:
        """The attempt ended (a failure or not); True when its failure starts a lockout."""
        try:
            return await self._end(ticket, failed)
        finally:
            # Only once the record here has this attempt: while its failure is being written to the shared
            # record, another attempt must not start unreserved as if this process knew of nothing.
            if ticket.where != "none":
                left = self._running.get(ticket.key, 1) - 1
                if left > 0:
                    self._running[ticket.key] = left
                else:
                    self._running.pop(ticket.key, None)

    async def _end(self, ticket: AuthTicket, failed: bool) -> bool:
        key = ticket.key
        if ticket.where == "unreserved" and not failed:
            return False
        if ticket.where != "local" and self.shared is not None:
            try:
                shared, locked, then = await self.shared.auth_end(key, self.rules, failed, ticket.where == "shared")
            except Deferred as exc:
                self._lost(exc)
            else:
                self._reached()
                self._remember(key, shared, then)
                return locked
        now = self._clock()
        record = self._records.get(key) or authcount.NEW
        record, locked = authcount.end(record, now, self.rules, failed=failed, in_flight=ticket.where == "local")
        self._keep(key, record)
        return locked

    async def held(self) -> tuple[list[tuple[str, float]], list[tuple[str, int]]]:
        """The client keys locked out now (with the seconds each has left) and those with failures in the window
        (with how many): with a shared ledger, what every process and instance holds against them (at most
        MAX_LISTED, locked out first); without one, or while it cannot be reached, what this process knows."""
        if self.shared is None:
            return self.locked(), self.failing()
        try:
            rows = await self.shared.auth_held(MAX_LISTED)
        except Deferred as exc:
            self._lost(exc)
            return self.locked(), self.failing()
        self._reached()
        locked: list[tuple[str, float]] = []
        failing: list[tuple[str, int]] = []
        for key, record, now in rows:
            current = authcount.current(record, now, self.rules)
            if current.locked_until > now:
                locked.append((key, current.locked_until - now))
            elif current.failures:
                failing.append((key, current.failures))
        return locked, failing

    def locked(self) -> list[tuple[str, float]]:
        """The client keys locked out now (as this process knows), with the seconds each has left."""
        now = self._clock()
        return [(key, r.locked_until - now) for key, r in self._records.items() if r.locked_until > now]

    def failing(self) -> list[tuple[str, int]]:
        """The client keys with failures in the window (not locked out), with how many."""
        now = self._clock()
        found = [(key, authcount.current(r, now, self.rules)) for key, r in self._records.items()]
        return [(key, r.failures) for key, r in found if r.failures and r.locked_until <= now]

    async def lift(self, key: str) -> bool:
        """Forget a client key's failures and lockout (an operator's decision), in the shared ledger too.
        False: nothing was held."""
        held = self._records.get(key) is not None
        self._records.pop(key)
        if self.shared is not None:
            try:
                held = await self.shared.auth_lift(key, self.rules) or held
            except Deferred as exc:
                self._lost(exc)
        return held

    def _started(self, ticket: AuthTicket) -> AuthTicket:
        self._running[ticket.key] = self._running.get(ticket.key, 0) + 1
        return ticket

    def _keep(self, key: str, record: authcount.Record) -> None:
        ttl = authcount.expires(record, self.rules) - self._clock()
        self._records.put(key, record, ttl)  # a record with nothing left to remember is dropped (ttl <= 0)

    def _remember(self, key: str, record: authcount.Record, then: float) -> None:
        """A shared record read at the store's time `then`, kept in this process's clock."""
        shift = self._clock() - then
        self._keep(
            key,
            authcount.Record(
                record.failures,
                record.since + shift if record.failures else 0.0,
                record.in_flight,
                record.in_flight_until + shift if record.in_flight else 0.0,
                record.locked_until + shift if record.locked_until else 0.0,
            ),
        )

    def _lost(self, exc: Deferred) -> None:
        if self._unreachable.occurred():  # once per outage of the store
            log.error("auth_failures_store_unavailable", error=exc.reason, fallback="this process's own counts")

    def _reached(self) -> None:
        if (over := self._unreachable.ended()) is not None:
            log.info("auth_failures_store_available", local_for=over.lasted, attempts=over.seen)


class LoginRates:
    """A token bucket per login (gateway.core.tokenbucket): `messages_per_minute`, `message_burst` at once."""

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        # login -> the bucket's tat; a full bucket is the same as none, so it is kept only until full again
        self._buckets: ExpiringLru[str, float] = ExpiringLru(MAX_TRACKED_LOGINS, clock)
        self.limits = limits

    def configure(self, limits: LimitsSettings) -> None:
        """New rules (a reload). Each login keeps what it has used of its burst: clearing the buckets would
        refill every login's burst, the flooding one's too, the moment its `messages_per_minute` is cut. A
        bucket's tat is `used` intervals ahead of now; with a new interval it is the same `used` intervals
        ahead (a changed burst then counts them against the new one)."""
        old, new = self.limits.messages_per_minute, limits.messages_per_minute
        self.limits = limits
        if old == new:
            return  # the burst alone changed: the same tats, measured against the new burst
        if old <= 0 or new <= 0:
            self._buckets.clear()  # no interval to carry over (unlimited before) or nothing to take (after)
            return
        now = self._clock()
        old_interval, new_interval = 60.0 / old, 60.0 / new
        for login, tat in self._buckets.items():
            # Whole intervals stay whole (rounded at a nanosecond's precision): a float's last bits must not
            # make a token still due when the next is free (take() refuses any wait above 0).
            used = round((tat - now) / old_interval, 9)
            self._buckets.put(login, now + used * new_interval, used * new_interval)

    def take(self, login: str) -> float:
        """Take one message's token: 0.0, or the seconds until one is free (nothing taken)."""
        return self._take(login, keep=True)

    def wait(self, login: str) -> float:
        """What take() would answer, without taking: 0.0 while a token is free."""
        return self._take(login, keep=False)

    def _take(self, login: str, keep: bool) -> float:
        rate = self.limits.messages_per_minute / 60.0
        if rate <= 0:
            return 0.0
        burst = self.limits.message_burst or max(1, math.ceil(self.limits.messages_per_minute))
        now = self._clock()
        tat = self._buckets.get(login)
        slot = tokenbucket.take(tokenbucket.NEW if tat is None else tat, now, 1.0 / rate, burst)
        if slot.wait > 0:
            return slot.wait
        if keep:
            self._buckets.put(login, slot.tat, slot.tat - now)
        return 0.0


class LogSampler:
    """One log line per key every `interval` seconds, so a flood cannot flood the log; what it held back
    is counted and reported with the next line. Remembers at most `max_keys` keys (the least recently
    seen are forgotten first)."""

    def __init__(self, interval: float = 60.0, max_keys: int = 10_000, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        # key -> (when last logged, held back since); a key with nothing held back is done after `interval`
        self._seen: ExpiringLru[object, tuple[float, int]] = ExpiringLru(max_keys, clock)

    def allow(self, key: object) -> int | None:
        """None: do not log now. Otherwise log, with this many lines held back since the last one."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen.put(key, (last[0], last[1] + 1), math.inf)  # kept until reported
            return None
        self._seen.put(key, (now, 0), self.interval)
        return last[1] if last is not None else 0


class Defenses:
    """The per-client state a listener keeps across sessions (and across configuration reloads)."""

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic, shared: AuthLedger | None = None) -> None:
        self.limits = limits
        self.sessions = SessionCounter()
        self.auth = AuthGuard(limits, clock, shared)
        self.rates = LoginRates(limits, clock)
        self.sampler = LogSampler(clock=clock)

    def configure(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self.auth.configure(limits)
        self.rates.configure(limits)
