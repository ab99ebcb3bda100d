"""`smtp-gateway status <id | message-id | address>`: what became of a message, from the message ledger.

Exit status: 0 found, 1 nothing found (or the ledger cannot be read), 2 usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
from typing import Any

from gateway.cli.common import (
    Refused,
    add_spool_option,
    load_for_queue,
    no_queue,
    refuse_other_files,
    refuse_unreachable_queue,
    spool_failure,
    utf8_text,
    with_config,
)
from gateway.cli.exits import Exit
from gateway.config import Settings
from gateway.ledger.backends import open_ledger
from gateway.ledger.model import MAX_LIMIT
from gateway.ledger.store import LedgerUnavailable


def cmd_status(args: argparse.Namespace) -> int:
    settings = load_for_queue(args)
    if not settings.delivery.queue_url and not settings.delivery.spool_path.exists():
        raise Refused([no_queue(settings, " (and so no message ledger)", from_spool=bool(args.spool))])
    refuse_other_files(settings)
    refuse_unreachable_queue(settings)
    try:
        return asyncio.run(_main(settings, args))
    except (sqlite3.DatabaseError, LedgerUnavailable) as exc:
        raise spool_failure(settings, exc) from None


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.ledger import render  # the lookups and their rendering: only for this command
    from gateway.ledger.query import lookup

    store = open_ledger(settings.delivery)
    try:
        found = await lookup(store, args.query, args.limit)
        if found is None:
            if args.json:
                print(json.dumps({"found": None, "messages": []}))
            else:
                print(f"{args.query}: no message in the ledger (kept {settings.ledger.retention / 86400:g} days)")
            return Exit.PROBLEM
        records = found.records
        one = len(records) == 1 and found.by in ("id", "reply_id", "upstream_id", "message_id")
        if one:
            full = await store.get(records[0].id)
            records = [full] if full is not None else records
        if args.json:
            out: dict[str, Any] = {"found": found.by, "more": found.more}
            out["messages"] = [r.to_json(full=one) for r in records]
            print(json.dumps(out, indent=2))
            return Exit.OK
        if one:
            print("\n".join(render.record(records[0])))
        else:
            print(f"{len(records)} message(s) by {found.by.replace('_', ' ')}, newest first:")
            for r in records:
                print(render.headline(r))
            if found.more:
                print(f"(more: --limit {min(args.limit * 2, MAX_LIMIT)}, or the API's paging)")
        return Exit.OK
    finally:
        await store.close()


def _limit(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_LIMIT}")
    return value


def add_parser(sub: Any) -> None:
    p = with_config(
        sub.add_parser(
            "status",
            help="what became of a message: by the id its 250 named, its local id, an upstream id, its "
            "Message-ID, or a recipient's or sender's address (works while servers run)",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    p.add_argument("query", type=utf8_text, help="an id, a Message-ID, or an address")
    p.add_argument("--json", action="store_true", help="JSON for scripts (as the API gives it)")
    p.add_argument("--limit", type=_limit, default=20, help="at most this many messages for an address (20)")
    add_spool_option(p)
    p.set_defaults(func=cmd_status)
