"""Bounded caches: each entry kept for its own lifetime, the least recently used evicted one at a time, and
lookups of the same key shared while they run (single-flight)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

from cachetools import TLRUCache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Entry(Generic[V]):
    value: V
    expires: float  # on the cache's clock


def _expires(_key: object, entry: Entry[Any], _now: float) -> float:
    return entry.expires


class ExpiringLru(Generic[K, V]):
    """At most `maxsize` entries, each until its own expiry. Storing into a full cache first drops what has
    expired, then the least recently used entry: one at a time, never everything at once (a flood of new
    keys can only push out the entries nobody used since)."""

    def __init__(self, maxsize: int, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._entries: TLRUCache[K, Entry[V]] = TLRUCache(maxsize, _expires, timer=clock)

    @property
    def maxsize(self) -> int:
        return int(self._entries.maxsize)

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)

    def entry(self, key: K) -> Entry[V] | None:
        """The live entry (a use: it becomes the most recent), or None when absent or expired."""
        return self._entries.get(key)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def put(self, key: K, value: V, ttl: float) -> None:
        """Keep `value` for `ttl` seconds from now; a `ttl` of 0 or less removes the key instead."""
        if ttl <= 0:
            self.pop(key)
            return
        self._entries[key] = Entry(value, self._clock() + ttl)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def items(self) -> list[tuple[K, V]]:
        """The live entries. Reading each counts as a use of it (cachetools has no peek): an operator's
        listing reorders the eviction order, which only matters when the cache is full."""
        found = []
        for key in list(self._entries):
            entry = self._entries.get(key)
            if entry is not None:
                found.append((key, entry.value))
        return found

    def clear(self) -> None:
        self._entries.clear()

    def resize(self, maxsize: int) -> None:
        """A new bound (a configuration reload); shrinking drops the oldest entries first."""
        if maxsize == self.maxsize:
            return
        old = self._entries
        self._entries = TLRUCache(maxsize, _expires, timer=self._clock)
        for key in list(old):
            entry = old.get(key)
            if entry is not None:
                self._entries[key] = entry


class SingleFlight(Generic[K, V]):
    """Concurrent calls for the same key share one run. The run is a task of its own: a caller that is
    cancelled stops waiting for it without cancelling it for the others (or for the cache it fills)."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[V]] = {}

    def running(self, key: K) -> bool:
        return key in self._running

    def start(self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The run for `key`: the one in flight, or `fn()` started now."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(fn())
            self._running[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return task

    async def run(self, key: K, fn: Callable[[], Coroutine[Any, Any, V]]) -> V:
        return await asyncio.shield(self.start(key, fn))

    def _done(self, key: K, task: asyncio.Task[V]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have stopped waiting, and each re-raises it itself


class Fresh(NamedTuple, Generic[V]):
    """What a load found, and how many seconds it may be reused (0 or less: not at all)."""

    value: V
    ttl: float


class AsyncCache(Generic[K, V]):
    """Values loaded on a miss, kept for the lifetime their load gives, bounded by `maxsize`; concurrent
    misses of one key share one load. A load that raises is not cached: each caller of it gets the error.

    With `negative` (which values are refusals or absences) those live in a segment of their own, bounded
    by `negative_maxsize`: a flood of failing lookups evicts older failures, never a positive entry.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        negative: Callable[[V], bool] | None = None,
        negative_maxsize: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._positive: ExpiringLru[K, V] = ExpiringLru(maxsize, clock)
        self._negative = self._positive
        self._is_negative = negative
        if negative is not None:
            self._negative = ExpiringLru(negative_maxsize or maxsize, clock)
        self._flight: SingleFlight[K, V] = SingleFlight()

    def __len__(self) -> int:
        return len(self._positive) + (len(self._negative) if self._negative is not self._positive else 0)

    def entry(self, key: K) -> Entry[V] | None:
        entry = self._positive.entry(key)
        if entry is None and self._negative is not self._positive:
            entry = self._negative.entry(key)
        return entry

    async def get(self, key: K, load: Callable[[], Coroutine[Any, Any, Fresh[V]]]) -> V:
        entry = self.entry(key)
        if entry is not None:
            return entry.value
        return await self._flight.run(key, functools.partial(self._load, key, load))

    def put(self, key: K, value: V, ttl: float) -> None:
        if self._is_negative is not None and self._is_negative(value):
            self._positive.pop(key)
            self._negative.put(key, value, ttl)
        else:
            self._negative.pop(key)
            self._positive.put(key, value, ttl)

    def forget(self, key: K) -> None:
        self._positive.pop(key)
        self._negative.pop(key)

    async def _load(self, key: K, load: Callable[[], Coroutine[Any, Any, Fresh[V]]]) -> V:
        value, ttl = await load()
        self.put(key, value, ttl)
        return value
