"""The ledger in the SQLite queue's file: its own connection on its own thread, so ledger writes never
wait behind the queue's statements on one thread, nor the queue's behind theirs.

`synchronous=NORMAL`: a ledger commit is not fsync'd. In WAL mode that loses nothing when the process
dies, only the last commits on a power loss, and the queue's own commits stay fsync'd (synchronous is per
connection). While the queue's disk reserve is in use (the disk is full) the ledger does not write: the
space is kept for draining the queue.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

from gateway.ledger import sql
from gateway.ledger.model import Page, Query, Recipient, Record, Row, Tally
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import sqlite_schema
from gateway.queue.sqlite_wal import use_wal

T = TypeVar("T")
P = "?"


@functools.lru_cache(maxsize=len(sql.INSERTS) * sql.ROWS)
def _statement(table: str, rows: int) -> str:
    return sql.insert(table, P, rows)


class SqliteLedger:
    def __init__(
        self,
        path: Path,
        disk_full: Callable[[], bool] | None = None,
        too_new: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        # True while the queue's disk reserve is in use (gateway/queue/sqlite_side.py): the disk is full.
        self._disk_full = disk_full or (lambda: False)
        # Told when the file turns out migrated by a newer version (the app stops the process on it).
        self._too_new = too_new or (lambda reason: None)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-db")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(connection, *args)` on the ledger's thread (the return path's statements use it too)."""
        return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise LedgerUnavailable(f"ledger {self.path}: closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(self._call, fn, *args)
            )
        except sqlite_schema.SchemaTooNew as exc:
            reason = f"ledger {self.path}: {exc}"
            self._too_new(reason)
            raise LedgerUnavailable(reason) from exc
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(f"ledger {self.path}: {type(exc).__name__}: {exc}") from exc

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
                cached_statements=len(sql.INSERTS) * sql.ROWS + 16,  # each table, each size of a part; reads
            )
            try:
                use_wal(db)
                db.execute("PRAGMA synchronous=NORMAL")
                # The indexes' hot pages stay cached between batches (SQLite's default is 2 MiB). Not more: a
                # larger cache is held by every process for good, while a large ledger's indexes on random keys
                # miss in any cache this size and cost only a read from the OS's page cache.
                db.execute("PRAGMA cache_size=-8192")
                sqlite_schema.migrate(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return fn(self._db, *args)

    async def open(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    # -- writing --------------------------------------------------------------------------------------------

    async def write(self, rows: Sequence[Row]) -> None:
        await self._run(self._write, rows)

    def _write(self, db: sqlite3.Connection, rows: Sequence[Row]) -> None:
        if self._disk_full():
            raise sqlite3.OperationalError("the disk is full (the queue's reserve is in use): ledger rows wait")
        db.execute("BEGIN IMMEDIATE")
        try:
            self.write_in(db, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def write_in(db: sqlite3.Connection, rows: Sequence[Row]) -> None:
        """The rows, inside the caller's transaction: by table, in statements of up to sql.ROWS rows (sql.py);
        each table's rows keep their order, which is all the upserts need."""
        for table, values in sql.by_table(rows):
            for start in range(0, len(values), sql.ROWS):
                part = values[start : start + sql.ROWS]
                db.execute(_statement(table, len(part)), list(chain.from_iterable(part)))

    # -- reading --------------------------------------------------------------------------------------------

    async def get(self, msg_id: str) -> Record | None:
        def run(db: sqlite3.Connection) -> Record | None:
            row = db.execute(sql.select_message(P), (msg_id.upper(),)).fetchone()
            if row is None:
                return None
            recipients = [sql.recipient_of(r)[1] for r in db.execute(sql.select_recipients(P, 1), (row[0],))]
            events = [sql.event_of(e) for e in db.execute(sql.select_events(P), (row[0],))]
            return sql.record_of(row, recipients, events)

        return await self._run(run)

    async def find(self, query: Query) -> Page:
        def run(db: sqlite3.Connection) -> Page:
            # No statistics to plan by: the smallest of the ranges the search could walk, counted (sql.drivers).
            driver = sql.smallest(query, P, lambda statement, params: int(db.execute(statement, params).fetchone()[0]))
            statement, params = sql.search(query, P, driver)
            rows = db.execute(statement, params).fetchall()
            ids = [r[0] for r in rows[: query.limit]]
            recipients: dict[str, list[Recipient]] = {}
            if ids:
                for r in db.execute(sql.select_recipients(P, len(ids)), ids):
                    msg_id, recipient = sql.recipient_of(r)
                    recipients.setdefault(msg_id, []).append(recipient)
            records, after = sql.page_of(rows, recipients, query.limit)
            return Page(records, after)

        return await self._run(run)

    async def tally(self, since: float) -> Tally:
        def run(db: sqlite3.Connection) -> Tally:
            messages = db.execute(sql.tally_messages(P), (since,)).fetchall()
            recipients = db.execute(sql.tally_recipients(P), (since,)).fetchall()
            return sql.tally_of(since, messages, recipients)

        return await self._run(run)

    # -- retention ------------------------------------------------------------------------------------------

    async def prune(self, before: float, limit: int) -> int:
        def run(db: sqlite3.Connection) -> int:
            for table in sql.TABLES:
                ids = sql.ids_of(db.execute(sql.expired_ids(table, P), (before, limit)).fetchall())
                if ids:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        for target in sql.TABLES:
                            db.execute(sql.delete_ids(target, P, len(ids)), ids)
                    except BaseException:
                        db.execute("ROLLBACK")
                        raise
                    db.execute("COMMIT")
                    return len(ids)
            return 0

        return await self._run(run)
