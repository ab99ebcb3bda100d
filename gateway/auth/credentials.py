"""Login verification: configured users (scrypt hashes) and each provider's own login styles, cached."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from gateway.auth.onetime import OneTimeLogins
from gateway.auth.passwords import decoy_hash, verify_any, verify_password
from gateway.config.base import AccountBase, UserSettings
from gateway.core.cache import AsyncCache, Fresh
from gateway.core.errors import Deferred
from gateway.core.model import Principal
from gateway.providers.base import Provider


class AuthFailed(Exception):
    """The credentials are wrong (535). `reason`: why, when it is more than a wrong password (a password past
    its expiry: "expired password 2026"). It carries no username: a refused username may be a password typed
    in the wrong field, so its str() and repr() (a traceback, a future `reason=str(exc)`) must not hold it;
    the handler logs the login it checked as a fingerprint (handler.py's _loggable)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(f"credentials refused ({reason})" if reason else "credentials refused")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Refused:
    """A cached refusal, with its reason (see AuthFailed)."""

    reason: str = ""


class AuthUnavailable(Exception):
    """The credentials cannot be checked now (454): the upstream lookup failed temporarily."""

    def __init__(self, reason: str, label: str | None = None) -> None:
        super().__init__(reason)
        self.label = label


# The credential label of a login by a one-time password of the console's test send.
CONSOLE_CREDENTIAL = "console-test"
# Verified pairs kept, and refusals kept, each at most: refusals have a segment of their own, so a
# credential-stuffing flood of failed logins evicts older refusals, never the entry of a login that works.
CACHE_ENTRIES = 50_000


class Authenticator:
    """Turns (username, password) into a Principal.

    A verified pair is cached under an HMAC of the pair with a per-process random key, so the cache
    holds no password and a repeat login costs one dict lookup instead of an scrypt hash or an HTTP
    round trip. Refusals are cached too (for the account's negative_cache_ttl). Concurrent checks of the
    same pair share one verification.
    """

    def __init__(
        self,
        accounts: Mapping[str, AccountBase],
        providers: Mapping[str, Provider],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        onetime: OneTimeLogins | None = None,
    ) -> None:
        self._accounts = accounts
        self._onetime = onetime
        self._wall = wall
        self._providers = providers
        self._secret = os.urandom(32)
        self._cache: AsyncCache[bytes, Principal | Refused] = AsyncCache(
            CACHE_ENTRIES, negative=lambda found: isinstance(found, Refused), clock=clock
        )
        self._users: dict[str, tuple[str, UserSettings]] = {
            user.username: (name, user) for name, account in accounts.items() for user in account.configured_users
        }
        # Verified for a username that is no login: as slow as a wrong password (see decoy_hash).
        self._decoy = decoy_hash(
            [entry.hash.get_secret_value() for _, user in self._users.values() for entry, _ in user.credentials()]
        )
        # A configured user's Principal depends on this configuration alone (a reload makes a new
        # Authenticator): built once, not for every trusted-network session.
        self._user_principals: dict[str, Principal] = {}

    def knows(self, username: str) -> bool:
        """Whether `username` is a configured user or has one of the providers' login shapes (so it is a
        login, safe to log, and not a password typed into the wrong field)."""
        return username in self._users or any(p.owns_login(username) for p in self._providers.values())

    def owner(self, username: str) -> tuple[str, UserSettings | None] | None:
        """The account a username belongs to, and its configured user (None: a login its provider checks);
        None when it is no login at all."""
        if username in self._users:
            return self._users[username]
        for name, provider in self._providers.items():
            if provider.owns_login(username):
                return name, None
        return None

    def principal_for_user(self, username: str) -> Principal | None:
        """The Principal of a configured user (for trusted-network clients that do not AUTH, and token
        logins); None when `username` is no configured user (a token's claim may name anyone)."""
        principal = self._user_principals.get(username)
        if principal is None:
            found = self._users.get(username)
            if found is None:
                return None
            principal = self._user_principals[username] = self._user_principal(*found)
        return principal

    def _user_principal(self, account: str, user: UserSettings) -> Principal:
        return Principal(
            account=account,
            login=user.username,
            allowed_senders=tuple(s.lower() for s in user.allowed_senders),
            default_from=user.default_from,
            force_from=user.force_from,
            extra=self._providers[account].user_extra(user),
        )

    async def authenticate(self, username: str, password: str) -> Principal:
        # The console's test send (auth/onetime.py): checked before the cache, which must never hold it.
        if self._onetime is not None:
            user = self.principal_for_user(username)  # (a one-time password is issued to configured users)
            if user is not None and self._onetime.redeem(username, password):
                return replace(user, credential=CONSOLE_CREDENTIAL)
        key = hmac.new(self._secret, f"{username}\0{password}".encode(), hashlib.sha256).digest()
        found = await self._cache.get(key, lambda: self._check(username, password))
        if isinstance(found, Refused):
            raise AuthFailed(found.reason)
        return found

    def label(self, username: str) -> str:
        """The username as logs may show it: a provider's secret used as a username (the dEngage API
        user's userkey) is replaced by a name for it."""
        for provider in self._providers.values():
            shown = provider.login_label(username)
            if shown != username:
                return shown
        return username

    async def _check(self, username: str, password: str) -> Fresh[Principal | Refused]:
        found = await self._verify(username, password)
        principal = found if isinstance(found, Principal) else None
        account = self._accounts.get(principal.account) if principal else self._account_of(username)
        ttl = 30.0  # an unknown username: remember the refusal briefly
        if account is not None:
            ttl = account.credential_cache_ttl if principal else account.negative_cache_ttl
        if principal is not None and principal.credential_expires is not None:
            ttl = min(ttl, principal.credential_expires - self._wall())  # not kept past its credential's end
        return Fresh(found, ttl)

    def _account_of(self, username: str) -> AccountBase | None:
        if username in self._users:
            return self._accounts[self._users[username][0]]
        for name, provider in self._providers.items():
            if provider.owns_login(username):
                return self._accounts[name]
        return None

    async def _verify(self, username: str, password: str) -> Principal | Refused:
        if username in self._users:
            return await self._verify_user(*self._users[username], password)
        owned = False
        for provider in self._providers.values():
            if not provider.owns_login(username):
                continue
            owned = True
            try:
                principal = await provider.verify_login(username, password)
            except Deferred as exc:
                raise AuthUnavailable(exc.reason, provider.login_label(username)) from exc
            if principal is not None:
                return principal
        if not owned:
            await self._decoy_check(password)
        return Refused()

    async def _decoy_check(self, password: str) -> None:
        """For a name that is no login: the work of a wrong password (one hash of the configured cost, off the
        loop as theirs), so that the refusal's timing does not tell which logins exist."""
        await asyncio.to_thread(verify_password, password, self._decoy)

    async def _verify_user(self, account: str, user: UserSettings, password: str) -> Principal | Refused:
        """A configured user's password against its entries in force; then, only to say why it is refused,
        against those past their expiry (a device still using a password that has been retired)."""
        now = self._wall()
        entries = [(entry, label, entry.expires_at) for entry, label in user.credentials()]
        live = [(label, at) for _, label, at in entries if at is None or at > now]
        expired = [label for _, label, at in entries if at is not None and at <= now]
        hashes = [entry.hash.get_secret_value() for entry, _, at in entries if at is None or at > now]
        hashes += [entry.hash.get_secret_value() for entry, _, at in entries if at is not None and at <= now]
        # One thread hop for every entry tried (scrypt holds no GIL for long: the loop keeps serving).
        matched = await asyncio.to_thread(verify_any, password, hashes)
        if matched is None:
            return Refused()
        if matched >= len(live):
            return Refused(f"expired password {expired[matched - len(live)]}")
        label, expires = live[matched]
        return replace(self._user_principal(account, user), credential=label, credential_expires=expires)
