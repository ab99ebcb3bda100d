"""Per-client limits that hold across connections: sessions per IP, AUTH failures per IP (slowed, then
locked out) and messages per login. Plain state with a clock: the SMTP edge asks before and reports after.

Postfix keeps the same counts in its anvil server (smtpd_client_connection_count_limit,
smtpd_client_auth_rate_limit); here they live in the process, so with `serve --workers N` each worker
counts on its own (docs/limits.md).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import LimitsSettings
from gateway.core import tokenbucket
from gateway.core.cache import ExpiringLru

Clock = Callable[[], float]
# Logins whose message rate is tracked at once (a bucket is forgotten once full again).
MAX_TRACKED_LOGINS = 100_000


def client_key(ip: str) -> str:
    """What a per-IP limit counts: the IPv4 address, or the IPv6 /64 (one subscriber's LAN: anyone holding
    one has 2^64 addresses to rotate through)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack listener's view of an IPv4 client
            return str(address.ipv4_mapped)
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


@dataclass(frozen=True, slots=True)
class AuthVerdict:
    """Before an AUTH check: `locked_for` > 0 refuses it unchecked; else wait `delay` seconds first."""

    locked_for: float = 0.0
    delay: float = 0.0
    failures: int = 0


@dataclass(slots=True)
class _Record:
    times: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class AuthGuard:
    """AUTH failures per client key in a sliding window.

    From `auth_failures_per_ip` failures on, every attempt waits first (1 s, doubling, at most
    `auth_delay_max`); at `auth_lockout_failures` the key is locked out for `auth_lockout_time`: its
    attempts are refused before any password hash or upstream lookup is spent. At most `max_tracked_ips`
    keys are remembered; past that the least recently seen are forgotten first.
    """

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        # A record lives while it holds a failure in the window or a lockout.
        self._records: ExpiringLru[str, _Record] = ExpiringLru(limits.max_tracked_ips, clock)
        self.limits = limits

    def configure(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self._records.resize(limits.max_tracked_ips)

    def __len__(self) -> int:
        return len(self._records)

    def before(self, key: str) -> AuthVerdict:
        record = self._records.get(key)
        if record is None:
            return AuthVerdict()
        now = self._clock()
        if record.locked_until > now:
            return AuthVerdict(locked_for=record.locked_until - now, failures=len(record.times))
        count = self._prune(record, now)
        if count == 0:  # nothing recent (or a lockout over): forget it
            self._records.pop(key)
            return AuthVerdict()
        over = count - self.limits.auth_failures_per_ip
        if over < 0:
            return AuthVerdict(failures=count)
        return AuthVerdict(delay=min(self.limits.auth_delay_max, math.ldexp(1.0, min(over, 30))), failures=count)

    def failed(self, key: str) -> bool:
        """Count a failure; True when it starts a lockout."""
        now = self._clock()
        record = self._records.get(key) or _Record()
        if record.locked_until > now:
            return False
        record.times.append(now)
        if self._prune(record, now) < self.limits.auth_lockout_failures:
            self._records.put(key, record, self.limits.auth_failure_window)
            return False
        record.locked_until = now + self.limits.auth_lockout_time
        record.times.clear()
        self._records.put(key, record, self.limits.auth_lockout_time)
        return True

    def locked(self) -> list[tuple[str, float]]:
        """The client keys locked out now, with the seconds each has left."""
        now = self._clock()
        return [(key, r.locked_until - now) for key, r in self._records.items() if r.locked_until > now]

    def failing(self) -> list[tuple[str, int]]:
        """The client keys with failures in the window (not locked out), with how many."""
        now = self._clock()
        found = [(key, self._prune(r, now)) for key, r in self._records.items() if r.locked_until <= now]
        return [(key, n) for key, n in found if n]

    def lift(self, key: str) -> bool:
        """Forget a client key's failures and lockout (an operator's decision). False: nothing was held."""
        held = self._records.get(key) is not None
        self._records.pop(key)
        return held

    def _prune(self, record: _Record, now: float) -> int:
        horizon = now - self.limits.auth_failure_window
        times = record.times
        while times and times[0] <= horizon:
            times.popleft()
        return len(times)


class LoginRates:
    """A token bucket per login (gateway.core.tokenbucket): `messages_per_minute`, `message_burst` at once."""

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        # login -> the bucket's tat; a full bucket is the same as none, so it is kept only until full again
        self._buckets: ExpiringLru[str, float] = ExpiringLru(MAX_TRACKED_LOGINS, clock)
        self.limits = limits

    def configure(self, limits: LimitsSettings) -> None:
        if (limits.messages_per_minute, limits.message_burst) != (
            self.limits.messages_per_minute,
            self.limits.message_burst,
        ):
            self._buckets.clear()
        self.limits = limits

    def take(self, login: str) -> float:
        """Take one message's token: 0.0, or the seconds until one is free (nothing taken)."""
        rate = self.limits.messages_per_minute / 60.0
        if rate <= 0:
            return 0.0
        burst = self.limits.message_burst or max(1, math.ceil(self.limits.messages_per_minute))
        now = self._clock()
        tat = self._buckets.get(login)
        slot = tokenbucket.take(tokenbucket.NEW if tat is None else tat, now, 1.0 / rate, burst)
        if slot.wait > 0:
            return slot.wait
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

    def __init__(self, limits: LimitsSettings, clock: Clock = time.monotonic) -> None:
        self.limits = limits
        self.sessions = SessionCounter()
        self.auth = AuthGuard(limits, clock)
        self.rates = LoginRates(limits, clock)
        self.sampler = LogSampler(clock=clock)

    def configure(self, limits: LimitsSettings) -> None:
        self.limits = limits
        self.auth.configure(limits)
        self.rates.configure(limits)
