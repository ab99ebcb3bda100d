"""`smtp-gateway sandbox`: the sandbox upstream (every provider's paths) as a server of its own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.cli.common import refuse_on_problems, run_loop, stopped_by
from gateway.config import ConfigError, preflight


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.providers.dengage.sandbox import DengageSandbox
    from gateway.providers.dengage.sandbox import install as dengage
    from gateway.providers.dmds.sandbox import DmdsSandbox
    from gateway.providers.dmds.sandbox import install as dmds
    from gateway.providers.sandbox import Sandbox, SandboxState, run_forever

    campaigns = {}
    for item in args.campaign or []:
        numid, sep, key = item.partition("=")
        if not (sep and numid.isdigit() and key):
            raise ConfigError(f"--campaign {item!r}: expected NUMID=APIKEY, e.g. --campaign 22=campaign-22-apikey")
        campaigns[int(numid)] = key
    state = SandboxState(
        latency=args.latency_ms / 1000.0,
        record_path=Path(args.record) if args.record else None,
        echo=None if args.quiet else sys.stdout,
    )
    dmds_state = DmdsSandbox(apikey=args.apikey, campaigns=campaigns, sender_domains=set(args.sender_domain or []))
    dengage_state = DengageSandbox(
        userkey=args.dengage_userkey,
        password=args.dengage_password,
        token_ttl=args.dengage_token_ttl,
        rate_limit=args.dengage_rate_limit or None,
        refuse_all=args.dengage_refuse_all,
        refused_ips=set(args.dengage_refuse_ip or []),
    )
    if args.dengage_from:
        dengage_state.froms = list(args.dengage_from)
    sandbox = Sandbox(state, [lambda s: dmds(s, dmds_state), lambda s: dengage(s, dengage_state)])
    host, port = args.listen
    wanted = [preflight.Port("sandbox --listen", host, port)]
    refuse_on_problems(preflight.ports(wanted), args)
    return stopped_by(run_loop(run_forever(sandbox, host, port), wanted))


def _listen_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8025)")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sandbox", help="run the sandbox upstream (DMDS and dEngage paths)")
    p.add_argument("--listen", default="127.0.0.1:8025", type=_listen_address, metavar="HOST:PORT")
    p.add_argument("--apikey", default="sandbox-account-apikey", help="DMDS: the account APIKEY")
    p.add_argument("--campaign", action="append", metavar="NUMID=APIKEY", help="DMDS: an API campaign (repeatable)")
    p.add_argument("--sender-domain", action="append", help="DMDS: permitted sender domain (repeatable; default any)")
    p.add_argument("--dengage-userkey", default="sandbox-userkey", help="dEngage: the API user's userkey")
    p.add_argument("--dengage-password", default="sandbox-password", help="dEngage: the API user's password")
    p.add_argument(
        "--dengage-from",
        action="append",
        metavar="'NAME <ADDR>'",
        help="dEngage: a From identity (repeatable; default 'Sandbox Team <team@example.com>')",
    )
    p.add_argument("--dengage-token-ttl", type=float, default=3600.0, help="dEngage: seconds a token lives")
    p.add_argument(
        "--dengage-rate-limit",
        type=int,
        default=30,
        help="dEngage: requests per second per client IP, then 429 (0: no limit)",
    )
    p.add_argument(
        "--dengage-refuse-ip",
        action="append",
        metavar="IP",
        help="dEngage: answer this client IP's requests 403 'not whitelisted' (repeatable)",
    )
    p.add_argument("--dengage-refuse-all", action="store_true", help="dEngage: refuse every client IP (allowlist)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every API call")
    p.add_argument("--record", help="append every request as JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="do not print requests")
    p.set_defaults(func=cmd_sandbox, config=None)
