"""A queue written by a newer version is never served on: not when its migration commits while this version
waits for SQLite's write lock, nor when the queue (or its ledger) is only opened after the start (an outage at
start) — the process stops as the start would have refused it (docs/install.md, Upgrade)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from gateway.app import App, run
from gateway.config import load_settings
from gateway.core.errors import QueueTooNew
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import sqlite_schema
from tests.configs import gateway_config
from tests.pgserver import PgCluster


def _schema(db: sqlite3.Connection, upto: int) -> None:
    for number, script in enumerate(sqlite_schema.MIGRATIONS[:upto], 1):
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version VALUES (?)", (number,))


def _newer(path: Path) -> None:
    """A queue file a newer version (schema 99) wrote."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (99)")
        db.commit()


class _NewerCommitsWhileWaiting:
    """This version's connection; just before it takes the write lock, the newer version's migration (which
    held the lock meanwhile) commits: what a BEGIN IMMEDIATE waiting out SQLite's busy timeout sees."""

    def __init__(self, ours: sqlite3.Connection, newer: sqlite3.Connection) -> None:
        self._ours = ours
        self._newer = newer

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE" and self._newer.in_transaction:
            for statement in sqlite_schema.MIGRATIONS[-1].split(";"):
                if statement.strip():
                    self._newer.execute(statement)
            self._newer.execute("UPDATE schema_version SET version = ?", (sqlite_schema.LATEST + 1,))
            self._newer.execute("COMMIT")
        return self._ours.execute(sql, *args)


def test_migrate_refuses_a_newer_version_that_committed_while_it_waited_for_the_lock(tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    with contextlib.closing(sqlite3.connect(spool, isolation_level=None)) as newer:
        _schema(newer, sqlite_schema.LATEST - 1)  # the queue this version's predecessor left
        newer.execute("BEGIN IMMEDIATE")  # the newer version's migration holds the write lock
        with contextlib.closing(sqlite3.connect(spool, isolation_level=None)) as ours:
            db = cast(sqlite3.Connection, _NewerCommitsWhileWaiting(ours, newer))
            with pytest.raises(sqlite_schema.SchemaTooNew, match=f"version {sqlite_schema.LATEST + 1} is newer"):
                sqlite_schema.migrate(db)
            assert not ours.in_transaction  # the lock given back
            # Nothing of this version's written over the newer schema.
            assert ours.execute("SELECT version FROM schema_version").fetchone()[0] == sqlite_schema.LATEST + 1


async def test_a_queue_found_newer_after_an_outage_at_start_stops_the_process(tmp_path: Path) -> None:
    """The start could not open the queue (queue_unavailable; it serves on); the queue that appears later was
    written by a newer version. Before: QueueTooNew was a SpoolUnavailable at every use (452 for good)."""
    # `later`, the queue's directory, is a link to a file at the start: the queue cannot be opened. It is then
    # pointed at a directory holding the newer version's queue in one rename: the gateway's own threads (the
    # ledger's writer) retry opening it meanwhile, and a directory made first and filled after gave them the
    # moment to create this version's queue there (the test then failed on its own CREATE TABLE).
    (tmp_path / "a-file").write_text("")
    later = tmp_path / "later"
    later.symlink_to(tmp_path / "a-file")
    spool = later / "spool.sqlite3"
    settings = load_settings(None, **gateway_config(tmp_path, delivery={"spool_path": str(spool)}))
    app = App(settings)
    started = asyncio.Event()
    serving = asyncio.ensure_future(run(app, drain_timeout=1.0, started=lambda _: started.set()))
    try:
        await asyncio.wait({serving, asyncio.ensure_future(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert not serving.done(), serving.exception()  # the start's outage is not fatal
        (tmp_path / "newer").mkdir()
        _newer(tmp_path / "newer" / "spool.sqlite3")
        (tmp_path / "link").symlink_to(tmp_path / "newer")
        os.replace(tmp_path / "link", later)
        assert app.store is not None
        with pytest.raises(QueueTooNew):
            await app.store.counts(time.time())  # any use of the queue opens it now
        assert "queue: written by a newer version of the gateway" in " ".join(app.problems())  # /readyz 503
        with pytest.raises(QueueTooNew, match="queue schema version 99 is newer than this gateway"):
            await serving  # serve exits 1 with this, as when the start finds it
    finally:
        if not serving.done():
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
        app.thaw()  # run() froze what was alive (gc.freeze): the test process's collector as it was


async def test_a_sqlite_ledger_found_newer_says_so_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite3"
    _newer(spool)
    told: list[str] = []
    ledger = SqliteLedger(spool, too_new=told.append)
    try:
        with pytest.raises(LedgerUnavailable, match="queue schema version 99 is newer than this gateway"):
            await ledger.open()
    finally:
        await ledger.close()
    assert told == [f"ledger {spool}: queue schema version 99 is newer than this gateway ({sqlite_schema.LATEST})"]


async def test_a_postgres_ledger_found_newer_says_so(pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version integer NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (99)")
    told: list[str] = []
    ledger = PostgresLedger(url, too_new=told.append)
    try:
        with pytest.raises(LedgerUnavailable, match="queue schema version 99 is newer than this gateway"):
            await ledger.get("0" * 26)  # any use opens it
    finally:
        await ledger.close()
    assert len(told) == 1 and "queue schema version 99 is newer than this gateway" in told[0]
