"""check-domains reports against the loopback DNS server (tests/dnsserver.py), plus the pure helpers."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.policy.dns import DnsResolver
from gateway.policy.domaincheck import (
    DomainReport,
    aligned_relaxed,
    check_domain,
    check_domains,
    format_table,
    organizational_domain,
    to_json,
)
from tests.conftest_dns import DNS_TIMEOUT
from tests.dnsserver import DnsServer

SPF = "v=spf1 ip4:192.0.2.1 -all"

# ---- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("dom1.com", "dom1.com"),
        ("nl.dom1.com", "dom1.com"),
        ("a.b.nl.dom1.com", "dom1.com"),
        ("NL.Dom1.COM.", "dom1.com"),
        ("nl.dom1.co.uk", "dom1.co.uk"),
        ("www.example.com.ar", "example.com.ar"),
        ("co.uk", "co.uk"),  # a public suffix stays itself
        ("com", "com"),
        ("nl.dom1.test", "dom1.test"),  # unknown TLD: the last label is the suffix
        ("x.y.github.io", "y.github.io"),  # the PSL's private section counts
        ("", ""),
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("a", "b", "aligned"),
    [
        ("nl.dom1.com", "dom1.com", True),
        ("dom1.com", "nl.dom1.com", True),
        ("dom1.com", "DOM1.com.", True),
        ("a.dom1.co.uk", "b.dom1.co.uk", True),
        ("dom1.com", "other.com", False),
        ("dom1.co.uk", "dom2.co.uk", False),  # same public suffix is not alignment
        ("a.github.io", "b.github.io", False),
        ("co.uk", "dom1.co.uk", False),
        ("dom1.com", "dom1.com.ar", False),
        ("", "", False),
        ("dom1.com", "", False),
    ],
)
def test_aligned_relaxed(a: str, b: str, aligned: bool) -> None:
    assert aligned_relaxed(a, b) is aligned


# ---- reports ------------------------------------------------------------------------------------


async def test_good_domain(dns_resolver: DnsResolver) -> None:
    report = await check_domain(dns_resolver, "dom1.test", "dmds-dom1@nl.dom1.test")
    assert report == DomainReport(
        domain="dom1.test",
        return_path="dmds-dom1@nl.dom1.test",
        domain_exists=True,
        return_path_mx=["mx.dom1.test"],
        spf=SPF,
        return_path_spf=SPF,
        dmarc="v=DMARC1; p=reject",
        dmarc_policy="reject",
        aligned=True,
        problems=[],
        warnings=[],
    )
    assert report.ok


async def test_misaligned_return_path_is_a_problem(dns_resolver: DnsResolver) -> None:
    report = await check_domain(dns_resolver, "misaligned.test", "bounce@other.test")
    assert not report.ok
    assert report.aligned is False
    assert report.dmarc_policy == "quarantine"
    assert report.return_path_mx == ["mx.dom1.test"]
    assert len(report.problems) == 1
    assert "other.test is not aligned with From domain misaligned.test" in report.problems[0]
    assert report.warnings == []


async def test_a_only_domain_has_warnings_only(dns_resolver: DnsResolver) -> None:
    report = await check_domain(dns_resolver, "nomx.test", "dmds@nomx.test")
    assert report.ok
    assert report.domain_exists is True
    assert report.return_path_mx == []
    assert (report.spf, report.return_path_spf, report.dmarc, report.dmarc_policy) == (None, None, None, None)
    assert report.warnings == [
        "return-path domain nomx.test has no MX; bounces rely on its A/AAAA record",
        "no SPF record (TXT v=spf1) for return-path domain nomx.test",
        "no SPF record (TXT v=spf1) for sender domain nomx.test",
        "no DMARC record at _dmarc.nomx.test",
    ]


async def test_missing_dmarc_is_a_warning(dns_resolver: DnsResolver) -> None:
    report = await check_domain(dns_resolver, "nodmarc.test", "b@nl.nodmarc.test")
    assert report.ok
    assert report.dmarc is None
    assert report.warnings == ["no DMARC record at _dmarc.nodmarc.test"]


async def test_dmarc_p_none_is_a_warning(dns_resolver: DnsResolver) -> None:
    report = await check_domain(dns_resolver, "pnone.test", "b@pnone.test")
    assert report.ok
    assert report.dmarc_policy == "none"
    assert report.warnings == ["DMARC policy of pnone.test is p=none: monitoring only, spoofed mail is not refused"]


async def test_dmarc_falls_back_to_organizational_domain(dns_resolver: DnsResolver, dns_server: DnsServer) -> None:
    report = await check_domain(dns_resolver, "news.dom1.test", "b@nl.dom1.test")
    assert report.dmarc == "v=DMARC1; p=reject"
    assert report.dmarc_policy == "reject"
    assert dns_server.count("_dmarc.news.dom1.test", "TXT") == 1
    assert dns_server.count("_dmarc.dom1.test", "TXT") == 1


async def test_subdomain_policy_sp_applies_when_found_at_organizational_domain(
    dns_resolver: DnsResolver,
) -> None:
    sub = await check_domain(dns_resolver, "sub.spdom.test", "b@sub.spdom.test")
    assert (sub.dmarc_policy, sub.warnings) == ("quarantine", [])
    org = await check_domain(dns_resolver, "spdom.test", "b@sub.spdom.test")
    assert org.dmarc_policy == "reject"
    assert org.ok
    assert org.warnings == [
        "DMARC at _dmarc.spdom.test has aspf=s: SPF of return-path domain sub.spdom.test is not strictly aligned"
    ]


@pytest.mark.parametrize(
    ("domain", "return_path", "exists", "problems"),
    [
        (
            "nosuch.test",
            "b@nl.nosuch.test",
            False,
            [
                "sender domain nosuch.test does not exist in DNS (no MX, A or AAAA record)",
                "return-path domain nl.nosuch.test has no MX, A or AAAA record: bounces cannot be delivered",
            ],
        ),
        (
            "dom1.test",
            "b@nullmx.test",
            True,
            [
                "return-path domain nullmx.test has a null MX (RFC 7505): it accepts no bounces",
                "return-path domain nullmx.test is not aligned with From domain dom1.test "
                "(organizational domains nullmx.test and dom1.test differ): DMARC cannot pass through SPF",
            ],
        ),
        (
            "dom1.test",
            "not-an-address",
            True,
            ["return-path 'not-an-address' is not an address local@domain"],
        ),
    ],
)
async def test_problems(
    dns_resolver: DnsResolver, domain: str, return_path: str, exists: bool, problems: list[str]
) -> None:
    report = await check_domain(dns_resolver, domain, return_path)
    assert report.domain_exists is exists
    assert report.problems == problems
    assert not report.ok


@pytest.mark.parametrize("domain", ["slow.test", "broken.test"])
async def test_dns_failures_become_problems(dns_resolver: DnsResolver, domain: str) -> None:
    async with asyncio.timeout(5 * DNS_TIMEOUT):
        report = await check_domain(dns_resolver, domain, f"b@nl.{domain}")
    assert report.domain_exists is None
    assert not report.ok
    assert len(report.problems) == 5  # existence, return-path MX, both SPF lookups, DMARC
    assert all(p.startswith("DNS timeout or server failure checking ") for p in report.problems)
    assert any(f"existence of sender domain {domain}" in p for p in report.problems)


async def test_check_domains_keeps_order_and_shares_lookups(dns_resolver: DnsResolver, dns_server: DnsServer) -> None:
    pairs = {
        "slow.test": "b@nl.slow.test",
        "dom1.test": "dmds-dom1@nl.dom1.test",
        "news.dom1.test": "b@nl.dom1.test",
        "misaligned.test": "bounce@other.test",
    }
    async with asyncio.timeout(5 * DNS_TIMEOUT):
        reports = await check_domains(dns_resolver, pairs)
    assert [r.domain for r in reports] == list(pairs)
    assert [r.ok for r in reports] == [False, True, True, False]
    assert dns_server.count("nl.dom1.test", "MX") == 1
    assert dns_server.count("_dmarc.dom1.test", "TXT") == 1


# ---- output -------------------------------------------------------------------------------------

EXPECTED_TABLE = """\
DOMAIN           RETURN-PATH             EXISTS  RETURN-PATH MX  RP SPF  SPF  DMARC         ALIGNED  RESULT
dom1.test        dmds-dom1@nl.dom1.test  yes     mx.dom1.test    yes     yes  p=reject      yes      ok
misaligned.test  bounce@other.test       yes     mx.dom1.test    yes     yes  p=quarantine  no       FAIL
    problem: return-path domain other.test is not aligned with From domain misaligned.test \
(organizational domains other.test and misaligned.test differ): DMARC cannot pass through SPF
nodmarc.test     b@nl.nodmarc.test       yes     mx.dom1.test    yes     yes  -             yes      warn
    warning: no DMARC record at _dmarc.nodmarc.test
3 domain(s): 2 ok, 1 with problems
"""


async def test_format_table(dns_resolver: DnsResolver) -> None:
    reports = await check_domains(
        dns_resolver,
        {
            "dom1.test": "dmds-dom1@nl.dom1.test",
            "misaligned.test": "bounce@other.test",
            "nodmarc.test": "b@nl.nodmarc.test",
        },
    )
    assert format_table(reports) == EXPECTED_TABLE


def test_format_table_marks_unknown_and_many_mx() -> None:
    report = DomainReport(
        domain="x.test",
        return_path="b@x.test",
        domain_exists=None,
        return_path_mx=["a.x.test", "b.x.test", "c.x.test"],
        spf=None,
        return_path_spf=None,
        dmarc="v=DMARC1; p=bogus",
        dmarc_policy=None,
        aligned=True,
        problems=["DNS timeout or server failure checking something"],
        warnings=[],
    )
    row = format_table([report]).splitlines()[1].split()
    assert row == [
        "x.test",
        "b@x.test",
        "?",
        "a.x.test,",
        "b.x.test",
        "...",
        "-",
        "-",
        "invalid",
        "yes",
        "FAIL",
    ]


async def test_to_json(dns_resolver: DnsResolver) -> None:
    reports = await check_domains(
        dns_resolver, {"dom1.test": "dmds-dom1@nl.dom1.test", "nosuch.test": "b@nl.nosuch.test"}
    )
    good, bad = json.loads(to_json(reports))
    assert good == {
        "domain": "dom1.test",
        "return_path": "dmds-dom1@nl.dom1.test",
        "domain_exists": True,
        "return_path_mx": ["mx.dom1.test"],
        "spf": SPF,
        "return_path_spf": SPF,
        "dmarc": "v=DMARC1; p=reject",
        "dmarc_policy": "reject",
        "aligned": True,
        "problems": [],
        "warnings": [],
        "ok": True,
    }
    assert bad["ok"] is False
    assert bad["domain_exists"] is False
    assert bad["return_path_mx"] == []
    assert len(bad["problems"]) == 2
