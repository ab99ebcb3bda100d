"""SQLite's WAL journal switched on by processes that open one file at once (the workers of `serve`), and
which of SQLite's errors is a wait for another connection's lock."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable


def use_wal(db: sqlite3.Connection, wait: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> None:
    """`PRAGMA journal_mode=WAL`, retried while another connection holds the file: the switch does not wait
    for the lock as other statements do (the connection's busy timeout does not apply to it), so two
    processes opening a new file together made one fail at once ("database is locked", 1 in 80 such starts
    measured). Blocking: call it off the event loop."""
    deadline = time.monotonic() + wait
    pause = 0.002
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if not busy(exc) or time.monotonic() + pause > deadline:
                raise
        sleep(pause)
        pause = min(pause * 2, 0.1)


def busy(exc: BaseException) -> bool:
    """Whether `exc` is SQLite's "database is locked" (SQLITE_BUSY, the busy timeout reached) or "database table
    is locked" (SQLITE_LOCKED): another connection held the lock, the file answers (the extended codes keep the
    primary one in the low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.OperationalError)
        and code is not None
        and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    )
