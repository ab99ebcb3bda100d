"""dEngage's registry entry: its account model, its provider, its sandbox routes and options, its quick-start
account. Light: the provider and the sandbox are imported when first used."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from gateway.providers.dengage.config import DengageAccount
from gateway.providers.spec import Hasher, Options, ProviderSpec, QuickStartEntry, Routes, SandboxEntry

if TYPE_CHECKING:
    from gateway.providers.base import Provider
    from gateway.providers.dengage.sandbox import DengageSandbox
    from gateway.upstream.client import HttpClient
    from gateway.upstream.ratelimit import RateLimiter

# The quick start's account "crm": its API user (in the sandbox), a configured SMTP login, its From identity.
QUICKSTART_ACCOUNT = "crm"
USERKEY, API_PASSWORD = "sandbox-userkey", "sandbox-password"
DEMO_USER, DEMO_PASSWORD = "demo-dengage", "dengage-password"
QUICKSTART_FROM = "Example Shop <shop@example.org>"


def _provider(name: str, account: DengageAccount, http: HttpClient, limiter: RateLimiter) -> Provider:
    from gateway.providers.dengage.provider import DengageProvider

    return DengageProvider(name, account, http, limiter)


def _options(options: Options) -> None:
    options.add_argument("--dengage-userkey", default=USERKEY, help="the API user's userkey")
    options.add_argument("--dengage-password", default=API_PASSWORD, help="the API user's password")
    options.add_argument(
        "--dengage-from",
        action="append",
        metavar="'NAME <ADDR>'",
        help="a From identity (repeatable; default 'Sandbox Team <team@example.com>')",
    )
    options.add_argument("--dengage-token-ttl", type=float, default=3600.0, help="seconds a token lives")
    options.add_argument(
        "--dengage-rate-limit",
        type=int,
        default=30,
        help="requests per second per client IP, then 429 (0: no limit)",
    )
    options.add_argument(
        "--dengage-refuse-ip",
        action="append",
        metavar="IP",
        help="answer this client IP's requests 403 'not whitelisted' (repeatable)",
    )
    options.add_argument("--dengage-refuse-all", action="store_true", help="refuse every client IP (allowlist)")


def _installed(state: DengageSandbox) -> Routes:
    from gateway.providers.dengage.sandbox import install

    return lambda sandbox: install(sandbox, state)


def _routes(args: argparse.Namespace) -> Routes:
    from gateway.providers.dengage.sandbox import DengageSandbox

    state = DengageSandbox(
        userkey=args.dengage_userkey,
        password=args.dengage_password,
        token_ttl=args.dengage_token_ttl,
        rate_limit=args.dengage_rate_limit or None,
        refuse_all=args.dengage_refuse_all,
        refused_ips=set(args.dengage_refuse_ip or []),
    )
    if args.dengage_from:
        state.froms = list(args.dengage_from)
    return _installed(state)


def _quickstart_settings(api_base: str, hash_password: Hasher) -> dict[str, Any]:
    return {
        "provider": "dengage",
        "api_base": api_base,
        "userkey": USERKEY,
        "password": API_PASSWORD,
        "users": [{"username": DEMO_USER, "password_hash": hash_password(DEMO_PASSWORD), "tags": ["quickstart"]}],
    }


def _quickstart_routes() -> Routes:
    from gateway.providers.dengage.sandbox import DengageSandbox

    return _installed(DengageSandbox(userkey=USERKEY, password=API_PASSWORD, froms=[QUICKSTART_FROM]))


def _howto(smtp_port: int) -> str:
    return f"""\
dEngage login (a configured user of the dEngage account "{QUICKSTART_ACCOUNT}"; its From identity is {QUICKSTART_FROM}):
  swaks --server 127.0.0.1:{smtp_port} --auth PLAIN --auth-user {DEMO_USER} \\
        --auth-password {DEMO_PASSWORD} --from shop@example.org --to someone@example.net \\
        --header 'Subject: Hello from dEngage'
"""


SPEC = ProviderSpec(
    kind="dengage",
    label="dEngage",
    account_model=DengageAccount,
    create=_provider,
    sandbox=SandboxEntry(routes=_routes, options=_options, prefix="/rest", api_base="/rest"),
    quickstart=QuickStartEntry(QUICKSTART_ACCOUNT, _quickstart_settings, _quickstart_routes, _howto),
)
