"""The per-IP AUTH lockouts in force, for operators: one interface whatever holds the failures (this process's
AuthGuard, or a store every instance shares), so the console lists and lifts them the same way."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.limits.clients import AuthGuard


@dataclass(frozen=True, slots=True)
class Lockout:
    """A client key held back: `scope` is what it failed at (smtp, api, console); `until` is wall-clock
    time (0: not locked out, only slowed down: `failures` in the window)."""

    scope: str
    client: str
    until: float
    failures: int = 0
    shared: bool = False  # held in a store every instance reads (else: this process only)


class Lockouts(Protocol):
    async def in_force(self) -> list[Lockout]:
        """Client keys locked out now, and those slowed down by recent failures."""
        ...

    async def lift(self, scope: str, client: str) -> bool:
        """Forget a client key's failures and lockout in `scope`. False: none was held."""
        ...


class LocalLockouts:
    """The lockouts of AuthGuards in this process, by scope: what each guard holds. A guard with a shared ledger
    (SMTP on a queue) lists what every process and instance holds; a lift deletes the shared record too."""

    def __init__(self, guards: Callable[[], Sequence[tuple[str, AuthGuard]]], wall: Callable[[], float] = time.time):
        self._guards = guards
        self._wall = wall

    async def in_force(self) -> list[Lockout]:
        now = self._wall()
        found: list[Lockout] = []
        for scope, guard in self._guards():
            # A guard with a shared ledger lists from the shared records (its own while they cannot be read).
            shared = guard.shared is not None
            locked, failing = await guard.held()
            found += [Lockout(scope, key, now + left, shared=shared) for key, left in locked]
            found += [Lockout(scope, key, 0.0, failures, shared) for key, failures in failing]
        return sorted(found, key=lambda lo: (-lo.until, lo.scope, lo.client))

    async def lift(self, scope: str, client: str) -> bool:
        return any([await guard.lift(client) for name, guard in self._guards() if name == scope])
