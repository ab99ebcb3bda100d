"""An issuer's signing keys (JWKS), fetched over HTTPS through the upstream client, kept for `jwks_ttl`, fetched
again when a token names a key not in the set (a rotation), at most every `jwks_min_refresh` seconds; a failed
fetch keeps the keys already held."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from gateway.config.oauth import OAuthIssuer
from gateway.config.urls import shown_url
from gateway.core.cache import SingleFlight
from gateway.core.errors import Deferred
from gateway.upstream.response import HttpResponse

if TYPE_CHECKING:
    import jwt

log = structlog.get_logger("gateway.auth")
Fetch = Callable[[], Awaitable[HttpResponse]]


class UnknownKey(Exception):
    """The token names a key the issuer's set does not hold (after a fetch, or too soon for one)."""


class KeysUnavailable(Exception):
    """The set could not be fetched and no keys are held: tokens cannot be checked now (454)."""


def parse_jwks(response: HttpResponse) -> dict[str, jwt.PyJWK]:
    """The signing keys of a JWKS answer by kid ("" for a key without one). ValueError when it is none."""
    import jwt  # PyJWT and cryptography (~12 MiB): only processes that take token logins load them

    if response.status != 200:
        raise ValueError(f"HTTP {response.status}")
    data: Any = response.json()
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWKS (no keys list)")
    keys: dict[str, jwt.PyJWK] = {}
    for item in data["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(item)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue  # a key type or curve this library does not take: not one the issuer signs with here
        keys[str(item.get("kid") or "")] = key
    if not keys:
        raise ValueError("no signing key this gateway can use")
    return keys


class JwksKeys:
    def __init__(
        self,
        issuer: OAuthIssuer,
        fetch: Fetch,
        close: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._fetch = fetch
        self._close = close
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = -float("inf")  # when the keys held were fetched
        self._tried = -float("inf")  # when a fetch was last started
        self._rotation = -float("inf")  # when an unknown key last made it fetch
        self._flight: SingleFlight[str, None] = SingleFlight()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key that signed a token with header `kid`. Raises UnknownKey or KeysUnavailable."""
        now = self._clock()
        # Expired keys are fetched again; while the issuer cannot be reached, at most every jwks_min_refresh.
        fetch = now - self._fetched >= self.issuer.jwks_ttl and now - self._tried >= self.issuer.jwks_min_refresh
        if fetch:
            await self._refresh("expired" if self._keys else "first use")
        found = self._find(kid)
        if found is None and not fetch and self._clock() - self._rotation >= self.issuer.jwks_min_refresh:
            # A key rotated in; or a made-up kid, which can make it fetch no more often than this.
            self._rotation = self._clock()
            await self._refresh("unknown key")
            found = self._find(kid)
        if found is None:
            if not self._keys:
                raise KeysUnavailable(f"no keys of issuer {self.issuer.name}")
            raise UnknownKey(f"key {kid!r} is not in the set of issuer {self.issuer.name}")
        return found

    async def aclose(self) -> None:
        if self._close is not None:
            await self._close()

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid:
            return self._keys.get(kid)
        return next(iter(self._keys.values())) if len(self._keys) == 1 else None

    async def _refresh(self, why: str) -> None:
        await self._flight.run("jwks", lambda: self._load(why))

    async def _load(self, why: str) -> None:
        self._tried = self._clock()
        try:
            keys = parse_jwks(await self._fetch())
        except (Deferred, ValueError) as exc:
            reason = exc.reason if isinstance(exc, Deferred) else str(exc)
            log.warning(
                "jwks_fetch_failed",
                issuer=self.issuer.name,
                url=shown_url(self.issuer.jwks_url),
                reason=reason,
                kept=len(self._keys),
            )
            return
        if set(keys) != set(self._keys):
            log.info("jwks_fetched", issuer=self.issuer.name, why=why, kids=sorted(keys))
        self._keys, self._fetched = keys, self._clock()
