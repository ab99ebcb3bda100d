"""Login verification: static users (hashed), DMDS SMTP-API logins and SMTP-DMDS sandbox logins, cached."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import Deferred
from gateway.model import Principal
from gateway.passwords import verify_password
from gateway.settings import AccountSettings, UserSettings


class AuthFailed(Exception):
    """The credentials are wrong (535)."""


class AuthUnavailable(Exception):
    """The credentials cannot be checked now (454): the upstream lookup failed temporarily."""


CampaignKeyLookup = Callable[[str, int], Awaitable[str | None]]

_SMTP_API_LOGIN = re.compile(r"^(?P<dmdsid>[A-Za-z0-9_.]+)-(?P<numid>\d{1,12})$")


@dataclass(slots=True)
class _Entry:
    principal: Principal | None  # None: a cached refusal
    expires: float


class Authenticator:
    """Turns (username, password) into a Principal.

    A verified pair is cached under an HMAC of the pair with a per-process random key, so the cache
    holds no password and a repeat login costs one dict lookup instead of an scrypt hash or an HTTP
    round trip. Concurrent checks of the same pair share one verification.
    """

    def __init__(
        self,
        accounts: dict[str, AccountSettings],
        campaign_key: CampaignKeyLookup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = accounts
        self._campaign_key = campaign_key
        self._clock = clock
        self._secret = os.urandom(32)
        self._cache: dict[bytes, _Entry] = {}
        self._inflight: dict[bytes, asyncio.Future[Principal | None]] = {}
        self._users: dict[str, tuple[str, UserSettings]] = {
            user.username: (name, user) for name, account in accounts.items() for user in account.users
        }
        self._by_dmdsid = {account.dmdsid: name for name, account in accounts.items()}

    def principal_for_user(self, username: str) -> Principal:
        """The Principal of a configured user, for trusted-network clients that do not AUTH."""
        account, user = self._users[username]
        return _user_principal(account, user)

    async def authenticate(self, username: str, password: str) -> Principal:
        key = hmac.new(self._secret, f"{username}\0{password}".encode(), hashlib.sha256).digest()
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry.expires > now:
            if entry.principal is None:
                raise AuthFailed(username)
            return entry.principal
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
            try:
                principal = await self._verify(username, password)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
                raise
            finally:
                self._inflight.pop(key, None)
            self._remember(key, username, principal)
            future.set_result(principal)
        else:
            principal = await asyncio.shield(future)
        if principal is None:
            raise AuthFailed(username)
        return principal

    def _remember(self, key: bytes, username: str, principal: Principal | None) -> None:
        account = self._accounts.get(principal.account) if principal else self._account_of(username)
        ttl = 30.0  # an unknown username: remember the refusal briefly
        if account is not None:
            ttl = account.credential_cache_ttl if principal else account.negative_cache_ttl
        if ttl > 0:
            if len(self._cache) > 100_000:  # bound memory under a credential-stuffing attack
                self._cache.clear()
            self._cache[key] = _Entry(principal, self._clock() + ttl)

    def _account_of(self, username: str) -> AccountSettings | None:
        if username in self._users:
            return self._accounts[self._users[username][0]]
        m = _SMTP_API_LOGIN.match(username)
        dmdsid = m.group("dmdsid") if m else username
        name = self._by_dmdsid.get(dmdsid)
        return self._accounts[name] if name else None

    async def _verify(self, username: str, password: str) -> Principal | None:
        if username in self._users:
            account_name, user = self._users[username]
            ok = await asyncio.to_thread(verify_password, password, user.password_hash.get_secret_value())
            return _user_principal(account_name, user) if ok else None
        m = _SMTP_API_LOGIN.match(username)
        if m and m.group("dmdsid") in self._by_dmdsid:
            account_name = self._by_dmdsid[m.group("dmdsid")]
            account = self._accounts[account_name]
            numid = int(m.group("numid"))
            if not account.smtp_api_logins or (account.campaigns and numid not in account.campaigns):
                return None
            try:
                key = await self._campaign_key(account_name, numid)
            except Deferred as exc:
                raise AuthUnavailable(str(exc)) from exc
            if key is None or not hmac.compare_digest(key.encode(), password.encode()):
                return None
            return Principal(account=account_name, login=username, campaign=numid)
        if username in self._by_dmdsid:
            account_name = self._by_dmdsid[username]
            account = self._accounts[account_name]
            if account.sandbox_logins and hmac.compare_digest(
                account.apikey.get_secret_value().encode(), password.encode()
            ):
                return Principal(account=account_name, login=username, campaign_from_subject=True)
        return None


def _user_principal(account: str, user: UserSettings) -> Principal:
    return Principal(
        account=account,
        login=user.username,
        campaign=user.campaign,
        campaign_from_subject=user.campaign_from_subject,
        may_choose_campaign=user.may_choose_campaign,
        allowed_senders=tuple(s.lower() for s in user.allowed_senders),
        default_from=user.default_from,
        force_from=user.force_from,
    )
