"""The memory of the in-memory suppression copy RCPT TO checks (gateway/ledger/suppression.py): N entries read
from a SQLite table as the stores read them, then held; prints tracemalloc's held and peak MiB.

    .venv/bin/python bench/suppressions.py [N]
"""

from __future__ import annotations

import sqlite3
import sys
import time
import tracemalloc

from gateway.ledger.returns import Suppressed
from gateway.ledger.suppression import SuppressionSet

MIB = 2**20


def main(n: int) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE s (account, address, reason, source, created, msg_id, detail)")
    db.executemany(
        "INSERT INTO s VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                "acme",
                f"user{k}@example{k % 500}.net",
                "hard bounce: 550 5.1.1 user unknown",
                "bounced",
                time.time(),
                f"M{k:012d}",
                "smtp; 550 5.1.1 <user> mailbox unavailable",
            )
            for k in range(n)
        ),
    )
    tracemalloc.start()
    copy = SuppressionSet()
    copy.replace([Suppressed(*row) for row in db.execute("SELECT * FROM s")])
    held, peak = tracemalloc.get_traced_memory()
    print(f"{n} entries: held {held / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB, {held / n:.0f} bytes per entry")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000)
