"""Pure: one client's AUTH record, the one arithmetic of every place it is kept (this process's memory, or a
row the processes and instances on one queue share): failures in a window, attempts in flight, a lockout.

Attempts in flight count toward the lockout with the failures: parallel guesses cannot pass the limit
while their checks run. A window starts at its first failure and lasts `window` seconds; an attempt in
flight is forgotten after IN_FLIGHT_AT_MOST seconds (a process that died while checking it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

IN_FLIGHT_AT_MOST = 120.0  # seconds: longer than any check (a provider login's lookup times out before)
IN_FLIGHT_RETRY = 1.0  # what an attempt refused for the attempts in flight is told to wait


@dataclass(frozen=True, slots=True)
class Rules:
    window: float  # seconds failures are counted in
    slow_from: int  # failures from which every attempt first waits
    delay_max: float  # the longest such wait
    lockout_at: int  # failures (and attempts in flight) that lock the client out
    lockout_time: float  # seconds a lockout lasts


@dataclass(frozen=True, slots=True)
class Record:
    failures: int = 0
    since: float = 0.0  # when the window of these failures began
    in_flight: int = 0
    in_flight_until: float = 0.0  # when the attempts in flight are forgotten
    locked_until: float = 0.0

    def clean(self) -> bool:
        """Nothing to remember: a client with no failure, no attempt in flight and no lockout."""
        return self.failures == 0 and self.in_flight == 0 and self.locked_until == 0.0


NEW = Record()


@dataclass(frozen=True, slots=True)
class Verdict:
    """Before an AUTH check: `locked_for` > 0 refuses it unchecked; else wait `delay` seconds first."""

    locked_for: float = 0.0
    delay: float = 0.0
    failures: int = 0


def current(r: Record, now: float, rules: Rules) -> Record:
    """`r` as it stands at `now`: an expired window, lockout or set of attempts in flight forgotten."""
    if r.failures and r.since + rules.window <= now:
        r = replace(r, failures=0, since=0.0)
    if r.in_flight and r.in_flight_until <= now:
        r = replace(r, in_flight=0, in_flight_until=0.0)
    if r.locked_until and r.locked_until <= now:
        r = replace(r, locked_until=0.0)
    return r


def verdict(r: Record, now: float, rules: Rules) -> Verdict:
    """What an attempt would be told now (no attempt taken)."""
    r = current(r, now, rules)
    if r.locked_until > now:
        return Verdict(locked_for=r.locked_until - now, failures=r.failures)
    if r.failures + r.in_flight >= rules.lockout_at:
        # The attempts in flight may lock the client out: this one is refused unchecked, to try again once
        # they have ended.
        return Verdict(locked_for=IN_FLIGHT_RETRY, failures=r.failures)
    over = r.failures - rules.slow_from
    if over < 0:
        return Verdict(failures=r.failures)
    return Verdict(delay=min(rules.delay_max, math.ldexp(1.0, min(over, 30))), failures=r.failures)


def begin(r: Record, now: float, rules: Rules) -> tuple[Record, Verdict]:
    """An attempt starts: in flight from now, unless refused (then `r` is unchanged)."""
    r = current(r, now, rules)
    v = verdict(r, now, rules)
    if v.locked_for:
        return r, v
    return replace(r, in_flight=r.in_flight + 1, in_flight_until=now + IN_FLIGHT_AT_MOST), v


def end(r: Record, now: float, rules: Rules, *, failed: bool, in_flight: bool = True) -> tuple[Record, bool]:
    """An attempt ended (`in_flight`: one `begin` counted); True when its failure starts a lockout."""
    r = current(r, now, rules)
    if in_flight and r.in_flight:
        r = replace(r, in_flight=r.in_flight - 1)
    if not failed or r.locked_until > now:
        return r, False
    r = replace(r, failures=r.failures + 1, since=r.since if r.failures else now)
    if r.failures < rules.lockout_at:
        return r, False
    return replace(r, failures=0, since=0.0, locked_until=now + rules.lockout_time), True


def expires(r: Record, rules: Rules) -> float:
    """When `r` has nothing left to remember (for a cache's entry)."""
    return max(r.since + rules.window if r.failures else 0.0, r.in_flight_until, r.locked_until)
