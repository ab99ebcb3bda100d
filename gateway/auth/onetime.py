"""One-time passwords the console issues for its test send: a configured login's password for one AUTH, within
a minute, over a real SMTP session to the gateway's own listener (so the message takes the same way as any
device's). Never cached as a verified login.

Under `serve --workers N` the console of one worker issues the password and the kernel gives its SMTP session
to any worker (SO_REUSEPORT), so the password verifies itself: it carries its login, its expiry and a random
nonce under an HMAC whose key every worker derives from the secret the supervisor shares with them through a
pipe (the TLS session-ticket secret, gateway/smtp/tickets.py). Single use is enforced by each worker (the
nonces it has taken, until they expire on both the wall and the monotonic clock): within the minute the same
password could be taken once by each of the other workers. It never leaves the gateway (the console sends it
over loopback to its own listener), and docs/console.md says so. A single process (no shared secret) uses a
random key of its own."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import struct
import time
from collections.abc import Callable, Sequence

PREFIX = "onetime$"
TTL = 60.0
# Nonces taken and not yet expired that a worker remembers; past it a password is refused (fail closed). The
# console issues one per test send, so this is never reached in use.
MAX_TAKEN = 10_000
_NONCE = 16
_HEAD = struct.Struct(">Q")  # the expiry, in milliseconds of the clock
_MAC = 32


class OneTimeLogins:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        shared: Callable[[], Sequence[bytes]] = tuple,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # `shared`: the secrets the workers share, the newest first, then the one before the last rotation (so
        # a password issued just before a SIGHUP still verifies); none in a single process. The composition
        # root gives gateway.smtp.tickets.shared_secrets.
        # time.time, not monotonic: the expiry is read by another process. Forgetting a taken nonce needs the
        # monotonic clock too (redeem).
        self._clock = clock
        self._monotonic = monotonic
        self._shared = shared
        self._own = os.urandom(32)
        self._taken: dict[bytes, tuple[float, float]] = {}  # nonce -> (its expiry, a monotonic keep-until)

    def _current_keys(self) -> list[bytes]:
        """The keys to verify with, the one to issue with first."""
        shared = self._shared()
        if not shared:
            return [self._own]
        return [hashlib.sha256(b"smtp-gateway one-time logins\0" + secret).digest() for secret in shared]

    @staticmethod
    def _mac(key: bytes, body: bytes) -> bytes:
        return hmac.new(key, body, hashlib.sha256).digest()

    def issue(self, login: str, ttl: float = TTL) -> str:
        """A password `login` may AUTH with once, within `ttl` seconds (in any worker)."""
        expires = int((self._clock() + ttl) * 1000)
        body = _HEAD.pack(expires) + secrets.token_bytes(_NONCE) + login.encode("utf-8", "surrogateescape")
        token = body + self._mac(self._current_keys()[0], body)
        return PREFIX + base64.urlsafe_b64encode(token).decode("ascii")

    def redeem(self, login: str, password: str) -> bool:
        """True once (per worker) for an issued password of `login` still in its time; an issued password is
        used up by any try, for its login or another."""
        if not password.startswith(PREFIX):
            return False
        try:
            token = base64.urlsafe_b64decode(password[len(PREFIX) :].encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            return False
        if len(token) < _HEAD.size + _NONCE + _MAC:
            return False
        body, mac = token[:-_MAC], token[-_MAC:]
        if not any(hmac.compare_digest(self._mac(key, body), mac) for key in self._current_keys()):
            return False  # not issued by this gateway
        (expires_ms,) = _HEAD.unpack_from(body)
        expires = expires_ms / 1000
        nonce = body[_HEAD.size : _HEAD.size + _NONCE]
        now, ticks = self._clock(), self._monotonic()
        if expires <= now:
            return False
        # A taken nonce is forgotten only once its expiry has passed on the wall clock AND its time (at least
        # TTL) has passed on the monotonic one: on the wall clock alone, a clock stepped forward past the
        # expiry (NTP makestep, a VM resumed) let any redeem forget it, and stepped back within the minute
        # the used password logged in again.
        self._taken = {n: (until, keep) for n, (until, keep) in self._taken.items() if until > now or keep > ticks}
        if nonce in self._taken or len(self._taken) >= MAX_TAKEN:
            return False
        self._taken[nonce] = (expires, ticks + max(TTL, expires - now))
        owner = body[_HEAD.size + _NONCE :]
        return hmac.compare_digest(owner, login.encode("utf-8", "surrogateescape"))
