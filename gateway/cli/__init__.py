"""Command line: serve | quickstart | sandbox | check-config | check-domains | queue | hash-password."""

from __future__ import annotations

import argparse
import asyncio
import errno
import getpass
import json
import os
import sqlite3
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from gateway import __version__
from gateway.config import CONFIG_ENV, ConfigError, Settings, load_settings, masked_dump, preflight
from gateway.core.errors import SpoolUnavailable
from gateway.providers.dmds.config import DmdsAccount

# Exit statuses: 1 a problem on this machine (port taken, file unreadable, DNS), 2 the configuration or the
# command line, 130 interrupted (Ctrl-C), 141 output pipe closed (as a shell reports coreutils killed by SIGPIPE).
EXIT_PROBLEM, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141


class Refused(Exception):
    """The command cannot run; the lines say why and what to do (exit 1)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(Path(args.config) if args.config else None)


def _no_config_file(args: argparse.Namespace) -> bool:
    return not args.config and not os.environ.get(CONFIG_ENV)


def _refuse_on_problems(findings: list[preflight.Finding], args: argparse.Namespace) -> None:
    for note in (f for f in findings if not f.problem):
        print(f"smtp-gateway: {note}", file=sys.stderr)
    problems = [f.text for f in findings if f.problem]
    if problems and args.command == "serve" and _no_config_file(args):
        problems.append(
            f"no config file was given (--config FILE or ${CONFIG_ENV}); to try the gateway "
            "without one: smtp-gateway quickstart"
        )
    if problems:
        raise Refused(problems)


def _spool_failure(settings: Settings, exc: Exception) -> Refused:
    where = settings.delivery.queue_url or f"delivery.spool_path {settings.delivery.spool_path}"
    return Refused([f"{where}: {exc} (is it an smtp-gateway queue, readable and writable?)"])


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import App, run
    from gateway.ops import logs

    settings = _load(args)
    if args.worker_slot is None:  # a worker's supervisor has checked (and a sibling worker holds the ports)
        _refuse_on_problems(preflight.files(settings) + preflight.ports(preflight.serve_ports(settings)), args)
    logs.configure(settings.log)
    if args.workers > 1 and args.worker_slot is None:
        from gateway.ops.supervisor import Supervisor

        worker_args = ["serve", "--drain-timeout", str(args.drain_timeout)]
        if args.config:
            worker_args += ["--config", args.config]
        return Supervisor(worker_args, args.workers).run()
    slot = args.worker_slot
    if slot is not None:
        settings = as_worker(settings, slot)
        structlog.contextvars.bind_contextvars(worker=slot)

    def source() -> Settings:
        """SIGHUP: the configuration file and environment read again, as this process reads them."""
        fresh = _load(args)
        return as_worker(fresh, slot) if slot is not None else fresh

    try:
        _run_loop(run(App(settings, source=source), drain_timeout=args.drain_timeout), preflight.serve_ports(settings))
    except (sqlite3.DatabaseError, SpoolUnavailable) as exc:
        raise _spool_failure(settings, exc) from None
    return 0


def as_worker(settings: Settings, slot: int) -> Settings:
    """Worker `slot` of `serve --workers N`: every listener shared (SO_REUSEPORT), and its own operator
    endpoint port (http.port + slot), so each worker's metrics and health can be scraped."""
    listeners = [listener.model_copy(update={"reuse_port": True}) for listener in settings.listeners]
    http = settings.http
    if http.port:
        http = http.model_copy(update={"port": http.port + slot})
    return settings.model_copy(update={"listeners": listeners, "http": http})


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
    print(json.dumps(masked_dump(settings), indent=2))
    findings = preflight.accounts(settings)
    if not args.config_only:
        findings += preflight.files(settings)
        findings += preflight.ports(preflight.serve_ports(settings), running_gateway_is_ok=True)
        findings += asyncio.run(preflight.dns(settings))
    for finding in findings:
        print(f"smtp-gateway: {finding}", file=sys.stderr)
    problems = sum(f.problem for f in findings)
    if problems:
        print(f"smtp-gateway: {problems} problem(s): `serve` would fail or misbehave", file=sys.stderr)
        return EXIT_PROBLEM
    print("configuration OK", file=sys.stderr)
    return 0


def cmd_check_domains(args: argparse.Namespace) -> int:
    from gateway.ops import logs
    from gateway.policy.dns import DnsResolver
    from gateway.policy.domaincheck import check_domains, format_table, to_json

    settings = _load(args)
    logs.configure(settings.log)  # to stderr: the report is stdout's
    d = settings.dns
    resolver = DnsResolver(d.nameservers or None, d.port, d.timeout, d.max_ttl, d.negative_ttl)
    if args.domains:
        pairs = {
            dom.lower(): rp or f"dmds-{dom.split('.')[0]}@nl.{dom}"
            for dom, _, rp in (item.partition("=") for item in args.domains)
        }
    else:
        pairs = {
            dom: rp
            for account in settings.accounts.values()
            if isinstance(account, DmdsAccount)
            for dom, rp in account.sender_domains.items()
        }
    if not pairs:
        print(
            "smtp-gateway: no sender_domains configured: add [accounts.<name>.sender_domains] to the config file "
            "(--config FILE), or name domains: smtp-gateway check-domains DOMAIN[=RETURN_PATH]",
            file=sys.stderr,
        )
        return 1
    reports = asyncio.run(check_domains(resolver, pairs))
    print(to_json(reports) if args.json else format_table(reports))
    return 0 if all(r.ok for r in reports) else 1


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.cli import queue as admin

    settings = _load(args)
    if args.spool:
        delivery = settings.delivery.model_copy(update={"spool_path": Path(args.spool), "queue_url": ""})
        settings = settings.model_copy(update={"delivery": delivery})
    try:
        return admin.main(settings, args)
    except (sqlite3.DatabaseError, SpoolUnavailable) as exc:
        raise _spool_failure(settings, exc) from None


def cmd_hash_password(args: argparse.Namespace) -> int:
    from gateway.auth.passwords import hash_password

    if args.stdin or not sys.stdin.isatty():
        # piped in (echo pw | smtp-gateway hash-password): the first line is the password
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
        except EOFError:  # Ctrl-D at the prompt
            password = ""
    if not password:
        print(
            "smtp-gateway: empty password: type one, or pipe it in (printf '%s\\n' PASSWORD | "
            "smtp-gateway hash-password --stdin)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    print(hash_password(password))
    return 0


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
    _refuse_on_problems(preflight.ports(wanted), args)
    _run_loop(run_forever(sandbox, host, port), wanted)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from gateway.cli import quickstart
    from gateway.config import LogSettings
    from gateway.ops import logs

    wanted = [
        preflight.Port("quick start SMTP (--port)", "127.0.0.1", args.port),
        preflight.Port("quick start STARTTLS (--tls-port)", "127.0.0.1", args.tls_port),
        preflight.Port("quick start sandbox (--sandbox-port)", "127.0.0.1", args.sandbox_port),
    ]
    findings = preflight.ports(wanted)
    if findings:
        raise Refused(
            [
                *(f.text for f in findings),
                "another quick start may be running; or pick free ports: "
                "smtp-gateway quickstart --port 2526 --tls-port 2588 --sandbox-port 8026",
            ]
        )
    logs.configure(LogSettings())
    try:
        return quickstart.main(args.workdir, args.sandbox_port, args.port, args.tls_port)
    except OSError as exc:
        raise _listen_failure(exc, wanted) from None


def _run_loop(coro: Coroutine[Any, Any, None], ports: list[preflight.Port]) -> None:
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(coro)
    except OSError as exc:
        # a port taken between the check and the bind, or another listen failure
        raise _listen_failure(exc, ports) from None


def _listen_failure(exc: OSError, ports: list[preflight.Port]) -> Exception:
    if exc.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        return exc  # not a listen failure: let it surface
    findings = preflight.ports(ports)
    return Refused([f.text for f in findings] or [f"cannot listen: {exc.strerror or exc}"])


def _listen_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8025)")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtp-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"smtp-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML file (default: $GATEWAY_CONFIG); GATEWAY_* env overrides")
        return p

    p = with_config(sub.add_parser("serve", help="run the gateway"))
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds sessions in DATA get on SIGTERM")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the listeners (SO_REUSEPORT) and the queue; one per core is typical",
    )
    p.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = with_config(
        sub.add_parser(
            "check-config", help="validate the configuration, print it (secrets masked) and check what serve needs"
        )
    )
    p.add_argument(
        "--config-only",
        action="store_true",
        help="validate the configuration alone, not this machine (files, ports, DNS): for a config "
        "meant for another machine",
    )
    p.set_defaults(func=cmd_check_config)

    p = with_config(sub.add_parser("check-domains", help="DNS report on every permitted sender domain"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "domains",
        nargs="*",
        metavar="DOMAIN[=RETURN_PATH]",
        help="check these instead of the configured sender domains",
    )
    p.set_defaults(func=cmd_check_domains)

    from gateway.cli import queue as admin

    admin.add_parser(sub, with_config)
    queue = sub.choices["queue"]
    queue.add_argument(
        "--spool",
        metavar="FILE",
        help="the SQLite queue file (default: delivery.spool_path; the quick start's is var/quickstart/spool.sqlite3)",
    )
    queue.set_defaults(func=cmd_queue)

    p = sub.add_parser("hash-password", help="hash a password for [[accounts.X.users]] password_hash")
    p.add_argument(
        "--stdin",
        action="store_true",
        help="read the password from standard input (the default when it is not a terminal)",
    )
    p.set_defaults(func=cmd_hash_password)

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

    p = sub.add_parser("quickstart", help="gateway + sandbox upstream in one process, for trying it out")
    p.add_argument("--workdir", default="var/quickstart")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--tls-port", type=int, default=2587)
    p.add_argument("--sandbox-port", type=int, default=8025)
    p.set_defaults(func=cmd_quickstart, config=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever an operator can get wrong ends in a line or two on stderr, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except ConfigError as exc:
        print(f"smtp-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Refused as exc:
        for line in exc.lines:
            print(f"smtp-gateway: {line}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line the ^C was echoed on
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `smtp-gateway queue list --json | head`: the reader has gone, as with coreutils stop quietly.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
