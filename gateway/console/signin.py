"""Console sign-in: an admin's name and password checked against the configured hashes (scrypt, in a thread),
failures throttled per client IP as SMTP AUTH's are (gateway/limits: a delay, then a lockout), shared through the
queue by every process and instance."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Literal

from gateway.auth.passwords import decoy_hash, verify_password
from gateway.config import LimitsSettings
from gateway.config.console import ConsoleAdmin
from gateway.limits.clients import AuthGuard, AuthLedger, client_key

Result = Literal["ok", "invalid", "locked_out"]


@dataclass(frozen=True, slots=True)
class Verdict:
    result: Result
    admin: ConsoleAdmin | None = None
    retry_after: float = 0.0


class AdminSignIn:
    def __init__(self, limits: LimitsSettings, shared: AuthLedger | None = None) -> None:
        # `shared`: the queue's AUTH ledger under the console's own keys, so a lockout (and its lift) holds for
        # every process and instance on the queue, as SMTP AUTH's does.
        self.guard = AuthGuard(limits, shared=shared)
        # Verified when the name is unknown, so a wrong name takes as long as a wrong password: at the cost
        # the admins' hashes use (as SMTP AUTH's), made again when those hashes change (a reload).
        self._decoy: tuple[tuple[str, ...], str] = ((), decoy_hash([]))

    def decoy(self, admins: list[ConsoleAdmin]) -> str:
        """The hash verified for a name that is no admin's: the cost most of `admins`' hashes use."""
        hashes = tuple(a.password_hash.get_secret_value() for a in admins)
        if hashes != self._decoy[0]:
            self._decoy = (hashes, decoy_hash(list(hashes)))
        return self._decoy[1]

    def configure(self, limits: LimitsSettings) -> None:
        self.guard.configure(limits)

    async def locked_for(self, client_ip: str) -> float:
        """How long a client is still locked out (0: it is not), as SMTP AUTH asks before an attempt: the shared
        record read when there is one (a lockout made or lifted by another process counts here)."""
        return max((await self.guard.check(client_key(client_ip))).locked_for, 0.0)

    async def check(self, admins: list[ConsoleAdmin], name: str, password: str, client_ip: str) -> Verdict:
        key = client_key(client_ip)
        # The attempt counts toward the lockout from here until its outcome (as SMTP AUTH's do): guesses sent
        # together cannot all pass a check of the failures recorded so far and then all be tried.
        ticket, verdict = await self.guard.begin(key)
        if ticket is None:
            return Verdict("locked_out", retry_after=verdict.locked_for)
        failed = False
        try:
            if verdict.delay:
                await asyncio.sleep(verdict.delay)
            wanted = name.strip().lower()
            admin = next((a for a in admins if hmac.compare_digest(a.name.lower().encode(), wanted.encode())), None)
            stored = admin.password_hash.get_secret_value() if admin is not None else self.decoy(admins)
            matched = await asyncio.to_thread(verify_password, password, stored)
            failed = admin is None or not matched
        finally:
            # Also when cancelled (the client went away, no answer given): the attempt is no longer in flight.
            locked = await self.guard.end(ticket, failed)
        if failed:
            if locked:
                return Verdict("locked_out", retry_after=self.guard.before(key).locked_for)
            return Verdict("invalid")
        return Verdict("ok", admin)
