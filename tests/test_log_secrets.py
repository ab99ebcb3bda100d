"""Every log line `serve` writes during a realistic run holds no secret: wrong and right passwords, a password
typed into the username field, the DMDS account key and campaign keys, the dEngage API user's userkey,
password and tokens (a token renewed mid-run), an upstream refusing our key, the PostgreSQL queue password
(reachable, and not), a reload. The run is a subprocess whose stderr is a file, so its lines are JSON by
default; each is parsed, each session line carries its session id, and each DATA has one summary line."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.configs import gateway_config, listener, toml
from tests.harness import (
    APIKEY,
    CAMPAIGNS,
    DENGAGE_API_PASSWORD,
    DENGAGE_SENDER,
    DENGAGE_USERKEY,
    PASSWORD,
    PASSWORD_HASH,
    USER,
    LoopThread,
    dengage_account,
    dengage_sandbox,
    sandbox_for_tests,
)
from tests.pgserver import PgCluster
from tests.procs import CLI, ready, spawn
from tests.smtputil import RECIPIENT, SENDER, RawClient
from tests.spool_helpers import wait_for

QUEUE_PASSWORD = "queue-pg-Secret-7731"
SUMMARIES = ("message_accepted", "message_rejected", "message_deferred", "message_aborted")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Run:
    """A `serve` subprocess logging to a file; `client()` talks to its plain listener."""

    def __init__(self, tmp: Path, config: dict[str, Any], name: str) -> None:
        config["listeners"] = [listener("plain")]
        self.config = tmp / f"{name}.toml"
        self.config.write_text(toml(config))
        self.log = tmp / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = spawn(
                [*CLI, "serve", "--config", str(self.config), "--drain-timeout", "2"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.smtp = ready(self.log, self.proc, timeout=30)["plain"]

    def port(self, listener: str = "plain") -> int:
        return self.smtp

    def client(self, source: str | None = None) -> RawClient:
        client = RawClient(self, source=source)  # type: ignore[arg-type]
        client.cmd("EHLO secrets.test")
        return client

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def data(client: RawClient, subject: str, sender: str = SENDER) -> str:
    """MAIL/RCPT/DATA; the DATA reply (or the first refusal before it)."""
    for line in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{RECIPIENT}>", "DATA"):
        reply = client.cmd(line)
        if not reply.startswith(("250 ", "354 ")):
            return reply
    client.write(f"From: {sender}\r\nTo: {RECIPIENT}\r\nSubject: {subject}\r\n\r\nbody\r\n.\r\n".encode())
    return client.reply()[-1]


@pytest.fixture
def sandbox(loop_thread: LoopThread) -> Iterator[Any]:
    dengage = dengage_sandbox()
    box = sandbox_for_tests(dengage=dengage)
    loop_thread.run(box.start("127.0.0.1", 0))
    yield box, dengage
    loop_thread.run(box.stop())


def test_no_secret_in_any_log_line(tmp_path: Path, sandbox: Any, pg_cluster: PgCluster) -> None:
    box, dengage = sandbox
    url = f"http://127.0.0.1:{box.port}"
    config = gateway_config(tmp_path, box.port)
    config["accounts"]["crm"] = dengage_account(box.port, api_user_logins=True)
    config["delivery"] = {
        "queue_url": pg_cluster.new_database(),
        "queue_password": QUEUE_PASSWORD,
        "inline_budget": 5.0,
    }
    config["limits"] = {"auth_failures_per_ip": 3, "auth_delay_max": 0.1, "auth_lockout_failures": 5}
    config["http"] = {"address": "127.0.0.1", "port": 0}
    run = Run(tmp_path, config, "main")
    datas = 0
    try:
        # Wrong passwords for every kind of login, and secrets typed into the username field.
        for n, (user, password) in enumerate(
            [
                (USER, "wrong-1"),
                ("acme-22", "wrong-2"),
                ("acme", "wrong-3"),
                ("erp", "wrong-4"),
                (DENGAGE_USERKEY, "wrong-5"),
                (PASSWORD, PASSWORD),
                (APIKEY, "x"),
                (CAMPAIGNS[22], "y"),
                (DENGAGE_API_PASSWORD, DENGAGE_API_PASSWORD),
            ]
        ):
            with run.client(f"127.0.1.{n + 1}") as client:  # one address each: none is locked out
                assert client.login(user, password).startswith("535 "), user
        with run.client("127.0.2.1") as client:  # AUTH LOGIN, the password in the username prompt
            assert client.cmd("AUTH LOGIN").startswith("334 ")
            assert client.cmd(b64(PASSWORD)).startswith("334 ")
            assert client.cmd(b64(PASSWORD)).startswith("535 ")
            assert client.cmd(b64(APIKEY)).startswith("500 ")  # base64 lines after a refusal
        # Right logins of every kind, and mail through both providers.
        for user, password, sender, subject in [
            (USER, PASSWORD, SENDER, "configured user"),
            ("acme-22", CAMPAIGNS[22], SENDER, "smtp-api login"),
            ("acme", APIKEY, SENDER, "[22]sandbox login"),
            ("erp", PASSWORD, DENGAGE_SENDER, "dengage user"),
            (DENGAGE_USERKEY, DENGAGE_API_PASSWORD, DENGAGE_SENDER, "dengage api user"),
        ]:
            with run.client() as client:
                assert client.login(user, password).startswith("235 "), user
                assert data(client, subject, sender).startswith("250 2.0.0 "), subject
                datas += 1
        # A token that expires mid-run: a 401, one re-login, a new token.
        httpx.post(f"{url}/_sandbox/dengage", json={"expire_tokens": True}).raise_for_status()
        with run.client() as client:
            assert client.login("erp", PASSWORD).startswith("235 ")
            assert data(client, "after re-login", DENGAGE_SENDER).startswith("250 2.0.0 ")
            datas += 1
        # The upstream refuses our key: queued, logged as an operator error.
        httpx.post(f"{url}/_sandbox/faults", json={"status": 403, "count": 1, "kind": "send"}).raise_for_status()
        with run.client() as client:
            assert client.login().startswith("235 ")
            assert data(client, "key refused").startswith("250 2.0.0 ")
            datas += 1
            assert data(client, "bad sender", "mallory@evil.example").startswith("553 ")  # refused at MAIL
        httpx.delete(f"{url}/_sandbox/faults").raise_for_status()
        # A brute force that ends in a lockout.
        for n in range(3):
            with run.client("127.0.3.1") as client:
                for m in range(3):
                    if not client.login("acme-22", f"guess-{n}-{m}-{CAMPAIGNS[23]}").startswith("535 "):
                        break
        # A reload (the configuration is read again, secrets files and all).
        run.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: '"config_reloaded"' in run.log.read_text(), 30, "config_reloaded")
        wait_for(lambda: "upstream_refused_credentials" in run.log.read_text(), 30, "the refusal logged")
    finally:
        lines = run.stop()
    tokens = list(dengage.tokens)
    assert len(tokens) >= 1  # the token in use at the end (the expired one was dropped by the sandbox)

    # The PostgreSQL queue unreachable: serve and the queue commands refuse, naming it, never its password.
    broken = gateway_config(tmp_path / "broken", box.port)
    broken["delivery"] = {
        "queue_url": f"postgresql://gateway@/nowhere?host={tmp_path}/no-such-dir",
        "queue_password": QUEUE_PASSWORD,
    }
    broken_path = tmp_path / "broken.toml"
    broken_path.write_text(toml(broken))
    for command in (["serve"], ["queue", "list"]):
        refused = subprocess.run(
            [*CLI, command[0], "--config", str(broken_path), *command[1:]], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 1 and "cannot connect to" in refused.stderr, refused.stderr
        lines.append({"event": "refused", "command": command, "output": refused.stdout + refused.stderr})

    text = "\n".join(json.dumps(line) for line in lines)
    secrets = [
        PASSWORD,
        APIKEY,
        *CAMPAIGNS.values(),
        DENGAGE_USERKEY,
        DENGAGE_API_PASSWORD,
        QUEUE_PASSWORD,
        PASSWORD_HASH,
        PASSWORD_HASH.split("$")[-1],
        *tokens,
    ]
    secrets += [b64(s) for s in secrets] + [b64(f"\0{USER}\0{PASSWORD}"), b64(f"\0acme-22\0{CAMPAIGNS[22]}")]
    assert [s for s in secrets if s in text] == []
    assert "guess-" not in text and "wrong-" not in text  # passwords that were tried are no one's business

    events = {line["event"] for line in lines}
    assert {
        "auth_failed",
        "auth_ok",
        "auth_lockout",
        "dengage_login",
        "dengage_token_rejected",
        "upstream_refused_credentials",
        "config_reloaded",
        "refused",
    } <= events
    main = [line for line in lines if line.get("worker") is None]
    summaries = [line for line in main if line["event"] in SUMMARIES]
    assert len(summaries) == datas  # one per DATA
    # The lines of a session carry its id; a session's lines all share it.
    for line in main:
        if line["event"] in ("auth_ok", "auth_failed", "message_sent", "message_spooled", *SUMMARIES):
            assert line.get("session") and line.get("peer") and line.get("listener") == "plain", line
    failed = [line for line in main if line["event"] == "auth_failed"]
    assert any("login_unknown" in line for line in failed)  # the password-as-username, fingerprinted
