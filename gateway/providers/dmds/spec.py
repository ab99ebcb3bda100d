"""DMDS's registry entry: its account model, its provider, its sandbox routes and options, its quick-start
account. Light: the provider and the sandbox are imported when first used."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError
from gateway.providers.dmds.config import DmdsAccount
from gateway.providers.spec import Hasher, Options, ProviderSpec, QuickStartEntry, Routes, SandboxEntry

if TYPE_CHECKING:
    from gateway.providers.base import Provider
    from gateway.providers.dmds.sandbox import DmdsSandbox
    from gateway.upstream.client import HttpClient
    from gateway.upstream.ratelimit import RateLimiter

SANDBOX_APIKEY = "sandbox-account-apikey"
# The quick start's account "sandbox": its API campaigns and a configured user sending with campaign 22.
QUICKSTART_ACCOUNT = "sandbox"
CAMPAIGNS = {22: "campaign-22-apikey", 23: "campaign-23-apikey"}
DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"


def _provider(name: str, account: DmdsAccount, http: HttpClient, limiter: RateLimiter) -> Provider:
    from gateway.providers.dmds.provider import DmdsProvider

    return DmdsProvider(name, account, http, limiter)


def _options(options: Options) -> None:
    options.add_argument("--apikey", default=SANDBOX_APIKEY, help="the account APIKEY")
    options.add_argument("--campaign", action="append", metavar="NUMID=APIKEY", help="an API campaign (repeatable)")
    options.add_argument("--sender-domain", action="append", help="permitted sender domain (repeatable; default any)")


def _installed(state: DmdsSandbox) -> Routes:
    from gateway.providers.dmds.sandbox import install

    return lambda sandbox: install(sandbox, state)


def _routes(args: argparse.Namespace) -> Routes:
    from gateway.providers.dmds.sandbox import DmdsSandbox

    campaigns = {}
    for item in args.campaign or []:
        numid, sep, key = item.partition("=")
        if not (sep and numid.isdigit() and key):
            raise ConfigError(f"--campaign {item!r}: expected NUMID=APIKEY, e.g. --campaign 22=campaign-22-apikey")
        campaigns[int(numid)] = key
    return _installed(
        DmdsSandbox(apikey=args.apikey, campaigns=campaigns, sender_domains=set(args.sender_domain or []))
    )


def _quickstart_settings(api_base: str, hash_password: Hasher) -> dict[str, Any]:
    return {
        "dmdsid": "sandbox",
        "api_base": api_base,
        "apikey": SANDBOX_APIKEY,
        "sender_domains": {"example.com": "dmds-example@nl.example.com"},
        "users": [{"username": DEMO_USER, "password_hash": hash_password(DEMO_PASSWORD), "campaign": 22}],
    }


def _quickstart_routes() -> Routes:
    from gateway.providers.dmds.sandbox import DmdsSandbox

    # The return path's domain is permitted too: delivery status notices come from MAILER-DAEMON@ it.
    return _installed(
        DmdsSandbox(apikey=SANDBOX_APIKEY, campaigns=dict(CAMPAIGNS), sender_domains={"example.com", "nl.example.com"})
    )


def _howto(smtp_port: int) -> str:
    return f"""\
  swaks --server 127.0.0.1:{smtp_port} --auth PLAIN --auth-user {DEMO_USER} --auth-password {DEMO_PASSWORD} \\
        --from info@example.com --to someone@example.net --header 'Subject: Hello'
SMTP-API login (campaign 22 and its apikey):
  swaks --server 127.0.0.1:{smtp_port} --auth LOGIN --auth-user sandbox-22 --auth-password {CAMPAIGNS[22]} \\
        --from info@example.com --to someone@example.net
"""


SPEC = ProviderSpec(
    kind="dmds",
    label="DMDS",
    account_model=DmdsAccount,
    create=_provider,
    sandbox=SandboxEntry(routes=_routes, options=_options, prefix="/v1"),
    quickstart=QuickStartEntry(QUICKSTART_ACCOUNT, _quickstart_settings, _quickstart_routes, _howto),
    default=True,
)
