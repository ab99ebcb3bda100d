"""[oauth]: issuers whose JWTs log in with AUTH XOAUTH2 or OAUTHBEARER (RFC 7628), each token's claim mapped to
a configured login."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.base import Section
from gateway.config.urls import ShownUrl, refuse_credentials

Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OAuthIssuer(Section):
    """One token issuer (Microsoft Entra ID, Google, Keycloak, ...): where its signing keys are, what its tokens
    must say, and which claim names the login."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$",
        description="Its name in logs and metrics (`credential=oauth:<name>`).",
    )
    issuer: str = Field(
        min_length=1,
        description="The tokens' `iss` claim, exactly, e.g. `https://login.microsoftonline.com/<tenant>/v2.0`.",
    )
    jwks_url: ShownUrl = Field(
        description="Where its signing keys are (JWKS), over HTTPS, e.g. "
        "`https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys` (plain HTTP only on loopback)."
    )
    audience: list[str] = Field(
        min_length=1, description="Accepted `aud` values: the application (client) id or URI tokens are issued for."
    )
    claim: str = Field(
        "sub",
        min_length=1,
        description="The claim that names the login: `sub`, `email`, `appid`, `azp`, `oid`, ... (a string claim).",
    )
    logins: dict[str, str] = Field(
        {},
        description="The claim's value -> the configured login it logs in as, e.g. "
        '`{ "0b6e...-app-id" = "erp" }`; empty: the value itself must be a configured login.',
    )
    algorithms: list[Algorithm] = Field(
        ["RS256", "ES256"], min_length=1, description="Signature algorithms accepted (never `none`, never HMAC)."
    )
    leeway: float = Field(
        60.0, ge=0, le=600, description="Seconds of clock difference allowed when checking `exp` and `nbf`."
    )
    jwks_ttl: float = Field(
        3600.0, gt=0, description="Seconds the fetched keys are used before they are fetched again."
    )
    jwks_min_refresh: float = Field(
        60.0,
        ge=0,
        description="A token signed with a key not in the set fetches the set again (a rotation), at most this "
        "often (seconds).",
    )
    ca_file: Path | None = Field(
        None, description="CA certificates (PEM) to trust for `jwks_url` instead of the system's (a private CA)."
    )
    http_timeout: float = Field(10.0, gt=0, description="Seconds one fetch of the keys may take.")
    scope: str = Field(
        "", description="The scope named in the failure challenge (RFC 7628 §3.2.2), e.g. the API's scope."
    )

    @field_validator("jwks_url")
    @classmethod
    def _https(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
        except ValueError:  # an invalid IPv6 host; never quoted (a URL may hold a token)
            parts = urlsplit("")
        host = parts.hostname or ""
        if not (host and (parts.scheme == "https" or (parts.scheme == "http" and _loopback(host)))):
            raise ValueError("must be an https:// URL (plain http:// only for a loopback address)")
        refuse_credentials(parts, "an issuer's signing keys are public: remove them from the URL")
        return v


class OAuthSettings(Section):
    """AUTH XOAUTH2 and OAUTHBEARER with JWTs of these issuers; none: the mechanisms are not offered."""

    issuers: list[OAuthIssuer] = Field([], description="The token issuers, each with its keys and login mapping.")

    @model_validator(mode="after")
    def _distinct(self) -> OAuthSettings:
        for key in ("name", "issuer"):
            values = [getattr(i, key) for i in self.issuers]
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"issuers: {key} {', '.join(twice)} given twice")
        return self
