"""The ledger in the PostgreSQL queue's database: a small pool of its own (ledger batches never take the
connections the queue's claims and settles need).

Each batch commits with `synchronous_commit = off`: the commit returns before the WAL is flushed, so a
crash of the database server (not of the gateway) can lose the last fraction of a second of ledger rows;
the queue's own commits keep the server's setting.

Ledger writes never hold an SMTP reply (the writer buffers rows and writes them from a task of its own), but
a batch waiting for a lock without end would fill that buffer: the pool's connections wait LOCK_TIMEOUT at
most for a lock (the batch fails, is kept and retried; gateway/ledger/writer.py). No statement_timeout: a
large batch or a prune over a large table may legitimately run long.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.core.storable import storable_values
from gateway.ledger import sql
from gateway.ledger.model import Page, Query, Recipient, Record, Row, Tally
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import postgres_schema
from gateway.queue.postgres import redacted

P = "%s"
LOCK_TIMEOUT = 30.0  # seconds; the schema migration lifts it (it waits for the instances' transactions)
_STATEMENTS = sql.statements(P)


class PostgresLedger:
    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        max_connections: int = 2,
        too_new: Callable[[str], None] | None = None,
    ) -> None:
        self.url = redacted(url)
        # Told when the database turns out migrated by a newer version (the app stops the process on it).
        self._too_new = too_new or (lambda reason: None)
        kwargs: dict[str, object] = {"autocommit": True}
        if password:
            kwargs["password"] = password
        self._pool = AsyncConnectionPool(
            url,
            kwargs=kwargs,
            min_size=1,
            max_size=max_connections,
            open=False,
            name="smtp-gateway-ledger",
            configure=self._configure,
        )
        self._opened = False
        self._opening: asyncio.Lock | None = None  # the first uses may come at once (writer, return path)

    @staticmethod
    async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(f"SET lock_timeout = {int(LOCK_TIMEOUT * 1000)}")

    def connection(self, write: bool = False) -> contextlib.AbstractAsyncContextManager[psycopg.AsyncConnection[Any]]:
        """A pooled connection in one transaction (`write`: not waiting for the WAL flush); the return path's
        statements use it too. Failures become LedgerUnavailable."""
        return self._conn(write)

    @contextlib.asynccontextmanager
    async def _conn(self, write: bool = False) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        try:
            await self.open()
            async with self._pool.connection(timeout=10.0) as conn, conn.transaction():
                if write:
                    await conn.execute("SET LOCAL synchronous_commit TO OFF")
                yield conn
        except postgres_schema.SchemaTooNew as exc:
            reason = f"ledger {self.url}: {exc}"
            self._too_new(reason)
            raise LedgerUnavailable(reason) from exc
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            raise LedgerUnavailable(f"ledger {self.url}: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        if self._opened:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._opened:
                return
            await self._pool.open(wait=True, timeout=10.0)  # safe to call again after a failure
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = 0")  # a migration is not cut
                await postgres_schema.migrate(conn)
            self._opened = True

    async def close(self) -> None:
        self._opened = False
        await self._pool.close()

    async def write(self, rows: Sequence[Row]) -> None:
        async with self._conn(write=True) as conn:
            await self.write_in(conn, rows)

    @staticmethod
    async def write_in(conn: psycopg.AsyncConnection[Any], rows: Sequence[Row]) -> None:
        """The rows, inside the caller's transaction. By table rather than in arrival order: each table's rows
        keep their order, which is all the upserts need (no row of one table depends on another's), and
        executemany pipelines them."""
        async with conn.cursor() as cur:
            for table, values in sql.by_table(rows):
                # The rows carry upstream words (reasons, event descriptions) and client text (Subject):
                # PostgreSQL refuses a NUL in text, and the batch with it (gateway.core.storable).
                await cur.executemany(_STATEMENTS[table], [storable_values(v) for v in values])

    async def get(self, msg_id: str) -> Record | None:
        async with self._conn() as conn:
            row = await (await conn.execute(sql.select_message(P), (msg_id.upper(),))).fetchone()
            if row is None:
                return None
            recipients = [
                sql.recipient_of(r)[1]
                for r in await (await conn.execute(sql.select_recipients(P, 1), (row[0],))).fetchall()
            ]
            events = [sql.event_of(e) for e in await (await conn.execute(sql.select_events(P), (row[0],))).fetchall()]
        return sql.record_of(row, recipients, events)

    async def find(self, query: Query) -> Page:
        statement, params = sql.search(query, P)
        async with self._conn() as conn:
            rows = await (await conn.execute(statement.encode(), params)).fetchall()
            ids = [r[0] for r in rows[: query.limit]]
            recipients: dict[str, list[Recipient]] = {}
            if ids:
                for r in await (await conn.execute(sql.select_recipients(P, len(ids)).encode(), ids)).fetchall():
                    msg_id, recipient = sql.recipient_of(r)
                    recipients.setdefault(msg_id, []).append(recipient)
        records, after = sql.page_of(rows, recipients, query.limit)
        return Page(records, after)

    async def tally(self, since: float) -> Tally:
        async with self._conn() as conn:
            messages = await (await conn.execute(sql.tally_messages(P).encode(), (since,))).fetchall()
            recipients = await (await conn.execute(sql.tally_recipients(P).encode(), (since,))).fetchall()
        return sql.tally_of(since, messages, recipients)

    async def prune(self, before: float, limit: int) -> int:
        async with self._conn(write=True) as conn:
            for table in sql.TABLES:
                cursor = await conn.execute(sql.expired_ids(table, P).encode(), (before, limit))
                ids = sql.ids_of(await cursor.fetchall())
                if ids:
                    for target in sql.TABLES:
                        await conn.execute(sql.delete_ids(target, P, len(ids)).encode(), ids)
                    return len(ids)
        return 0
