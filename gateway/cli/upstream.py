"""`smtp-gateway check-upstream [ACCOUNT]`: harmless read-only calls against each account's real API (or one
account's), and per account a table: reached, authenticated, answer shape recognised (with the key names that
matched and those not expected), campaigns or identities found against those configured, what to fix."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

from gateway.cli.common import load, with_config
from gateway.cli.exits import Exit
from gateway.config import ConfigError, Settings

if TYPE_CHECKING:
    from gateway.providers.checks import AccountCheck, CallCheck


def cmd_check_upstream(args: argparse.Namespace) -> int:
    from gateway.ops import logs

    settings = load(args)
    logs.configure(settings.log)  # to stderr: the report is stdout's
    names = [args.account] if args.account else list(settings.accounts)
    unknown = [name for name in names if name not in settings.accounts]
    if unknown:
        raise ConfigError(
            f"no account {unknown[0]!r} in the configuration (accounts: {', '.join(settings.accounts) or 'none'})"
        )
    if not names:
        print("smtp-gateway: no [accounts.<name>] configured: nothing to check", file=sys.stderr)
        return Exit.PROBLEM
    reports = asyncio.run(check_accounts(settings, names))
    if args.json:
        print(json.dumps([_as_json(r) for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return Exit.OK if all(r.ok for r in reports) else Exit.PROBLEM


async def check_accounts(settings: Settings, names: list[str]) -> list[AccountCheck]:
    """Each account's checks, one account after the other (each with its own HTTP client, closed after)."""
    from gateway.providers import registry

    reports = []
    for name in names:
        account = settings.accounts[name]
        provider = registry.build(name, account)
        try:
            report = await provider.check_upstream()
        finally:
            await provider.aclose()
        report.provider = registry.spec_for(account).label
        reports.append(report)
    return reports


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "NO"


def _row(call: CallCheck) -> list[str]:
    status = f"HTTP {call.status}" if call.status is not None else "no answer"
    return [call.call, status, _yes(call.reached), _yes(call.authenticated), _yes(call.recognised), call.read or "-"]


def format_report(report: AccountCheck) -> str:
    verdict = "OK" if report.ok else f"{len(report.fixes) or 1} problem(s)"
    lines = [f"account {report.account} ({report.provider}, {report.base_url}): {verdict}"]
    rows = [["call", "answer", "reached", "authenticated", "recognised", "read as"], *map(_row, report.calls)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append(
            "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        )
    for call in report.calls:
        if call.unexpected:
            lines.append(f"  {call.call}: keys not expected: {', '.join(call.unexpected)}")
    if report.things:
        lines.append(f"  {report.things} configured: {', '.join(report.configured) or 'none'}")
        lines.append(f"  {report.things} found: {', '.join(report.found) or 'none'}")
    if report.fixes:
        lines.append("  to fix:")
        lines += [f"  - {fix}" for fix in report.fixes]
    return "\n".join(lines)


def _as_json(report: AccountCheck) -> dict[str, Any]:
    data = dataclasses.asdict(report)
    data["ok"] = report.ok
    for call, raw in zip(report.calls, data["calls"], strict=True):
        raw["ok"] = call.ok
    return data


def add_parser(sub: Any) -> None:
    p = with_config(
        sub.add_parser(
            "check-upstream",
            help="harmless read-only calls against each account's API: reached, authenticated, answers understood, "
            "campaigns or identities found against the configuration",
        )
    )
    p.add_argument("account", nargs="?", help="only this account (default: every account)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check_upstream)
