"""`smtp-gateway queue ...`: operator commands on the queue, safe while servers run (any backend)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from typing import Any

from gateway.cli.common import add_spool_option, load_for_queue, spool_failure, with_config
from gateway.cli.exits import Exit
from gateway.config import Settings
from gateway.core.errors import SpoolUnavailable
from gateway.delivery.admin import QueueAdmin, operator_name
from gateway.ledger.backends import open_ledger
from gateway.ledger.model import Row
from gateway.ledger.recorder import Recorder
from gateway.ledger.store import LedgerUnavailable
from gateway.queue import codec
from gateway.queue.backends import open_store
from gateway.queue.store import QueueStore


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
    if (
        args.action != "migrate"
        and not settings.delivery.queue_url.startswith("postgres")
        and not (settings.delivery.spool_path.exists())
    ):
        print(f"no queue at {settings.delivery.spool_path}")
        return Exit.OK if args.action in ("list", "dead") else Exit.PROBLEM
    return asyncio.run(_main(settings, args))


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings.delivery, server=False)
    try:
        await store.open()
        return await _act(store, settings, args)
    finally:
        await store.close()


async def _act(store: QueueStore, settings: Settings, args: argparse.Namespace) -> int:
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
        states = ["dead"] if action == "dead" else ["queued", "inflight"]
        rows = await store.list(states, limit=args.limit)
        counts = await store.counts(now)
        if args.json:
            print(json.dumps({"counts": counts, "messages": rows}, indent=2))
            return Exit.OK
        summary = ", ".join(
            f"{state} {c['count']} (oldest {_age(c['oldest_age'])})" for state, c in sorted(counts.items())
        )
        print(f"queue {store.url}: {summary or 'empty'}")
        for line in _table(rows, now, dead=action == "dead"):
            print(line)
        return Exit.OK
    msg_id = args.id.upper()
    if action == "show":
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
    # Each action is recorded in the message's ledger record (who, what, when).
    recorded: list[Row] = []
    admin = QueueAdmin(store, Recorder(recorded.extend, operator_name(), enabled=settings.ledger.enabled))
    if action == "retry":
        ok = await admin.retry(msg_id, now)
        print(f"{msg_id}: {'due now' if ok else 'not queued (unknown, in flight or dead: see requeue)'}")
    elif action == "delete":
        ok = await admin.delete(msg_id)
        print(f"{msg_id}: {'deleted' if ok else 'not deleted (unknown, or its call is running)'}")
    elif action == "requeue":
        ok = await admin.requeue(msg_id, now, settings.delivery.max_lifetime)
        print(f"{msg_id}: {'requeued' if ok else 'not a dead letter'}")
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(action)
    if recorded:
        ledger = open_ledger(settings.delivery)
        try:
            await ledger.write(recorded)
        except LedgerUnavailable as exc:
            print(f"{msg_id}: not recorded in the message ledger: {exc.reason}", file=sys.stderr)
        finally:
            await ledger.close()
    return Exit.OK if ok else Exit.PROBLEM


def add_parser(sub: Any) -> None:
    p = with_config(sub.add_parser("queue", help="inspect and manage the queue (works while servers run)"))
    qsub = p.add_subparsers(dest="action", required=True)
    for name, text in (("list", "queued messages, with counts by state and age"), ("dead", "dead letters")):
        q = qsub.add_parser(name, help=text)
        q.add_argument("--json", action="store_true", help="the counts and the messages as JSON")
        q.add_argument("--limit", type=int, default=1000, help="list at most this many messages")
    qsub.add_parser("migrate", help="apply pending schema migrations (servers also do it at start)")
    for name, text in (
        ("show", "one message with its calls"),
        ("retry", "make a queued message due now"),
        ("delete", "delete a queued message or dead letter"),
        ("requeue", "put a dead letter back in the queue with a fresh lifetime"),
    ):
        qsub.add_parser(name, help=text).add_argument("id", metavar="ID", help="the message's queue id")
    add_spool_option(p)
    p.set_defaults(func=cmd_queue)
