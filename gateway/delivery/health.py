"""What each upstream account's recent answers say: up, down (an outage), or refusing our credentials.

The delivery owner reports every attempt here. An account that fails with "unavailable" is down: the
retry worker then probes it with one queued message every `probe_interval` instead of waiting out each
message's backoff, and the first success wakes the whole backlog: the queue drains when the outage
ends, not at each message's next retry. Credential refusals (401/403, dEngage's IP allowlist) are
operator errors: counted, logged at error level when they begin, and shown by /readyz until a call
succeeds again. Each state is logged once when it begins and once when it ends, with what happened
meanwhile; an upstream failing now and then (a call in three answering 500) is no outage: `upstream_down`
waits for DOWN_AFTER_FAILURES failures in a row over DOWN_AFTER seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.core.episode import Episode
from gateway.core.errors import Deferred, RateLimited, UpstreamAuthFailed, UpstreamUnavailable
from gateway.ops.metrics import UPSTREAM_AUTH_REFUSED

log = structlog.get_logger("gateway.delivery")
# An outage worth a log line: this many calls failed with no success between them, over at least this long.
DOWN_AFTER_FAILURES = 3
DOWN_AFTER = 2.0


@dataclass
class _State:
    down: Episode  # calls failing as unavailable, none succeeding since the first
    refused: Episode  # the upstream refusing the gateway's credentials
    refused_reason: str = ""
    announced: bool = False  # `upstream_down` was logged for this outage
    last_probe: float = 0.0


class AccountHealth:
    def __init__(self, accounts: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states = {account: self._new() for account in accounts}

    def _new(self) -> _State:
        return _State(Episode(self._clock), Episode(self._clock))

    def _state(self, account: str) -> _State:
        state = self._states.get(account)
        if state is None:
            state = self._states[account] = self._new()
        return state

    def track(self, accounts: list[str]) -> None:
        """The configured accounts changed (reload): new ones start healthy, removed ones are forgotten."""
        self._states = {account: self._states.get(account) or self._new() for account in accounts}

    def credentials_accepted(self, account: str) -> None:
        """A lookup the upstream answered with our credentials (dEngage's identities): a refusal is over. An
        outage is not: only a delivery call ends it (a lookup's endpoint may be up while sending is down)."""
        if (refused := self._state(account).refused.ended()) is not None:
            log.info("upstream_recovered", account=account, refused_for=refused.lasted, refusals=refused.seen)

    def succeeded(self, account: str) -> bool:
        """A call was accepted. True when the account was down or refusing: its backlog should go now."""
        state = self._state(account)
        down, refused = state.down.ended(), state.refused.ended()
        counts: dict[str, float] = {}
        if down is not None and state.announced:
            counts.update(down_for=down.lasted, failures=down.seen)
        if refused is not None:
            counts.update(refused_for=refused.lasted, refusals=refused.seen)
        if counts:
            # The end of an outage or of a refusal, with what failed while it lasted.
            log.info("upstream_recovered", account=account, **counts)
        state.announced = False
        return down is not None or refused is not None

    def failed(self, account: str, error: Deferred) -> None:
        state = self._state(account)
        if isinstance(error, UpstreamAuthFailed):
            UPSTREAM_AUTH_REFUSED.labels(account=account).inc()
            state.refused_reason = error.reason
            if state.refused.occurred():
                log.error(
                    "upstream_refused_credentials",
                    account=account,
                    reason=error.reason,
                    hint="fix the account's credentials (or the upstream's IP allowlist); messages are queued",
                )
        elif isinstance(error, UpstreamUnavailable) and not isinstance(error, RateLimited):
            down = state.down
            down.occurred()
            assert down.since is not None
            lasted = self._clock() - down.since
            if not state.announced and down.seen >= DOWN_AFTER_FAILURES and lasted >= DOWN_AFTER:
                state.announced = True
                log.warning(
                    "upstream_down", account=account, reason=error.reason, failures=down.seen, since=round(lasted, 1)
                )

    def needs_probe(self, account: str, interval: float) -> bool:
        """Down or refusing for `interval` and not probed for as long: time to try one queued message?
        (Messages also retry on their own schedule; the probe only bounds how long a backlog can wait.)"""
        state = self._state(account)
        since = state.down.since if state.down.since is not None else state.refused.since
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
            if s.refused.since is not None:
                found.append((account, "refused", now - s.refused.since, s.refused_reason))
            elif s.down.since is not None:
                found.append((account, "down", now - s.down.since, ""))
            else:
                found.append((account, "ok", 0.0, ""))
        return found

    def degraded(self) -> list[str]:
        """Accounts whose upstream refuses the gateway's credentials (for /readyz and /healthz), or [] when
        every account is fine. Degraded, not unready: the key is every instance's, so another instance would
        be refused the same, while this one still queues messages with a 250 until the key works again."""
        return [
            f"{account}: upstream refuses the gateway's credentials ({s.refused_reason})"
            for account, s in self._states.items()
            if s.refused.active
        ]
