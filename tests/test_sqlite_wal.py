"""use_wal: the switch to SQLite's WAL journal while another process holds the new file's write lock (the
workers of `serve` opening the rate file together) waits for the lock instead of failing at once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.queue.sqlite_wal import use_wal


def holder(path: Path) -> sqlite3.Connection:
    """Another process's connection, in the middle of a write transaction on a file not yet in WAL mode."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    return other


def test_the_switch_waits_for_a_writer_and_then_happens(tmp_path: Path) -> None:
    path = tmp_path / "rate.sqlite3"
    other = holder(path)
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    # SQLite fails the switch at once here, its busy timeout notwithstanding: the reason for use_wal.
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.execute("PRAGMA journal_mode=WAL")
    pauses: list[float] = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 3:
            other.execute("COMMIT")  # the other process's transaction ends while this one waits

    use_wal(db, sleep=sleep)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(pauses) == 3 and pauses == sorted(pauses)  # backing off


def test_a_lock_held_past_the_wait_is_the_error_it_was(tmp_path: Path) -> None:
    path = tmp_path / "rate.sqlite3"
    other = holder(path)
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        use_wal(db, wait=0.05)
    other.execute("COMMIT")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
