"""What each upstream account's recent answers say: up, down (an outage), or refusing our credentials.

The delivery owner reports every attempt here. An account that fails with "unavailable" is down: the
retry worker then probes it with one queued message every `probe_interval` instead of waiting out each
message's backoff, and the first success wakes the whole backlog: the queue drains when the outage
ends, not at each message's next retry. Credential refusals (401/403, dEngage's IP allowlist) are
operator errors: logged at error level once a minute per account, counted, and shown by /readyz until a
call succeeds again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.core.errors import Deferred, RateLimited, UpstreamAuthFailed, UpstreamUnavailable
from gateway.ops.metrics import UPSTREAM_AUTH_REFUSED

log = structlog.get_logger("gateway.delivery")
LOG_EVERY = 60.0


@dataclass
class _State:
    down_since: float | None = None
    refused_since: float | None = None
    refused_reason: str = ""
    last_logged: float = 0.0
    last_probe: float = 0.0


class AccountHealth:
    def __init__(self, accounts: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states = {account: _State() for account in accounts}

    def track(self, accounts: list[str]) -> None:
        """The configured accounts changed (reload): new ones start healthy, removed ones are forgotten."""
        self._states = {account: self._states.get(account) or _State() for account in accounts}

    def succeeded(self, account: str) -> bool:
        """A call was accepted. True when the account was down or refusing: its backlog should go now."""
        state = self._states.setdefault(account, _State())
        recovered = state.down_since is not None or state.refused_since is not None
        if recovered:
            log.info(
                "upstream_recovered",
                account=account,
                down_for=round(self._clock() - (state.down_since or state.refused_since or 0.0), 1),
            )
        state.down_since = state.refused_since = None
        return recovered

    def failed(self, account: str, error: Deferred) -> None:
        state = self._states.setdefault(account, _State())
        now = self._clock()
        if isinstance(error, UpstreamAuthFailed):
            UPSTREAM_AUTH_REFUSED.labels(account=account).inc()
            if state.refused_since is None:
                state.refused_since = now
            state.refused_reason = error.reason
            if now - state.last_logged >= LOG_EVERY:
                state.last_logged = now
                log.error(
                    "upstream_refused_credentials",
                    account=account,
                    reason=error.reason,
                    hint="fix the account's credentials (or the upstream's IP allowlist); messages are queued",
                )
        elif isinstance(error, UpstreamUnavailable) and not isinstance(error, RateLimited) and state.down_since is None:
            state.down_since = now
            log.warning("upstream_down", account=account, reason=error.reason)

    def needs_probe(self, account: str, interval: float) -> bool:
        """Down or refusing for `interval` and not probed for as long: time to try one queued message?
        (Messages also retry on their own schedule; the probe only bounds how long a backlog can wait.)"""
        state = self._states.setdefault(account, _State())
        since = state.down_since if state.down_since is not None else state.refused_since
        if since is None:
            return False
        now = self._clock()
        if now - max(since, state.last_probe) < interval:
            return False
        state.last_probe = now
        return True

    def status(self) -> list[tuple[str, str, float, str]]:
        """Each account as its last answers left it: `ok`, `down` (an outage) or `refused` (our credentials),
        for how many seconds, and the refusal's reason."""
        now = self._clock()
        found = []
        for account, s in self._states.items():
            if s.refused_since is not None:
                found.append((account, "refused", now - s.refused_since, s.refused_reason))
            elif s.down_since is not None:
                found.append((account, "down", now - s.down_since, ""))
            else:
                found.append((account, "ok", 0.0, ""))
        return found

    def problems(self) -> list[str]:
        """Why this instance is not ready (for /readyz), or [] when every account is fine."""
        return [
            f"{account}: upstream refuses the gateway's credentials ({s.refused_reason})"
            for account, s in self._states.items()
            if s.refused_since is not None
        ]
