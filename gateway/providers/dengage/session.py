"""The dEngage API session of one account: one bearer token and one identities list for the process.

Every SMTP session and the retry worker share them. At most one login is in flight; the token is
renewed shortly before it expires (`expires_in`, counted from when the login was sent), and a 401 makes
the next caller log in again. The sender identities (GET /rest/email/froms) are cached for `froms_ttl`
and refreshed in the background; a failed refresh keeps the last list.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson
import structlog

from gateway.core.cache import SingleFlight
from gateway.core.episode import Episode
from gateway.core.errors import Deferred, RateLimited, UpstreamAuthFailed
from gateway.ops.metrics import INTERNAL_ERRORS
from gateway.providers.dengage import wire
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter

log = structlog.get_logger("gateway.dengage")

# After a failed login or froms fetch, callers get that failure for this long instead of a new request
# each: a refused API user must not turn every message into a login attempt.
FAILURE_HOLD = 2.0
# Renew this long before the token expires (clients use 60 s [C]), or a tenth of its lifetime if shorter.
RENEW_MARGIN = 60.0
JSON = {"Accept": "application/json", "Content-Type": "application/json"}


class TokenSource:
    def __init__(
        self,
        account: str,
        http: HttpClient,
        limiter: RateLimiter,
        userkey: str,
        password: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.account = account
        self._http = http
        self._limiter = limiter
        self._body = orjson.dumps(wire.login_body(userkey, password))
        self._clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._login: SingleFlight[None, str] = SingleFlight()
        self._failure: tuple[Deferred, float] | None = None
        self._failing = Episode(clock)
        self.logins = 0  # logins sent by this process (tests and metrics read it)

    async def get(self) -> str:
        """A valid bearer token (logging in first when there is none or it is about to expire)."""
        now = self._clock()
        if self._token is not None and now < self._renew_at:
            return self._token
        if not self._login.running(None) and self._failure is not None and now < self._failure[1]:
            raise self._failure[0].with_traceback(None)
        return await self._login.run(None, self._log_in)

    def invalidate(self, token: str) -> None:
        """dEngage answered 401 with this token: the next caller logs in again (once, for everyone)."""
        if self._token == token:
            self._token = None

    async def _log_in(self) -> str:
        try:
            sent = self._clock()  # before the waits for a connection and a slot: the token's age errs older
            self.logins += 1
            response = await self._http.request(
                "login", "POST", str(wire.WIRE["login"]), headers=JSON, content=self._body, limiter=self._limiter
            )
            token = wire.login_token(response)
        except Deferred as exc:
            if isinstance(exc, RateLimited):
                await self._limiter.penalize(exc.retry_after)
            self._failure = (exc, self._clock() + FAILURE_HOLD)
            if self._failing.occurred():  # once until a login succeeds, not once per try
                log.warning("dengage_login_failed", account=self.account, reason=exc.reason)
            raise
        self._failure = None
        self._token = token.value
        self._renew_at = sent + token.expires_in - min(RENEW_MARGIN, token.expires_in / 10)
        over = self._failing.ended()
        failed = {"failed_logins": over.seen, "failed_for": over.lasted} if over is not None else {}
        log.info("dengage_login", account=self.account, expires_in=token.expires_in, **failed)
        return token.value


class Identities:
    """The account's From identities from GET /rest/email/froms, cached and refreshed."""

    def __init__(
        self,
        account: str,
        fetch: Callable[[], Awaitable[tuple[wire.Identity, ...]]],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.account = account
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._identities: tuple[wire.Identity, ...] | None = None
        self._fresh_until = 0.0
        self._update: SingleFlight[None, tuple[wire.Identity, ...]] = SingleFlight()
        self._failure: tuple[Deferred, float] | None = None
        self._failing = Episode(clock)  # fetches failing: logged when it begins and when it ends

    async def current(self) -> tuple[wire.Identity, ...]:
        """The identities now. Stale ones are returned at once while a refresh runs in the background;
        with none known yet, the caller waits for the first fetch (and gets its failure: a Deferred)."""
        now = self._clock()
        if self._identities is not None:
            if now >= self._fresh_until:
                self._update.start(None, self._background_refresh)
            return self._identities
        if not self._update.running(None) and self._failure is not None and now < self._failure[1]:
            raise self._failure[0].with_traceback(None)
        return await self._update.run(None, self._refresh)

    async def _background_refresh(self) -> tuple[wire.Identity, ...]:
        """A refresh nobody waits for: a bug in it is logged here, once, or it would go unseen."""
        try:
            return await self._refresh()
        except Exception as exc:
            INTERNAL_ERRORS.labels(where="dengage_froms_refresh").inc()
            log.error("dengage_froms_refresh_internal_error", account=self.account, exc_info=exc)
            raise

    async def _refresh(self) -> tuple[wire.Identity, ...]:
        try:
            identities = await self._fetch()
        except Deferred as exc:
            first = self._failing.occurred()
            if self._identities is None:
                # Never fetched: MAIL FROM cannot be checked, so it is a temporary failure (4xx), not a refusal.
                self._failure = (exc, self._clock() + FAILURE_HOLD)
                if first:
                    # Refused credentials or IP allowlist: an operator error, said at error level.
                    fields = {
                        "account": self.account,
                        "reason": exc.reason,
                        "hint": "MAIL FROM is answered 451 until the identities can be fetched",
                    }
                    if isinstance(exc, UpstreamAuthFailed):
                        log.error("dengage_froms_unavailable", **fields)
                    else:
                        log.warning("dengage_froms_unavailable", **fields)
                raise
            # Keep the list we have; try again in a minute at most.
            self._fresh_until = self._clock() + min(self._ttl, 60.0)
            if first:
                log.warning(
                    "dengage_froms_refresh_failed", account=self.account, reason=exc.reason, kept=len(self._identities)
                )
            return self._identities
        if (over := self._failing.ended()) is not None:
            log.info("dengage_froms_available", account=self.account, failed_for=over.lasted, failures=over.seen)
        if identities != self._identities:
            log.info("dengage_froms", account=self.account, identities=[i.address for i in identities])
        self._identities = identities
        self._fresh_until = self._clock() + self._ttl
        self._failure = None
        return identities
