"""Schema text both queue backends share word for word (SQLite reads these type names with the same meaning)."""

from __future__ import annotations

# The message ledger (gateway/ledger/): one row per message answered 250, its recipients and its timeline.
# No foreign keys: rows of one message may come from several instances in any order (an instance that
# claims a message may flush its rows before the accepting instance flushes the message's own row).
# Every table carries the message's acceptance time (`created`): retention prunes each table by it.
LEDGER = """
CREATE TABLE ledger_messages (
    id         text PRIMARY KEY,
    created    double precision NOT NULL,
    account    text NOT NULL,
    login      text,
    listener   text,
    peer       text,
    mail_from  text NOT NULL,
    sender     text NOT NULL,
    message_id text,
    subject    text NOT NULL,
    size       integer,
    reply_id   text,
    reply      text,
    request    text
);
CREATE INDEX ledger_messages_created ON ledger_messages (created, id);
CREATE INDEX ledger_messages_reply ON ledger_messages (reply_id);
CREATE INDEX ledger_messages_message_id ON ledger_messages (message_id);
CREATE INDEX ledger_messages_sender ON ledger_messages (sender, created);
CREATE INDEX ledger_messages_login ON ledger_messages (login, created);
CREATE INDEX ledger_messages_account ON ledger_messages (account, created);
CREATE TABLE ledger_recipients (
    msg_id      text NOT NULL,
    rcpt        text NOT NULL,
    address     text NOT NULL,
    created     double precision NOT NULL,
    state       text NOT NULL,
    state_at    double precision NOT NULL,
    upstream_id text,
    call_key    text,
    reason      text,
    PRIMARY KEY (msg_id, rcpt)
);
CREATE INDEX ledger_recipients_rcpt ON ledger_recipients (rcpt, created);
CREATE INDEX ledger_recipients_upstream ON ledger_recipients (upstream_id);
CREATE INDEX ledger_recipients_state ON ledger_recipients (state, created);
CREATE INDEX ledger_recipients_created ON ledger_recipients (created);
CREATE TABLE ledger_events (
    id          text PRIMARY KEY,
    msg_id      text NOT NULL,
    created     double precision NOT NULL,
    at          double precision NOT NULL,
    kind        text NOT NULL,
    rcpt        text,
    call_key    text,
    outcome     text,
    upstream_id text,
    detail      text,
    actor       text,
    data        text
);
CREATE INDEX ledger_events_msg ON ledger_events (msg_id, at);
CREATE INDEX ledger_events_created ON ledger_events (created)
"""

# The return path (gateway/returnpath/, docs/after-250.md): a message's notice data and the notice it is
# (dsn_of); each account's event poll cursor, leased to one instance at a time with a fencing token; the
# suppression lists; the webhook outbox, its rows written in the same transaction as the events they
# announce; one notice decision per message and recipient; notices counted per sender and window.
RETURN_PATH = """
ALTER TABLE ledger_messages ADD COLUMN dsn_of text;
ALTER TABLE ledger_messages ADD COLUMN notice text;
CREATE INDEX ledger_recipients_settled ON ledger_recipients (state, state_at);
CREATE TABLE event_cursors (
    name         text PRIMARY KEY,
    account      text NOT NULL,
    position     double precision NOT NULL,
    window_since double precision,
    window_until double precision,
    page         integer NOT NULL DEFAULT 0,
    owner        text,
    lease_until  double precision,
    token        bigint NOT NULL DEFAULT 0,
    polled       double precision
);
CREATE TABLE suppressions (
    account text NOT NULL,
    address text NOT NULL,
    reason  text NOT NULL,
    source  text NOT NULL,
    created double precision NOT NULL,
    msg_id  text,
    detail  text,
    PRIMARY KEY (account, address)
);
CREATE TABLE webhook_outbox (
    webhook      text NOT NULL,
    event_id     text NOT NULL,
    msg_id       text NOT NULL,
    created      double precision NOT NULL,
    enqueued     double precision NOT NULL,
    type         text NOT NULL,
    body         text NOT NULL,
    state        text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt double precision NOT NULL,
    owner        text,
    lease_until  double precision,
    token        bigint NOT NULL DEFAULT 0,
    last_error   text,
    done_at      double precision,
    PRIMARY KEY (webhook, event_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt);
CREATE INDEX webhook_outbox_created ON webhook_outbox (created);
CREATE TABLE ledger_notices (
    msg_id      text NOT NULL,
    rcpt        text NOT NULL,
    created     double precision NOT NULL,
    state       text NOT NULL,
    at          double precision NOT NULL,
    owner       text,
    lease_until double precision,
    token       bigint NOT NULL DEFAULT 0,
    notice_id   text,
    reason      text,
    PRIMARY KEY (msg_id, rcpt)
);
CREATE INDEX ledger_notices_claimed ON ledger_notices (state, lease_until);
CREATE INDEX ledger_notices_created ON ledger_notices (created);
CREATE TABLE notice_counts (
    sender text NOT NULL,
    win    double precision NOT NULL,
    n      integer NOT NULL,
    PRIMARY KEY (sender, win)
)
"""

# Indexes for retention and the ledger's reads at size (SQLite version 7, PostgreSQL version 8). Each prune
# batch deletes the outbox rows of up to 500 messages by msg_id, inside SQLite's one writer lock that every
# SMTP enqueue waits for; without an index with msg_id first that DELETE read the whole outbox (~0.5 s a
# batch at 2,000,000 rows). The expired ids are read oldest first, distinct by (created, msg_id)
# (gateway/ledger/sql.py expired_ids): an index on both, in that order, gives them without sorting every
# expired row (PostgreSQL sorted a whole backlog for each batch of 500 with `created` alone).
SCALE_INDEXES = """
CREATE INDEX webhook_outbox_msg ON webhook_outbox (msg_id);
DROP INDEX ledger_recipients_created;
CREATE INDEX ledger_recipients_created ON ledger_recipients (created, msg_id);
DROP INDEX ledger_events_created;
CREATE INDEX ledger_events_created ON ledger_events (created, msg_id);
DROP INDEX webhook_outbox_created;
CREATE INDEX webhook_outbox_created ON webhook_outbox (created, msg_id);
DROP INDEX ledger_notices_created;
CREATE INDEX ledger_notices_created ON ledger_notices (created, msg_id)
"""

# The recipient indexes a search by state or recipient walks, newest first, in the page's own order
# (gateway/ledger/sql.py search; SQLite version 8, PostgreSQL version 9): with msg_id after `created` the index
# gives (created DESC, msg_id DESC) as the ORDER BY asks, so a page reads its own rows, not a sort of every
# match (1.8 s a page of `state=delivered` at 1,000,000 messages on SQLite). The state index also holds rcpt:
# the walk tells a message's first recipient in the state, and probes the other filters, from the index
# alone. Rebuilding them reads the recipients once at the first start after an upgrade (seconds at 1,000,000
# rows).
SEARCH_INDEXES = """
DROP INDEX ledger_recipients_rcpt;
CREATE INDEX ledger_recipients_rcpt ON ledger_recipients (rcpt, created, msg_id);
DROP INDEX ledger_recipients_state;
CREATE INDEX ledger_recipients_state ON ledger_recipients (state, created, msg_id, rcpt)
"""

# What a delivery status notice about a queued message needs that its submission does not hold: whom to tell
# and the header block as received (gateway/ledger/notice.py `queued`; NULL when nobody would be told, and for
# rows stored before). An instance that claims a message whose accepting instance died before writing its
# ledger record rebuilds the record's notice data from it, so a later bounce is still told (SQLite version 9,
# PostgreSQL version 11). A column added with no default: no table rewrite on either backend.
QUEUED_NOTICE = """
ALTER TABLE messages ADD COLUMN notice text
"""

# Notices counted per account, sender and window length (SQLite version 10, PostgreSQL version 12), each row
# pruned once its own window has ended (`ends`): notice_counts, keyed by sender and window start alone, was
# shared by two accounts counting the same address and pruned by whichever account had the shortest window
# (an account's daily limit reset by another's minute). Each counted notice is kept by its idempotency key
# (notice_counted), so a decision taken over after its notice was handed to the queue finds its count, and
# counts the notice once. New tables, not a rewrite of notice_counts: an instance of the version before,
# still running on the migrated queue (a rolling upgrade), counts in the old table as it did.
NOTICE_TALLY = """
CREATE TABLE notice_tally (
    account text NOT NULL,
    sender  text NOT NULL,
    length  double precision NOT NULL,
    win     double precision NOT NULL,
    ends    double precision NOT NULL,
    n       integer NOT NULL,
    PRIMARY KEY (account, sender, length, win)
);
CREATE INDEX notice_tally_ends ON notice_tally (ends);
CREATE TABLE notice_counted (
    key     text PRIMARY KEY,
    account text NOT NULL,
    sender  text NOT NULL,
    length  double precision NOT NULL,
    win     double precision NOT NULL,
    ends    double precision NOT NULL
);
CREATE INDEX notice_counted_ends ON notice_counted (ends)
"""

# Each webhook's due deliveries by a query of its own (gateway/ledger/returns_sql.py outbox_due_of; SQLite
# version 11, PostgreSQL version 13): `WHERE webhook=? AND state='pending' AND next_attempt<=? ORDER BY
# next_attempt` had only (state, next_attempt). SQLite walked every webhook's due rows in due order to find this
# one's: after a receiver's outage (100,000 due rows of one webhook) each round's query of every other webhook
# read that whole backlog (11 ms a query, against 0.01 ms with this index); PostgreSQL read all of the
# webhook's rows by the primary key and sorted them. With the webhook first each seeks its own due rows, in
# order. The reapable query (state='sending' AND webhook=? AND lease_until<?) seeks the same index on
# (webhook, state) and filters lease_until over the rows being sent, at most the running instances' slots: no
# index of its own, which every outbox write would pay for.
WEBHOOK_DUE_INDEX = """
CREATE INDEX webhook_outbox_due_of ON webhook_outbox (webhook, state, next_attempt)
"""
