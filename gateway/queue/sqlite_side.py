"""The SQLite queue's side files: token buckets and quota counts shared by local processes, and the disk
reserve."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway.core import quota, tokenbucket
from gateway.core.authcount import Record
from gateway.core.errors import QueueBusy, SpoolUnavailable
from gateway.queue.health import QueueHealth
from gateway.queue.sql import FOR_SQLITE, auth_held_parameters
from gateway.queue.sqlite_wal import busy, use_wal
from gateway.queue.store import AUTH_SWEEP_EVERY, SIGNOUT_KEPT_PAST, AuthChange, auth_read, auth_written

log = structlog.get_logger("gateway.queue.sqlite")
T = TypeVar("T")
SQL = FOR_SQLITE


class RateFile:
    """The token buckets, per-login quota counts, AUTH counts and console sign-outs of the local processes sharing
    a SQLite queue, in a side file of their own: they must not wait behind the queue's writes (own thread) and need
    no fsync (a committed row outlives the process, a restart; only a crash of the machine may lose the last)."""

    def __init__(self, path: Path, busy_timeout: float = 10.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout  # seconds a statement waits for another process's lock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-rate")
        self._db: sqlite3.Connection | None = None
        self._next_sweep = 0.0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=self._busy_timeout)
            try:
                db.row_factory = sqlite3.Row
                use_wal(db)  # every worker's first use may come at once, on a new file
                db.execute("PRAGMA synchronous=OFF")
                # One write transaction taken up front (it waits for the lock; a statement that starts
                # reading and then writes would fail at once if another process wrote in between).
                db.execute("BEGIN IMMEDIATE")
                db.execute(
                    "CREATE TABLE IF NOT EXISTS rate_buckets (account TEXT PRIMARY KEY, tat REAL NOT NULL,"
                    " slow_until REAL NOT NULL DEFAULT 0)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS auth_clients (client TEXT PRIMARY KEY,"
                    " failures INTEGER NOT NULL DEFAULT 0, since REAL NOT NULL DEFAULT 0,"
                    " in_flight INTEGER NOT NULL DEFAULT 0, in_flight_until REAL NOT NULL DEFAULT 0,"
                    " locked_until REAL NOT NULL DEFAULT 0)"
                )
                db.execute(
                    "CREATE TABLE IF NOT EXISTS quota_counts (login TEXT NOT NULL, win TEXT NOT NULL, messages"
                    " INTEGER NOT NULL, bytes INTEGER NOT NULL, expires REAL NOT NULL, PRIMARY KEY (login, win))"
                )
                # Console sessions signed out (gateway/console/web.py): refused by every local process.
                db.execute("CREATE TABLE IF NOT EXISTS console_signouts (sid TEXT PRIMARY KEY, until REAL NOT NULL)")
                db.execute("COMMIT")
            except BaseException:
                db.close()  # the next use tries again, on a new connection
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))
        except (sqlite3.Error, OSError) as exc:
            if busy(exc):
                # Another process held the file's lock past the busy timeout: the file answers, so QueueBusy (the
                # shared bucket defers the call, as PostgreSQL's lock_timeout does), not an unreachable store (its
                # own bucket, up to rate_burst at once on top of the shared rate, in every process at once).
                raise QueueBusy(f"rate limit file {self.path}: busy: {exc}") from exc
            raise SpoolUnavailable(f"rate limit file {self.path}: {type(exc).__name__}: {exc}") from exc

    async def slots(self, account: str, count: int, interval: float, burst: int, recovery: float) -> list[float]:
        def run() -> list[float]:
            with self._tx() as db:
                tat, slow_until, now = self._row(db, account)
                slowed = tokenbucket.slowed(interval, now, slow_until, recovery)
                slots = tokenbucket.take_many(tat, now, slowed, burst, count)
                db.execute(SQL.rate_write, (slots.tat, slow_until, account))
            return list(slots.waits)

        return await self._run(run)

    async def pause(self, account: str, seconds: float, slow_for: float) -> None:
        def run() -> None:
            with self._tx() as db:
                tat, _, now = self._row(db, account)
                db.execute(SQL.rate_write, (tokenbucket.paused(tat, now, seconds), now + slow_for, account))

        await self._run(run)

    async def auth(self, client: str, window: float, change: AuthChange) -> tuple[Record, Any, float]:
        """Apply `change` to `client`'s AUTH record under the file's write lock; a record left with nothing
        to remember is deleted (and, now and then, every such record)."""

        def run() -> tuple[Record, Any, float]:
            with self._tx() as db:
                db.execute(SQL.auth_row, (client,))
                record, now = auth_read(db.execute(SQL.auth_read, (client,)).fetchone())
                record, result = change(record, now)
                if record.clean():
                    db.execute(SQL.auth_forget, (client,))
                else:
                    db.execute(SQL.auth_write, auth_written(client, record))
                if now >= self._next_sweep:
                    self._next_sweep = now + AUTH_SWEEP_EVERY
                    db.execute(SQL.auth_sweep, (now - window, now, now))
                    db.execute(SQL.signout_sweep, (SIGNOUT_KEPT_PAST,))
            return record, result, now

        return await self._run(run)

    async def auth_peek(self, client: str) -> tuple[Record, float] | None:
        """`client`'s AUTH record and the file's clock, or None: nothing held (read only, no lock taken)."""

        def run() -> tuple[Record, float] | None:
            row = self._conn().execute(SQL.auth_peek, (client,)).fetchone()
            return None if row is None else auth_read(row)

        return await self._run(run)

    async def auth_held(
        self, limit: int, *, prefix: str = "", besides: Sequence[str] = ()
    ) -> list[tuple[str, Record, float]]:
        """The clients held back (locked out first), at most `limit` (read only, no lock taken), of those whose
        key starts with `prefix` and with none of `besides`."""
        held = SQL.auth_held_of(len(besides))

        def run() -> list[tuple[str, Record, float]]:
            rows = self._conn().execute(held, auth_held_parameters(limit, prefix, besides)).fetchall()
            return [(str(row["client"]), *auth_read(row)) for row in rows]

        return await self._run(run)

    async def session_revoke(self, sid: str, until: float) -> None:
        def run() -> None:
            with self._tx() as db:
                db.execute(SQL.signout_sweep, (SIGNOUT_KEPT_PAST,))
                db.execute(SQL.signout_write, (sid, until))

        await self._run(run)

    async def session_revoked(self, sid: str) -> bool:
        """One primary-key read, no lock taken (a sign-out committed before it is seen)."""

        def run() -> bool:
            return self._conn().execute(SQL.signout_read, (sid,)).fetchone() is not None

        return await self._run(run)

    async def quota_take(
        self, login: str, windows: Sequence[quota.Window], size: int
    ) -> tuple[quota.Verdict, dict[str, quota.Counts]]:
        def run() -> tuple[quota.Verdict, dict[str, quota.Counts]]:
            with self._tx() as db:
                counts = self._quota_rows(db, login, windows)
                verdict = quota.decide(windows, counts, 1, size)
                if verdict.ok:
                    for window in windows:
                        db.execute(SQL.quota_add, (1, size, login, window.key))
                        counts[window.key] = quota.added(counts[window.key], 1, size)
            return verdict, counts

        return await self._run(run)

    async def quota_return(self, login: str, windows: Sequence[quota.Window], size: int) -> None:
        def run() -> None:
            with self._tx() as db:
                for window in windows:
                    db.execute(SQL.quota_add, (-1, -size, login, window.key))

        await self._run(run)

    async def quota_counts(self, login: str, windows: Sequence[quota.Window]) -> dict[str, quota.Counts]:
        def run() -> dict[str, quota.Counts]:
            with self._tx() as db:
                return self._quota_rows(db, login, windows)

        return await self._run(run)

    @staticmethod
    def _quota_rows(db: sqlite3.Connection, login: str, windows: Sequence[quota.Window]) -> dict[str, quota.Counts]:
        """The windows' counts, their rows made on first use (and the login's windows ended over
        an hour ago dropped)."""
        db.execute(SQL.quota_expired, (login, quota.KEEP_AFTER_END))
        counts = {}
        for window in windows:
            db.execute(SQL.quota_row, (login, window.key, window.end))
            messages, size = db.execute(SQL.quota_read, (login, window.key)).fetchone()
            counts[window.key] = quota.Counts(int(messages), int(size))
        return counts

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _row(db: sqlite3.Connection, account: str) -> tuple[float, float, float]:
        """(tat, slow_until, now) of the account's bucket, made on first use."""
        db.execute(SQL.rate_row, (account,))
        tat, slow_until, now = db.execute(SQL.rate_read, (account,)).fetchone()
        return float(tat), float(slow_until), float(now)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)


def disk_full(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


class Reserve:
    """Disk space set aside beside the queue (a pre-allocated file), released only to let stored messages
    drain when the file system fills up, and taken back as soon as the file system has room for it again
    (measured each time the queue asks, never guessed)."""

    def __init__(self, path: Path, size: int, health: QueueHealth | None = None) -> None:
        self.path = path
        self.size = size
        self._health = health  # told when the reserve is in use (/readyz)
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    @released.setter
    def released(self, value: bool) -> None:
        self._released = value
        if self._health is not None:
            self._health.reserve_released = value

    def release(self) -> bool:
        """Free the reserve; False when there is none to free."""
        if self.released or self.size <= 0:
            return False
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self.released = True
        log.error(
            "queue_disk_full",
            path=str(self.path.parent),
            reserve_released=self.size,
            effect="stored messages keep draining; new messages get 452 4.3.1 until there is room",
        )
        return True

    def room(self) -> int:
        """Bytes the file system has free for the queue now."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def restore(self, at_start: bool = False) -> bool:
        """Take the reserve (back) if the file system has room for it now; True when it is in place. Taken
        back only with as much again free beside it: the queue must be able to work without reaching for it
        at once (the file system would be full again at the next write, and the reserve released again)."""
        if self.size <= 0 or (not at_start and not self.released):
            return True
        try:
            if self.path.exists() and self.path.stat().st_size >= self.size:
                self.released = False  # another process of this queue took it back
                return True
            needed = self.size if at_start else 2 * self.size
            if (free := self.room()) < needed:  # measured first: no half-allocated file to clean up
                raise OSError(errno.ENOSPC, f"{free} bytes free, {needed} needed")
            with self.path.open("wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, self.size)
        except OSError as exc:
            self.path.unlink(missing_ok=True)  # not enough room yet: keep draining, try again later
            if at_start and not self.released:
                # At start: run without a reserve (a full disk then stalls retries until there is room).
                log.warning("queue_disk_reserve_unavailable", path=str(self.path), size=self.size, error=str(exc))
                self.size = 0
            return False
        if self.released:
            log.info("queue_disk_reserve_restored", path=str(self.path.parent), size=self.size)
        self.released = False
        return True
