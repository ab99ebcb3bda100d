"""`smtp-gateway quickstart`: the gateway and a sandbox upstream in one process, ready for swaks."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.auth.passwords import hash_password
from gateway.cli.common import Refused, listen_failure, stopped_by
from gateway.config import load_settings, preflight
from gateway.providers import registry
from gateway.providers.spec import ProviderSpec, QuickStartEntry, SandboxEntry


def _entries() -> list[tuple[ProviderSpec[Any], QuickStartEntry, SandboxEntry]]:
    """The registered providers with a quick-start account (and the sandbox routes it sends to)."""
    return [
        (spec, spec.quickstart, spec.sandbox)
        for spec in registry.specs()
        if spec.quickstart is not None and spec.sandbox is not None
    ]


# The console's admin in the quick start; its password is made anew at each start and printed in the banner.
CONSOLE_ADMIN = "admin"
# The quick start's webhook: the sandbox receives it and checks its signature with this secret.
WEBHOOK_SECRET = "quickstart-webhook-secret"
# Events read back every two seconds, as soon as the sandbox reports them (a real account: the defaults).
EVENTS = {"enabled": True, "interval": 2.0, "lag": 0.0, "overlap": 300.0}


def quickstart_settings(
    workdir: Path, sandbox_port: int, smtp_port: int, tls_port: int, http_port: int | None = None, console: str = ""
) -> dict[str, Any]:
    """`http_port`: the operator endpoint on loopback; `console`: the console admin's password (enables it)."""
    from gateway.smtp.tls import write_self_signed

    cert, key = write_self_signed(workdir / "tls")
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    accounts = {
        entry.account: {**entry.settings(sandbox + routes.api_base, hash_password), "events": EVENTS}
        for _, entry, routes in _entries()
    }
    extra: dict[str, Any] = {}
    if http_port is not None:
        extra["http"] = {"address": "127.0.0.1", "port": http_port}
    if console:
        extra["console"] = {
            "enabled": True,
            "admins": [{"name": CONSOLE_ADMIN, "password_hash": hash_password(console)}],
            "session_secret": secrets.token_hex(32),  # this run's own: sessions end with it
        }
    return {
        **extra,
        "hostname": "localhost",
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "listeners": [
            # Loopback only, so AUTH without TLS is acceptable here (and handy with swaks).
            {"name": "plain", "address": "127.0.0.1", "port": smtp_port, "tls": "none", "allow_insecure_auth": True},
            {"name": "submission", "address": "127.0.0.1", "port": tls_port, "tls": "starttls"},
        ],
        # One account per provider, each with its sandbox's API and a configured user, its events read back.
        "accounts": accounts,
        "delivery": {"spool_path": str(workdir / "spool.sqlite3")},
        "dns": {"check_sender_domain": False},
        "webhooks": [{"name": "sandbox", "url": f"{sandbox}/_sandbox/webhook", "secret": WEBHOOK_SECRET}],
        "return_path": {"poll_interval": 0.5},
    }


async def quickstart(
    workdir: Path, sandbox_port: int, smtp_port: int, tls_port: int, http_port: int = 8026
) -> signal.Signals:
    # Imported here, as every command's handler does: the other commands start without the server's modules.
    from gateway.app import App, run
    from gateway.providers.sandbox import Sandbox, SandboxState

    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "sandbox-requests.jsonl"
    state = SandboxState(record_path=record, echo=sys.stdout, webhook_secret=WEBHOOK_SECRET)
    sandbox = Sandbox(state, [entry.routes() for _, entry, _ in _entries()])
    bound = await sandbox.start("127.0.0.1", sandbox_port)
    password = secrets.token_urlsafe(12)
    settings = load_settings(
        None, **quickstart_settings(workdir, bound, smtp_port, tls_port, http_port=http_port, console=password)
    )

    def banner(app: App) -> None:  # the ports bound: any free one where 0 was asked for
        ports = app.ports
        http = app.operator.port if app.operator is not None else http_port
        text = _banner(bound, ports["plain"], ports["submission"], record)
        text += (
            f"The console in a browser:  http://127.0.0.1:{http}/console/   sign in as {CONSOLE_ADMIN} / {password}\n"
        )
        print(text, file=sys.stderr, flush=True)

    try:
        return await run(App(settings), drain_timeout=5.0, started=banner)
    finally:
        await sandbox.stop()


def program() -> str:
    """This program as a shell line can run it: the path it was started by (relative to the current directory
    when inside it: `.venv/bin/smtp-gateway`), shell-quoted. Not the bare name: ./install.sh puts nothing on
    PATH, so a bare `smtp-gateway` the banner prints would be "command not found" when pasted."""
    started = Path(os.path.abspath(sys.argv[0]))
    if started.name != "smtp-gateway":  # python -m gateway
        return f"{_pasteable(Path(sys.executable))} -m gateway"
    return _pasteable(started)


def _pasteable(path: Path) -> str:
    """A path as a shell word: relative to the current directory when inside it, quoted when it must be."""
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(shown if "/" in shown else f"./{shown}")


def _banner(sandbox_port: int, smtp_port: int, tls_port: int, record: Path) -> str:
    entries = _entries()
    run = program()
    spool = shlex.quote(str(record.parent / "spool.sqlite3"))
    paths = ", ".join(f"{spec.label} at {routes.prefix or '/'}" for spec, _, routes in entries)
    howtos = "".join(entry.howto(smtp_port) for _, entry, _ in entries)
    return f"""
smtp-gateway quick start
  SMTP (loopback, AUTH without TLS allowed): 127.0.0.1:{smtp_port}
  SMTP submission with STARTTLS (self-signed): 127.0.0.1:{tls_port}
  sandbox upstream ({paths}): http://127.0.0.1:{sandbox_port}   requests: {record}

Send a message (the sandbox prints the API request it received):
{howtos}Read back what the gateway sent:  curl -s http://127.0.0.1:{sandbox_port}/_sandbox/requests
What became of a message (its 250 id, Message-ID or an address):
  {run} status --spool {spool} <id>
After the 250: the sandbox bounces bounce-hard@..., bounce-soft@... and not-sent@... (any domain, +tags too)
and reports it within two seconds: the message turns bounced, its sender gets a delivery status notice (a
request above), the sandbox's webhook receiver gets each event (kind "webhook"), and the address is refused
at RCPT TO from then on:  {run} suppression list --spool {spool}
"""


def main(workdir: str, sandbox_port: int, smtp_port: int, tls_port: int, http_port: int = 8026) -> int:
    return stopped_by(asyncio.run(quickstart(Path(workdir), sandbox_port, smtp_port, tls_port, http_port)))


def cmd_quickstart(args: argparse.Namespace) -> int:
    from gateway.config import LogSettings
    from gateway.ops import logs

    wanted = [
        preflight.Port("quick start SMTP (--port)", "127.0.0.1", args.port),
        preflight.Port("quick start STARTTLS (--tls-port)", "127.0.0.1", args.tls_port),
        preflight.Port("quick start sandbox (--sandbox-port)", "127.0.0.1", args.sandbox_port),
        preflight.Port("quick start console (--http-port)", "127.0.0.1", args.http_port),
    ]
    findings = preflight.ports(wanted)
    if findings:
        raise Refused(
            [
                *(f.text for f in findings),
                "another quick start may be running; or pick free ports: "
                f"{program()} quickstart --port 2526 --tls-port 2588 --sandbox-port 8027 --http-port 8028",
            ]
        )
    logs.configure(LogSettings())
    try:
        return main(args.workdir, args.sandbox_port, args.port, args.tls_port, args.http_port)
    except OSError as exc:
        raise listen_failure(exc, wanted) from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="gateway + sandbox upstream in one process, for trying it out")
    p.add_argument(
        "--workdir", default="var/quickstart", help="where the queue, the certificate and the request record go"
    )
    # 0: any free port (the banner shows the ones bound)
    p.add_argument("--port", type=int, default=2525, help="SMTP port on 127.0.0.1 (AUTH without TLS allowed)")
    p.add_argument("--tls-port", type=int, default=2587, help="SMTP port on 127.0.0.1 with STARTTLS")
    p.add_argument("--sandbox-port", type=int, default=8025, help="the sandbox upstream's HTTP port on 127.0.0.1")
    p.add_argument(
        "--http-port",
        type=int,
        default=8026,
        help="the operator endpoint's port on 127.0.0.1: the console (/console/), /metrics, /healthz",
    )
    p.set_defaults(func=cmd_quickstart, config=None)
