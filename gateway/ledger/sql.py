"""The ledger's SQL, written once for both backends: each statement takes the backend's placeholder
(`?` for SQLite, `%s` for psycopg). Upserts use `INSERT ... ON CONFLICT ... DO UPDATE` with `excluded`,
which SQLite (3.24+) and PostgreSQL read alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson

from gateway.ledger.model import (
    INVALID_LIST,
    NO_LONGER_FAILED,
    Cursor,
    Event,
    EventRow,
    MessageRow,
    NoticeRow,
    OutboxRow,
    Query,
    Recipient,
    RecipientRow,
    Record,
    SuppressionRow,
    Tally,
    address_key,
    message_id_key,
)

MESSAGE_COLUMNS = (
    "id",
    "created",
    "account",
    "login",
    "listener",
    "peer",
    "mail_from",
    "sender",
    "message_id",
    "subject",
    "size",
    "reply_id",
    "reply",
    "request",
    "dsn_of",
    "notice",
)
RECIPIENT_COLUMNS = ("msg_id", "rcpt", "address", "created", "state", "state_at", "upstream_id", "call_key", "reason")
EVENT_COLUMNS = (
    "id",
    "msg_id",
    "created",
    "at",
    "kind",
    "rcpt",
    "call_key",
    "outcome",
    "upstream_id",
    "detail",
    "actor",
    "data",
)
_RANK = "CASE {t}.state WHEN 'accepted' THEN 0 WHEN 'deferred' THEN 1 WHEN 'sent' THEN 2 ELSE 3 END"


def _marks(p: str, n: int) -> str:
    return ",".join([p] * n)


def _rows(p: str, n: int, rows: int) -> str:
    """`rows` rows of `n` placeholders: "(?,?),(?,?)"."""
    return ",".join([f"({_marks(p, n)})"] * rows)


def _message_conflict() -> str:
    """A message's row; a second writer only fills what the first left empty (the accepting instance knows
    the listener, peer and reply; a claiming instance knows what the queue stored)."""
    fill = ", ".join(f"{c} = COALESCE(ledger_messages.{c}, excluded.{c})" for c in MESSAGE_COLUMNS[1:])
    return f" ON CONFLICT (id) DO UPDATE SET {fill}"


# Every statement takes `rows` rows at once. SQLite's writer sends a batch in statements of up to ROWS rows:
# the sqlite3 module hands the GIL back and forth with the event loop around every step of a statement, so
# executemany costs two hand-overs per row; and a batch as one JSON array parameter (json_each) costs more
# CPU than binding the values, most of all for a message's request (SQLite 3.40's json_extract parses the
# whole row's text once per column). (PostgreSQL's writes run on the loop, pipelined, one row a statement.)
ROWS = 64


def message_upsert(p: str, rows: int = 1) -> str:
    return (
        f"INSERT INTO ledger_messages ({', '.join(MESSAGE_COLUMNS)}) VALUES {_rows(p, len(MESSAGE_COLUMNS), rows)}"
        + _message_conflict()
    )


def _recipient_conflict() -> str:
    """A recipient's state (model.py): the incoming row wins when it is further along (RANK), or as far
    and not older, or not older than a `dead` it replaces unless it is `accepted` (a fenced attempt's: see
    model.replaces). model.replaces is the same rule in Python (readback decides webhooks and notices by it):
    change both or neither."""
    new, old = _RANK.format(t="excluded"), _RANK.format(t="ledger_recipients")
    wins = (
        f"({new} > {old} OR (excluded.state_at >= ledger_recipients.state_at"
        f" AND ({new} = {old} OR (ledger_recipients.state = 'dead' AND excluded.state <> 'accepted'))))"
    )
    updates = ", ".join(
        f"{c} = CASE WHEN {wins} THEN excluded.{c} ELSE ledger_recipients.{c} END"
        for c in ("state", "state_at", "reason")
    )
    keep = ", ".join(
        f"{c} = CASE WHEN {wins} THEN COALESCE(excluded.{c}, ledger_recipients.{c})"
        f" ELSE COALESCE(ledger_recipients.{c}, excluded.{c}) END"
        for c in ("upstream_id", "call_key")
    )
    return f" ON CONFLICT (msg_id, rcpt) DO UPDATE SET {updates}, {keep}"


def recipient_upsert(p: str, rows: int = 1) -> str:
    return (
        f"INSERT INTO ledger_recipients ({', '.join(RECIPIENT_COLUMNS)})"
        f" VALUES {_rows(p, len(RECIPIENT_COLUMNS), rows)}{_recipient_conflict()}"
    )


OUTBOX_COLUMNS = ("webhook", "event_id", "msg_id", "created", "enqueued", "type", "body", "state", "next_attempt")
SUPPRESSION_COLUMNS = ("account", "address", "reason", "source", "created", "msg_id", "detail")
NOTICE_COLUMNS = ("msg_id", "rcpt", "created", "state", "at")


def outbox_insert(p: str, rows: int = 1) -> str:
    return (
        f"INSERT INTO webhook_outbox ({', '.join(OUTBOX_COLUMNS)}) VALUES {_rows(p, len(OUTBOX_COLUMNS), rows)}"
        " ON CONFLICT (webhook, event_id) DO NOTHING"
    )


def suppression_insert(p: str, rows: int = 1) -> str:
    # The first entry is kept, but one only the vendor's invalid list made is replaced by any other source's
    # (model.suppression_replaces: the in-memory copy's rule): the list's sync and a read-back hard bounce race
    # within one poll, and the more specific entry must win whichever is written first. An operator's entry
    # and an event's are never replaced; the list's sync removes only its own source's, so not the new entry.
    # (PostgreSQL executes one row per statement: an upsert may not touch a row twice in one statement.)
    updated = ", ".join(f"{c}=excluded.{c}" for c in SUPPRESSION_COLUMNS[2:])
    return (
        f"INSERT INTO suppressions ({', '.join(SUPPRESSION_COLUMNS)})"
        f" VALUES {_rows(p, len(SUPPRESSION_COLUMNS), rows)} ON CONFLICT (account, address) DO UPDATE SET {updated}"
        f" WHERE suppressions.source='{INVALID_LIST}' AND excluded.source<>'{INVALID_LIST}'"
    )


def notice_insert(p: str, rows: int = 1) -> str:
    return (
        f"INSERT INTO ledger_notices ({', '.join(NOTICE_COLUMNS)}) VALUES {_rows(p, len(NOTICE_COLUMNS), rows)}"
        # A decision is made once; only one skipped because its recipient was no longer failed is decided
        # again when the recipient fails again (a requeued dead letter that dies again is told then).
        " ON CONFLICT (msg_id, rcpt) DO UPDATE SET state='pending', at=excluded.at, notice_id=NULL, reason=NULL"
        f" WHERE ledger_notices.state='skipped' AND ledger_notices.reason='{NO_LONGER_FAILED}'"
    )


def notice_values(n: NoticeRow) -> tuple[Any, ...]:
    return (n.msg_id, n.key, n.created, "pending", n.at)


def outbox_values(o: OutboxRow) -> tuple[Any, ...]:
    return (o.webhook, o.event_id, o.msg_id, o.created, o.enqueued, o.type, o.body, "pending", o.enqueued)


def suppression_values(r: SuppressionRow) -> tuple[Any, ...]:
    return (r.account, address_key(r.address), r.reason, r.source, r.created, r.msg_id, r.detail)


def by_table(rows: Sequence[Any]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """The rows' values grouped by table, in the order the tables are written: (table, values). The rows are
    sorted by type first and each group's values made by one map(): this runs on the writer's thread holding
    the GIL against the event loop, for every row."""
    groups: dict[type, list[Any]] = {}
    for row in rows:
        group = groups.get(type(row))
        if group is None:
            groups[type(row)] = group = []
        group.append(row)
    out = []
    for kind in _ORDER:
        if kind in groups:
            table, values = _VALUES[kind]
            out.append((table, list(map(values, groups[kind]))))
    return out


def event_insert(p: str, rows: int = 1) -> str:
    return (
        f"INSERT INTO ledger_events ({', '.join(EVENT_COLUMNS)}) VALUES {_rows(p, len(EVENT_COLUMNS), rows)}"
        " ON CONFLICT (id) DO NOTHING"
    )


def unpack_request(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


def message_values(m: MessageRow) -> tuple[Any, ...]:
    return (
        m.id,
        m.created,
        m.account,
        m.login,
        m.listener,
        m.peer,
        m.mail_from,
        address_key(m.mail_from),
        message_id_key(m.message_id) if m.message_id else None,
        m.subject,
        m.size,
        m.reply_id,
        m.reply,
        m.request,  # JSON text, not deflated: that would cost the writer more CPU than all the rest of the rows
        m.dsn_of,
        m.notice,
    )


def recipient_values(r: RecipientRow) -> tuple[Any, ...]:
    return (r.msg_id, r.key, r.address, r.created, r.state, r.at, r.upstream_id, r.call, r.reason)


def event_values(e: EventRow) -> tuple[Any, ...]:
    return (
        e.id,
        e.msg_id,
        e.created,
        e.at,
        e.kind,
        e.recipient,
        e.call,
        e.outcome,
        e.upstream_id,
        e.detail,
        e.actor,
        e.data,
    )


# Each row type's table and values, and the order tables are written in within one transaction.
WRITTEN = ("message", "recipient", "event", "outbox", "suppression", "notice")
_VALUES: dict[type, tuple[str, Any]] = {
    MessageRow: ("message", message_values),
    RecipientRow: ("recipient", recipient_values),
    EventRow: ("event", event_values),
    OutboxRow: ("outbox", outbox_values),
    SuppressionRow: ("suppression", suppression_values),
    NoticeRow: ("notice", notice_values),
}
_ORDER = sorted(_VALUES, key=lambda kind: WRITTEN.index(_VALUES[kind][0]))
INSERTS: dict[str, Callable[[str, int], str]] = {
    "message": message_upsert,
    "recipient": recipient_upsert,
    "event": event_insert,
    "outbox": outbox_insert,
    "suppression": suppression_insert,
    "notice": notice_insert,
}


def statements(p: str) -> dict[str, str]:
    """Each table's insert (one row per execution) with the backend's placeholder."""
    return {table: build(p, 1) for table, build in INSERTS.items()}


def insert(table: str, p: str, rows: int) -> str:
    """`table`'s insert of `rows` rows at once (SQLite's batches, in parts of up to ROWS rows)."""
    return INSERTS[table](p, rows)


# -- reading ------------------------------------------------------------------------------------------------

_SUMMARY = "id, created, account, login, listener, peer, mail_from, message_id, subject, size, reply_id, reply, dsn_of"


def select_message(p: str) -> str:
    return f"SELECT {_SUMMARY}, request FROM ledger_messages WHERE id = {p}"


def select_events(p: str) -> str:
    return (
        "SELECT id, at, kind, rcpt, call_key, outcome, upstream_id, detail, actor, data FROM ledger_events"
        f" WHERE msg_id = {p} ORDER BY at, id"
    )


def select_recipients(p: str, count: int) -> str:
    return (
        "SELECT msg_id, address, state, state_at, upstream_id, call_key, reason FROM ledger_recipients"
        f" WHERE msg_id IN ({_marks(p, count)}) ORDER BY msg_id, address"
    )


# A search by recipient or state walks that recipient index, newest first, instead of listing every matching
# message and sorting them all for one page (1.8 s a page of `state=delivered` at 1,000,000 messages on
# SQLite; 2.1 s for a mailbox that receives half the ledger). The recipient rows carry their message's
# acceptance time (`created`, shared_schema.LEDGER: every writer gives all rows of a message the same one, and
# retention relies on it too), so the index (state | rcpt, created, msg_id) gives the messages in the page's
# own order (created DESC, id DESC) and the walk stops at the page's end. A query with a selective key (an
# id, a 250's id, a Message-ID, an upstream id) is not driven: its few messages are found first and the
# recipient conditions probed on each.
_SELECTIVE = ("id", "ids", "reply_id", "message_id", "upstream_id")
# What a search walks: a recipient column (rcpt or state) or None, ledger_messages' own indexes.
Driver = str | None
# How many rows of each possible walk `extent` counts at most (SQLite: see drivers()): counting reads an
# index only (~1 ms per 10,000 rows); a walk chosen below it reads at most that many rows.
EXTENT = 20000


def drivers(q: Query) -> list[Driver]:
    """The walks that can serve `q`, the default first. Several when `q` combines filters each with its own
    index (recipient, state, login/account/sender): a walk reads rows until a page of them passes the other
    filters, so when they share few or no messages it reads the whole of its own range (a login with no
    `delivered` message walked all 950,000 delivered rows, 15 s on SQLite). SQLite has no statistics to
    choose from (no ANALYZE is run), so its backend counts each range up to EXTENT rows (extent()) and walks
    the smallest; PostgreSQL's planner reorders the join by its own statistics."""
    if any(getattr(q, key) not in (None, ()) for key in _SELECTIVE):
        return [None]
    # The state walk first: of equals it is the cheaper (its index holds every column it probes with).
    out: list[Driver] = []
    if q.state is not None:
        out.append("state")
    if q.recipient is not None:
        out.append("rcpt")
    if not out or q.login is not None or q.account is not None or q.sender is not None:
        out.append(None)
    return out


def extent(q: Query, driver: Driver, p: str, most: int = EXTENT) -> tuple[str, list[Any]]:
    """How many rows (up to `most`) the walk `driver` has in the query's window: one index range, counted."""
    where: list[str] = []
    params: list[Any] = []
    if driver == "rcpt":
        where.append(f"rcpt = {p}")
        params.append(address_key(q.recipient or ""))
    elif driver == "state":
        where.append(f"state = {p}")
        params.append(q.state)
    else:
        for column, value in (("login", q.login), ("account", q.account), ("sender", q.sender)):
            if value is not None:
                where.append(f"{column} = {p}")
                params.append(address_key(value) if column == "sender" else value)
    if q.since is not None:
        where.append(f"created >= {p}")
        params.append(q.since)
    if q.until is not None:
        where.append(f"created < {p}")
        params.append(q.until)
    if q.cursor is not None:
        key = "id" if driver is None else "msg_id"
        where.append(f"(created, {key}) < ({p}, {p})")
        params += [q.cursor.created, q.cursor.id]
    table = "ledger_messages" if driver is None else "ledger_recipients"
    clause = " WHERE " + " AND ".join(where) if where else ""
    return f"SELECT COUNT(*) FROM (SELECT 1 FROM {table}{clause} LIMIT {p}) AS e", [*params, most]


def smallest(q: Query, p: str, count: Callable[[str, list[Any]], int]) -> Driver:
    """The walk of `q` with the fewest rows by extent(), `count` running it (the first of equals: drivers'
    order); the only one without counting when there is one."""
    choices = drivers(q)
    if len(choices) == 1:
        return choices[0]
    sizes = [count(*extent(q, d, p)) for d in choices]
    return choices[min(range(len(choices)), key=lambda i: sizes[i])]


def search(q: Query, p: str, driver: Driver | Literal["default"] = "default") -> tuple[str, list[Any]]:
    """The page's messages (one more than `limit`: whether there is a next page), newest first, read by the
    walk `driver` (one of drivers(q); by default its first)."""
    where: list[str] = []
    params: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        where.append(clause.format(p=p))
        params.extend(values)

    choices = drivers(q)
    if driver == "default":
        driver = choices[0]
    elif driver not in choices:
        raise ValueError(f"no walk by {driver} for this query")
    # Time bounds and the cursor on the walked table's own `created` (the same value as the message's); the
    # probes of other recipients by the walked row's msg_id, so that they run before the message's row is read.
    t = "m" if driver is None else "r"
    key = "id" if driver is None else "msg_id"
    walked = f"{t}.{key}"
    if driver == "rcpt" and q.recipient is not None:
        add("r.rcpt = {p}", address_key(q.recipient))
    elif driver == "state":
        add("r.state = {p}", q.state)
        # One row per message: the first of its recipients (by address) in that state.
        add(
            "NOT EXISTS (SELECT 1 FROM ledger_recipients d"
            " WHERE d.msg_id = r.msg_id AND d.state = r.state AND d.rcpt < r.rcpt)"
        )
    if q.id is not None:
        add("m.id = {p}", q.id.upper())
    if q.ids:
        add(f"m.id IN ({_marks('{p}', len(q.ids))})", *(i.upper() for i in q.ids))
    if q.reply_id is not None:
        add("m.reply_id = {p}", q.reply_id)
    if q.message_id is not None:
        add("m.message_id = {p}", message_id_key(q.message_id))
    if q.sender is not None:
        add("m.sender = {p}", address_key(q.sender))
    if q.login is not None:
        add("m.login = {p}", q.login)
    if q.account is not None:
        add("m.account = {p}", q.account)
    if q.since is not None:
        add(f"{t}.created >= {{p}}", q.since)
    if q.until is not None:
        add(f"{t}.created < {{p}}", q.until)
    if q.recipient is not None and driver != "rcpt":
        add(
            f"EXISTS (SELECT 1 FROM ledger_recipients s WHERE s.msg_id = {walked} AND s.rcpt = {{p}})",
            address_key(q.recipient),
        )
    if q.upstream_id is not None:
        add("m.id IN (SELECT msg_id FROM ledger_recipients WHERE upstream_id = {p})", q.upstream_id)
    if q.state is not None and driver != "state":
        # A probe of the message's own recipients (the primary key's msg_id prefix), not the list of every
        # message with a recipient in that state (95 % of the ledger for `delivered`). `|| ''` keeps SQLite
        # (no statistics) from probing by the state index instead, which walks every row in that state.
        add(f"EXISTS (SELECT 1 FROM ledger_recipients s WHERE s.msg_id = {walked} AND s.state || '' = {{p}})", q.state)
    if q.cursor is not None:
        # A row value, not `created < c OR (created = c AND id < i)`: the OR is no index condition, so both
        # backends walked the (created, id) index from the newest row, filtering out every row before the
        # cursor (661 ms 29 days deep at 1,000,000 messages on PostgreSQL; a whole month by 500 ~ N²/2 rows).
        add(f"({t}.created, {t}.{key}) < ({{p}}, {{p}})", q.cursor.created, q.cursor.id)
    sql = f"SELECT {', '.join('m.' + c for c in _SUMMARY.split(', '))} FROM "
    # CROSS JOIN: SQLite (no ANALYZE statistics) keeps the recipients as the outer loop, in the index's order;
    # PostgreSQL plans it as any inner join.
    sql += "ledger_messages m" if driver is None else "ledger_recipients r CROSS JOIN ledger_messages m"
    if driver is not None:
        where.insert(0, "m.id = r.msg_id")
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {t}.created DESC, {t}.{key} DESC LIMIT {p}"
    params.append(q.limit + 1)
    return sql, params


def record_of(row: Sequence[Any], recipients: Sequence[Recipient] = (), events: Sequence[Event] = ()) -> Record:
    """A record from a row of _SUMMARY columns (and `request` after them, when selected)."""
    request = unpack_request(row[13]) if len(row) > 13 else None
    return Record(
        id=row[0],
        created=float(row[1]),
        account=row[2],
        login=row[3],
        listener=row[4],
        peer=row[5],
        mail_from=row[6],
        message_id=row[7],
        subject=row[8],
        size=None if row[9] is None else int(row[9]),
        reply_id=row[10],
        reply=row[11],
        dsn_of=row[12],
        recipients=tuple(recipients),
        events=tuple(events),
        request=request,
    )


def recipient_of(row: Sequence[Any]) -> tuple[str, Recipient]:
    """(msg_id, recipient) from a select_recipients row."""
    return row[0], Recipient(row[1], row[2], float(row[3]), row[4], row[5], row[6])


def event_of(row: Sequence[Any]) -> Event:
    return Event(
        id=row[0],
        at=float(row[1]),
        kind=row[2],
        recipient=row[3],
        call=row[4],
        outcome=row[5],
        upstream_id=row[6],
        detail=row[7],
        actor=row[8],
        data=orjson.loads(row[9]) if row[9] else None,
    )


def page_of(
    rows: Sequence[Sequence[Any]], recipients: dict[str, list[Recipient]], limit: int
) -> tuple[list[Record], Cursor | None]:
    """The page's records and the cursor after its last one (None: no more)."""
    records = [record_of(r, recipients.get(r[0], ())) for r in rows[:limit]]
    more = len(rows) > limit
    return records, Cursor(records[-1].created, records[-1].id) if more and records else None


def tally_messages(p: str) -> str:
    """Messages accepted since {p} by account and login, with the newest one's time."""
    # The window is read from the `created` index in a subquery: given the GROUP BY, SQLite rather walked the
    # whole (account, created) index testing `created` on every row, whatever the window (116 ms for the last
    # hour at 1,000,000 messages, linear in the ledger's size). Its ORDER BY keeps SQLite from flattening the
    # subquery into the grouping query (an aggregate's subquery with ORDER BY is never flattened), and it is
    # the index's own order on both backends.
    return (
        "SELECT account, login, COUNT(*), MAX(created) FROM"
        f" (SELECT account, login, created FROM ledger_messages WHERE created >= {p} ORDER BY created) AS w"
        " GROUP BY account, login"
    )


def tally_recipients(p: str) -> str:
    """Recipients of the messages accepted since {p} by account, login and state."""
    return (
        "SELECT m.account, m.login, r.state, COUNT(*) FROM ledger_recipients r"
        f" JOIN ledger_messages m ON m.id = r.msg_id WHERE r.created >= {p} GROUP BY m.account, m.login, r.state"
    )


def tally_of(since: float, messages: Sequence[Sequence[Any]], recipients: Sequence[Sequence[Any]]) -> Tally:
    return Tally(
        since,
        {(r[0], r[1]): (int(r[2]), float(r[3])) for r in messages},
        {(r[0], r[1], r[2]): int(r[3]) for r in recipients},
    )


# -- retention ----------------------------------------------------------------------------------------------


# A message with a webhook delivery or a notice decision still to make is kept past its retention: pruned
# now, the delivery would never be made nor counted as failed. Each ends by its own max_age (counted there),
# and the message is pruned at the next prune after that.
PENDING = (
    "SELECT msg_id FROM webhook_outbox WHERE state IN ('pending', 'sending')"
    " UNION SELECT msg_id FROM ledger_notices WHERE state IN ('pending', 'claimed')"
)


def expired_ids(table: str, p: str) -> str:
    """Up to {p} message ids with rows in `table` older than {p} (the message's acceptance time), but for those
    with work still pending (PENDING); rows (created, id), oldest first: read them with ids_of.

    Ordered by (created, id) so that both backends walk the table's (created, id) index from its start and stop
    after {p} distinct ids, sorting nothing (shared_schema.SCALE_INDEXES; with `created` alone PostgreSQL sorted
    every expired row for each batch). Without the order SQLite served the DISTINCT by walking the whole table in
    id order, testing `created` on every row: the last call of every prune run (fewer than {p} found) read each
    big table whole, ~9 s at 1,000,000 messages. `created` is selected too because PostgreSQL orders a DISTINCT
    only by what it selects; every row of a message carries the message's acceptance time, so the pairs are the
    ids."""
    column = "id" if table == "ledger_messages" else "msg_id"
    return (
        f"SELECT DISTINCT created, {column} FROM {table} WHERE created < {p} AND {column} NOT IN ({PENDING})"
        f" ORDER BY created, {column} LIMIT {p}"
    )


def ids_of(rows: Sequence[Sequence[Any]]) -> list[str]:
    """The message ids of expired_ids' rows, each once (a message whose rows were written with several
    acceptance times would come once per time)."""
    return list(dict.fromkeys(str(r[1]) for r in rows))


def delete_ids(table: str, p: str, count: int) -> str:
    column = "id" if table == "ledger_messages" else "msg_id"
    return f"DELETE FROM {table} WHERE {column} IN ({_marks(p, count)})"


TABLES = ("ledger_messages", "ledger_recipients", "ledger_events", "webhook_outbox", "ledger_notices")
