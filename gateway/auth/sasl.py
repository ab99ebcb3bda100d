"""Pure: the SASL messages of token logins, AUTH XOAUTH2 (Google's and Microsoft's) and OAUTHBEARER (RFC 7628):
the client's initial response read into its user and bearer token, and the server's error challenge."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import orjson

Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)\Z", re.IGNORECASE)  # RFC 6750 §2.1's b64token


class SaslError(ValueError):
    """The client's message is not what the mechanism defines (the reason, for the log)."""


@dataclass(frozen=True, slots=True)
class BearerLogin:
    user: str  # XOAUTH2's user=, OAUTHBEARER's authzid (a=); "" when not given
    token: str


def _fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, item in enumerate(text.split("\x01"), 1):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            # Where and how long, never the item: it may be the bearer token sent without its `auth=`.
            raise SaslError(f"item {n} is not a key=value pair ({len(item)} characters)")
        out[key] = value
    return out


def _token(fields: dict[str, str]) -> str:
    match = _BEARER.match(fields.get("auth", ""))
    if match is None:
        raise SaslError("no auth=Bearer <token>")
    return match.group(1)


def parse(mechanism: Mechanism, blob: bytes) -> BearerLogin:
    """The user and token of an initial response. Raises SaslError."""
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("not UTF-8") from None
    if not text.endswith("\x01\x01"):
        raise SaslError("does not end with ^A^A")
    if mechanism == "XOAUTH2":
        fields = _fields(text)
        return BearerLogin(fields.get("user", ""), _token(fields))
    # RFC 7628 §3.1: gs2-header "n,a=<authzid>," (or "n,,"), then ^A and the key=value pairs.
    header, sep, rest = text.partition("\x01")
    flag, comma, authzid = header.partition(",")
    if not sep or not comma or not authzid.endswith(","):
        raise SaslError("no GS2 header")
    if flag != "n":
        raise SaslError("channel binding is not supported")  # "y" or "p=...": RFC 7628 defines none for OAuth
    authzid = authzid[:-1]
    if authzid and not authzid.startswith("a="):
        raise SaslError("the GS2 header's authzid is not a=")
    user = authzid[2:].replace("=2C", ",").replace("=3D", "=")
    return BearerLogin(user, _token(_fields(rest)))


def error_challenge(mechanism: Mechanism, scope: str, discovery: str | None) -> bytes:
    """The server's JSON error before its 535 (RFC 7628 §3.2.2; XOAUTH2 as Google sends it). `discovery`: the
    issuer's OpenID configuration URL, where there is one to name."""
    body: dict[str, str] = (
        {"status": "401", "schemes": "Bearer"} if mechanism == "XOAUTH2" else {"status": "invalid_token"}
    )
    if scope:
        body["scope"] = scope
    if discovery and mechanism == "OAUTHBEARER":
        body["openid-configuration"] = discovery
    return orjson.dumps(body)
