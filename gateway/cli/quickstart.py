"""`smtp-gateway quickstart`: the gateway and a sandbox upstream in one process, ready for swaks."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.auth.passwords import hash_password
from gateway.cli.common import Refused, listen_failure, stopped_by
from gateway.config import load_settings, preflight

SANDBOX_APIKEY = "sandbox-account-apikey"
CAMPAIGNS = {22: "campaign-22-apikey", 23: "campaign-23-apikey"}
DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"
# The dEngage account "crm": its API user (in the sandbox) and a configured SMTP login.
DENGAGE_USERKEY, DENGAGE_API_PASSWORD = "sandbox-userkey", "sandbox-password"
DENGAGE_DEMO_USER, DENGAGE_DEMO_PASSWORD = "demo-dengage", "dengage-password"
DENGAGE_FROM = "Example Shop <shop@example.org>"


def quickstart_settings(workdir: Path, sandbox_port: int, smtp_port: int, tls_port: int) -> dict[str, Any]:
    from gateway.smtp.tls import write_self_signed

    cert, key = write_self_signed(workdir / "tls")
    return {
        "hostname": "localhost",
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "listeners": [
            # Loopback only, so AUTH without TLS is acceptable here (and handy with swaks).
            {"name": "plain", "address": "127.0.0.1", "port": smtp_port, "tls": "none", "allow_insecure_auth": True},
            {"name": "submission", "address": "127.0.0.1", "port": tls_port, "tls": "starttls"},
        ],
        "accounts": {
            "sandbox": {
                "dmdsid": "sandbox",
                "api_base": f"http://127.0.0.1:{sandbox_port}",
                "apikey": SANDBOX_APIKEY,
                "sender_domains": {"example.com": "dmds-example@nl.example.com"},
                "users": [{"username": DEMO_USER, "password_hash": hash_password(DEMO_PASSWORD), "campaign": 22}],
            },
            "crm": {
                "provider": "dengage",
                "api_base": f"http://127.0.0.1:{sandbox_port}/rest",
                "userkey": DENGAGE_USERKEY,
                "password": DENGAGE_API_PASSWORD,
                "users": [
                    {
                        "username": DENGAGE_DEMO_USER,
                        "password_hash": hash_password(DENGAGE_DEMO_PASSWORD),
                        "tags": ["quickstart"],
                    }
                ],
            },
        },
        "delivery": {"spool_path": str(workdir / "spool.sqlite3")},
        "dns": {"check_sender_domain": False},
    }


async def quickstart(workdir: Path, sandbox_port: int, smtp_port: int, tls_port: int) -> signal.Signals:
    # Imported here, as every command's handler does: the other commands start without the server's modules.
    from gateway.app import App, run
    from gateway.providers.dengage.sandbox import DengageSandbox
    from gateway.providers.dengage.sandbox import install as dengage
    from gateway.providers.dmds.sandbox import DmdsSandbox
    from gateway.providers.dmds.sandbox import install as dmds
    from gateway.providers.sandbox import Sandbox, SandboxState

    workdir.mkdir(parents=True, exist_ok=True)
    record = workdir / "sandbox-requests.jsonl"
    state = SandboxState(record_path=record, echo=sys.stdout)
    dmds_state = DmdsSandbox(apikey=SANDBOX_APIKEY, campaigns=dict(CAMPAIGNS), sender_domains={"example.com"})
    dengage_state = DengageSandbox(userkey=DENGAGE_USERKEY, password=DENGAGE_API_PASSWORD, froms=[DENGAGE_FROM])
    sandbox = Sandbox(state, [lambda s: dmds(s, dmds_state), lambda s: dengage(s, dengage_state)])
    bound = await sandbox.start("127.0.0.1", sandbox_port)
    settings = load_settings(None, **quickstart_settings(workdir, bound, smtp_port, tls_port))
    print(_banner(bound, smtp_port, tls_port, record), file=sys.stderr, flush=True)
    try:
        return await run(App(settings), drain_timeout=5.0)
    finally:
        await sandbox.stop()


def _banner(sandbox_port: int, smtp_port: int, tls_port: int, record: Path) -> str:
    return f"""
smtp-gateway quick start
  SMTP (loopback, AUTH without TLS allowed): 127.0.0.1:{smtp_port}
  SMTP submission with STARTTLS (self-signed): 127.0.0.1:{tls_port}
  sandbox upstream (DMDS at /v1, dEngage at /rest): http://127.0.0.1:{sandbox_port}   requests: {record}

Send a message (the sandbox prints the API request it received):
  swaks --server 127.0.0.1:{smtp_port} --auth PLAIN --auth-user {DEMO_USER} --auth-password {DEMO_PASSWORD} \\
        --from info@example.com --to someone@example.net --header 'Subject: Hello'
SMTP-API login (campaign 22 and its apikey):
  swaks --server 127.0.0.1:{smtp_port} --auth LOGIN --auth-user sandbox-22 --auth-password {CAMPAIGNS[22]} \\
        --from info@example.com --to someone@example.net
dEngage login (a configured user of the dEngage account "crm"; its From identity is {DENGAGE_FROM}):
  swaks --server 127.0.0.1:{smtp_port} --auth PLAIN --auth-user {DENGAGE_DEMO_USER} \\
        --auth-password {DENGAGE_DEMO_PASSWORD} --from shop@example.org --to someone@example.net \\
        --header 'Subject: Hello from dEngage'
Read back what the gateway sent:  curl -s http://127.0.0.1:{sandbox_port}/_sandbox/requests
"""


def main(workdir: str, sandbox_port: int, smtp_port: int, tls_port: int) -> int:
    return stopped_by(asyncio.run(quickstart(Path(workdir), sandbox_port, smtp_port, tls_port)))


def cmd_quickstart(args: argparse.Namespace) -> int:
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
        return main(args.workdir, args.sandbox_port, args.port, args.tls_port)
    except OSError as exc:
        raise listen_failure(exc, wanted) from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="gateway + sandbox upstream in one process, for trying it out")
    p.add_argument("--workdir", default="var/quickstart")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--tls-port", type=int, default=2587)
    p.add_argument("--sandbox-port", type=int, default=8025)
    p.set_defaults(func=cmd_quickstart, config=None)
