"""The startup report: with dns.check_sender_domain on, `smtp-gateway serve` logs the same findings as
`check-domains` for every permitted sender domain (sender_domain_ok / _warning / _problem), read from the
real server's JSON log (a subprocess) against the loopback DNS server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configs import serve_config, write
from tests.conftest_dns import DNS_TIMEOUT, MX, SPF, dns_on_thread, make_zones
from tests.dnsserver import DnsServer, ZoneData
from tests.harness import APIKEY, LoopThread
from tests.procs import spawn
from tests.spool_helpers import wait_for

CLI = [sys.executable, "-m", "gateway"]
FINDINGS = ("sender_domain_ok", "sender_domain_warning", "sender_domain_problem")

SENDER_DOMAINS = {
    "acme.example": "dmds-acme@nl.acme.example",  # MX, SPF, DMARC, return-path with MX: ok
    "gone.example": "dmds-gone@nl.gone.example",  # NXDOMAIN: problem
    "nodmarc.example": "dmds-nd@nl.nodmarc.example",  # fine but no DMARC: a warning only
}


def _zones() -> ZoneData:
    data = make_zones()
    data.zones["example"] = {
        "acme.example": [("MX", 300, MX), ("TXT", 300, SPF)],
        "_dmarc.acme.example": [("TXT", 300, '"v=DMARC1; p=reject"')],
        "nl.acme.example": [("MX", 300, MX), ("TXT", 300, SPF)],
        "nodmarc.example": [("MX", 300, MX), ("TXT", 300, SPF)],
        "nl.nodmarc.example": [("MX", 300, MX), ("TXT", 300, SPF)],
    }
    return data


@pytest.fixture
def dns_thread(loop_thread: LoopThread) -> Iterator[DnsServer]:
    with dns_on_thread(loop_thread, _zones()) as server:
        yield server


def _config(tmp: Path, dns_port: int, check: bool) -> Path:
    dns = {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": DNS_TIMEOUT, "check_sender_domain": check}
    return write(
        tmp / "gateway.toml", serve_config(tmp, accounts={"acme": {"sender_domains": SENDER_DOMAINS}}, dns=dns)
    )


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def _findings(log: Path) -> dict[str, dict[str, Any]]:
    return {e["domain"]: e for e in _events(log) if e.get("event") in FINDINGS}


def _serve(tmp: Path, dns: DnsServer, check: bool) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / "gateway.log"
    with log.open("wb") as out:
        proc = spawn(
            [*CLI, "serve", "-c", str(_config(tmp, dns.port, check)), "--drain-timeout", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise


def test_startup_logs_sender_domain_findings(tmp_path: Path, dns_thread: DnsServer) -> None:
    proc, log = _serve(tmp_path, dns_thread, check=True)
    try:

        def complete() -> dict[str, dict[str, Any]] | None:
            assert proc.poll() is None, log.read_text()
            found = _findings(log)
            return found if len(found) == len(SENDER_DOMAINS) else None

        findings = wait_for(complete, 15, "a finding for every sender domain")
    finally:
        assert _stop(proc) == 0
    assert {d: e["event"] for d, e in findings.items()} == {
        "acme.example": "sender_domain_ok",
        "gone.example": "sender_domain_problem",
        "nodmarc.example": "sender_domain_warning",
    }
    ok = findings["acme.example"]
    assert (ok["level"], ok["account"], ok["return_path"]) == ("info", "acme", "dmds-acme@nl.acme.example")
    problem = findings["gone.example"]
    assert problem["level"] == "error"
    assert problem["account"] == "acme" and problem["return_path"] == "dmds-gone@nl.gone.example"
    assert "sender domain gone.example does not exist in DNS (no MX, A or AAAA record)" in problem["problems"]
    assert any("nl.gone.example" in p and "bounces cannot be delivered" in p for p in problem["problems"])
    warning = findings["nodmarc.example"]
    assert warning["level"] == "warning"
    assert any("DMARC" in w and "nodmarc.example" in w for w in warning["warnings"])
    # One report per domain, no duplicates; and the key never reaches the log.
    assert sum(e.get("event") in FINDINGS for e in _events(log)) == len(SENDER_DOMAINS)
    assert APIKEY not in log.read_text()
    assert dns_thread.count("gone.example", "MX") >= 1


def test_no_startup_report_when_the_check_is_off(tmp_path: Path, dns_thread: DnsServer) -> None:
    proc, log = _serve(tmp_path, dns_thread, check=False)
    try:
        wait_for(
            lambda: any(e.get("event") == "ready" for e in _events(log)) or proc.poll() is not None, 15, "gateway ready"
        )
    finally:
        assert _stop(proc) == 0
    assert [e for e in _events(log) if e.get("event") in FINDINGS] == []
    assert dns_thread.count("acme.example") == 0 and dns_thread.count("gone.example") == 0
