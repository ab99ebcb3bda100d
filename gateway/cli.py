"""Command line: serve | quickstart | sandbox | check-config | hash-password (and the operator tools)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from pathlib import Path

from gateway import __version__
from gateway.settings import ConfigError, DmdsAccount, Settings, load_settings, masked_dump


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app import App, run

    settings = _load(args)
    logs.configure(settings.log)
    _run_loop(run(App(settings), drain_timeout=args.drain_timeout))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(json.dumps(masked_dump(settings), indent=2))
    print("configuration OK", file=sys.stderr)
    return 0


def cmd_check_domains(args: argparse.Namespace) -> int:
    from gateway.dns import DnsResolver
    from gateway.domaincheck import check_domains, format_table, to_json

    settings = _load(args)
    d = settings.dns
    resolver = DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)
    pairs = {dom: rp for account in settings.accounts.values() if isinstance(account, DmdsAccount)
             for dom, rp in account.sender_domains.items()}
    if not pairs:
        print("no sender_domains configured", file=sys.stderr)
        return 1
    reports = asyncio.run(check_domains(resolver, pairs))
    print(to_json(reports) if args.json else format_table(reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.queue import admin

    return admin.main(_load(args), args)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from gateway.passwords import hash_password

    password = sys.stdin.readline().rstrip("\n") if args.stdin else getpass.getpass("Password: ")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.providers.dengage.sandbox import DengageSandbox
    from gateway.providers.dengage.sandbox import install as dengage
    from gateway.providers.dmds.sandbox import DmdsSandbox
    from gateway.providers.dmds.sandbox import install as dmds
    from gateway.sandbox import Sandbox, SandboxState, run_forever

    campaigns = {}
    for item in args.campaign or []:
        numid, _, key = item.partition("=")
        campaigns[int(numid)] = key
    state = SandboxState(
        latency=args.latency_ms / 1000.0,
        record_path=Path(args.record) if args.record else None,
        echo=None if args.quiet else sys.stdout,
    )
    dmds_state = DmdsSandbox(apikey=args.apikey, campaigns=campaigns, sender_domains=set(args.sender_domain or []))
    dengage_state = DengageSandbox(
        userkey=args.dengage_userkey, password=args.dengage_password, token_ttl=args.dengage_token_ttl,
        rate_limit=args.dengage_rate_limit or None, refuse_all=args.dengage_refuse_all,
        refused_ips=set(args.dengage_refuse_ip or []),
    )
    if args.dengage_from:
        dengage_state.froms = list(args.dengage_from)
    sandbox = Sandbox(state, [lambda s: dmds(s, dmds_state), lambda s: dengage(s, dengage_state)])
    host, _, port = args.listen.rpartition(":")
    _run_loop(run_forever(sandbox, host or "127.0.0.1", int(port)))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from gateway import logs, quickstart
    from gateway.settings import LogSettings

    logs.configure(LogSettings())
    return quickstart.main(args.workdir, args.sandbox_port, args.port, args.tls_port)


def _run_loop(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtp-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtp-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML file (default: $GATEWAY_CONFIG); GATEWAY_* env overrides")
        return p

    p = with_config(sub.add_parser("serve", help="run the gateway"))
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds sessions in DATA get on SIGTERM")
    p.set_defaults(func=cmd_serve)

    p = with_config(sub.add_parser("check-config", help="validate the configuration and print it, secrets masked"))
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("check-domains", help="DNS report on every permitted sender domain"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_check_domains)

    from gateway.queue import admin

    admin.add_parser(sub, with_config)
    sub.choices["queue"].set_defaults(func=cmd_queue)

    p = sub.add_parser("hash-password", help="hash a password for [[accounts.X.users]] password_hash")
    p.add_argument("--stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_hash_password)

    p = sub.add_parser("sandbox", help="run the sandbox upstream (DMDS and dEngage paths)")
    p.add_argument("--listen", default="127.0.0.1:8025")
    p.add_argument("--apikey", default="sandbox-account-apikey", help="DMDS: the account APIKEY")
    p.add_argument("--campaign", action="append", metavar="NUMID=APIKEY", help="DMDS: an API campaign (repeatable)")
    p.add_argument("--sender-domain", action="append", help="DMDS: permitted sender domain (repeatable; default any)")
    p.add_argument("--dengage-userkey", default="sandbox-userkey", help="dEngage: the API user's userkey")
    p.add_argument("--dengage-password", default="sandbox-password", help="dEngage: the API user's password")
    p.add_argument("--dengage-from", action="append", metavar="'NAME <ADDR>'",
                   help="dEngage: a From identity (repeatable; default 'Sandbox Team <team@example.com>')")
    p.add_argument("--dengage-token-ttl", type=float, default=3600.0, help="dEngage: seconds a token lives")
    p.add_argument("--dengage-rate-limit", type=int, default=30,
                   help="dEngage: requests per second per client IP, then 429 (0: no limit)")
    p.add_argument("--dengage-refuse-ip", action="append", metavar="IP",
                   help="dEngage: answer this client IP's requests 403 'not whitelisted' (repeatable)")
    p.add_argument("--dengage-refuse-all", action="store_true", help="dEngage: refuse every client IP (allowlist)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay added to every API call")
    p.add_argument("--record", help="append every request as JSON lines to this file")
    p.add_argument("--quiet", action="store_true", help="do not print requests")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("quickstart", help="gateway + sandbox upstream in one process, for trying it out")
    p.add_argument("--workdir", default="var/quickstart")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--tls-port", type=int, default=2587)
    p.add_argument("--sandbox-port", type=int, default=8025)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"smtp-gateway: {exc}", file=sys.stderr)
        return 2
