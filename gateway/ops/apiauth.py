"""Bearer tokens for the operator endpoint's API: checked against the configured hashes (scrypt, as
`smtp-gateway hash-password` makes them), failures throttled per client IP as SMTP AUTH's are.

A token that verified once is remembered under a keyed HMAC of it (the key is random per process, so the
cache holds nothing a memory dump could replay elsewhere): scrypt runs once per token per process, and
the comparison of a presented token is then one HMAC and a dict lookup. Failed tokens are not cached:
each costs scrypt, which the per-IP throttle (delay, then lockout) bounds.

Other ways in (console sessions with admin passwords) are meant to sit beside this one, each its own
module, all answering the same question: who is asking (a name), or why not.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Literal

from gateway.auth.passwords import verify_password
from gateway.config import LimitsSettings
from gateway.config.settings import ApiToken
from gateway.limits.clients import AuthGuard, AuthLedger, client_key
from gateway.ops.metrics import API_AUTH

Result = Literal["ok", "missing", "invalid", "locked_out"]


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    name: str | None = None  # the token's configured name, when ok
    retry_after: float = 0.0  # locked out: seconds until the client IP may try again


class TokenAuth:
    def __init__(self, tokens: list[ApiToken], limits: LimitsSettings, shared: AuthLedger | None = None) -> None:
        self._key = os.urandom(32)
        self._tokens = [(t.name, t.token_hash.get_secret_value()) for t in tokens]
        self._verified: dict[bytes, str] = {}  # HMAC(token) -> name; at most one entry per configured token
        # `shared`: the queue's AUTH ledger under the API's own keys (every process and instance on the queue).
        self.guard = AuthGuard(limits, shared=shared)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def configure(self, tokens: list[ApiToken], limits: LimitsSettings) -> None:
        """New tokens (SIGHUP): what was verified under the old ones is forgotten."""
        wanted = [(t.name, t.token_hash.get_secret_value()) for t in tokens]
        if wanted != self._tokens:
            self._tokens = wanted
            self._verified.clear()
        self.guard.configure(limits)

    async def check(self, authorization: str | None, client_ip: str) -> Verdict:
        """`Authorization: Bearer <token>` from `client_ip` (the per-IP throttle's key)."""
        key = client_key(client_ip)
        if not authorization:
            # No token, no guess: not an attempt, though a locked-out client is still told so.
            locked_for = (await self.guard.check(key)).locked_for
            result: Result = "locked_out" if locked_for > 0 else "missing"
            API_AUTH.labels(result=result).inc()
            return Verdict(result, retry_after=max(locked_for, 0.0))
        # The attempt counts toward the lockout from here until its outcome (as SMTP AUTH's do): tokens sent
        # together cannot all pass a check of the failures recorded so far and then all be tried.
        # The shared record first (as SMTP AUTH's `check`): a lockout made or lifted by another process counts here.
        if (locked_for := (await self.guard.check(key)).locked_for) > 0:
            API_AUTH.labels(result="locked_out").inc()
            return Verdict("locked_out", retry_after=locked_for)
        ticket, verdict = await self.guard.begin(key)
        if ticket is None:
            API_AUTH.labels(result="locked_out").inc()
            return Verdict("locked_out", retry_after=verdict.locked_for)
        scheme, _, token = authorization.partition(" ")
        name: str | None = None
        failed = False
        try:
            if verdict.delay:
                await asyncio.sleep(verdict.delay)
            name = await self._verify(token.strip()) if scheme.lower() == "bearer" else None
            failed = name is None
        finally:
            # Also when cancelled (the client went away, no answer given): the attempt is no longer in flight.
            await self.guard.end(ticket, failed)
        if name is None:
            API_AUTH.labels(result="invalid").inc()
            return Verdict("invalid")
        API_AUTH.labels(result="ok").inc()
        return Verdict("ok", name)

    async def _verify(self, token: str) -> str | None:
        if not token:
            return None
        mac = hmac.new(self._key, token.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        name = self._verified.get(mac)
        if name is not None:
            return name
        tokens = list(self._tokens)

        def scrypt() -> str | None:
            # Every configured hash is tried (no early exit on a name): the time says nothing about which.
            found = None
            for candidate, stored in tokens:
                if verify_password(token, stored) and found is None:
                    found = candidate
            return found

        name = await asyncio.to_thread(scrypt)
        if name is not None and tokens == self._tokens:
            self._verified[mac] = name
        return name
