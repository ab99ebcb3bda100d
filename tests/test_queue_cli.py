"""`smtp-gateway queue ...` (and `status`, `suppression`) as an operator runs them: what a multi-id action says
and records when it stops part way; a file that is not a queue is refused, not written into."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from gateway.cli import queue as queue_cli
from gateway.config import preflight
from gateway.core.errors import QueueBusy
from gateway.queue.backends import open_store
from gateway.queue.store import QueueStore
from tests.harness import Running
from tests.spool_helpers import make_queue, send

# Messages stay queued (the sandbox answers 503, the next attempt is an hour away).
SLOW = {"retry_schedule": [3600], "retry_jitter": 0.0, "inline_budget": 2.0, "probe_interval": 3600}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(["smtp-gateway", *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def _queued(gw: Running, subject: str) -> str:
    code, text = send(gw.port(), subject)
    assert code == 250 and "queued as" in text, text
    return text.rsplit(" ", 1)[1]


def _two_queued(gw: Running) -> tuple[str, str]:
    gw.fault(status=503, count=1000, kind="send")
    first, second = _queued(gw, "first"), _queued(gw, "second")
    assert gw.app.ledger_writer is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    return first, second


def _states(gw: Running, msg_id: str) -> set[str]:
    assert gw.app.ledger is not None
    record = gw.loop.run(gw.app.ledger.get(msg_id))
    assert record is not None
    return {r.state for r in record.recipients}


def test_a_multi_id_delete_stopped_by_a_lock_says_and_records_what_it_deleted(
    gateway_factory: Callable[..., Running], pg_cluster: Any, tmp_path: Path
) -> None:
    url = pg_cluster.new_database()
    gw = gateway_factory(delivery={**SLOW, "queue_url": url})
    first, second = _two_queued(gw)
    config = tmp_path / "cli.toml"
    config.write_text(f'[delivery]\nqueue_url = "{url}"\n')
    with psycopg.connect(url) as holder:  # holds `second`'s row, as a claim or an open transaction does
        holder.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", (second,))
        result = cli("queue", "-c", str(config), "delete", first, second)  # second: lock_timeout
        holder.rollback()
    assert result.returncode == 1
    assert gw.app.store is not None
    assert gw.loop.run(gw.app.store.show(first)) is None
    assert gw.loop.run(gw.app.store.show(second)) is not None
    # The operator is told what was done and where it stopped, and the ledger says what the queue holds.
    assert f"{first}: deleted" in result.stdout, result.stdout
    assert f"stopped at {second}" in result.stderr, result.stderr
    assert _states(gw, first) == {"dead"}
    assert _states(gw, second) == {"deferred"}


class _BusyOn:
    """The queue store, its delete of one id failing as a lock wait past the busy timeout does."""

    def __init__(self, store: QueueStore, busy: str) -> None:
        self.store, self.busy = store, busy

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def delete(self, msg_id: str) -> Any:
        if msg_id == self.busy:
            raise QueueBusy("database is locked")
        return await self.store.delete(msg_id)


def test_a_multi_id_delete_that_fails_part_way_on_sqlite_records_what_it_deleted(
    gateway_factory: Callable[..., Running], capsys: pytest.CaptureFixture[str]
) -> None:
    gw = gateway_factory(delivery=SLOW)
    first, second = _two_queued(gw)
    args = argparse.Namespace(action="delete", ids=[first.lower(), second])

    async def act() -> int:
        store = open_store(gw.settings.delivery, server=False)
        try:
            await store.open()
            return await queue_cli._act(_BusyOn(store, second), gw.settings, args)  # type: ignore[arg-type]
        finally:
            await store.close()

    with pytest.raises(QueueBusy):
        asyncio.run(act())
    out = capsys.readouterr()
    assert f"{first}: deleted" in out.out
    assert f"stopped at {second}" in out.err
    assert _states(gw, first) == {"dead"}
    assert _states(gw, second) == {"deferred"}


def _tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


# The commands that read a queue file an operator names and never create one.
QUEUE_READERS = [
    ["queue", "--spool", "{spool}", "list"],
    ["queue", "--spool", "{spool}", "migrate"],
    ["status", "--spool", "{spool}", "a@example.com"],
    ["suppression", "list", "--spool", "{spool}"],
]


@pytest.mark.parametrize(
    "command",
    QUEUE_READERS,
    ids=["queue-list", "queue-migrate", "status", "suppression-list"],
)
def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path, command: list[str]) -> None:
    other = tmp_path / "app.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    db.commit()
    db.close()
    before = other.read_bytes()
    result = cli(*(str(other) if a == "{spool}" else a for a in command))
    assert other.read_bytes() == before, "a read-only command wrote into another program's database"
    assert result.returncode == 1, result.stdout
    assert f"smtp-gateway: {other} is not an smtp-gateway queue" in result.stderr, result.stderr
    assert "invoices" in result.stderr


async def _touch_rate_file(path: Path) -> None:
    from gateway.queue.sqlite_side import RateFile

    rate = RateFile(path)
    try:
        await rate.pause("acme", 0.0, 0.0)
    finally:
        await rate.close()


def test_the_queues_ratelimit_side_file_is_refused(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "spool.sqlite3")
    side = queue.with_name("spool.sqlite3-ratelimit")  # tab completion offers it next to the queue
    asyncio.run(_touch_rate_file(side))  # as a serving gateway has it
    before = _tables(side)
    result = cli("queue", "--spool", str(side), "list")
    assert _tables(side) == before
    assert result.returncode == 1, result.stdout  # not "queue ...: empty", exit 0
    assert "not an smtp-gateway queue" in result.stderr, result.stderr


def test_the_queue_itself_is_read(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "spool.sqlite3")
    result = cli("queue", "--spool", str(queue), "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"queue sqlite:///{queue}: empty") or ": empty" in result.stdout, result.stdout


def test_queue_list_json_is_json_on_an_older_queue_file(tmp_path: Path) -> None:
    """A queue file made before auto_vacuum=INCREMENTAL (an upgrade): the CLI converts it and logs so, on
    stderr, not in front of the JSON on stdout."""
    queue = make_queue(tmp_path / "spool.sqlite3")
    db = sqlite3.connect(queue, isolation_level=None)
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA auto_vacuum=NONE")
    db.execute("VACUUM")
    db.close()
    result = cli("queue", "--spool", str(queue), "list", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["messages"] == []
    assert "queue_auto_vacuum_on" in result.stderr


@pytest.mark.parametrize("limit", ["0", "-1", "99999999999999999999", "ten"])
@pytest.mark.parametrize("action", ["list", "dead"])
def test_a_limit_out_of_range_is_a_usage_error(tmp_path: Path, action: str, limit: str) -> None:
    queue = make_queue(tmp_path / "spool.sqlite3")
    result = cli("queue", "--spool", str(queue), action, "--limit", limit, "--account", "acme")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stdout
    assert "argument --limit" in result.stderr, result.stderr


def test_a_locked_sqlite_queue_says_another_process_holds_its_lock(tmp_path: Path) -> None:
    """A lock held past the busy timeout: "try again", not "is it an smtp-gateway queue, readable and writable?"
    with the library's exception name (review cli2 F8)."""
    queue = make_queue(tmp_path / "spool.sqlite3")
    holder = sqlite3.connect(queue, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # a process paused inside its write transaction
        result = cli("queue", "--spool", str(queue), "delete", "0123456789abcdef")
    finally:
        holder.close()
    assert result.returncode == 1, result.stdout
    assert result.stderr == (
        f"smtp-gateway: delivery.spool_path {queue}: another process holds the queue's lock; try again\n"
    ), result.stderr


def _no_tables(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 0")  # a header written: an SQLite database with nothing in it
    db.execute("CREATE TABLE t (x)")
    db.execute("DROP TABLE t")
    db.commit()
    db.close()


@pytest.mark.parametrize("kind", ["0-bytes", "no-tables"])
@pytest.mark.parametrize(
    "command",
    QUEUE_READERS,
    ids=["queue-list", "queue-migrate", "status", "suppression-list"],
)
def test_an_empty_file_is_no_queue(tmp_path: Path, command: list[str], kind: str) -> None:
    """These commands never create a queue: an empty file was made one (the schema written, "empty" listed,
    "0 -> N" migrated) where a missing file is "no queue at PATH"; now it is that, exit 1, the file untouched."""
    spool = tmp_path / "spool.sqlite3"
    spool.touch()
    if kind == "no-tables":
        _no_tables(spool)
    before = spool.read_bytes()
    result = cli(*(str(spool) if a == "{spool}" else a for a in command))
    assert spool.read_bytes() == before, "a command that never creates a queue wrote one"
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(f"smtp-gateway: no queue at {spool}: the file is empty"), result.stderr
    # serve still takes an empty file for a new queue (SQLite makes a database of it).
    assert preflight._spool_file(spool) == []


def test_backup_copies_the_queue_while_a_gateway_runs(gateway_factory: Callable[..., Running], tmp_path: Path) -> None:
    """`queue backup DEST` (review firstcontact2 F1): the queued message is in the copy, which `queue list` reads."""
    gw = gateway_factory(delivery=SLOW)
    gw.fault(status=503, count=1000, kind="send")
    queued = _queued(gw, "kept")
    dest = tmp_path / "backup.sqlite3"
    result = cli("queue", "--spool", str(gw.settings.delivery.spool_path), "backup", str(dest))
    assert result.returncode == 0, result.stderr
    assert f"backed up to {dest}" in result.stdout, result.stdout
    listed = cli("queue", "--spool", str(dest), "list")
    assert f"{queued}  queued" in listed.stdout, listed.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".backup")] == []  # no temporary left


def test_backup_of_a_missing_queue_creates_nothing(tmp_path: Path) -> None:
    """The one-liner install.md gave created an empty queue at a mistyped path and an empty backup, exit 0."""
    missing, dest = tmp_path / "lib" / "spool.sqlite3", tmp_path / "backup.sqlite3"
    missing.parent.mkdir()
    result = cli("queue", "--spool", str(missing), "backup", str(dest))
    assert result.returncode == 1, result.stdout
    assert f"no queue at {missing}" in result.stderr, result.stderr
    assert not missing.exists() and not dest.exists()
    assert list(missing.parent.iterdir()) == []


@pytest.mark.parametrize("kind", ["0-bytes", "other-program"])
def test_backup_of_a_file_that_is_not_a_queue_is_refused(tmp_path: Path, kind: str) -> None:
    source, dest = tmp_path / "spool.sqlite3", tmp_path / "backup.sqlite3"
    source.touch()
    if kind == "other-program":
        db = sqlite3.connect(source)
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
        db.commit()
        db.close()
    before = source.read_bytes()
    result = cli("queue", "--spool", str(source), "backup", str(dest))
    assert result.returncode == 1, result.stdout
    assert source.read_bytes() == before
    assert not dest.exists()


def test_backup_refuses_an_existing_dest_unless_forced(tmp_path: Path) -> None:
    queue = make_queue(tmp_path / "spool.sqlite3")
    dest = tmp_path / "backup.sqlite3"
    dest.write_bytes(b"yesterday's")
    result = cli("queue", "--spool", str(queue), "backup", str(dest))
    assert result.returncode == 1, result.stdout
    assert f"{dest} exists: give another name, or --force" in result.stderr, result.stderr
    assert dest.read_bytes() == b"yesterday's"
    forced = cli("queue", "--spool", str(queue), "backup", "--force", str(dest))
    assert forced.returncode == 0, forced.stderr
    assert cli("queue", "--spool", str(dest), "list").returncode == 0


@pytest.mark.parametrize("dest", ["itself", "symlink", "hard-link", "other-path", "-wal", "-shm", "-ratelimit"])
def test_backup_onto_the_queue_or_its_files_is_refused_even_forced(tmp_path: Path, dest: str) -> None:
    """`backup --force` onto the queue renamed a snapshot over the live file (a new inode under the running
    gateway; review today6b F1): refused, exit 1, whatever path names it, and so are its -wal/-shm/side files."""
    queue = make_queue(tmp_path / "lib" / "spool.sqlite3")
    (tmp_path / "lib" / "spool.sqlite3-wal").write_bytes(b"")  # a running gateway's WAL
    inodes = {p.name: p.stat().st_ino for p in queue.parent.iterdir()}
    target = {
        "itself": queue,
        "symlink": tmp_path / "link.sqlite3",
        "hard-link": tmp_path / "hard.sqlite3",
        "other-path": tmp_path / "via" / "spool.sqlite3",
        "-wal": queue.with_name(queue.name + "-wal"),
        "-shm": queue.with_name(queue.name + "-shm"),  # maybe not there: refused by its name
        "-ratelimit": queue.with_name(queue.name + "-ratelimit"),
    }[dest]
    if dest == "symlink":
        target.symlink_to(queue)
    elif dest == "hard-link":
        os.link(queue, target)
    elif dest == "other-path":
        target.parent.symlink_to(queue.parent)
    result = cli("queue", "--spool", str(queue), "backup", "--force", str(target))
    assert result.returncode == 1, result.stdout
    assert "is the queue itself or one of its files" in result.stderr, result.stderr
    assert {name: (queue.parent / name).stat().st_ino for name in inodes} == inodes  # none renamed over


def test_backup_of_a_postgresql_queue_says_pg_dump(tmp_path: Path) -> None:
    config = tmp_path / "pg.toml"
    config.write_text('[delivery]\nqueue_url = "postgresql://gw@127.0.0.1:9/gateway"\n')
    dest = tmp_path / "backup.sqlite3"
    result = cli("queue", "-c", str(config), "backup", str(dest))
    assert result.returncode == 1, result.stdout
    assert "pg_dump" in result.stderr, result.stderr
    assert not dest.exists()
