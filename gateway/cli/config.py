"""`smtp-gateway check-config`: validate the configuration, print it (secrets masked), check this machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gateway.cli.common import load, queue_findings, with_config
from gateway.cli.exits import Exit
from gateway.config import masked_dump, preflight


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load(args)
    print(json.dumps(masked_dump(settings), indent=2))
    findings = preflight.accounts(settings)
    if not args.config_only:
        findings += preflight.files(settings)
        findings += queue_findings(settings)
        findings += preflight.ports(preflight.serve_ports(settings), running_gateway_is_ok=True)
        findings += asyncio.run(preflight.dns(settings))
    for finding in findings:
        print(f"smtp-gateway: {finding}", file=sys.stderr)
    problems = sum(f.problem for f in findings)
    if problems:
        print(f"smtp-gateway: {problems} problem(s): `serve` would fail or misbehave", file=sys.stderr)
        return Exit.PROBLEM
    print("configuration OK", file=sys.stderr)
    return Exit.OK


def add_parser(sub: Any) -> None:
    p = with_config(
        sub.add_parser(
            "check-config", help="validate the configuration, print it (secrets masked) and check what serve needs"
        )
    )
    p.add_argument(
        "--config-only",
        action="store_true",
        help="validate the configuration alone, not this machine (files, ports, DNS): for a config "
        "meant for another machine",
    )
    p.set_defaults(func=cmd_check_config)
