"""PostgreSQL schema migrations, in order (the same model as the SQLite queue's version 2 and later)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.queue import shared_schema

if TYPE_CHECKING:
    import psycopg

V1 = """
CREATE TABLE messages (
    seq             bigserial PRIMARY KEY,
    id              text NOT NULL UNIQUE,
    account         text NOT NULL,
    state           text NOT NULL CHECK (state IN ('queued', 'inflight', 'dead')),
    created         double precision NOT NULL,
    expires         double precision NOT NULL,
    next_attempt    double precision NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    mail_from       text NOT NULL,
    subject         text NOT NULL,
    size            integer NOT NULL,
    last_error      text,
    dead_reason     text,
    dead_at         double precision,
    owner           text,
    lease_until     double precision,
    token           bigint NOT NULL DEFAULT 0,
    internal_errors integer NOT NULL DEFAULT 0,
    idem_key        text,
    submission      bytea NOT NULL
);
CREATE INDEX messages_due ON messages (account, next_attempt, seq) WHERE state = 'queued';
CREATE INDEX messages_lease ON messages (account, lease_until) WHERE state = 'inflight';
CREATE INDEX messages_owner ON messages (owner) WHERE owner IS NOT NULL;
CREATE TABLE calls (
    msg_id      text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    key         text NOT NULL,
    ord         integer NOT NULL,
    recipients  text NOT NULL,
    state       text NOT NULL CHECK (state IN ('pending', 'sending', 'done', 'rejected')),
    upstream_id text,
    error       text,
    lost        integer NOT NULL DEFAULT 0,
    PRIMARY KEY (msg_id, key)
);
CREATE TABLE idempotency (
    account  text NOT NULL,
    key      text NOT NULL,
    msg_id   text NOT NULL,
    reply_id text,
    created  double precision NOT NULL,
    expires  double precision NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE INDEX idempotency_expires ON idempotency (expires);
CREATE TABLE rate_buckets (
    account    text PRIMARY KEY,
    tat        double precision NOT NULL,
    slow_until double precision NOT NULL DEFAULT 0
)
"""

# Large attachments outside the record, in chunks (as SQLite's version 3).
V2 = """
CREATE TABLE blobs (
    msg_id text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    n      integer NOT NULL,
    seq    integer NOT NULL,
    data   bytea NOT NULL,
    PRIMARY KEY (msg_id, n, seq)
)
"""

# The message ledger (gateway/ledger/), as SQLite's version 4.
V3 = shared_schema.LEDGER

# Per-login quota counts (gateway/core/quota.py), one row per login and window (SQLite keeps them in its
# rate-limit side file).
V4 = """
CREATE TABLE quota_counts (
    login    text NOT NULL,
    win      text NOT NULL,
    messages bigint NOT NULL,
    bytes    bigint NOT NULL,
    expires  double precision NOT NULL,
    PRIMARY KEY (login, win)
)
"""

# The digest of what a message said, kept with its idempotency key (as SQLite's version 5).
V5 = """
ALTER TABLE idempotency ADD COLUMN digest text
"""

# AUTH failures and attempts in flight per client IP, shared by every instance (gateway/core/authcount.py).
V6 = """
CREATE TABLE auth_clients (
    client          text PRIMARY KEY,
    failures        integer NOT NULL DEFAULT 0,
    since           double precision NOT NULL DEFAULT 0,
    in_flight       integer NOT NULL DEFAULT 0,
    in_flight_until double precision NOT NULL DEFAULT 0,
    locked_until    double precision NOT NULL DEFAULT 0
)
"""

# The return path (gateway/returnpath/), as SQLite's version 6.
V7 = shared_schema.RETURN_PATH

# Indexes retention and the ledger's reads need at size, as SQLite's version 7.
V8 = shared_schema.SCALE_INDEXES

# The recipient indexes a search walks, as SQLite's version 8.
V9 = shared_schema.SEARCH_INDEXES

# Console sessions signed out, refused by every instance until their lifetime is over (SQLite keeps them in
# its rate-limit side file, as the AUTH counts).
V10 = """
CREATE TABLE console_signouts (
    sid   text PRIMARY KEY,
    until double precision NOT NULL
)
"""

# What a notice about a queued message needs, as SQLite's version 9.
V11 = shared_schema.QUEUED_NOTICE

# Notices counted per account, sender and window length, and by notice, as SQLite's version 10.
V12 = shared_schema.NOTICE_TALLY

# Each webhook's due deliveries by webhook, in due order, as SQLite's version 11.
V13 = shared_schema.WEBHOOK_DUE_INDEX

MIGRATIONS: list[str] = [V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11, V12, V13]
LATEST = len(MIGRATIONS)
# Serialises migrations of several instances starting at once (pg_advisory_xact_lock key).
MIGRATION_LOCK = 0x5347_5751  # "SGWQ"


async def migrate(conn: psycopg.AsyncConnection[Any]) -> list[int]:
    """Bring the database to LATEST inside the caller's transaction, under the migration lock (instances
    starting at once wait for each other). Returns the versions applied, none when it was up to date."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
    cur = await conn.execute("SELECT version FROM schema_version")
    row = await cur.fetchone()
    found = int(row[0] if isinstance(row, tuple) else row["version"]) if row else 0
    if found > LATEST:
        raise SchemaTooNew(f"queue schema version {found} is newer than this gateway ({LATEST})")
    applied = list(range(found + 1, LATEST + 1))
    for number in applied:
        for statement in MIGRATIONS[number - 1].split(";"):
            if statement.strip():
                await conn.execute(statement.encode())  # our own constant SQL
        await conn.execute("DELETE FROM schema_version")
        await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
    return applied


class SchemaTooNew(Exception):
    """The database was migrated by a newer gateway."""
