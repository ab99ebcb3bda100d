"""A local OAuth token issuer for the tests: its signing keys generated here, its JWKS served over HTTPS (a
self-signed certificate the gateway is told to trust) by aiohttp on loopback, tokens minted with PyJWT."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from gateway.smtp.tls import server_context, write_self_signed

ISSUER = "https://login.test.example/tenant/v2.0"
AUDIENCE = "api://smtp-gateway"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_algorithm(key: PrivateKey) -> str:
    """The ECDSA algorithm of an EC key's curve (RFC 7518 §3.4)."""
    return {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[key.curve.name]  # type: ignore[union-attr]


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "RS256"
    else:
        jwk = ec_jwk(key)
        jwk["alg"] = ec_algorithm(key)
    return {**jwk, "kid": kid, "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """An EC public key as RFC 7518 §6.2.1.2 writes it: each coordinate the curve's full size in bytes. PyJWT
    2.8's to_jwk drops a coordinate's leading zero bytes (one key in about 128), and its from_jwk, as the
    gateway reads keys with the minimum versions, refuses such a key: the test issuer must publish it whole."""
    numbers = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]

    def coordinate(value: int) -> str:
        return base64.urlsafe_b64encode(value.to_bytes(size, "big")).rstrip(b"=").decode()

    return {"kty": "EC", "crv": crv, "x": coordinate(numbers.x), "y": coordinate(numbers.y)}


@dataclass
class Issuer:
    """Serves GET /keys (the JWKS of `published`) and counts the fetches."""

    directory: Path
    keys: dict[str, PrivateKey] = field(default_factory=dict)  # kid -> private key (signs tokens)
    published: list[str] = field(default_factory=list)  # kids in the JWKS now
    fetches: int = 0
    down: bool = False
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def ca_file(self) -> Path:
        return self.directory / "cert.pem"

    @property
    def jwks_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/tenant/discovery/keys?appid=x"

    def add_key(self, kid: str, key: PrivateKey | None = None, publish: bool = True) -> None:
        self.keys[kid] = key or rsa_key()
        if publish:
            self.published.append(kid)

    def token(self, kid: str = "k1", lifetime: float = 600, not_before: float = 0, **claims: Any) -> str:
        """`lifetime` and `not_before`: seconds from now, read when the token is made (not when a test's
        parameters are collected, minutes earlier in a long run)."""
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now + int(not_before),
            "exp": now + int(lifetime),
            **claims,
        }
        key = self.keys[kid]
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else ec_algorithm(key)
        return jwt.encode(body, key, algorithm=algorithm, headers={"kid": kid})

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.Response(status=503, text="unavailable")
        return web.json_response({"keys": [public_jwk(self.keys[kid], kid) for kid in self.published]})

    async def start(self) -> None:
        cert, key = write_self_signed(self.directory)
        app = web.Application()
        app.router.add_get("/tenant/discovery/keys", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_context("intermediate", [(cert, key)]))
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def issuer_config(issuer: Issuer, **keys: Any) -> dict[str, Any]:
    """An [[oauth.issuers]] entry for the test issuer."""
    return {
        "name": "test",
        "issuer": ISSUER,
        "jwks_url": issuer.jwks_url,
        "audience": [AUDIENCE],
        "ca_file": str(issuer.ca_file),
        "scope": "https://smtp-gateway.test/.default",
        **keys,
    }
