"""The ledger in the PostgreSQL queue's database: a small pool of its own (ledger batches never take the
connections the queue's claims and settles need).

Each batch commits with `synchronous_commit = off`: the commit returns before the WAL is flushed, so a
crash of the database server (not of the gateway) can lose the last fraction of a second of ledger rows;
the queue's own commits keep the server's setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.ledger import sql
from gateway.ledger.model import EventRow, MessageRow, Page, Query, Recipient, RecipientRow, Record, Row
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import postgres_schema
from gateway.queue.postgres import redacted

P = "%s"
_MESSAGE, _RECIPIENT, _EVENT = sql.message_upsert(P), sql.recipient_upsert(P), sql.event_insert(P)


class PostgresLedger:
    def __init__(self, url: str, password: str | None = None, *, max_connections: int = 2) -> None:
        self.url = redacted(url)
        kwargs: dict[str, object] = {"autocommit": True}
        if password:
            kwargs["password"] = password
        self._pool = AsyncConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=max_connections, open=False, name="smtp-gateway-ledger"
        )
        self._opened = False

    @contextlib.asynccontextmanager
    async def _conn(self, write: bool = False) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
        try:
            await self.open()
            async with self._pool.connection(timeout=10.0) as conn, conn.transaction():
                if write:
                    await conn.execute("SET LOCAL synchronous_commit TO OFF")
                yield conn
        except (psycopg.Error, PoolTimeout, OSError, postgres_schema.SchemaTooNew) as exc:
            raise LedgerUnavailable(f"ledger {self.url}: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        if self._opened:
            return
        await self._pool.open(wait=True, timeout=10.0)  # safe to call again after a failure
        async with self._pool.connection() as conn, conn.transaction():
            await postgres_schema.migrate(conn)
        self._opened = True

    async def close(self) -> None:
        self._opened = False
        await self._pool.close()

    async def write(self, rows: Sequence[Row]) -> None:
        messages = [sql.message_values(r) for r in rows if isinstance(r, MessageRow)]
        recipients = [sql.recipient_values(r) for r in rows if isinstance(r, RecipientRow)]
        events = [sql.event_values(r) for r in rows if isinstance(r, EventRow)]
        async with self._conn(write=True) as conn, conn.cursor() as cur:
            # By table rather than in arrival order: each table's rows keep their order, which is all the
            # upserts need (no row of one table depends on another's), and executemany pipelines them.
            for statement, values in ((_MESSAGE, messages), (_RECIPIENT, recipients), (_EVENT, events)):
                if values:
                    await cur.executemany(statement, values)

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

    async def prune(self, before: float, limit: int) -> int:
        async with self._conn(write=True) as conn:
            for table in sql.TABLES:
                ids = [
                    r[0]
                    for r in await (await conn.execute(sql.expired_ids(table, P).encode(), (before, limit))).fetchall()
                ]
                if ids:
                    for target in sql.TABLES:
                        await conn.execute(sql.delete_ids(target, P, len(ids)).encode(), ids)
                    return len(ids)
        return 0
