"""One-time passwords the console issues for its test send: a configured login's password for one AUTH, within
a minute, over a real SMTP session to the gateway's own listener (so the message takes the same way as any
device's). Kept as keyed HMACs in this process; never cached as a verified login."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable

PREFIX = "onetime$"
TTL = 60.0
MAX_PENDING = 100


class OneTimeLogins:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = os.urandom(32)
        self._clock = clock
        self._pending: dict[bytes, tuple[str, float]] = {}  # HMAC(password) -> (login, expires)

    def _mac(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def issue(self, login: str, ttl: float = TTL) -> str:
        """A password `login` may AUTH with once, within `ttl` seconds."""
        now = self._clock()
        self._pending = {mac: held for mac, held in self._pending.items() if held[1] > now}
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        password = PREFIX + secrets.token_urlsafe(32)
        self._pending[self._mac(password)] = (login, now + ttl)
        return password

    def redeem(self, login: str, password: str) -> bool:
        """True once for an issued password of `login` still in its time (it is used up either way)."""
        if not password.startswith(PREFIX):
            return False
        held = self._pending.pop(self._mac(password), None)
        if held is None:
            return False
        return hmac.compare_digest(held[0].encode(), login.encode()) and held[1] > self._clock()
