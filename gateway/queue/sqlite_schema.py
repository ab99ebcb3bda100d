"""SQLite schema migrations, in order. Version 1 is the spool of releases before the provider-neutral queue."""

from __future__ import annotations

import sqlite3

from gateway.queue import shared_schema
from gateway.queue.sql import FOR_SQLITE as SQL

V1 = """
CREATE TABLE messages (
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
CREATE INDEX messages_due ON messages (state, account, next_attempt, seq);
CREATE TABLE legs (
    msg_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    leg         INTEGER NOT NULL,
    recipients  TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected')),
    upstream_id TEXT,
    error       TEXT,
    PRIMARY KEY (msg_id, leg)
);
"""

# Provider-neutral calls under opaque keys (a DMDS leg N becomes call "N"), leases with fencing tokens,
# idempotency keys. A v1 message that was in flight when its process stopped may have reached the
# upstream: its pending legs become 'sending' calls, so the first claim counts them as ambiguous.
V2 = """
CREATE TABLE calls (
    msg_id      TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    recipients  TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'done', 'rejected')),
    upstream_id TEXT,
    error       TEXT,
    lost        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (msg_id, key)
);
INSERT INTO calls (msg_id, key, recipients, state, upstream_id, error)
    SELECT l.msg_id, CAST(l.leg AS TEXT), l.recipients,
           CASE WHEN m.state = 'inflight' AND l.state = 'pending' THEN 'sending' ELSE l.state END,
           l.upstream_id, l.error
    FROM legs l JOIN messages m ON m.id = l.msg_id;
DROP TABLE legs;
ALTER TABLE messages DROP COLUMN batch_eeid;
ALTER TABLE messages ADD COLUMN owner TEXT;
ALTER TABLE messages ADD COLUMN lease_until REAL;
ALTER TABLE messages ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN internal_errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN idem_key TEXT;
CREATE INDEX messages_lease ON messages (state, account, lease_until);
CREATE INDEX messages_owner ON messages (owner);
CREATE TABLE idempotency (
    account  TEXT NOT NULL,
    key      TEXT NOT NULL,
    msg_id   TEXT NOT NULL,
    reply_id TEXT,
    created  REAL NOT NULL,
    expires  REAL NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX idempotency_expires ON idempotency (expires);
"""

# Large attachments outside the record, in chunks: storing or loading a big scan never needs one huge
# value (a second full copy in memory, a multi-megabyte parameter).
V3 = """
CREATE TABLE blobs (
    msg_id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    n      INTEGER NOT NULL,
    seq    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (msg_id, n, seq)
);
"""

# The message ledger (gateway/ledger/).
V4 = shared_schema.LEDGER

# The digest of what a message said, kept with its idempotency key: a key reused for another message is
# refused, not taken for a resend (NULL for keys stored before).
V5 = """
ALTER TABLE idempotency ADD COLUMN digest TEXT;
"""

# The return path: event cursors, suppressions, the webhook outbox, notices.
V6 = shared_schema.RETURN_PATH

# Indexes retention and the ledger's reads need at size (the webhook outbox by message).
V7 = shared_schema.SCALE_INDEXES

# The recipient indexes a search by state or recipient walks in the page's order.
V8 = shared_schema.SEARCH_INDEXES

# What a notice about a queued message needs (whom to tell, the header block), for a record rebuilt from it.
V9 = shared_schema.QUEUED_NOTICE

# Notices counted per account, sender and window length, each pruned by its own window, and by notice.
V10 = shared_schema.NOTICE_TALLY

# Each webhook's due deliveries by webhook, in due order (its own query's index, not another's backlog).
V11 = shared_schema.WEBHOOK_DUE_INDEX

MIGRATIONS: list[str] = [V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11]
LATEST = len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" in tables:
        row = db.execute("SELECT version FROM schema_version").fetchone()
        return int(row[0]) if row else 0
    # A spool written before versioning has the v1 tables and no version table.
    return 1 if "messages" in tables else 0


def migrate(db: sqlite3.Connection) -> tuple[int, int]:
    """Bring the file to LATEST, each step in its own transaction. Returns (before, after)."""
    start = version(db)
    if start > LATEST:
        raise SchemaTooNew(f"queue schema version {start} is newer than this gateway ({LATEST})")
    for number in range(start + 1, LATEST + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            found = version(db)
            if found > LATEST:
                # A newer version's migration committed while this one waited for the lock (the check above
                # was made before it): refused as at the start, never used (PostgreSQL reads it under its lock).
                raise SchemaTooNew(f"queue schema version {found} is newer than this gateway ({LATEST})")
            if found >= number:  # another process migrated meanwhile
                db.execute("ROLLBACK")
                continue
            for statement in MIGRATIONS[number - 1].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            db.execute("DELETE FROM schema_version")
            db.execute(SQL.set_version, (number,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return start, LATEST


class SchemaTooNew(sqlite3.DatabaseError):
    """The file was migrated by a newer gateway (a DatabaseError still, for the commands that say so)."""
