"""gateway/core/tokenbucket.py, the one bucket algorithm: its arithmetic, and the in-process buckets built on it
(the upstream's TokenBucket and the per-login LoginRates) answering alike. The shared bucket's rows are tested
on both queue backends in tests/test_queue_store.py."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.config import LimitsSettings
from gateway.core import tokenbucket
from gateway.core.errors import PoolExhausted, QueueBusy, QueueUnreachable, RateLimited, SpoolUnavailable
from gateway.limits.clients import LoginRates
from gateway.queue.sqlite_side import RateFile
from gateway.upstream.ratelimit import SharedBucket, TokenBucket
from gateway.upstream.response import MAX_RETRY_AFTER, MIN_RETRY_AFTER, HttpResponse


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def waits(tat: float, now: float, interval: float, burst: int, n: int) -> list[float]:
    out = []
    for _ in range(n):
        slot = tokenbucket.take(tat, now, interval, burst)
        out.append(round(slot.wait, 9))
        tat = slot.tat
    return out


def test_a_burst_goes_at_once_then_one_per_interval() -> None:
    assert waits(tokenbucket.NEW, 1000.0, 0.5, 3, 6) == [0, 0, 0, 0.5, 1.0, 1.5]


def test_a_bucket_left_alone_fills_up_to_its_burst_and_no_more() -> None:
    tat = tokenbucket.NEW
    for _ in range(3):
        tat = tokenbucket.take(tat, 1000.0, 1.0, 3).tat
    assert tat == 1003.0  # full again from then on: the same as a new bucket
    assert waits(tat, 1003.0, 1.0, 3, 4) == waits(tokenbucket.NEW, 1003.0, 1.0, 3, 4) == [0, 0, 0, 1.0]
    assert waits(tat, 1001.0, 1.0, 3, 2) == [0, 1.0]  # a second after the burst: one call refilled


def test_a_pause_holds_every_slot_until_it_ends() -> None:
    tat = tokenbucket.paused(tokenbucket.NEW, 1000.0, 7.0)
    assert tokenbucket.take(tat, 1000.0, 0.1, 1).wait == pytest.approx(7.0)
    assert tokenbucket.paused(2000.0, 1000.0, 7.0) == 2000.0  # never earlier than already booked


def test_after_a_429_the_interval_doubles_and_recovers_linearly() -> None:
    assert tokenbucket.slowed(1.0, 1000.0, 1030.0, 30.0) == pytest.approx(2.0)
    assert tokenbucket.slowed(1.0, 1015.0, 1030.0, 30.0) == pytest.approx(1 / 0.75)
    assert tokenbucket.slowed(1.0, 1030.0, 1030.0, 30.0) == 1.0
    assert tokenbucket.slowed(1.0, 1000.0, 0.0, 30.0) == 1.0  # never slowed


def test_slots_taken_at_once_are_those_taken_one_by_one() -> None:
    many = tokenbucket.take_many(1001.0, 1000.0, 0.5, 3, 4)
    assert many.waits == (0.0, 0.5, 1.0, 1.5)
    assert many.tat == 1003.0  # the next caller after the four
    assert list(many.waits) == waits(1001.0, 1000.0, 0.5, 3, 4)
    assert tokenbucket.take_many(tokenbucket.NEW, 1000.0, 0.5, 3, 0) == tokenbucket.Slots((), tokenbucket.NEW)


def test_upstream_bucket_and_login_rates_answer_alike() -> None:
    """60 a minute with a burst of 3: both let three through, then ask for a second's wait."""
    clock = Clock()
    upstream = TokenBucket(1.0, 3, clock=clock)
    logins = LoginRates(LimitsSettings(messages_per_minute=60, message_burst=3), clock)
    assert [upstream.reserve(max_wait=0) for _ in range(3)] == [logins.take("a") for _ in range(3)] == [0, 0, 0]
    with pytest.raises(RateLimited) as refused:
        upstream.reserve(max_wait=0)  # a caller that cannot wait takes no slot, like a refused message
    assert refused.value.retry_after == pytest.approx(logins.take("a")) == pytest.approx(1.0)
    clock.now += 1
    assert upstream.reserve(max_wait=0) == logins.take("a") == 0


async def test_upstream_bucket_after_a_429() -> None:
    clock = Clock()
    bucket = TokenBucket(10.0, 1, recovery=30.0, clock=clock)
    await bucket.penalize(retry_after=5.0)
    assert bucket.reserve() == pytest.approx(5.0)
    assert bucket.reserve() == pytest.approx(5.0 + 0.2)  # the next slot: half the rate right after the 429
    clock.now += 40  # recovered: the full rate again
    assert [bucket.reserve() for _ in range(2)] == [0, pytest.approx(0.1)]


async def test_a_429_pauses_an_account_for_at_most_the_longest_retry_after_honoured() -> None:
    """One `Retry-After: 86400` must not stop an account (inline calls included) for a day."""
    clock = Clock()
    bucket = TokenBucket(10.0, 1, account="acme", recovery=30.0, clock=clock)
    asked = HttpResponse(429, b"", {"retry-after": "86400"}).retry_after(clock.now)
    dated = HttpResponse(429, b"", {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}).retry_after(clock.now)
    assert asked == dated == MAX_RETRY_AFTER
    with capture_logs() as logs:
        await bucket.penalize(retry_after=asked)
        await TokenBucket(10.0, 1, account="other").penalize(retry_after=5.0)
    assert bucket.reserve() == pytest.approx(MAX_RETRY_AFTER)
    assert [(e["event"], e["account"]) for e in logs] == [("upstream_retry_after_capped", "acme")]
    pauses: list[float] = []

    async def pause(account: str, seconds: float, recovery: float) -> None:
        pauses.append(seconds)

    await SharedBucket(_slots(TokenBucket(10.0, 1)), pause, 10.0, 1, account="acme").penalize(86400.0)
    assert pauses == [MAX_RETRY_AFTER]  # the queue's row too, for every instance


async def test_a_429_asking_for_no_pause_pauses_an_account_a_second() -> None:
    """`Retry-After: 0` or a date now or past (a proxy's "try again now", a skewed clock) names no pause: the
    limiter pauses its second, as for a 429 without the header, and the queue waits on its schedule
    (tests/test_transition.py); a pause under a second is a second."""
    clock = Clock()
    wall = 1_700_000_000.0  # a whole second: the HTTP date below is exact
    past = "Tue, 14 Nov 2023 22:13:19 GMT"  # wall - 1
    soon = "Tue, 14 Nov 2023 22:13:21 GMT"  # wall + 1
    assert [HttpResponse(429, b"", {"retry-after": v}).retry_after(wall) for v in ("0", "00", past)] == [None] * 3
    assert HttpResponse(429, b"", {"retry-after": soon}).retry_after(wall + 0.7) == MIN_RETRY_AFTER == 1.0
    bucket = TokenBucket(10.0, 1, account="acme", recovery=30.0, clock=clock)
    await bucket.penalize(retry_after=0.0)
    assert bucket.reserve() == pytest.approx(MIN_RETRY_AFTER)
    pauses: list[float] = []

    async def pause(account: str, seconds: float, recovery: float) -> None:
        pauses.append(seconds)

    shared = SharedBucket(_slots(TokenBucket(10.0, 1)), pause, 10.0, 1, account="acme")
    await shared.penalize(0.0)
    await shared.penalize(0.2)
    assert pauses == [MIN_RETRY_AFTER, MIN_RETRY_AFTER]  # the queue's row too, for every instance


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
async def test_slots_reserved_before_a_pause_are_not_spent_after_it(shared: bool) -> None:
    """The process freezes (here: its event loop blocked, as by a GC or SIGSTOP) while five callers wait for
    their slots: the slots that passed meanwhile are given up and fresh ones taken, so the callers do not
    all go in the instant the process wakes."""
    own = TokenBucket(10.0, 1)
    limiter = own if not shared else SharedBucket(_slots(own), _no_pause, 10.0, 1, account="acme")
    went: list[float] = []

    async def call() -> None:
        await limiter.acquire()
        went.append(time.monotonic())

    calls = [asyncio.ensure_future(call()) for _ in range(5)]  # slots 0, 0.1, ... 0.4 s from now
    await asyncio.sleep(0.02)
    time.sleep(0.6)  # noqa: ASYNC251 (the pause itself: every slot but the first passes while the loop is frozen)
    await asyncio.gather(*calls)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(sorted(went))]
    # At most one slot may be spent late (a slot within one interval of its time); the rest one interval apart.
    assert sum(gap < 0.08 for gap in gaps) <= 1, gaps


async def test_callers_waiting_together_share_one_trip_to_the_store() -> None:
    """Callers that ask while the store is busy with another's slot are served together by the next trip,
    which takes all their slots at once: one trip per batch, not per caller, and each caller a slot of its
    own; when that trip finds the store unreachable, every caller of the batch falls back to the local bucket."""
    own = TokenBucket(1000.0, 1, clock=Clock())  # the store's bucket, its clock stopped
    trips: list[int] = []
    handed: list[float] = []
    first_trip, store_answers = asyncio.Event(), asyncio.Event()
    fail = False

    async def slots(account: str, count: int, interval: float, burst: int, recovery: float) -> list[float]:
        trips.append(count)
        if len(trips) == 1:
            first_trip.set()
            await store_answers.wait()
        if fail:
            raise SpoolUnavailable("queue: down")
        waits = [own.reserve() for _ in range(count)]
        handed.extend(waits)
        return waits

    limiter = SharedBucket(slots, _no_pause, 1000.0, 1, account="acme")
    first = asyncio.ensure_future(limiter.acquire())
    await first_trip.wait()
    rest = [asyncio.ensure_future(limiter.acquire()) for _ in range(7)]
    await asyncio.sleep(0)  # one turn of the loop: each of the seven asks (and waits) for its slot
    store_answers.set()
    await asyncio.gather(first, *rest)
    assert trips == [1, 7]
    assert handed == pytest.approx([n / 1000 for n in range(8)])  # eight slots, one per caller, in order

    fail = True
    trips.clear()
    await asyncio.gather(*(limiter.acquire() for _ in range(3)))  # none left waiting for an answer
    assert sum(trips) == 3


@pytest.mark.parametrize("busy", [QueueBusy("queue: busy: lock_timeout"), PoolExhausted("queue: busy: pool")])
async def test_a_busy_store_defers_the_call_and_only_an_unreachable_one_falls_back(busy: QueueBusy) -> None:
    """Review limits2 F2: the local bucket is the fallback while the store is unreachable only. A store that
    answers but is busy defers the call (as the queue's own calls are): falling back on each such failure let
    a process send up to rate_burst at once on top of the shared rate."""
    failure: SpoolUnavailable = busy

    async def slots(account: str, count: int, interval: float, burst: int, recovery: float) -> list[float]:
        raise failure

    limiter = SharedBucket(slots, _no_pause, 10.0, 3, account="acme")
    with capture_logs() as logs:
        for _ in range(5):  # the local bucket's burst is 3: a fall-back would let them through
            with pytest.raises(type(busy)):
                await limiter.acquire()
        await limiter.penalize(None)
    assert not [e for e in logs if e["event"] == "rate_limit_store_unavailable"]  # busy is no outage
    failure = QueueUnreachable("queue: database unreachable")
    with capture_logs() as logs:
        await limiter.acquire()  # this process's own bucket serves
    assert [e["event"] for e in logs] == ["rate_limit_store_unavailable"]


async def test_a_locked_sqlite_rate_file_is_busy_not_unreachable(tmp_path: Path) -> None:
    """Another process holding the SQLite queue's rate limit file past the busy timeout ("database is locked")
    is a busy store: the call is deferred (QueueBusy). It raised plain SpoolUnavailable, so the shared bucket
    fell back to this process's own bucket, up to rate_burst at once on top of the shared rate."""
    rate = RateFile(tmp_path / "spool.sqlite3-ratelimit", busy_timeout=0.05)
    limiter = SharedBucket(rate.slots, rate.pause, 10.0, 3, account="acme")
    try:
        await limiter.acquire()  # the file made, one slot taken
        holder = sqlite3.connect(rate.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
        try:
            with capture_logs() as logs:
                for _ in range(4):  # the local bucket's burst is 3: a fall-back would let them through
                    with pytest.raises(QueueBusy, match="busy: database is locked"):
                        await limiter.acquire()
                await limiter.penalize(None)
            assert not [e for e in logs if e["event"] == "rate_limit_store_unavailable"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await limiter.acquire()  # the lock released: the file serves again
    finally:
        await rate.close()


def _slots(bucket: TokenBucket) -> Callable[[str, int, float, int, float], Awaitable[list[float]]]:
    """The shared store's answer, from an in-process bucket (the queue's rows are tested in test_queue_store)."""

    async def slots(account: str, count: int, interval: float, burst: int, recovery: float) -> list[float]:
        return [bucket.reserve() for _ in range(count)]

    return slots


async def _no_pause(account: str, seconds: float, slow_for: float) -> None:
    return None
