"""`smtp-gateway check-domains`: a DNS report on every permitted sender domain and its return-path."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from gateway.cli.common import load, with_config
from gateway.cli.exits import Exit


def cmd_check_domains(args: argparse.Namespace) -> int:
    from gateway.ops import logs
    from gateway.policy.dns import DnsResolver
    from gateway.policy.domaincheck import check_domains, format_table, to_json

    settings = load(args)
    logs.configure(settings.log)  # to stderr: the report is stdout's
    d = settings.dns
    resolver = DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)
    if args.domains:
        pairs = {
            dom.lower(): rp or f"dmds-{dom.split('.')[0]}@nl.{dom}"
            for dom, _, rp in (item.partition("=") for item in args.domains)
        }
    else:
        pairs = {dom: rp for account in settings.accounts.values() for dom, rp in account.return_paths().items()}
    if not pairs:
        print(
            "smtp-gateway: no sender_domains configured: add [accounts.<name>.sender_domains] to the config file "
            "(--config FILE), or name domains: smtp-gateway check-domains DOMAIN[=RETURN_PATH]",
            file=sys.stderr,
        )
        return Exit.PROBLEM
    reports = asyncio.run(check_domains(resolver, pairs))
    print(to_json(reports) if args.json else format_table(reports))
    return Exit.OK if all(r.ok for r in reports) else Exit.PROBLEM


def add_parser(sub: Any) -> None:
    p = with_config(sub.add_parser("check-domains", help="DNS report on every permitted sender domain"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "domains",
        nargs="*",
        metavar="DOMAIN[=RETURN_PATH]",
        help="check these instead of the configured sender domains",
    )
    p.set_defaults(func=cmd_check_domains)
