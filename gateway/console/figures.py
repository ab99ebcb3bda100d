"""This process's metrics as figures for the console's pages (read through prometheus_client's collect(), the
same numbers a scrape of /metrics gets)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.ops import metrics


def samples(metric: Any, suffix: str = "_total") -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of `metric` whose name ends in `suffix` (`_total`, `_count`, `_sum`, ``)."""
    found = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name == family.name + suffix:
                found.append((dict(sample.labels), float(sample.value)))
    return found


def by(metric: Any, *labels: str, suffix: str = "_total") -> dict[tuple[str, ...], float]:
    """The samples summed by these labels."""
    out: dict[tuple[str, ...], float] = {}
    for values, value in samples(metric, suffix):
        key = tuple(values.get(label, "") for label in labels)
        out[key] = out.get(key, 0.0) + value
    return out


def upstream(accounts: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per account: calls by outcome, rate-limit waits (count, seconds), credential refusals (401/403)."""
    calls = by(metrics.UPSTREAM_SECONDS, "account", "outcome", suffix="_count")
    waits = by(metrics.RATE_LIMIT_WAIT, "account", suffix="_count")
    waited = by(metrics.RATE_LIMIT_WAIT, "account", suffix="_sum")
    refused = by(metrics.UPSTREAM_AUTH_REFUSED, "account")
    out: dict[str, dict[str, float]] = {}
    for account in accounts:
        row = {outcome: n for (a, outcome), n in calls.items() if a == account}
        row["rate_waits"] = waits.get((account,), 0.0)
        row["rate_wait_seconds"] = waited.get((account,), 0.0)
        row["auth_refused"] = refused.get((account,), 0.0)
        out[account] = row
    return out


def refusals() -> list[tuple[str, str, float]]:
    """What clients were refused, most first: (what, why, count): SMTP replies by code, connections refused,
    per-login controls."""
    rows = [("reply", code, n) for (code,), n in by(metrics.REFUSALS, "code").items()]
    rows += [("connection", reason, n) for (reason,), n in by(metrics.CONNECTIONS_REFUSED, "reason").items()]
    rows += [("login control", reason, n) for (reason,), n in by(metrics.LOGIN_REFUSALS, "reason").items()]
    return sorted((r for r in rows if r[2]), key=lambda r: -r[2])
