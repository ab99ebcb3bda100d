"""The ledger's searches on a big SQLite ledger: a page of 50 of each search the API and the console make.

Fills FILE (once; kept for the next run) with `--messages` messages over 30 days through the real
`SqliteLedger.write_in`: three accounts, 20 logins, one recipient each, every other one the same mailbox
(invoices@acme.example, a scanner's), 95 % delivered, 2.5 % bounced, 2.5 % deferred. Then times
`SqliteLedger.find` (the walk it chooses, the page and its recipients), median of `--runs`, and prints the
plan of the page's statement.

    python bench/ledgersearch.py /tmp/ledger-1m.sqlite3 --messages 1000000

Before and after a change: run it first from an export of the older tree (which fills the file at its own
schema version), then from this one (whose `open()` migrates the file first).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
from pathlib import Path

from gateway.ledger import sql
from gateway.ledger.model import Cursor, MessageRow, Query, RecipientRow, Row
from gateway.ledger.sqlite import SqliteLedger
from gateway.queue import sqlite_schema

SPAN = 30 * 86400
MAILBOX = "invoices@acme.example"


def rows(i: int, n: int, now: float) -> list[Row]:
    created = now - SPAN + SPAN * i / n
    msg_id = f"{(i * 0x9E3779B97F4A7C15) % (1 << 64):016X}"  # ids in no time order, as the gateway's are
    address = MAILBOX if i % 2 else f"user{i % 200000}@example{i % 50}.com"
    state = "delivered" if i % 20 else ("bounced" if i % 40 else "deferred")
    return [
        MessageRow(msg_id, created, ("acme", "beta", "gamma")[i % 3], "billing@acme.example", f"Invoice {i}", 5000,
                   f"login{i % 20}", "main", "10.0.0.1", f"<{i}@acme.example>", f"R{msg_id}", "250 2.0.0 queued"),
        RecipientRow(msg_id, created, address, state, created + 60, f"UP{i}", "0"),
    ]  # fmt: skip


def fill(path: Path, n: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    sqlite_schema.migrate(db)
    now, started = time.time(), time.monotonic()
    for start in range(0, n, 20000):
        batch = [row for i in range(start, min(n, start + 20000)) for row in rows(i, n, now)]
        db.execute("BEGIN IMMEDIATE")
        SqliteLedger.write_in(db, batch)
        db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    print(f"filled {n:,} messages in {time.monotonic() - started:.0f} s", flush=True)


def searches(db: sqlite3.Connection) -> dict[str, Query]:
    last = float(db.execute("SELECT max(created) FROM ledger_messages").fetchone()[0])
    half = db.execute("SELECT created, id FROM ledger_messages ORDER BY created DESC, id DESC LIMIT 1 OFFSET ?",
                      (db.execute("SELECT count(*) FROM ledger_messages").fetchone()[0] // 2,)).fetchone()  # fmt: skip
    middle = Cursor(float(half[0]), str(half[1]))
    return {
        "state=delivered": Query(state="delivered"),
        "state=bounced": Query(state="bounced"),
        "state=accepted (none)": Query(state="accepted"),
        "state=delivered, cursor half-way": Query(state="delivered", cursor=middle),
        "state=bounced, last day": Query(state="bounced", since=last - 86400, until=last),
        "login+state=bounced": Query(login="login0", state="bounced"),
        "login+state=bounced (none)": Query(login="login3", state="bounced"),
        "login (none)+state=delivered": Query(login="nobody", state="delivered"),
        "account+state=delivered": Query(account="acme", state="delivered"),
        "recipient (half the ledger)": Query(recipient=MAILBOX),
        "recipient, cursor half-way": Query(recipient=MAILBOX, cursor=middle),
        "recipient+state=bounced (none)": Query(recipient=MAILBOX, state="bounced"),
        "recipient+state=accepted (none)": Query(recipient=MAILBOX, state="accepted"),
        "recipient (5 messages)": Query(recipient="user6@example6.com"),
        "upstream_id+state": Query(upstream_id="UP6", state="delivered"),
        "id+state": Query(id=str(half[1]), state="delivered"),
        "no filter": Query(),
    }


async def measure(path: Path, runs: int) -> None:
    ledger = SqliteLedger(path)
    await ledger.open()  # migrates a file an older gateway filled
    try:
        with sqlite3.connect(path) as db:
            queries = searches(db)
            for name, query in queries.items():
                times = []
                for _ in range(runs):
                    started = time.perf_counter()
                    page = await ledger.find(query)
                    times.append(time.perf_counter() - started)
                if hasattr(sql, "smallest"):
                    walk = sql.smallest(query, "?", lambda s, a: int(db.execute(s, a).fetchone()[0]))
                    statement, params = sql.search(query, "?", walk)
                else:  # an older tree, from before the walks
                    statement, params = sql.search(query, "?")
                plan = " | ".join(str(r[3]) for r in db.execute("EXPLAIN QUERY PLAN " + statement, params))
                print(
                    f"{name:34s} {statistics.median(times) * 1000:9.1f} ms {len(page.records):3d} found  {plan}",
                    flush=True,
                )
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not args.file.exists():
        fill(args.file, args.messages)
    asyncio.run(measure(args.file, args.runs))


if __name__ == "__main__":
    main()
