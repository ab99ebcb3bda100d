"""`smtp-gateway suppression list|remove`: the addresses each account refuses at RCPT TO (hard bounces, not
sent, complaints, the vendor's invalid contacts), in the queue's database, shared by every instance; safe while
servers run (a running server's copy follows within `return_path.suppression_refresh`)."""

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
from gateway.ledger.backends import open_ledger, open_returns
from gateway.ledger.model import address_key, iso
from gateway.ledger.store import LedgerUnavailable


def cmd_suppression(args: argparse.Namespace) -> int:
    settings = load_for_queue(args)
    if not settings.delivery.queue_url and not settings.delivery.spool_path.exists():
        raise Refused([no_queue(settings, " (and so no suppression list)", from_spool=bool(args.spool))])
    refuse_other_files(settings)
    refuse_unreachable_queue(settings)
    try:
        return asyncio.run(_main(settings, args))
    except (sqlite3.DatabaseError, LedgerUnavailable) as exc:
        raise spool_failure(settings, exc) from None


async def _main(settings: Settings, args: argparse.Namespace) -> int:
    ledger = open_ledger(settings.delivery)
    returns = open_returns(ledger)
    try:
        await ledger.open()
        if args.action == "list":
            entries = await returns.suppressions(args.account)
            if args.address:
                entries = [e for e in entries if e.address == address_key(args.address)]
            if args.json:
                print(json.dumps({"suppressions": [e.to_json() for e in entries]}, indent=2))
                return Exit.OK
            for e in entries:
                print(f"{e.account:<12} {e.address:<40} {iso(e.created)}  {e.source:<13} {e.reason}")
            print(f"{len(entries)} suppressed address(es)")
            return Exit.OK
        removed = await returns.unsuppress(args.address, args.account)
        where = f" from account {args.account}" if args.account else ""
        count = "1 entry" if removed == 1 else f"{removed} entries"
        print(f"{args.address}: {'removed' if removed else 'not suppressed'}{where} ({count})")
        return Exit.OK if removed else Exit.PROBLEM
    finally:
        await ledger.close()


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "suppression",
        help="the addresses refused at RCPT TO after hard bounces, not sent, complaints or the vendor's "
        "invalid contacts: list them, remove one (works while servers run)",
        description=__doc__,
    )
    actions = p.add_subparsers(dest="action", required=True)
    listing = with_config(actions.add_parser("list", help="the suppressed addresses, newest first per account"))
    listing.add_argument("--account", type=utf8_text, help="only this account's")
    listing.add_argument("--address", type=utf8_text, help="only this address")
    listing.add_argument("--json", action="store_true", help="JSON for scripts (as the API gives it)")
    remove = with_config(
        actions.add_parser(
            "remove",
            help="take an address off the list (a DMDS invalid contact comes back at the next read of the list "
            "unless DMDS revalidates it)",
        )
    )
    remove.add_argument("address", type=utf8_text, help="the address")
    remove.add_argument("--account", type=utf8_text, help="only from this account's list (default: every account's)")
    for action in (listing, remove):
        add_spool_option(action)
    p.set_defaults(func=cmd_suppression)
