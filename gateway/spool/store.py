"""The spool's SQLite file: messages not yet delivered, their legs (one upstream call each), dead letters.

Blocking code: the server runs it on one dedicated thread (gateway/spool/spool.py); `smtp-gateway queue`
uses it directly. WAL lets the CLI read and write while the server runs; `synchronous=FULL` makes every
commit durable (fsync'd) before it returns, so a 250 is only sent for a message on disk.

    messages.state   queued    waiting for next_attempt (the retry worker picks it up)
                     inflight  an upstream call for its pending legs is running right now
                     dead      dead letter: expired or permanently refused; dead_reason says why
    legs.state       pending   not delivered yet
                     done      the upstream accepted it (upstream_id) -- never sent again
                     rejected  the upstream refused it permanently (error)

A delivered message (every leg done) is deleted. At start-up `recover()` turns `inflight` back into
`queued`: those calls may or may not have reached the upstream (the at-least-once window).
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    account      TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('queued', 'inflight', 'dead')),
    created      REAL NOT NULL,
    expires      REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    batch_eeid   TEXT,
    mail_from    TEXT NOT NULL,
    subject      TEXT NOT NULL,
    size         INTEGER NOT NULL,
    last_error   TEXT,
    dead_reason  TEXT,
    dead_at      REAL,
    submission   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, account, next_attempt, seq);
CREATE TABLE IF NOT EXISTS legs (
    msg_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    leg         INTEGER NOT NULL,
    recipients  TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected')),
    upstream_id TEXT,
    error       TEXT,
    PRIMARY KEY (msg_id, leg)
);
"""


@dataclass(frozen=True)
class RetryPolicy:
    schedule: Sequence[float]
    jitter: float
    max_lifetime: float

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Wait after the `attempts`-th failed attempt (1-based): the schedule's entry, last one repeated."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1] if self.schedule else 60.0
        if self.jitter:
            base *= 1 + (rng or random).uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


@dataclass(frozen=True)
class LegRow:
    leg: int
    recipients: str
    state: str
    upstream_id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Claimed:
    id: str
    submission: bytes
    done: dict[int, str]  # leg -> upstream id: never sent again
    batch_eeid: str | None


class SpoolStore:
    def __init__(self, path: Path, *, busy_timeout: float = 5.0, max_page_count: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        if max_page_count is not None:  # tests: simulate a full disk
            self.db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- the server's operations ----------------------------------------------------------------------

    def insert(
        self, *, msg_id: str, account: str, state: str, created: float, expires: float, next_attempt: float,
        attempts: int, batch_eeid: str | None, mail_from: str, subject: str, submission: bytes,
        legs: Sequence[LegRow], last_error: str | None, dead_reason: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO messages (id, account, state, created, expires, next_attempt, attempts, batch_eeid,"
                " mail_from, subject, size, last_error, dead_reason, dead_at, submission)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (msg_id, account, state, created, expires, next_attempt, attempts, batch_eeid, mail_from, subject,
                 len(submission), last_error, dead_reason, created if state == "dead" else None, submission),
            )
            db.executemany(
                "INSERT INTO legs (msg_id, leg, recipients, state, upstream_id, error) VALUES (?,?,?,?,?,?)",
                [(msg_id, r.leg, r.recipients, r.state, r.upstream_id, r.error) for r in legs],
            )

    def recover(self, now: float) -> list[tuple[str, str | None]]:
        """At start-up: calls that were running when the process died are due again now. Returns (id, batch)."""
        with self._tx() as db:
            rows = db.execute("SELECT id, batch_eeid FROM messages WHERE state='inflight' ORDER BY seq").fetchall()
            db.execute("UPDATE messages SET state='queued', next_attempt=? WHERE state='inflight'", (now,))
        return [(r["id"], r["batch_eeid"]) for r in rows]

    def claim(self, account: str, now: float, limit: int) -> list[Claimed]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, submission, batch_eeid FROM messages WHERE state='queued' AND account=?"
                " AND next_attempt<=? ORDER BY next_attempt, seq LIMIT ?", (account, now, limit),
            ).fetchall()
            out = []
            for r in rows:
                db.execute("UPDATE messages SET state='inflight' WHERE id=?", (r["id"],))
                done = db.execute(
                    "SELECT leg, upstream_id FROM legs WHERE msg_id=? AND state='done'", (r["id"],)
                ).fetchall()
                out.append(Claimed(r["id"], r["submission"], {d["leg"]: d["upstream_id"] for d in done},
                                   r["batch_eeid"]))
        return out

    def next_due(self, accounts: Sequence[str]) -> float | None:
        marks = ",".join("?" * len(accounts))
        row = self.db.execute(
            f"SELECT MIN(next_attempt) AS t FROM messages WHERE state='queued' AND account IN ({marks})",
            tuple(accounts),
        ).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def settle(
        self, msg_id: str, delivered: dict[int, str], rejected: dict[int, str], error: str | None,
        now: float, policy: RetryPolicy, rng: random.Random | None = None,
    ) -> str:
        """Record one attempt's per-leg results. Returns 'done', 'queued', 'dead' or 'gone' (deleted meanwhile)."""
        with self._tx() as db:
            msg = db.execute("SELECT * FROM messages WHERE id=?", (msg_id,)).fetchone()
            if msg is None:
                return "gone"
            for leg, upstream_id in delivered.items():
                db.execute("UPDATE legs SET state='done', upstream_id=?, error=NULL WHERE msg_id=? AND leg=?",
                           (upstream_id, msg_id, leg))
            for leg, reason in rejected.items():
                db.execute("UPDATE legs SET state='rejected', error=? WHERE msg_id=? AND leg=?",
                           (reason, msg_id, leg))
            if delivered and msg["batch_eeid"] is None:
                batch = delivered.get(0) or next(iter(delivered.values()))
                db.execute("UPDATE messages SET batch_eeid=? WHERE id=?", (batch, msg_id))
            counts = dict(db.execute(
                "SELECT state, COUNT(*) FROM legs WHERE msg_id=? GROUP BY state", (msg_id,)
            ).fetchall())
            attempts = msg["attempts"] + 1
            if not counts.get("pending"):
                if not counts.get("rejected"):
                    db.execute("DELETE FROM messages WHERE id=?", (msg_id,))
                    return "done"
                reasons = db.execute(
                    "SELECT leg, recipients, error FROM legs WHERE msg_id=? AND state='rejected'", (msg_id,)
                ).fetchall()
                dead = "refused by upstream: " + "; ".join(
                    f"leg {r['leg']} ({r['recipients']}): {r['error']}" for r in reasons)
                self._kill(db, msg_id, dead, now, attempts, error)
                return "dead"
            if now >= msg["expires"]:
                dead = f"expired after {attempts} attempts in {now - msg['created']:.0f}s; last error: {error}"
                self._kill(db, msg_id, dead, now, attempts, error)
                return "dead"
            next_attempt = min(now + policy.delay(attempts, rng), msg["expires"])
            db.execute(
                "UPDATE messages SET state='queued', attempts=?, next_attempt=?, last_error=? WHERE id=?",
                (attempts, next_attempt, error, msg_id),
            )
            return "queued"

    @staticmethod
    def _kill(db: sqlite3.Connection, msg_id: str, reason: str, now: float, attempts: int, error: str | None) -> None:
        db.execute(
            "UPDATE messages SET state='dead', dead_reason=?, dead_at=?, attempts=?, last_error=? WHERE id=?",
            (reason, now, attempts, error, msg_id),
        )

    # -- operator commands (smtp-gateway queue ...) --------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT state, COUNT(*) AS n, MIN(created) AS oldest FROM messages GROUP BY state"
        ).fetchall()
        return {r["state"]: {"count": r["n"], "oldest_age": now - r["oldest"]} for r in rows}

    def list(self, states: Sequence[str], limit: int = 1000) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(states))
        rows = self.db.execute(
            "SELECT m.id, m.state, m.account, m.created, m.next_attempt, m.attempts, m.mail_from, m.subject,"
            " m.size, m.last_error, m.dead_reason, m.dead_at,"
            " (SELECT COUNT(*) FROM legs l WHERE l.msg_id=m.id AND l.state!='done') AS open_legs,"
            " (SELECT COUNT(*) FROM legs l WHERE l.msg_id=m.id) AS legs"
            f" FROM messages m WHERE m.state IN ({marks}) ORDER BY m.seq LIMIT ?", (*states, limit),
        ).fetchall()
        return [dict(r) for r in rows]

    def show(self, msg_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM messages WHERE id=?", (msg_id,)).fetchone()
        if row is None:
            return None
        out = {k: row[k] for k in row.keys() if k != "submission"}  # noqa: SIM118 (sqlite3.Row)
        out["legs"] = [dict(r) for r in self.db.execute(
            "SELECT leg, recipients, state, upstream_id, error FROM legs WHERE msg_id=? ORDER BY leg", (msg_id,))]
        return out

    def submission(self, msg_id: str) -> bytes | None:
        row = self.db.execute("SELECT submission FROM messages WHERE id=?", (msg_id,)).fetchone()
        return None if row is None else bytes(row["submission"])

    def retry_now(self, msg_id: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute("UPDATE messages SET next_attempt=? WHERE id=? AND state='queued'", (now, msg_id))
        return cur.rowcount == 1

    def delete(self, msg_id: str) -> bool:
        """Delete a queued or dead message (not one whose call is running)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM messages WHERE id=? AND state!='inflight'", (msg_id,))
        return cur.rowcount == 1

    def requeue(self, msg_id: str, now: float, max_lifetime: float) -> bool:
        """A dead letter back into the queue with a fresh lifetime; refused legs are tried again."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE messages SET state='queued', next_attempt=?, expires=?, attempts=0, dead_reason=NULL,"
                " dead_at=NULL WHERE id=? AND state='dead'", (now, now + max_lifetime, msg_id),
            )
            if cur.rowcount:
                db.execute("UPDATE legs SET state='pending', error=NULL WHERE msg_id=? AND state='rejected'",
                           (msg_id,))
        return cur.rowcount == 1
