"""`smtp-gateway queue ...`: operator commands on the queue, safe while servers run (any backend)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.backup import backup, refuse_postgres
from gateway.cli.common import (
    Refused,
    add_spool_option,
    load_for_queue,
    no_queue,
    queue_named,
    refuse_other_files,
    refuse_unreachable_queue,
    spool_failure,
    utf8_text,
    with_config,
)
from gateway.cli.exits import Exit
from gateway.config import Settings
from gateway.core.errors import SpoolUnavailable
from gateway.ledger.backends import open_ledger
from gateway.ledger.model import Row
from gateway.ledger.recorder import Recorder
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import codec
from gateway.queue.backends import open_store
from gateway.queue.store import QueueStore

if TYPE_CHECKING:
    from gateway.delivery.admin import Selection


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _table(rows: list[dict[str, Any]], now: float, dead: bool) -> list[str]:
    lines = []
    for r in rows:
        calls = f"{r['open_calls']}/{r['calls']}"
        if dead:
            tail = f"dead {_age(now - (r['dead_at'] or now))} ago: {r['dead_reason']}"
        else:
            due = r["next_attempt"] - now
            tail = f"next {'now' if due <= 0 else 'in ' + _age(due)}" + (
                f"  last error: {r['last_error']}" if r["last_error"] else ""
            )
        lines.append(
            f"{r['id']}  {r['state']:<8} age {_age(now - r['created']):>6}  tries {r['attempts']:>2}"
            f'  calls open {calls}  from {r["mail_from"]}  "{r["subject"]}"  {tail}'
        )
    return lines


def cmd_queue(args: argparse.Namespace) -> int:
    settings = load_for_queue(args)
    try:
        return run(settings, args)
    except (sqlite3.DatabaseError, SpoolUnavailable) as exc:
        raise spool_failure(settings, exc) from None


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "backup" and settings.delivery.queue_url:
        raise refuse_postgres(queue_named(settings))
    if not settings.delivery.queue_url.startswith("postgres") and not settings.delivery.spool_path.exists():
        # Exit 1 for list and dead too: "nothing queued" would hide a queue at another path (a relative
        # delivery.spool_path read from another directory than serve's). And for migrate: it would create an
        # empty queue there and report "0 -> N" while the real one waits for its migration at the next start.
        raise Refused([no_queue(settings, from_spool=bool(args.spool))])
    refuse_other_files(settings)
    if args.action == "backup":
        return _backup(settings, args)
    # One connection attempt and its one line, as status and suppression: the store's own open would also log
    # queue_database_unreachable (its circuit, for serve) on the operator's terminal.
    refuse_unreachable_queue(settings)
    return asyncio.run(_main(settings, args))


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    source, dest = settings.delivery.spool_path, Path(args.dest)
    size = backup(source, dest, args.force)
    print(f"queue {source.absolute()}: backed up to {dest.absolute()} ({size} bytes)")
    return Exit.OK


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.delivery, server=False)
    try:
        await store.open()
        return await _act(store, settings, args)
    finally:
        await store.close()


async def _act(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
    from gateway.delivery.admin import QueueAdmin, operator_name  # only for this command

    now = time.time()
    action = args.action
    if action == "migrate":
        before, after = await store.migrate()
        print(
            f"queue {store.url}: schema version {before} -> {after}"
            if before != after
            else f"queue {store.url}: schema version {after}, up to date"
        )
        return Exit.OK
    if action in ("list", "dead"):
        selection = _selection(args, dead=action == "dead")
        notes: dict[str, Any] = {}
        if _filtered(selection):
            ledger = open_ledger(settings.delivery)
            try:
                # One more than shown: the count line says when more match than --limit lets it show.
                listing = await QueueAdmin(store, Recorder(lambda rows: None, "", enabled=False), ledger).select(
                    selection, now, args.limit + 1
                )
            finally:
                await ledger.close()
            items = listing.items[: args.limit]
            rows = [dict(item.row, login=item.login, recipients=list(item.recipients)) for item in items]
            notes = {
                "more": len(listing.items) > len(items),
                "scanned": listing.scanned,
                "truncated": listing.truncated,
            }
        else:
            rows = await store.list(list(selection.states), limit=args.limit)
        counts = await store.counts(now)
        if args.json:
            print(json.dumps({"counts": counts, "messages": rows, **notes}, indent=2))
            return Exit.OK
        summary = ", ".join(
            f"{state} {c['count']} (oldest {_age(c['oldest_age'])})" for state, c in sorted(counts.items())
        )
        print(f"queue {store.url}: {summary or 'empty'}")
        if _filtered(selection):
            print(f"matching {selection.describe()}: {_matched(len(rows), notes)}")
        for line in _table(rows, now, dead=action == "dead"):
            print(line)
        return Exit.OK
    if action == "show":
        msg_id = args.id.upper()
        info = await store.show(msg_id)
        if info is None:
            print(f"{msg_id}: not in the queue")
            return Exit.PROBLEM
        blob = await store.submission(msg_id)
        if blob is not None:
            try:
                sub = codec.decode(blob, None)  # names and types; large contents are not loaded
                info["rcpt_tos"] = list(sub.rcpt_tos)
                info["attachments"] = [a.filename for a in sub.message.attachments]
            except codec.CodecError as exc:
                info["decode_error"] = str(exc)
        print(json.dumps(info, indent=2, default=str))
        return Exit.OK
    # Each action is recorded in the message's ledger record (who, what, when). Each id is its own transaction:
    # its line is printed as soon as it is done, and what was done is written to the ledger whatever stops the
    # ids after it (a lock wait, an outage, Ctrl-C), else a deleted message would stay `deferred` there.
    recorded: list[Row] = []
    admin = QueueAdmin(store, Recorder(recorded.extend, operator_name(), enabled=settings.ledger.enabled))
    told: list[str] = []

    def say(msg_id: str, done: bool) -> None:
        told.append(msg_id)
        print(f"{msg_id}: {OUTCOMES[action][done]}", flush=True)

    try:
        results = await admin.act(action, args.ids, now, settings.delivery.max_lifetime, each=say)
    except BaseException:
        left = [i.upper() for i in args.ids[len(told) :]]
        if left:  # the ids above it are said; this one's own transaction may or may not have committed
            more = f" and the {len(left) - 1} after it" if len(left) > 1 else ""
            print(f"smtp-gateway: stopped at {left[0]}: it{more} not known to be done (queue show ID)", file=sys.stderr)
        raise
    finally:
        await _record(settings, recorded)
    return Exit.PROBLEM if results.skipped else Exit.OK


async def _record(settings: Settings, recorded: list[Row]) -> None:
    if not recorded:
        return
    ledger = open_ledger(settings.delivery)
    try:
        await ledger.write(recorded)
    except LedgerUnavailable as exc:
        print(f"not recorded in the message ledger: {exc.reason}", file=sys.stderr)
    finally:
        await ledger.close()


def _matched(shown: int, notes: dict[str, Any]) -> str:
    """The count line's tail, as the console says it: whether --limit cut the list, whether the scan stopped
    at its cap (younger messages were not read)."""
    text = f"{shown} shown, the oldest: more match (raise --limit)" if notes["more"] else str(shown)
    if notes["truncated"]:
        text += f"; only the oldest {notes['scanned']} were read: narrow the filters to reach younger ones"
    return text


# What each action says of one message: (not done, done).
OUTCOMES = {
    "retry": ("not queued (unknown, in flight or dead: see requeue)", "due now"),
    "delete": ("not deleted (unknown, or its call is running)", "deleted"),
    "requeue": ("not a dead letter", "requeued"),
}


# The most `--limit` takes: beyond it a listing is for a database query, not a terminal or a script's page.
MAX_LIST = 100_000


def _limit(text: str) -> int:
    """`--limit`: 0, a negative or a huge count is a usage error (exit 2) as `status --limit` is: SQLite took -1
    as no limit, PostgreSQL refused it with a traceback, and 0 listed nothing without saying so."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:20]!r}") from None
    if not 1 <= value <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_LIST}")
    return value


def _age_option(text: str) -> float:
    """`--older-than`: a bad value is a usage error (exit 2, argparse's message), like `--limit abc`."""
    from gateway.delivery.admin import BadSelection, parse_age

    try:
        return parse_age(text)
    except BadSelection as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _selection(args: argparse.Namespace, dead: bool) -> Selection:
    from gateway.delivery.admin import Selection

    return Selection(dead, args.account, args.login, args.domain, args.reason, args.older_than)


def _filtered(selection: Selection) -> bool:
    from gateway.delivery.admin import Selection

    return selection != Selection(selection.dead)


def add_parser(sub: Any) -> None:
    p = with_config(sub.add_parser("queue", help="inspect and manage the queue (works while servers run)"))
    qsub = p.add_subparsers(dest="action", required=True)
    for name, text in (("list", "queued messages, with counts by state and age"), ("dead", "dead letters")):
        q = qsub.add_parser(name, help=text)
        q.add_argument("--json", action="store_true", help="the counts and the messages as JSON")
        q.add_argument("--limit", type=_limit, default=1000, help=f"list at most this many messages (1 to {MAX_LIST})")
        q.add_argument("--account", type=utf8_text, help="only messages of this account")
        q.add_argument(
            "--login", type=utf8_text, help="only messages sent by this login (as the message ledger recorded it)"
        )
        q.add_argument(
            "--domain", type=utf8_text, help="only messages with a recipient in this domain (or a subdomain of it)"
        )
        q.add_argument(
            "--reason",
            type=utf8_text,
            help="only messages whose last error (dead letters: reason) contains these words",
        )
        q.add_argument(
            "--older-than",
            metavar="AGE",
            type=_age_option,
            help="only messages accepted longer ago than AGE (30m, 2h, 1d)",
        )
    qsub.add_parser(
        "migrate",
        help="apply pending schema migrations to the existing queue (servers also do it at start; a SQLite file "
        "that does not exist is not created: exit 1 naming the path looked at)",
    )
    q = qsub.add_parser(
        "backup",
        help="a consistent copy of the SQLite queue in DEST, taken while servers run (SQLite's online backup; "
        "DEST appears only whole; a missing queue file or one that is not a queue is refused, untouched; a "
        "PostgreSQL queue is refused: back it up with pg_dump)",
    )
    q.add_argument(
        "dest",
        metavar="DEST",
        help="the backup file to write (refused if it exists, unless --force; always if it is the queue or its files)",
    )
    q.add_argument("--force", action="store_true", help="replace DEST if it exists")
    qsub.add_parser("show", help="one message with its calls").add_argument(
        "id", metavar="ID", type=utf8_text, help="the message's queue id"
    )
    for name, text in (
        ("retry", "make queued messages due now"),
        ("delete", "delete queued messages or dead letters"),
        ("requeue", "put dead letters back in the queue with a fresh lifetime"),
    ):
        qsub.add_parser(name, help=text).add_argument(
            "ids", metavar="ID", nargs="+", type=utf8_text, help="the messages' queue ids"
        )
    add_spool_option(p)
    p.set_defaults(func=cmd_queue)
