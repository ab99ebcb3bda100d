"""Token logins: AUTH XOAUTH2 and OAUTHBEARER (RFC 7628) with JWTs of a local issuer the tests start (keys made
here, JWKS over HTTPS): claims checked, the configured claim mapped to a login, the keys fetched again on a
rotation (at most every jwks_min_refresh), failures answered with the JSON challenge then 535; and msmtp, a
real client, logging in with a token."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import jwks, sasl
from gateway.upstream.response import HttpResponse
from tests.configs import PASSWORD_HASH, listener
from tests.devices_util import captured_logs, events, raw_send, require_tool
from tests.harness import LoopThread, Running
from tests.oauth_issuer import AUDIENCE, Issuer, issuer_config, public_jwk, rsa_key
from tests.ops_util import sample
from tests.smtputil import RECIPIENT, SENDER, RawClient, message
from tests.test_reload import config_of, reload_with

Factory = Callable[..., Running]
APP_ID = "0b6e4a1c-app-erp"


@pytest.fixture
def issuer(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Issuer]:
    running = Issuer(tmp_path / "issuer")
    running.add_key("k1")
    loop_thread.run(running.start())
    yield running
    loop_thread.run(running.stop())


def xoauth2(user: str, token: str) -> str:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()


def oauthbearer(user: str, token: str) -> str:
    authzid = f"a={user}" if user else ""
    return base64.b64encode(
        f"n,{authzid},\x01host=gw.test\x01port=587\x01auth=Bearer {token}\x01\x01".encode()
    ).decode()


def token_login(gw: Running, mechanism: str, blob: str) -> list[str]:
    """AUTH <mechanism> <blob>; on a 334 error challenge the client's dummy answer (^A). Every reply line."""
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        replies = [client.cmd(f"AUTH {mechanism} {blob}")]
        if replies[0].startswith("334 "):
            replies.append(client.cmd("AQ=="))
        return replies


def challenge(reply: str) -> dict[str, Any]:
    assert reply.startswith("334 "), reply
    parsed: dict[str, Any] = json.loads(base64.b64decode(reply[4:]))
    return parsed


@pytest.fixture
def gw(gateway_factory: Factory, issuer: Issuer) -> Running:
    return gateway_factory(oauth={"issuers": [issuer_config(issuer, claim="appid", logins={APP_ID: "scanner"})]})


def test_xoauth2_and_oauthbearer_log_in_as_the_mapped_login(gw: Running, issuer: Issuer) -> None:
    token = issuer.token(appid=APP_ID)
    before = sample(
        "smtp_gateway_login_credential_used_total", account="acme", login="scanner", credential="oauth:test"
    )
    with captured_logs() as logs:
        with RawClient(gw) as client:
            ehlo = client.cmd("EHLO client.test")
            assert client.cmd(f"AUTH XOAUTH2 {xoauth2('scanner', token)}").startswith("235 2.7.0 ")
            assert raw_send(client, message(subject="by token")).startswith("250 2.0.0 ")
        assert token_login(gw, "OAUTHBEARER", oauthbearer("", token))[-1].startswith("235 ")
        assert token_login(gw, "oauthbearer", oauthbearer("scanner", token))[-1].startswith("235 ")
    assert ehlo  # the reply's last line; the mechanisms are checked in test_mechanisms_are_offered_...
    assert [r["body"]["asunto"] for r in gw.sent] == ["by token"]
    assert [(e["login"], e["credential"], e["mechanism"]) for e in events(logs, "auth_ok")] == [
        ("scanner", "oauth:test", "XOAUTH2"),
        ("scanner", "oauth:test", "OAUTHBEARER"),
        ("scanner", "oauth:test", "OAUTHBEARER"),
    ]
    assert sample(
        "smtp_gateway_login_credential_used_total", account="acme", login="scanner", credential="oauth:test"
    ) == (before + 3)
    assert token not in str(logs)
    assert issuer.fetches == 1  # fetched once, then cached


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"lifetime": -120}, "ExpiredSignatureError"),
        ({"aud": "api://another-app"}, "InvalidAudienceError"),
        ({"iss": "https://evil.example/"}, "is not configured"),
        ({"not_before": 600}, "ImmatureSignatureError"),
        ({"appid": "unknown-app"}, "maps to no login"),
        ({"appid": None}, "no appid claim"),
    ],
)
def test_a_token_that_does_not_qualify_gets_the_challenge_then_535(
    gw: Running, issuer: Issuer, claims: dict[str, Any], why: str
) -> None:
    token = issuer.token(**{"appid": APP_ID, **claims})
    with captured_logs() as logs:
        first, final = token_login(gw, "OAUTHBEARER", oauthbearer("", token))
    assert challenge(first) == {
        "status": "invalid_token",
        "scope": "https://smtp-gateway.test/.default",
        "openid-configuration": "https://login.test.example/tenant/v2.0/.well-known/openid-configuration",
    }
    assert final == "535 5.7.8 Authentication credentials invalid"
    [failed] = events(logs, "auth_failed")
    assert why in failed["reason"] and failed["mechanism"] == "OAUTHBEARER"


def test_xoauth2_failures_use_its_own_challenge_and_a_small_leeway_is_allowed(gw: Running, issuer: Issuer) -> None:
    first, final = token_login(gw, "XOAUTH2", xoauth2("scanner", issuer.token(appid=APP_ID, lifetime=-600)))
    assert challenge(first) == {"status": "401", "schemes": "Bearer", "scope": "https://smtp-gateway.test/.default"}
    assert final.startswith("535 5.7.8 ")
    # Expired 30 s ago: within the 60 s leeway for clocks that differ.
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(appid=APP_ID, lifetime=-30)))[-1].startswith("235 ")


def test_forged_tokens_and_mismatched_users_are_refused(gw: Running, issuer: Issuer) -> None:
    # Signed by another key under the published kid.
    issuer.add_key("forger", rsa_key(), publish=False)
    forged = issuer.token(kid="forger", appid=APP_ID).split(".")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode()).rstrip(b"=")
    forged[0] = header.decode()
    assert token_login(gw, "XOAUTH2", xoauth2("", ".".join(forged)))[-1].startswith("535 ")
    # alg none and HMAC are never accepted.
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none","kid":"k1"}').rstrip(b"=").decode()
    body = issuer.token(appid=APP_ID).split(".")[1]
    assert token_login(gw, "XOAUTH2", xoauth2("", f"{unsigned}.{body}."))[-1].startswith("535 ")
    # A valid token naming another user: no acting as another login.
    assert token_login(gw, "XOAUTH2", xoauth2("other", issuer.token(appid=APP_ID)))[-1].startswith("535 ")
    # Not a token at all, and a message that is not the mechanism's.
    assert token_login(gw, "XOAUTH2", xoauth2("", "not-a-jwt"))[-1].startswith("535 ")
    assert token_login(gw, "OAUTHBEARER", base64.b64encode(b"garbage").decode())[-1].startswith("535 ")


def test_a_valid_token_whose_claim_is_no_configured_login_gets_the_challenge_then_535(
    gateway_factory: Factory, issuer: Issuer
) -> None:
    # With no `logins` map the claim's value must be a configured login: any other user of the tenant holds
    # a valid token for the audience. Refused like any other token (never 451), and counted as a failure.
    gw = gateway_factory(
        oauth={"issuers": [issuer_config(issuer, claim="email")]},
        extra_users=[{"username": "app@acme.example", "passwords": [{"hash": PASSWORD_HASH}], "campaign": 22}],
    )
    with captured_logs() as logs:
        first, final = token_login(gw, "XOAUTH2", xoauth2("", issuer.token(email="someone-else@acme.example")))
        ok = token_login(gw, "XOAUTH2", xoauth2("", issuer.token(email="app@acme.example")))
    assert challenge(first)["status"] == "401"
    assert final == "535 5.7.8 Authentication credentials invalid"
    assert ok[-1].startswith("235 ")
    [failed] = events(logs, "auth_failed")
    assert "'someone-else@acme.example' is no configured login" in failed["reason"]
    assert not [e for e in logs if e.get("log_level") == "error"]


def forged_header(issuer: Issuer, alg: str, kid: str) -> str:
    """A token whose header claims `alg` under the published `kid` (signed by an unpublished RSA key)."""
    if "forger" not in issuer.keys:
        issuer.add_key("forger", rsa_key(), publish=False)
    parts = issuer.token(kid="forger", appid=APP_ID).split(".")
    header = json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode()
    parts[0] = base64.urlsafe_b64encode(header).rstrip(b"=").decode()
    return ".".join(parts)


@pytest.mark.parametrize(
    ("alg", "kid"),
    [("RS256", "ec256"), ("PS256", "ec256"), ("ES256", "k1"), ("ES384", "ec256"), ("ES256", "ec384")],
)
def test_a_token_whose_alg_does_not_fit_its_keys_type_gets_the_challenge_then_535(
    gateway_factory: Factory, issuer: Issuer, alg: str, kid: str
) -> None:
    # Anyone can read the JWKS (an issuer publishing RSA and EC keys, as Keycloak does) and put one type's
    # kid on a token claiming another accepted algorithm: refused before PyJWT, which would raise TypeError
    # or InvalidKeyError on such a pair; counted as a failed AUTH (throttle, lockout), never 451.
    issuer.add_key("ec256", ec.generate_private_key(ec.SECP256R1()))
    issuer.add_key("ec384", ec.generate_private_key(ec.SECP384R1()))
    algorithms = ["RS256", "PS256", "ES256", "ES384"]
    gw = gateway_factory(
        oauth={"issuers": [issuer_config(issuer, claim="appid", logins={APP_ID: "scanner"}, algorithms=algorithms)]}
    )
    with captured_logs() as logs:
        first, final = token_login(gw, "XOAUTH2", xoauth2("", forged_header(issuer, alg, kid)))
        ok = token_login(gw, "XOAUTH2", xoauth2("", issuer.token(kid="ec384", appid=APP_ID)))  # ES384: fits
    assert challenge(first)["status"] == "401"
    assert final == "535 5.7.8 Authentication credentials invalid"
    assert ok[-1].startswith("235 ")
    [failed] = events(logs, "auth_failed")
    assert f"algorithm {alg} does not fit key {kid!r}" in failed["reason"]
    assert not [e for e in logs if e.get("log_level") == "error"]


def test_a_rotated_key_is_fetched_once_at_most_every_min_refresh(gateway_factory: Factory, issuer: Issuer) -> None:
    gw = gateway_factory(
        oauth={"issuers": [issuer_config(issuer, claim="sub", logins={"svc": "scanner"}, jwks_min_refresh=3600)]}
    )
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("235 ")
    issuer.add_key("k2")  # the issuer rotates: k2 is published, tokens are signed with it
    with captured_logs() as logs:
        assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(kid="k2", sub="svc")))[-1].startswith("235 ")
    assert issuer.fetches == 2
    [fetched] = events(logs, "jwks_fetched")
    assert fetched["why"] == "unknown key" and fetched["kids"] == ["k1", "k2"]
    # An unknown kid right after: not fetched again within jwks_min_refresh (a flood of made-up kids cannot
    # make the gateway hammer the issuer).
    issuer.add_key("k3")
    for _ in range(3):
        assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(kid="k3", sub="svc")))[-1].startswith("535 ")
    assert issuer.fetches == 2


def test_keys_that_cannot_be_fetched_are_a_temporary_failure(gateway_factory: Factory, issuer: Issuer) -> None:
    issuer.down = True
    gw = gateway_factory(oauth={"issuers": [issuer_config(issuer, claim="sub", logins={"svc": "scanner"})]})
    with captured_logs() as logs:
        assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc"))) == [
            "454 4.7.0 Temporary authentication failure"
        ]
    [failed] = events(logs, "jwks_fetch_failed")
    assert failed["reason"] == "HTTP 503" and failed["kept"] == 0


def test_an_oauth_login_keeps_its_per_login_controls(gateway_factory: Factory, issuer: Issuer) -> None:
    gw = gateway_factory(
        oauth={"issuers": [issuer_config(issuer, claim="email")]},  # the claim's value is the login itself
        extra_users=[
            {"username": "app@acme.example", "passwords": [{"hash": PASSWORD_HASH}], "campaign": 22},
            {
                "username": "vlan-app",
                "passwords": [{"hash": PASSWORD_HASH}],
                "campaign": 22,
                "networks": ["10.0.0.0/8"],
            },
        ],
    )
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(email="app@acme.example")))[-1].startswith("235 ")
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(email="vlan-app"))) == [
        "535 5.7.8 Authentication credentials invalid"
    ]


def test_a_token_login_refused_for_require_tls_counts_as_an_auth_failure(
    gateway_factory: Factory, issuer: Issuer
) -> None:
    """As for PLAIN and LOGIN (per-login.md, TLS per login): the 538 is throttled and counted towards the
    client address's AUTH failures, up to the lockout (before the fix a token login's 538 counted nothing)."""
    gw = gateway_factory(
        oauth={"issuers": [issuer_config(issuer, claim="email")]},
        extra_users=[
            {"username": "tls-app", "passwords": [{"hash": PASSWORD_HASH}], "campaign": 22, "require_tls": True}
        ],
        limits={"auth_failures_per_ip": 2, "auth_lockout_failures": 2, "auth_delay_max": 0, "auth_lockout_time": 60},
    )
    token = issuer.token(email="tls-app")
    assert token_login(gw, "XOAUTH2", xoauth2("", token))[-1].startswith("538 5.7.11 ")
    assert token_login(gw, "OAUTHBEARER", oauthbearer("", token)) == [
        "421 4.7.0 Too many failed logins from your address; try again later"
    ]


def test_a_token_logins_require_tls_is_its_own_login_s_not_a_remapped_one(
    gateway_factory: Factory, issuer: Issuer
) -> None:
    """The token names a configured login (mapped already): its rules are looked up as they are, not mapped
    again as an AUTH username is (strip_login_domain made `erp@acme.example` `erp`, a login with no rules)."""
    gw = gateway_factory(
        listeners=[listener("plain", strip_login_domain=True)],
        oauth={"issuers": [issuer_config(issuer, claim="email")]},
        extra_users=[
            {
                "username": "erp@acme.example",
                "passwords": [{"hash": PASSWORD_HASH}],
                "campaign": 22,
                "require_tls": True,
            }
        ],
    )
    token = issuer.token(email="erp@acme.example")
    assert token_login(gw, "XOAUTH2", xoauth2("", token))[-1].startswith("538 5.7.11 ")


def test_mechanisms_are_offered_only_with_issuers(gateway_factory: Factory, gw: Running) -> None:
    def auth_line(running: Running) -> str:
        with RawClient(running) as client:
            client.write(b"EHLO client.test\r\n")
            return next(line for line in client.reply() if line[4:].startswith("AUTH"))

    assert auth_line(gw) == "250-AUTH LOGIN OAUTHBEARER PLAIN XOAUTH2"
    plain = gateway_factory(listeners=[listener()])
    assert auth_line(plain) == "250-AUTH LOGIN PLAIN"
    with RawClient(plain) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"AUTH XOAUTH2 {xoauth2('', 'x')}").startswith("504 5.5.4 ")


def test_sasl_messages_are_read_as_the_rfcs_define_them() -> None:
    assert sasl.parse("XOAUTH2", b"user=a@b\x01auth=Bearer abc.def-ghi\x01\x01") == sasl.BearerLogin(
        "a@b", "abc.def-ghi"
    )
    parsed = sasl.parse("OAUTHBEARER", b"n,a=us=2Cer=3D,\x01host=h\x01port=1\x01auth=Bearer tok\x01\x01")
    assert parsed == sasl.BearerLogin("us,er=", "tok")
    for bad in (b"n,,\x01auth=Bearer tok\x01", b"y,,\x01auth=Bearer t\x01\x01", b"n,,\x01auth=Basic t\x01\x01"):
        with pytest.raises(sasl.SaslError):
            sasl.parse("OAUTHBEARER", bad)
    # A malformed item (the bearer token sent without its auth=) is named by its place, never quoted: the
    # reason goes to auth_failed's log line.
    secret = "opaque-Tok3n-s3cret-value"
    malformed: list[tuple[sasl.Mechanism, str]] = [
        ("XOAUTH2", f"user=x\x01Bearer {secret}\x01\x01"),
        ("OAUTHBEARER", f"n,,\x01Bearer {secret}\x01\x01"),
    ]
    for mechanism, blob in malformed:
        with pytest.raises(sasl.SaslError) as info:
            sasl.parse(mechanism, blob.encode())
        assert "is not a key=value pair (32 characters)" in str(info.value)
        assert "Bearer" not in str(info.value) and secret[:5] not in str(info.value), info.value


# -- msmtp: a real client with auth xoauth2 / oauthbearer and passwordeval -----------------------------------


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_msmtp_sends_with_a_token(gw: Running, issuer: Issuer, tmp_path: Path, mechanism: str) -> None:
    msmtp = require_tool("msmtp", "msmtp")
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token(appid=APP_ID))
    config = tmp_path / "msmtprc"
    config.write_text(
        "account gw\n"
        "host 127.0.0.1\n"
        f"port {gw.port()}\n"
        "tls off\n"
        f"auth {mechanism}\n"
        "user scanner\n"
        f"passwordeval cat {token_file}\n"
        f"from {SENDER}\n"
        "account default : gw\n"
    )
    config.chmod(0o600)
    result = subprocess.run(
        [msmtp, "--file", str(config), RECIPIENT],
        input=message(subject=f"msmtp {mechanism}"),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert [r["body"]["asunto"] for r in gw.sent] == [f"msmtp {mechanism}"]
    assert AUDIENCE  # the token was minted for the gateway's audience


def test_keys_held_are_kept_while_the_issuer_is_down(gateway_factory: Factory, issuer: Issuer) -> None:
    gw = gateway_factory(
        oauth={
            "issuers": [
                issuer_config(issuer, claim="sub", logins={"svc": "scanner"}, jwks_ttl=0.001, jwks_min_refresh=0)
            ]
        }
    )
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("235 ")
    issuer.down = True
    with captured_logs() as logs:
        assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("235 ")
    [failed] = events(logs, "jwks_fetch_failed")
    assert failed["kept"] == 1 and issuer.fetches == 2


def test_issuers_are_reloaded(gateway_factory: Factory, issuer: Issuer) -> None:
    gw = gateway_factory()
    config = config_of(gw)
    config["oauth"] = {"issuers": [issuer_config(issuer, claim="sub", logins={"svc": "scanner"})]}
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("504 ")
    assert reload_with(gw, config)
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("235 ")
    del config["oauth"]
    assert reload_with(gw, config)
    assert token_login(gw, "XOAUTH2", xoauth2("", issuer.token(sub="svc")))[-1].startswith("504 ")


def test_the_test_issuer_publishes_ec_coordinates_at_their_full_size() -> None:
    """RFC 7518 §6.2.1.2: a coordinate is the curve's size in bytes, leading zeros kept. One P-256 key in about
    128 has a coordinate below 2**248; written short (PyJWT 2.8's to_jwk), the gateway's key reader with the
    minimum versions refuses the key, and a test that uses it failed now and then in CI's first run."""
    keys = (ec.derive_private_key(v, ec.SECP256R1()) for v in range(1, 100_000))
    key = next(k for k in keys if k.public_key().public_numbers().x < 2**248)
    jwk = public_jwk(key, "short-x")
    assert len(base64.urlsafe_b64decode(jwk["x"] + "==")) == 32
    assert len(base64.urlsafe_b64decode(jwk["y"] + "==")) == 32
    assert jwks.parse_jwks(HttpResponse(200, json.dumps({"keys": [jwk]}).encode(), {})).keys() == {"short-x"}
