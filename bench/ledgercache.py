"""The message ledger's SQLite page cache: CPU per message of the ledger's writes at a few cache sizes.

The real `SqliteLedger.write_in` writes rows shaped like a 5 KB message's (its row with a ~2.5 KB request,
one recipient, two events; random Message-IDs, reply and upstream ids, as the indexes see in production)
in batches of 500, first into a fresh ledger, then into one grown to `--grow` messages, the cache sizes
alternated. No server: only the writer thread's work, which is where the cache size matters.

    python bench/ledgercache.py --grow 200000 --sizes 8,32
    python bench/ledgercache.py --grow 20000 --sizes 8 --requests bodies,sizes --rounds 5

`--requests`: the kept request with the message's text (`bodies`, `ledger.keep_bodies = true`) or with its
size in its place (`sizes`, the default since keep_bodies), alternated like the cache sizes.
"""

from __future__ import annotations

import argparse
import resource
import secrets
import sqlite3
import tempfile
import time
from pathlib import Path

from gateway.ledger.model import EventRow, MessageRow, RecipientRow, Row, json
from gateway.ledger.sqlite import SqliteLedger

REQUESTS = {
    "bodies": json({"html": "x" * 2500, "to": ["rcpt@rcpt.example"], "attachments": []}),
    "sizes": json({"html": "(2500 bytes, not kept)", "to": ["rcpt@rcpt.example"], "attachments": []}),
}
BATCH = 500


def rows(n: int, start: float, request: str = REQUESTS["bodies"]) -> list[Row]:
    out: list[Row] = []
    for i in range(n):
        msg, at = secrets.token_hex(10), start + i / 1000
        out += [
            MessageRow(
                msg,
                at,
                "bench",
                "sender@bench.example",
                f"subject {msg}",
                5066,
                login="bench",
                listener="bench",
                peer="127.0.0.1",
                message_id=f"<{secrets.token_hex(12)}@bench.example>",
                reply_id=secrets.token_hex(8),
                reply="250 2.0.0 queued",
                request=request,
            ),
            RecipientRow(msg, at, f"r{secrets.token_hex(4)}@rcpt.example", "accepted", at, secrets.token_hex(12), "c1"),
            EventRow(secrets.token_hex(10), msg, at, at, "accepted", detail="250"),
            EventRow(secrets.token_hex(10), msg, at, at, "delivered", upstream_id=secrets.token_hex(12)),
        ]
    return out


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write(db: sqlite3.Connection, batch: list[Row]) -> None:
    db.execute("BEGIN IMMEDIATE")
    SqliteLedger.write_in(db, batch)
    db.execute("COMMIT")


def measure(db: sqlite3.Connection, cache_mib: int, messages: int, request: str = REQUESTS["bodies"]) -> float:
    """CPU microseconds per message written with this cache size and kept request."""
    db.execute(f"PRAGMA cache_size=-{cache_mib * 1024}")
    spent = 0.0
    for _ in range(max(1, messages // BATCH)):
        batch = rows(BATCH, time.time(), request)
        before = cpu()
        write(db, batch)
        spent += cpu() - before
    return 1e6 * spent / (max(1, messages // BATCH) * BATCH)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grow", type=int, default=200_000, help="messages in the grown ledger")
    parser.add_argument("--measure", type=int, default=10_000, help="messages written per measurement")
    parser.add_argument("--sizes", default="8,32", help="cache sizes in MiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per size and ledger")
    parser.add_argument("--requests", default="bodies", help="comma list of kept requests: bodies,sizes")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.requests.split(",")
    if not set(kinds) <= set(REQUESTS):
        parser.error(f"--requests: of {', '.join(REQUESTS)}")
    with tempfile.TemporaryDirectory(prefix="bench-ledgercache-") as tmp:
        ledger = SqliteLedger(Path(tmp) / "ledger.sqlite3")
        db = ledger._call(lambda db: db)  # the ledger's own connection, opened and migrated as the gateway does
        for label, grow in (("fresh", 0), ("grown", args.grow)):
            while db.execute("SELECT count(*) FROM ledger_messages").fetchone()[0] < grow:
                write(db, rows(2000, time.time()))
            for _ in range(args.rounds):
                for size in sizes:
                    for kind in kinds:
                        per = measure(db, size, args.measure, REQUESTS[kind])
                        print(f"{label} ledger, cache {size} MiB, request with {kind}: {per:.1f} us CPU per message")
        db.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
