"""Token logins: a JWT from a configured issuer, verified against its JWKS (signature, `iss`, `aud`, `exp`,
`nbf` with a small leeway), its configured claim mapped to a login."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.auth import sasl
from gateway.auth.jwks import JwksKeys, KeysUnavailable, UnknownKey
from gateway.config.oauth import OAuthIssuer


class TokenRefused(Exception):
    """The token does not log in (the reason is for the log only)."""


class TokenUnavailable(Exception):
    """The token cannot be checked now: its issuer's keys could not be fetched (454)."""


@dataclass(frozen=True, slots=True)
class TokenLogin:
    issuer: OAuthIssuer
    login: str  # the configured login the claim maps to
    claim: str  # the claim's value (for the log)
    expires: float  # the token's exp, epoch seconds


class OAuthVerifier:
    def __init__(self, issuers: Sequence[OAuthIssuer], keys: Mapping[str, JwksKeys]) -> None:
        self._by_iss = {issuer.issuer: issuer for issuer in issuers}
        self._keys = keys

    @property
    def discovery(self) -> str | None:
        """The OpenID configuration to name in a failure challenge: the one issuer's, if there is one."""
        if len(self._by_iss) != 1:
            return None
        return next(iter(self._by_iss)).rstrip("/") + "/.well-known/openid-configuration"

    def scope(self) -> str:
        return next((i.scope for i in self._by_iss.values() if i.scope), "")

    async def login(
        self, mechanism: sasl.Mechanism, blob: bytes, login_for: Callable[[str], tuple[str, str | None]]
    ) -> TokenLogin:
        """An AUTH XOAUTH2/OAUTHBEARER initial response: its token verified, and the user it names (if any)
        the token's own login (as an AUTH username maps to one: `login_for`). Raises TokenRefused or
        TokenUnavailable."""
        try:
            message = sasl.parse(mechanism, blob)
        except sasl.SaslError as exc:
            raise TokenRefused(f"{mechanism} message: {exc}") from None
        found = await self.verify(message.token)
        if message.user and login_for(message.user)[0] != found.login:
            # RFC 7628 §3.1: the authorization identity must be the token's; no acting as another login.
            raise TokenRefused(f"the message names user {message.user[:80]!r}, the token is {found.login!r}'s")
        return found

    async def verify(self, token: str) -> TokenLogin:
        """Raises TokenRefused or TokenUnavailable."""
        import jwt  # PyJWT and cryptography (~12 MiB): only processes that take token logins load them

        try:
            header = jwt.get_unverified_header(token)
            unverified: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(f"not a JWT ({exc})") from None
        issuer = self._by_iss.get(str(unverified.get("iss")))
        if issuer is None:
            raise TokenRefused(f"issuer {str(unverified.get('iss'))[:80]!r} is not configured")
        if header.get("alg") not in issuer.algorithms:
            raise TokenRefused(f"algorithm {header.get('alg')!r} is not accepted for issuer {issuer.name}")
        try:
            key = await self._keys[issuer.name].key(header.get("kid"))
        except UnknownKey as exc:
            raise TokenRefused(str(exc)) from None
        except KeysUnavailable as exc:
            raise TokenUnavailable(str(exc)) from None
        if not key_fits(header["alg"], key.key):
            # Anyone can read the JWKS and put another type's kid on a token: PyJWT would raise TypeError
            # or InvalidKeyError (no InvalidTokenError) on such a pair, so it is refused before.
            raise TokenRefused(f"algorithm {header['alg']} does not fit key {key.key_id!r} ({key.key_type})")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(issuer.algorithms),
                audience=list(issuer.audience),
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise TokenRefused(f"{type(exc).__name__}: {exc}") from None
        value = claims.get(issuer.claim)
        if not isinstance(value, str) or not value:
            raise TokenRefused(f"no {issuer.claim} claim")
        login = issuer.logins.get(value) if issuer.logins else value
        if login is None:
            raise TokenRefused(f"{issuer.claim} {value[:80]!r} maps to no login")
        return TokenLogin(issuer, login, value, float(claims["exp"]))

    async def aclose(self) -> None:
        for keys in self._keys.values():
            await keys.aclose()


# The curve each ECDSA algorithm signs on (RFC 7518 §3.4).
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def key_fits(alg: str, key: object) -> bool:
    """Whether a JWKS key (PyJWK.key, a cryptography key) is of the type (and curve) algorithm `alg` signs
    with: RSA for RS*/PS*, the algorithm's curve for ES*, Ed25519/Ed448 for EdDSA."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    if alg == "EdDSA":
        kinds = (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey, ed448.Ed448PublicKey, ed448.Ed448PrivateKey)
        return isinstance(key, kinds)
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return key.curve.name == _CURVES.get(alg)
    return False
