"""gateway/core/cache.py: eviction order, lifetimes on an injected clock, shared in-flight loads and what a
cancelled caller leaves; and the login cache under a credential-stuffing flood (scrypt calls counted)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.auth import credentials
from gateway.auth.credentials import Authenticator, AuthFailed
from gateway.config import load_settings
from gateway.core.cache import AsyncCache, ExpiringLru, Fresh, SingleFlight
from gateway.providers import registry
from gateway.providers.base import Provider
from tests.configs import gateway_config
from tests.harness import PASSWORD, USER


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- the bounded map ------------------------------------------------------------------------------


def test_full_cache_evicts_the_least_recently_used_one_at_a_time() -> None:
    lru: ExpiringLru[str, int] = ExpiringLru(3, Clock())
    for n, key in enumerate("abc"):
        lru.put(key, n, 60)
    assert lru.get("a") == 0  # a use: "b" is now the least recent
    lru.put("d", 3, 60)
    assert (lru.get("b"), len(lru)) == (None, 3)
    assert [lru.get(k) for k in "acd"] == [0, 2, 3]
    lru.put("e", 4, 60)  # "a" is the least recent now: only it goes
    assert [lru.get(k) for k in "acde"] == [None, 2, 3, 4]


def test_expired_entries_go_before_any_live_one() -> None:
    clock = Clock()
    lru: ExpiringLru[str, int] = ExpiringLru(3, clock)
    lru.put("old", 1, 100)
    lru.put("short", 2, 1)
    lru.put("new", 3, 100)
    clock.now += 2
    lru.put("next", 4, 100)
    assert [lru.get(k) for k in ("old", "short", "new", "next")] == [1, None, 3, 4]


def test_each_entry_lives_for_its_own_ttl() -> None:
    clock = Clock()
    lru: ExpiringLru[str, str] = ExpiringLru(10, clock)
    lru.put("long", "x", 300)
    lru.put("short", "y", 30)
    lru.put("never", "z", 0)  # not kept at all
    clock.now += 29.9
    assert (lru.get("long"), lru.get("short"), lru.get("never")) == ("x", "y", None)
    clock.now += 0.1
    assert (lru.get("long"), lru.get("short")) == ("x", None)
    assert len(lru) == 1  # what expired is not counted
    clock.now += 270
    assert lru.get("long") is None


def test_resize_keeps_entries_and_their_expiry() -> None:
    clock = Clock()
    lru: ExpiringLru[int, int] = ExpiringLru(10, clock)
    for n in range(10):
        lru.put(n, n, 10 + n)
    lru.resize(4)
    assert len(lru) == 4 and lru.maxsize == 4
    clock.now += 12  # the 4 kept (6..9) expire at +16..+19
    assert [lru.get(n) for n in range(6, 10)] == [6, 7, 8, 9]
    clock.now += 5
    assert [lru.get(n) for n in range(6, 10)] == [None, None, 8, 9]


# ---- single-flight loads --------------------------------------------------------------------------


class Loader:
    """A load that waits for `release`, counting its runs."""

    def __init__(self, value: str = "v", ttl: float = 60, error: Exception | None = None) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = asyncio.Event()  # set as it returns: the cache stores the value in the same step
        self.runs = 0
        self.value, self.ttl, self.error = value, ttl, error

    async def __call__(self) -> Fresh[str]:
        self.runs += 1
        self.started.set()
        await self.release.wait()
        self.finished.set()
        if self.error is not None:
            raise self.error
        return Fresh(self.value, self.ttl)


async def test_concurrent_misses_share_one_load() -> None:
    cache: AsyncCache[str, str] = AsyncCache(10, clock=Clock())
    load = Loader()
    callers = [asyncio.create_task(cache.get("k", load)) for _ in range(20)]
    await load.started.wait()
    load.release.set()
    assert await asyncio.gather(*callers) == ["v"] * 20
    assert await cache.get("k", load) == "v"  # from the cache now
    assert load.runs == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    cache: AsyncCache[str, str] = AsyncCache(10, clock=Clock())
    load = Loader()
    first = asyncio.create_task(cache.get("k", load))
    second = asyncio.create_task(cache.get("k", load))
    await load.started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    load.release.set()
    assert await second == "v"
    assert load.runs == 1


async def test_a_load_every_caller_left_still_fills_the_cache() -> None:
    cache: AsyncCache[str, str] = AsyncCache(10, clock=Clock())
    load = Loader()
    caller = asyncio.create_task(cache.get("k", load))
    await load.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    load.release.set()
    await load.finished.wait()  # the load went on without any caller
    assert cache.entry("k") is not None
    assert await cache.get("k", load) == "v" and load.runs == 1


async def test_a_failed_load_is_shared_but_not_cached() -> None:
    cache: AsyncCache[str, str] = AsyncCache(10, clock=Clock())
    load = Loader(error=LookupError("down"))
    callers = [asyncio.create_task(cache.get("k", load)) for _ in range(5)]
    await load.started.wait()
    load.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, LookupError) for r in results) and load.runs == 1
    ok = Loader("fine")
    ok.release.set()
    assert await cache.get("k", ok) == "fine"  # the next caller loads again


async def test_ttl_of_a_load_on_the_injected_clock() -> None:
    clock = Clock()
    cache: AsyncCache[str, str] = AsyncCache(10, clock=clock)
    load = Loader(ttl=30)
    load.release.set()
    await cache.get("k", load)
    clock.now += 29.9
    await cache.get("k", load)
    assert load.runs == 1
    clock.now += 0.1
    await cache.get("k", load)
    assert load.runs == 2


async def test_negative_entries_cannot_evict_positive_ones() -> None:
    cache: AsyncCache[str, bool] = AsyncCache(2, negative=lambda found: not found, clock=Clock())

    async def found(value: bool) -> Fresh[bool]:
        return Fresh(value, 60)

    await cache.get("good", lambda: found(True))
    for n in range(100):
        await cache.get(f"bad{n}", lambda: found(False))
    assert cache.entry("good") is not None
    assert len(cache) == 3  # one positive, the two most recent negatives
    assert cache.entry("bad99") is not None and cache.entry("bad97") is None


async def test_single_flight_start_runs_without_a_waiter() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    release = asyncio.Event()
    runs = []

    async def run() -> int:
        runs.append(1)
        await release.wait()
        return 7

    task = flight.start("k", run)
    assert flight.start("k", run) is task and flight.running("k")
    release.set()
    assert await flight.run("k", run) == 7
    await asyncio.sleep(0)
    assert not flight.running("k") and len(runs) == 1


# ---- the login cache under credential stuffing ----------------------------------------------------


@pytest.fixture
def authenticator(tmp_path: Path) -> Iterator[Authenticator]:
    settings = load_settings(None, **gateway_config(tmp_path))  # no upstream call is made
    built: dict[str, Provider] = {name: registry.build(name, account) for name, account in settings.accounts.items()}
    yield Authenticator(settings.accounts, built)
    loop = asyncio.new_event_loop()
    try:
        for provider in built.values():
            loop.run_until_complete(provider.aclose())
    finally:
        loop.close()


async def test_a_flood_of_failed_logins_does_not_evict_a_working_one(
    authenticator: Authenticator, monkeypatch: pytest.MonkeyPatch
) -> None:
    scrypt_calls = []
    real = credentials.verify_any

    def counting(password: str, stored: list[str]) -> int | None:
        scrypt_calls.append(len(stored))
        return real(password, stored)

    monkeypatch.setattr(credentials, "verify_any", counting)
    auth = authenticator

    async def no_decoy(password: str) -> None:
        pass

    # A name that is no login costs a decoy hash (as slow as a wrong password): not what this test is about,
    # and 100,000 of them would take over an hour of CPU.
    monkeypatch.setattr(auth, "_decoy_check", no_decoy)
    assert (await auth.authenticate(USER, PASSWORD)).login == USER
    assert scrypt_calls == [1]
    flood = max(100_001, credentials.CACHE_ENTRIES * 2 + 1)
    for n in range(flood):  # a credential-stuffing list: each pair tried once, each refused
        with pytest.raises(AuthFailed):
            await auth.authenticate(f"stuffed{n}@victim.example", "123456")
    assert (await auth.authenticate(USER, PASSWORD)).login == USER
    assert scrypt_calls == [1]  # the working login was still cached: no second hash


async def test_a_refused_username_is_not_in_the_exception(authenticator: Authenticator) -> None:
    """A username may be a password typed into the wrong field: AuthFailed's str(), repr() and args never hold
    it (the handler logs the login it checked as a fingerprint), and still say what happened."""
    typed = "Tr0ub4dor&3-horse"
    for username in (typed, USER):
        with pytest.raises(AuthFailed) as info:
            await authenticator.authenticate(username, "not the password")
        shown = f"{info.value} {info.value!r} {info.value.args!r}"
        assert username not in shown and "credentials refused" in shown, shown
