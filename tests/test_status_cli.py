"""`smtp-gateway status` as a subprocess against a quick-start-like spool (`--spool FILE`, no config file),
while the gateway that wrote it runs: by the 250 id, the local id, the Message-ID and an address; --json;
the exit statuses (0 found, 1 nothing found, 2 usage)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.harness import Running
from tests.spool_helpers import send


def status(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        ["smtp-gateway", "status", "--spool", str(spool), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_status_finds_a_message_by_each_of_its_names(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory()
    code, text = send(gw.port(), "Scan 12", to=("someone@example.net",), extra="Message-ID: <scan-12@acme.example>\r\n")
    assert code == 250
    eeid = text.rsplit(" ", 1)[1]
    send(gw.port(), "Scan 13", to=("someone@example.net",))
    assert gw.app.ledger_writer is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    spool = gw.settings.delivery.spool_path

    shown = status(spool, eeid)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[1] == "sent" and '"Scan 12"' in lines[0] and "acme/scanner" in lines[0]
    assert f"  reply       250 {text}" in lines
    assert "  message-id  <scan-12@acme.example>" in lines
    assert any(line.split()[:2] == ["someone@example.net", "sent"] and eeid in line for line in lines)
    timeline = lines[lines.index("  timeline") + 1 :]
    assert "accepted" in timeline[0] and f"attempt  call 0 (someone@example.net)  delivered  {eeid}" in timeline[1]
    local = lines[0].split()[0]
    assert status(spool, local).stdout == shown.stdout
    assert status(spool, local.lower()).stdout == shown.stdout
    assert status(spool, "<scan-12@acme.example>").stdout == shown.stdout

    listed = status(spool, "Someone@Example.NET")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0] == "2 message(s) by recipient, newest first:"
    assert listed.stdout.splitlines()[1].split()[-2:] == ['"Scan', '13"']
    assert len(status(spool, "someone@example.net", "--limit", "1").stdout.splitlines()) == 3  # + "(more: ...)"

    data = json.loads(status(spool, eeid, "--json").stdout)
    assert data["found"] == "reply_id"
    [message] = data["messages"]
    assert message["id"] == local and message["state"] == "sent" and message["reply"] == f"250 {text}"
    assert [e["kind"] for e in message["events"]] == ["accepted", "attempt"]
    assert message["recipients"][0]["upstream_id"] == eeid

    missing = status(spool, "nobody@example.net")
    assert missing.returncode == 1 and "no message in the ledger" in missing.stdout
    assert json.loads(status(spool, "nobody@example.net", "--json").stdout) == {"found": None, "messages": []}
    assert status(spool, eeid, "--limit", "0").returncode == 2
    gone = status(spool.with_name("nothing-here.sqlite3"), eeid)
    assert gone.returncode == 1 and gone.stderr.startswith("smtp-gateway: no queue"), gone.stderr
