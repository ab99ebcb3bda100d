"""gateway/core/tokenbucket.py, the one bucket algorithm: its arithmetic, and the in-process buckets built on it
(the upstream's TokenBucket and the per-login LoginRates) answering alike. The shared bucket's rows are tested
on both queue backends in tests/test_queue_store.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.config import LimitsSettings
from gateway.core import tokenbucket
from gateway.core.errors import RateLimited
from gateway.limits.clients import LoginRates
from gateway.upstream.ratelimit import SharedBucket, TokenBucket


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


def _slots(bucket: TokenBucket) -> Callable[[str, float, int, float], Awaitable[float]]:
    """The shared store's answer, from an in-process bucket (the queue's rows are tested in test_queue_store)."""

    async def slot(account: str, interval: float, burst: int, recovery: float) -> float:
        return bucket.reserve()

    return slot


async def _no_pause(account: str, seconds: float, slow_for: float) -> None:
    return None
