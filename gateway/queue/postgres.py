"""The PostgreSQL queue backend: one database shared by gateway instances on several machines.

psycopg 3, async, pooled. Claims lock rows with `FOR UPDATE SKIP LOCKED`, so instances never wait for
each other and never claim one message twice; every write happens in one transaction and is committed
before the call returns (with a synchronous standby, `synchronous_commit` decides when a commit is
acknowledged: docs/operations/instances.md). Changes that make a message due NOTIFY the other
instances (LISTEN/NOTIFY), so they need not poll. Time values are epoch seconds from the instances'
clocks: keep them NTP-synchronised (leases are 60 s; a skew of a second or two does not matter).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
import structlog
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.core import quota, tokenbucket
from gateway.core.errors import SpoolUnavailable
from gateway.core.quota import Counts, Verdict, Window
from gateway.core.records import Decision
from gateway.queue import postgres_schema
from gateway.queue.health import QueueHealth
from gateway.queue.sql import FOR_POSTGRES, POSTGRES
from gateway.queue.store import Claimed, ClaimedRows, KeyHit, NewMessage, chunks, message_row

log = structlog.get_logger("gateway.queue.postgres")
CHANNEL = "smtp_gateway_queue"
SQL = FOR_POSTGRES


def redacted(url: str) -> str:
    """The URL as it may be logged (settings refuse a password in it; belt and braces)."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}://{userinfo.partition(':')[0]}{at}{host}" if at else url


class PostgresQueue:
    def __init__(self, url: str, password: str | None = None, *, max_connections: int = 10) -> None:
        self.url = redacted(url)
        self._conninfo = url
        self._kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
        if password:
            self._kwargs["password"] = password
        self._pool = AsyncConnectionPool(
            url,
            connection_class=psycopg.AsyncConnection[DictRow],
            kwargs=self._kwargs,
            min_size=1,
            max_size=max_connections,
            open=False,
            name="smtp-gateway-queue",
        )
        self._opened = False
        self._found_version = 0
        self.health = QueueHealth()

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        """A pooled connection inside one transaction; backend failures become SpoolUnavailable."""
        try:
            if not self._opened:
                await self.open()
            async with self._pool.connection(timeout=10.0) as conn, conn.transaction():
                yield conn
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise SpoolUnavailable(f"queue {self.url}: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        if self._opened:
            return
        try:
            await self._pool.open(wait=True, timeout=10.0)
            self._opened = True
            self._found_version = await self._migrate()
        except (psycopg.Error, PoolTimeout, OSError, postgres_schema.SchemaTooNew) as exc:
            raise SpoolUnavailable(f"queue {self.url}: {type(exc).__name__}: {exc}") from exc

    async def _migrate(self) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            applied = await postgres_schema.migrate(conn)
        for number in applied:
            log.info("queue_migrated", queue=self.url, version=number)
        return applied[0] - 1 if applied else postgres_schema.LATEST

    async def migrate(self) -> tuple[int, int]:
        await self.open()
        return self._found_version, postgres_schema.LATEST

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            await self._pool.close()

    # -- the server's side ---------------------------------------------------------------------------

    async def insert(self, m: NewMessage) -> int:
        try:
            token = await self._insert(m)
        except SpoolUnavailable as exc:
            self.health.record("insert", exc.reason)
            raise
        self.health.record("insert", None)
        return token

    async def _insert(self, m: NewMessage) -> int:
        stored = message_row(m)
        async with self._tx() as conn:
            await conn.execute(SQL.insert_message, stored.values)
            async with conn.cursor() as cur:
                await cur.executemany(
                    SQL.insert_call,
                    [
                        (m.id, n, c.key, c.recipients, c.state, c.upstream_id, c.error, c.lost)
                        for n, c in enumerate(m.decision.calls.values())
                    ],
                )
                for row in chunks(m.id, m.blobs):  # one chunk in memory at a time
                    await cur.execute(SQL.insert_blob, row)
            if stored.state == "queued":
                await self._notify(conn, m.account)
        return stored.token

    @staticmethod
    async def _notify(conn: psycopg.AsyncConnection[DictRow], account: str) -> None:
        # PostgreSQL only: the other instances' LISTEN (SQLite's processes poll).
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, account))

    async def claim(self, owner: str, account: str, now: float, limit: int, lease: float) -> list[Claimed]:
        async with self._tx() as conn:
            rows = await (await conn.execute(SQL.due, (account, now, limit))).fetchall()
            if len(rows) < limit:
                rows += await (await conn.execute(SQL.reapable, (account, now, limit - len(rows)))).fetchall()
            if not rows:
                return []
            reaped = {r["id"]: r["state"] == "inflight" for r in rows}
            ids = POSTGRES.items(list(reaped))
            updated = await (await conn.execute(SQL.claim(len(reaped)), (owner, now + lease, *ids))).fetchall()
            rows_read = ClaimedRows(account, reaped, updated)
            for c in await (await conn.execute(SQL.claimed_calls(len(reaped)), ids)).fetchall():
                rows_read.call(c)
            async with conn.cursor() as cur:
                async for row in cur.stream(SQL.claimed_blobs(len(reaped)), ids):  # streamed row by row
                    rows_read.blob_chunk(row)
        return rows_read.claimed()

    async def mark_sending(self, msg_id: str, token: int, keys: Sequence[str]) -> bool:
        async with self._tx() as conn:
            if not await self._holds(conn, msg_id, token):
                return False
            async with conn.cursor() as cur:
                await cur.executemany(SQL.mark_sending, [(msg_id, key) for key in keys])
        return True

    @staticmethod
    async def _holds(conn: psycopg.AsyncConnection[DictRow], msg_id: str, token: int) -> bool:
        return await (await conn.execute(SQL.holds, (msg_id, token))).fetchone() is not None

    async def settle(self, msg_id: str, token: int, d: Decision, now: float) -> bool:
        async with self._tx() as conn:
            if not await self._holds(conn, msg_id, token):
                return False
            if d.verdict == "delivered":
                await conn.execute(SQL.delete_message, (msg_id,))
                return True
            dead = d.verdict in ("dead", "refused")
            row = await (
                await conn.execute(
                    SQL.settle,
                    (
                        "dead" if dead else "queued",
                        d.attempts,
                        d.next_attempt,
                        d.last_error,
                        d.dead_reason if dead else None,
                        now if dead else None,
                        d.internal_errors,
                        msg_id,
                    ),
                )
            ).fetchone()
            async with conn.cursor() as cur:
                await cur.executemany(
                    SQL.settle_call,
                    [(c.state, c.upstream_id, c.error, c.lost, msg_id, c.key) for c in d.calls.values()],
                )
            if not dead and row is not None:
                await self._notify(conn, row["account"])
        return True

    async def release(self, msg_id: str, token: int, now: float) -> bool:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.release, (now, msg_id, token))).fetchone()
            if row is not None:
                await self._notify(conn, row["account"])
        return row is not None

    async def renew(self, owner: str, lease_until: float) -> int:
        async with self._tx() as conn:
            cur = await conn.execute(SQL.lease, (lease_until, owner))
            return cur.rowcount

    async def expire_owners(self, owners: Sequence[str], now: float) -> int:
        async with self._tx() as conn:
            expired = 0
            for owner in owners:
                expired += (await conn.execute(SQL.lease, (now - 1, owner))).rowcount
            return expired

    async def owners(self) -> list[str]:
        async with self._tx() as conn:
            rows = await (await conn.execute(SQL.owners)).fetchall()
        return [r["owner"] for r in rows]

    async def next_due(self, accounts: Sequence[str]) -> float | None:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.next_due(len(accounts)), POSTGRES.items(accounts))).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    async def wake(self, account: str, now: float, limit: int | None = None) -> int:
        async with self._tx() as conn:
            cur = await conn.execute(SQL.wake, (now, account, now, POSTGRES.no_limit if limit is None else limit))
            if cur.rowcount:
                await self._notify(conn, account)
            return cur.rowcount

    async def listen(self, wake: Callable[[str], None]) -> None:
        """Call `wake(account)` whenever another instance made a message due; reconnects until cancelled."""
        delay = 1.0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 1.0
                    async for notice in conn.notifies():
                        wake(notice.payload)
            except (psycopg.Error, OSError) as exc:
                log.warning("queue_listen_failed", queue=self.url, error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    # -- shared rate limits ---------------------------------------------------------------------------

    async def rate_slot(self, account: str, interval: float, burst: int, recovery: float = 30.0) -> float:
        """Take the account's next call slot (one row per account, the database's clock); returns the seconds
        to wait for it."""
        async with self._tx() as conn:
            tat, slow_until, now = await self._rate_row(conn, account)
            slot = tokenbucket.take(tat, now, tokenbucket.slowed(interval, now, slow_until, recovery), burst)
            await conn.execute(SQL.rate_write, (slot.tat, slow_until, account))
        return slot.wait

    async def rate_pause(self, account: str, seconds: float, slow_for: float) -> None:
        """The upstream said 429: no slot for `seconds`, and a slower rate for `slow_for` seconds."""
        async with self._tx() as conn:
            tat, _, now = await self._rate_row(conn, account)
            await conn.execute(SQL.rate_write, (tokenbucket.paused(tat, now, seconds), now + slow_for, account))

    # -- shared quota counts ------------------------------------------------------------------------------

    async def quota_take(self, login: str, windows: Sequence[Window], size: int) -> tuple[Verdict, dict[str, Counts]]:
        async with self._tx() as conn:
            counts = await self._quota_rows(conn, login, windows)
            verdict = quota.decide(windows, counts, 1, size)
            if verdict.ok:
                for window in windows:
                    await conn.execute(SQL.quota_add, (1, size, login, window.key))
                    counts[window.key] = quota.added(counts[window.key], 1, size)
        return verdict, counts

    async def quota_return(self, login: str, windows: Sequence[Window], size: int) -> None:
        async with self._tx() as conn:
            for window in windows:
                await conn.execute(SQL.quota_add, (-1, -size, login, window.key))

    async def quota_counts(self, login: str, windows: Sequence[Window]) -> dict[str, Counts]:
        async with self._tx() as conn:
            return await self._quota_rows(conn, login, windows)

    @staticmethod
    async def _quota_rows(
        conn: psycopg.AsyncConnection[DictRow], login: str, windows: Sequence[Window]
    ) -> dict[str, Counts]:
        """The windows' counts, their rows made on first use and locked until commit (the login's ended
        windows dropped)."""
        await conn.execute(SQL.quota_expired, (login, time.time()))
        counts = {}
        for window in windows:
            await conn.execute(SQL.quota_row, (login, window.key, window.end))
            row = await (await conn.execute(SQL.quota_read, (login, window.key))).fetchone()
            assert row is not None
            counts[window.key] = Counts(int(row["messages"]), int(row["bytes"]))
        return counts

    @staticmethod
    async def _rate_row(conn: psycopg.AsyncConnection[DictRow], account: str) -> tuple[float, float, float]:
        """(tat, slow_until, now) of the account's bucket, made on first use and locked until commit."""
        await conn.execute(SQL.rate_row, (account,))
        row = await (await conn.execute(SQL.rate_read, (account,))).fetchone()
        assert row is not None
        return float(row["tat"]), float(row["slow_until"]), float(row["now"])

    # -- idempotency keys -----------------------------------------------------------------------------

    async def claim_key(
        self, account: str, key: str, msg_id: str, now: float, window: float, stale: float
    ) -> KeyHit | None:
        async with self._tx() as conn:
            # Only this key's expired row: a table-wide delete in every claim would have instances contend
            # (SQLite, one writer at a time, deletes every expired key).
            await conn.execute(
                "DELETE FROM idempotency WHERE account=%s AND key=%s AND expires<%s", (account, key, now)
            )
            # Insert first: two instances claiming one new key at once cannot both get it.
            inserted = await (await conn.execute(SQL.key_insert, (account, key, msg_id, now, now + window))).fetchone()
            if inserted is not None:
                return None
            row = await (await conn.execute(SQL.key_row, (account, key))).fetchone()
            if row is None or row["reply_id"] is not None or row["created"] >= now - stale:
                return None if row is None else KeyHit(row["msg_id"], row["reply_id"])
            if await (await conn.execute(SQL.stored, (row["msg_id"],))).fetchone() is not None:
                await conn.execute(SQL.key_answered, (account, key))
                return KeyHit(row["msg_id"], row["msg_id"])
            # A stale claim whose message was never stored: this one takes the key over, in place.
            await conn.execute(
                "UPDATE idempotency SET msg_id=%s, created=%s, expires=%s WHERE account=%s AND key=%s",
                (msg_id, now, now + window, account, key),
            )
        return None

    async def finish_key(self, account: str, key: str, msg_id: str, reply_id: str | None) -> None:
        async with self._tx() as conn:
            if reply_id is None:
                await conn.execute(SQL.key_drop, (account, key, msg_id))
            else:
                await conn.execute(SQL.key_reply, (reply_id, account, key, msg_id))

    # -- operators ------------------------------------------------------------------------------------

    async def counts(self, now: float) -> dict[str, dict[str, Any]]:
        async with self._tx() as conn:
            rows = await (await conn.execute(SQL.counts)).fetchall()
        return {r["state"]: {"count": r["n"], "oldest_age": now - r["oldest"]} for r in rows}

    async def list(self, states: Sequence[str], limit: int = 1000) -> list[dict[str, Any]]:
        async with self._tx() as conn:
            rows = await (await conn.execute(SQL.listing(len(states)), (*POSTGRES.items(states), limit))).fetchall()
        return [dict(r) for r in rows]

    async def show(self, msg_id: str) -> dict[str, Any] | None:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.show, (msg_id,))).fetchone()
            if row is None:
                return None
            calls = await (await conn.execute(SQL.calls, (msg_id,))).fetchall()
        out = {k: v for k, v in row.items() if k != "submission"}
        out["calls"] = [dict(c) for c in calls]
        return out

    async def submission(self, msg_id: str) -> bytes | None:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.submission, (msg_id,))).fetchone()
        return None if row is None else bytes(row["submission"])

    async def retry_now(self, msg_id: str, now: float) -> bool:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.retry_now, (now, msg_id))).fetchone()
            if row is not None:
                await self._notify(conn, row["account"])
        return row is not None

    async def delete(self, msg_id: str) -> bool:
        async with self._tx() as conn:
            cur = await conn.execute(SQL.delete, (msg_id,))
            return cur.rowcount == 1

    async def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        async with self._tx() as conn:
            row = await (await conn.execute(SQL.requeue, (now, now + max_lifetime, msg_id))).fetchone()
            if row is not None:
                await conn.execute(SQL.requeue_calls, (msg_id,))
                await self._notify(conn, row["account"])
        return row is not None
