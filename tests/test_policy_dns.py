"""Sender/recipient domain existence over SMTP and `smtp-gateway check-domains`, against the loopback DNS server.

The DNS server runs on the harness' background loop (the gateway's loop), so synchronous smtplib tests and
the CLI subprocess can use it while the test thread blocks.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configs import gateway_config, listener, write
from tests.conftest_dns import DNS_TIMEOUT, MX, SPF, make_zones
from tests.devices_util import captured_logs, events
from tests.dnsserver import DnsServer, ZoneData
from tests.harness import LoopThread, Running
from tests.smtputil import session

Factory = Callable[..., Running]

SENDER_DOMAINS = {
    "acme.example": "dmds-acme@nl.acme.example",
    "gone.example": "dmds-gone@nl.gone.example",  # NXDOMAIN
    "txtonly.example": "dmds-txt@nl.acme.example",  # exists, but no MX, A or AAAA
    "aonly.example": "dmds-a@nl.aonly.example",  # only an A record: exists
    "slow.example": "dmds-slow@nl.slow.example",  # never answered
    "broken.example": "dmds-broken@nl.broken.example",  # SERVFAIL
}


def zones() -> ZoneData:
    data = make_zones()
    data.zones["example"] = {
        "acme.example": [("MX", 300, MX), ("TXT", 300, SPF)],
        "_dmarc.acme.example": [("TXT", 300, '"v=DMARC1; p=reject"')],
        "nl.acme.example": [("MX", 300, MX), ("TXT", 300, SPF)],
        "txtonly.example": [("TXT", 300, '"hello"')],
        "aonly.example": [("A", 300, "192.0.2.80")],
        "client.example": [("MX", 300, MX)],
    }
    data.servfail.add("broken.example")
    data.blackhole.add("slow.example")
    return data


@pytest.fixture
def dns_thread(loop_thread: LoopThread) -> Iterator[DnsServer]:
    """The loopback DNS server on the background loop (not the test's), for the gateway and subprocesses."""

    async def start() -> DnsServer:
        return await DnsServer(zones()).start()

    server = loop_thread.run(start())
    try:
        yield server
    finally:
        loop_thread.run(server.close())


def dns_config(server: DnsServer, **extra: Any) -> dict[str, Any]:
    return {
        "nameservers": ["127.0.0.1"],
        "port": server.port,
        "check_sender_domain": True,
        "timeout": DNS_TIMEOUT,
        **extra,
    }


def start(factory: Factory, server: DnsServer, **dns: Any) -> Running:
    upstream = factory()  # lends its sandbox
    gw = factory(
        accounts={"acme": {"api_base": upstream.sandbox_url, "sender_domains": SENDER_DOMAINS}},  # the rest as usual
        dns=dns_config(server, **dns),
    )
    gw.extra["upstream"] = upstream
    return gw


def line(reply: tuple[int, bytes]) -> str:
    return f"{reply[0]} {reply[1].decode()}"


# ---- MAIL FROM ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "reply"),
    [
        ("billing@acme.example", "250 2.1.0 Ok"),
        ("dmds-acme@nl.acme.example", "250 2.1.0 Ok"),  # the return-path's own domain is looked up
        ("billing@aonly.example", "250 2.1.0 Ok"),
        ("x@gone.example", "553 5.1.8 <x@gone.example>: The domain name gone.example does not exist."),
        ("x@txtonly.example", "553 5.1.8 <x@txtonly.example>: The domain name txtonly.example does not exist."),
        (
            "x@slow.example",
            "451 4.4.3 <x@slow.example>: DNS lookup of slow.example failed temporarily "
            "(DNS timeout looking up slow.example MX); try again later",
        ),
        (
            "x@broken.example",
            "451 4.4.3 <x@broken.example>: DNS lookup of broken.example failed temporarily "
            "(no DNS server answered for broken.example MX (SERVFAIL or refused)); try again later",
        ),
    ],
)
def test_sender_domain_must_exist(gateway_factory: Factory, dns_thread: DnsServer, mail_from: str, reply: str) -> None:
    gw = start(gateway_factory, dns_thread)
    with session(gw) as client:
        assert line(client.mail(mail_from)) == reply
    assert dns_thread.count(mail_from.rpartition("@")[2], "MX") >= 1


def test_library_error_text_stays_out_of_the_reply(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    # A DNS error with no branch of its own (YXDOMAIN): the reply is in the gateway's words, dnspython's own
    # text ("The DNS query name is too long after DNAME substitution.") goes to the log only.
    dns_thread.data.yxdomain.add("odd.example")
    upstream = gateway_factory()
    domains = {**SENDER_DOMAINS, "odd.example": "dmds-odd@nl.acme.example"}
    gw = gateway_factory(
        accounts={"acme": {"api_base": upstream.sandbox_url, "sender_domains": domains}},
        dns=dns_config(dns_thread),
    )
    with captured_logs() as logs, session(gw) as client:
        reply = line(client.mail("x@odd.example"))
    assert reply == (
        "451 4.4.3 <x@odd.example>: DNS lookup of odd.example failed temporarily "
        "(DNS lookup of odd.example MX failed); try again later"
    )
    [refused] = events(logs, "sender_rejected")
    assert refused["reply"] == reply
    assert "YXDOMAIN" in refused["reason"] and "DNAME substitution" in refused["reason"]


def test_policy_refusal_comes_before_any_lookup(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread)
    with session(gw) as client:
        assert line(client.mail("x@client.example")) == (
            "553 5.7.1 <x@client.example>: Sender address rejected: not owned by scanner"
        )
    assert dns_thread.count("client.example") == 0


def test_sender_domain_answer_is_cached(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread, negative_ttl=300)
    with session(gw) as client:
        for _ in range(3):
            assert line(client.mail("x@gone.example")).startswith("553 5.1.8 ")
    assert dns_thread.count("gone.example", "MX") == 1


def test_sender_domain_check_off(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread, check_sender_domain=False)
    with session(gw) as client:
        assert line(client.mail("x@gone.example")) == "250 2.1.0 Ok"
    assert dns_thread.count("gone.example") == 0  # and no startup report either


def test_temporary_failure_then_success_in_one_session(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread)
    with session(gw) as client:
        assert line(client.mail("x@slow.example")).startswith("451 4.4.3 ")
        assert line(client.mail("billing@acme.example")) == "250 2.1.0 Ok"


# ---- RCPT TO ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "rcpt", "reply"),
    [
        (False, "x@nowhere.example", "250 2.1.5 Ok"),  # default: the API validates recipients
        (True, "x@client.example", "250 2.1.5 Ok"),
        (True, "x@nowhere.example", "550 5.1.2 <x@nowhere.example>: The domain name nowhere.example does not exist."),
        (
            True,
            "x@mx.slow.example",
            "451 4.4.3 <x@mx.slow.example>: DNS lookup of mx.slow.example failed temporarily "
            "(DNS timeout looking up mx.slow.example MX); try again later",
        ),
    ],
)
def test_recipient_domain_check(
    gateway_factory: Factory, dns_thread: DnsServer, check: bool, rcpt: str, reply: str
) -> None:
    gw = start(gateway_factory, dns_thread, check_recipient_domains=check)
    with session(gw) as client:
        assert line(client.mail("billing@acme.example")) == "250 2.1.0 Ok"
        assert line(client.rcpt(rcpt)) == reply
    # not a sender domain: only the RCPT check can have looked it up
    assert dns_thread.count(rcpt.rpartition("@")[2], "MX") == (1 if check else 0)


def test_message_sent_after_dns_checks(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread, check_recipient_domains=True)
    raw = b"From: billing@acme.example\r\nTo: x@client.example\r\nSubject: hi\r\n\r\nhello\r\n"
    with session(gw) as client:
        client.sendmail("billing@acme.example", ["x@client.example"], raw)
    upstream: Running = gw.extra["upstream"]
    assert [r["body"]["remitente"] for r in upstream.sent] == ["billing@acme.example"]


def test_unknown_sender_domain_through_sendmail(gateway_factory: Factory, dns_thread: DnsServer) -> None:
    gw = start(gateway_factory, dns_thread)
    with session(gw) as client, pytest.raises(smtplib.SMTPSenderRefused) as exc:
        client.sendmail("x@gone.example", ["x@client.example"], b"Subject: x\r\n\r\nx\r\n")
    assert (exc.value.smtp_code, exc.value.smtp_error) == (
        553,
        b"5.1.8 <x@gone.example>: The domain name gone.example does not exist.",
    )


# ---- check-domains CLI --------------------------------------------------------------------------


def write_config(tmp_path: Path, server: DnsServer, domains: dict[str, str]) -> Path:
    dns = {"nameservers": ["127.0.0.1"], "port": server.port, "timeout": DNS_TIMEOUT, "check_sender_domain": True}
    config = gateway_config(tmp_path, listeners=[listener()], accounts={"acme": {"sender_domains": domains}}, dns=dns)
    return write(tmp_path / "gateway.toml", config)


def check_domains(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["smtp-gateway", "check-domains", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_domains_all_ok(tmp_path: Path, dns_thread: DnsServer) -> None:
    config = write_config(tmp_path, dns_thread, {"acme.example": "dmds-acme@nl.acme.example"})
    result = check_domains(config)
    assert result.returncode == 0, result.stderr
    header, row, summary = result.stdout.strip().splitlines()
    assert header.split() == [
        "DOMAIN",
        "RETURN-PATH",
        "EXISTS",
        "RETURN-PATH",
        "MX",
        "RP",
        "SPF",
        "SPF",
        "DMARC",
        "ALIGNED",
        "RESULT",
    ]
    assert row.split() == [
        "acme.example",
        "dmds-acme@nl.acme.example",
        "yes",
        "mx.dom1.test",
        "yes",
        "yes",
        "p=reject",
        "yes",
        "ok",
    ]
    assert summary == "1 domain(s): 1 ok, 0 with problems"


def test_check_domains_reports_problems(tmp_path: Path, dns_thread: DnsServer) -> None:
    domains = {
        "acme.example": "dmds-acme@nl.acme.example",
        "gone.example": "dmds-gone@nl.gone.example",
        "slow.example": "dmds-slow@nl.acme.example",
        "aonly.example": "dmds-acme@nl.acme.example",
    }
    config = write_config(tmp_path, dns_thread, domains)
    result = check_domains(config)
    assert result.returncode == 1
    out = result.stdout
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in domains}
    assert rows["acme.example"][-1] == "ok"
    assert rows["gone.example"][2] == "no"
    assert rows["gone.example"][-1] == "FAIL"
    assert rows["slow.example"][2] == "?"
    assert rows["slow.example"][-1] == "FAIL"
    assert rows["aonly.example"][-2:] == ["no", "FAIL"]  # return-path in another organizational domain
    assert "    problem: sender domain gone.example does not exist in DNS (no MX, A or AAAA record)" in out
    assert (
        "    problem: return-path domain nl.gone.example has no MX, A or AAAA record: bounces cannot be delivered"
        in out
    )
    assert "    problem: DNS timeout or server failure checking existence of sender domain slow.example" in out
    assert "    problem: return-path domain nl.acme.example is not aligned with From domain aonly.example" in out
    assert out.rstrip().endswith("4 domain(s): 1 ok, 3 with problems")


def test_check_domains_json(tmp_path: Path, dns_thread: DnsServer) -> None:
    domains = {"acme.example": "dmds-acme@nl.acme.example", "gone.example": "dmds-gone@nl.gone.example"}
    result = check_domains(write_config(tmp_path, dns_thread, domains), "--json")
    assert result.returncode == 1
    reports = json.loads(result.stdout)
    assert [(r["domain"], r["ok"], r["domain_exists"]) for r in reports] == [
        ("acme.example", True, True),
        ("gone.example", False, False),
    ]
    assert reports[0]["return_path_mx"] == ["mx.dom1.test"]
    assert reports[0]["dmarc_policy"] == "reject"
    assert reports[1]["problems"][0] == "sender domain gone.example does not exist in DNS (no MX, A or AAAA record)"


def test_check_domains_without_sender_domains(tmp_path: Path, dns_thread: DnsServer) -> None:
    result = check_domains(write_config(tmp_path, dns_thread, {}))
    assert result.returncode == 1
    assert "no sender_domains configured" in result.stderr
