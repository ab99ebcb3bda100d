"""The Logins page: each configured login with its account, its last message and today's (from the ledger,
shared by every instance), its AUTH failures, refusals and credentials in use (this process's counts), its
test mode and quota; and the per-IP lockouts in force, each of which can be lifted."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from gateway.auth.controls import LoginControls
from gateway.console import figures
from gateway.console.runtime import Gateway
from gateway.ledger.model import Query
from gateway.ledger.store import LedgerUnavailable
from gateway.ops import metrics


def midnight(now: float) -> float:
    """The start of today (UTC), when `messages today` begin."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


async def page(gw: Gateway) -> dict[str, Any]:
    now = time.time()
    settings = gw.settings
    controls = LoginControls(settings)
    failures = figures.by(metrics.LOGIN_AUTH_FAILURES, "account", "login")
    refused = figures.by(metrics.LOGIN_REFUSALS, "account", "login", "reason")
    used = figures.by(metrics.LOGIN_CREDENTIALS, "account", "login", "credential")
    last_used = figures.by(metrics.LOGIN_CREDENTIAL_LAST_USED, "account", "login", "credential", suffix="")
    problems: list[str] = []
    today: dict[tuple[str, str | None], dict[str, float]] = {}
    if gw.ledger is not None:
        try:
            today = (await gw.ledger.tally(midnight(now))).by_login()
        except LedgerUnavailable as exc:
            problems.append(f"the message ledger cannot be read now: {exc.reason}")
    rows = []
    for account, account_settings in settings.accounts.items():
        for user in account_settings.configured_users:
            login = user.username
            rules = controls.rules_of(account, login)
            last = today.get((account, login), {}).get("last")
            if last is None and gw.ledger is not None and not problems:
                try:
                    page = await gw.ledger.find(Query(login=login, account=account, limit=1))
                    last = page.records[0].created if page.records else None
                except LedgerUnavailable as exc:
                    problems.append(f"the message ledger cannot be read now: {exc.reason}")
            rows.append(
                {
                    "account": account,
                    "login": login,
                    "last": last,
                    "today": int(today.get((account, login), {}).get("messages", 0)),
                    "failures": int(failures.get((account, login), 0)),
                    "refused": sorted(
                        (r, int(n)) for (a, lg, r), n in refused.items() if (a, lg) == (account, login) and n
                    ),
                    "credentials": sorted(
                        (c, int(n), last_used.get((account, login, c)))
                        for (a, lg, c), n in used.items()
                        if (a, lg) == (account, login)
                    ),
                    "test_mode": rules.test_mode,
                    "quota": rules.quota,
                    "networks": [str(n) for n in rules.networks],
                }
            )
    configured = {(r["account"], r["login"]) for r in rows}
    others = sorted(
        (
            (account, login or "", int(row.get("messages", 0)), row.get("last"))
            for (account, login), row in today.items()
            if (account, login) not in configured
        ),
        key=lambda r: (r[0], r[1]),
    )
    return {
        "rows": rows,
        "others": others,
        "lockouts": await gw.lockouts.in_force(),
        "problems": problems,
        "limits": settings.limits,
    }
