"""Per-login quotas (messages and bytes per clock hour and per UTC day), counted across every process and
instance on the queue.

A message is counted at the end of its DATA, before the gateway answers it: one transaction in the queue store
checks every window and adds the message only if it fits them all, so the instances together never go past a
quota (no overshoot). A message counted and then not accepted (refused, deferred) is taken back. MAIL is
answered from this process's last view of the counts (no store call once a login has one, while it fits): a
view a little behind lets a MAIL through that the end of DATA then refuses. Counts also shrink within a window
(a message given back, here or by another process or instance), so a view that refuses is re-read from the
store once before the refusal is answered: a MAIL that fits the shared counts is never refused for an old view,
and only a refused MAIL pays the store read. When the store cannot be reached the process counts on its own (and
says so once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from gateway.config.logins import Quota
from gateway.core import quota
from gateway.core.cache import ExpiringLru
from gateway.core.errors import Deferred
from gateway.core.quota import Counts, Verdict, Window
from gateway.ops.metrics import INTERNAL_ERRORS

log = structlog.get_logger("gateway.limits")
# Logins whose counts this process remembers at once (the least recently used forgotten first).
MAX_VIEWS = 100_000


class QuotaStore(Protocol):
    """The part of gateway.queue.store.QueueStore that keeps the shared counts."""

    async def quota_take(
        self, login: str, windows: tuple[Window, ...], size: int
    ) -> tuple[Verdict, dict[str, Counts]]: ...

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None: ...

    async def quota_counts(self, login: str, windows: tuple[Window, ...]) -> dict[str, Counts]: ...


class LocalCounts:
    """The same counts held by this process alone: without a shared store, or while it is unreachable."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: ExpiringLru[tuple[str, str], Counts] = ExpiringLru(MAX_VIEWS * 2, clock)

    def _get(self, login: str, window: Window) -> Counts:
        return self._counts.get((login, window.key)) or Counts()

    async def quota_take(self, login: str, windows: tuple[Window, ...], size: int) -> tuple[Verdict, dict[str, Counts]]:
        counts = await self.quota_counts(login, windows)
        verdict = quota.decide(windows, counts, 1, size)
        if verdict.ok:
            self._add(login, windows, 1, size)
            counts = await self.quota_counts(login, windows)
        return verdict, counts

    async def quota_return(self, login: str, windows: tuple[Window, ...], size: int) -> None:
        self._add(login, windows, -1, -size)

    async def quota_counts(self, login: str, windows: tuple[Window, ...]) -> dict[str, Counts]:
        return {w.key: self._get(login, w) for w in windows}

    def _add(self, login: str, windows: tuple[Window, ...], messages: int, size: int) -> None:
        for window in windows:
            counts = quota.added(self._get(login, window), messages, size)
            self._counts.put((login, window.key), counts, window.end - self._clock())


@dataclass(frozen=True, slots=True)
class Taken:
    """A message counted against a login's windows, to take back if it is not accepted after all."""

    key: str
    windows: tuple[Window, ...]
    size: int
    # Where it was counted: the shared store, or this process alone (the store was unreachable). It is given
    # back where it was counted: a count taken alone during an outage and given back to the store after it
    # would take the shared count below what the instances counted.
    shared: bool = True


@dataclass(frozen=True, slots=True)
class View:
    """A login's windows and their counts as this process last saw them (for MAIL, and for /metrics)."""

    windows: tuple[Window, ...]
    counts: Mapping[str, Counts]


def _key(account: str, login: str) -> str:
    return f"{account}/{login}"


class QuotaTracker:
    def __init__(self, store: QuotaStore | None, clock: Callable[[], float] = time.time) -> None:
        self._local = LocalCounts(clock)
        self._store: QuotaStore = store or self._local
        self._clock = clock
        self._views: ExpiringLru[str, View] = ExpiringLru(MAX_VIEWS, clock)
        self._degraded = False
        # The configured logins' quotas, by (account, login), that /metrics shows even before any traffic.
        self.configured: dict[tuple[str, str], Quota] = {}
        self._late: set[asyncio.Task[None]] = set()  # counts of callers gone, being given back

    def windows(self, limits: Quota) -> tuple[Window, ...]:
        return quota.windows(
            self._clock(),
            (limits.messages_per_hour, limits.bytes_per_hour),
            (limits.messages_per_day, limits.bytes_per_day),
        )

    async def check(self, account: str, login: str, limits: Quota, size: int) -> Verdict:
        """At MAIL: would one more message (of `size` bytes, at least one) fit, as far as this process knows."""
        windows = self.windows(limits)
        if not windows:
            return quota.OK
        key = _key(account, login)
        size = max(size, 1)
        view = self._views.get(key)
        if view is None or view.windows != windows:
            view = self._remember(key, windows, await self._counts(key, windows))
            return quota.decide(windows, view.counts, 1, size)
        verdict = quota.decide(windows, view.counts, 1, size)
        if verdict.ok:
            return verdict
        # The view says no, but another process or instance may have given a message back since it was read
        # (counts then shrink): ask the store once before refusing.
        view = self._remember(key, windows, await self._counts(key, windows))
        return quota.decide(windows, view.counts, 1, size)

    async def take(self, account: str, login: str, limits: Quota, size: int) -> tuple[Verdict, Taken | None]:
        """At the end of DATA: count the message if it fits every window (shared, atomic)."""
        windows = self.windows(limits)
        if not windows:
            return quota.OK, None
        key = _key(account, login)
        counting = asyncio.ensure_future(self._take(key, windows, size))
        try:
            verdict, counts, shared = await asyncio.shield(counting)
        except asyncio.CancelledError:
            # The caller left (its client gone) while the store counted: a shared store's transaction is not
            # cut in half, and may have counted the message; once done, a count is given back (nothing is sent).
            counting.add_done_callback(lambda done: self._give_back_late(done, key, windows, size))
            raise
        self._remember(key, windows, counts)
        return verdict, Taken(key, windows, size, shared) if verdict.ok else None

    def _give_back_late(
        self,
        counting: asyncio.Future[tuple[Verdict, dict[str, Counts], bool]],
        key: str,
        windows: tuple[Window, ...],
        size: int,
    ) -> None:
        if counting.cancelled() or counting.exception() is not None or not counting.result()[0].ok:
            return
        taken = Taken(key, windows, size, counting.result()[2])
        task = asyncio.get_running_loop().create_task(self._give_back_now(taken))
        self._late.add(task)
        task.add_done_callback(self._late.discard)

    async def _give_back_now(self, taken: Taken) -> None:
        # Nobody awaits this task: what it raises is logged and counted here (as gateway.smtp.logins does for
        # the give-back after a reply), not left to "Task exception was never retrieved".
        try:
            await self.give_back(taken)
        except Exception as exc:  # a bug: logged once, counted; the count stays one too high until the window ends
            INTERNAL_ERRORS.labels(where="quota_return").inc()
            log.error("quota_return_failed", login=taken.key, late=True, exc_info=exc)

    async def give_back(self, taken: Taken) -> None:
        """Uncount a message that was not accepted after all."""
        await self._return(taken)
        view = self._views.get(taken.key)
        if view is not None and view.windows == taken.windows:
            counts = {k: quota.added(c, -1, -taken.size) for k, c in view.counts.items()}
            self._remember(taken.key, taken.windows, counts)

    def views(self) -> Iterator[tuple[str, str, Quota, View | None]]:
        """Each configured login with a quota, its limits and its counts as last seen in the current windows."""
        for (account, login), limits in self.configured.items():
            view = self._views.get(_key(account, login))
            yield account, login, limits, view if view is not None and view.windows == self.windows(limits) else None

    def _remember(self, key: str, windows: tuple[Window, ...], counts: Mapping[str, Counts]) -> View:
        view = View(windows, counts)
        self._views.put(key, view, max(w.end for w in windows) - self._clock())
        return view

    async def _counts(self, key: str, windows: tuple[Window, ...]) -> dict[str, Counts]:
        try:
            counts = await self._store.quota_counts(key, windows)
        except Deferred as exc:
            self._unavailable(exc)
            return await self._local.quota_counts(key, windows)
        self._available()
        return counts

    async def _take(self, key: str, windows: tuple[Window, ...], size: int) -> tuple[Verdict, dict[str, Counts], bool]:
        """The verdict, the counts, and whether the shared store counted it (False: this process alone)."""
        try:
            verdict, counts = await self._store.quota_take(key, windows, size)
        except Deferred as exc:
            self._unavailable(exc)
            return (*await self._local.quota_take(key, windows, size), False)
        self._available()
        return verdict, counts, self._store is not self._local

    async def _return(self, taken: Taken) -> None:
        if not taken.shared:
            await self._local.quota_return(taken.key, taken.windows, taken.size)
            return
        try:
            await self._store.quota_return(taken.key, taken.windows, taken.size)
        except Deferred as exc:
            # The shared count stays one message too high until its window ends: it refuses early, never lets
            # a login past its quota; taking it back from this process's own counts would do neither.
            self._unavailable(exc)
            log.warning("quota_return_skipped", login=taken.key, reason="the queue store is unreachable")
            return
        self._available()

    def _unavailable(self, exc: Deferred) -> None:
        if not self._degraded:
            self._degraded = True
            log.error("quota_store_unavailable", error=exc.reason, fallback="this process's own counts")

    def _available(self) -> None:
        if self._degraded:
            self._degraded = False
            log.info("quota_store_available")
