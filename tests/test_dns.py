"""DnsResolver against the loopback authoritative server in tests/dnsserver.py (no mocked resolver)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.policy.dns import DnsResolver, DnsTemporaryError
from tests.conftest_dns import DNS_TIMEOUT
from tests.dnsserver import DnsServer

# generous bound: a resolver that ignored its 0.3 s timeout would take dnspython's default 5 s
FAST = 5 * DNS_TIMEOUT  # a temporary error: a lookup or two, each bounded by the timeout


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver_for(server: DnsServer, **kwargs: Any) -> DnsResolver:
    return DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT, **kwargs)


# ---- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "exists"),
    [
        ("dom1.test", True),  # MX
        ("DOM1.test.", True),  # case and final dot do not matter
        ("mxonly.test", True),  # only an MX counts
        ("nomx.test", True),  # only an A (implicit MX)
        ("v6only.test", True),  # only an AAAA
        ("txtonly.test", False),  # the name exists, but no MX, A or AAAA
        ("nosuch.test", False),  # NXDOMAIN
        ("", False),
        ("a..b.test", False),  # not a valid name
        ("x" * 64 + ".test", False),  # label too long
    ],
)
async def test_domain_exists(dns_resolver: DnsResolver, domain: str, exists: bool) -> None:
    assert await dns_resolver.domain_exists(domain) is exists


async def test_domain_exists_stops_at_nxdomain(dns_resolver: DnsResolver, dns_server: DnsServer) -> None:
    assert await dns_resolver.domain_exists("nosuch.test") is False
    assert dns_server.queries == [("nosuch.test", "MX")]


async def test_invalid_name_sends_no_query(dns_resolver: DnsResolver, dns_server: DnsServer) -> None:
    assert await dns_resolver.mx("a..b.test") == []
    assert dns_server.queries == []


async def test_mx_sorted_by_preference(dns_resolver: DnsResolver) -> None:
    assert await dns_resolver.mx("multimx.test") == [(5, "mx1.dom1.test"), (20, "mx2.dom1.test")]
    assert await dns_resolver.mx("dom1.test") == [(10, "mx.dom1.test")]
    assert await dns_resolver.mx("nullmx.test") == [(0, ".")]
    assert await dns_resolver.mx("nomx.test") == []
    assert await dns_resolver.mx("nosuch.test") == []


async def test_txt_joins_character_strings(dns_resolver: DnsResolver) -> None:
    assert await dns_resolver.txt("split.test") == ["v=spf1 ip4:192.0.2.1 -all"]
    assert await dns_resolver.txt("_dmarc.dom1.test") == ["v=DMARC1; p=reject"]
    assert await dns_resolver.txt("nomx.test") == []
    assert await dns_resolver.txt("nosuch.test") == []


async def test_truncated_answer_is_retried_over_tcp(dns_resolver: DnsResolver, dns_server: DnsServer) -> None:
    assert await dns_resolver.txt("bigtxt.test") == ["".join(c * 250 for c in "abcdef")]
    assert dns_server.count("bigtxt.test", "TXT") == 2  # UDP (truncated), then TCP


async def test_a_or_aaaa(dns_resolver: DnsResolver) -> None:
    assert await dns_resolver.a_or_aaaa("dom1.test") == ["192.0.2.1"]
    assert await dns_resolver.a_or_aaaa("v6only.test") == ["2001:db8::1"]
    assert await dns_resolver.a_or_aaaa("mxonly.test") == []
    assert await dns_resolver.a_or_aaaa("nosuch.test") == []


# ---- temporary errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["slow.test", "broken.test", "outside.example"])
async def test_temporary_errors_raise_fast_and_are_not_cached(dns_server: DnsServer, domain: str) -> None:
    resolver = resolver_for(dns_server)
    async with asyncio.timeout(FAST):
        with pytest.raises(DnsTemporaryError, match=domain):
            await resolver.mx(domain)
        first = dns_server.count(domain, "MX")
        assert first >= 1
        with pytest.raises(DnsTemporaryError):
            await resolver.domain_exists(domain)
    assert dns_server.count(domain, "MX") > first  # asked again: the failure was not cached


# ---- cache --------------------------------------------------------------------------------------


async def test_positive_answer_is_cached(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    assert await resolver.mx("dom1.test") == [(10, "mx.dom1.test")]
    dns_server.data.zones["test"]["dom1.test"] = [("MX", 300, "10 changed.dom1.test.")]
    assert await resolver.mx("dom1.test") == [(10, "mx.dom1.test")]
    assert await resolver.domain_exists("dom1.test") is True
    assert dns_server.count("dom1.test", "MX") == 1


@pytest.mark.parametrize(("name", "rdtype"), [("nosuch.test", "MX"), ("txtonly.test", "MX")])
async def test_negative_answer_cached_for_negative_ttl(dns_server: DnsServer, name: str, rdtype: str) -> None:
    clock = FakeClock()
    resolver = resolver_for(dns_server, negative_ttl=300, clock=clock)
    assert await resolver.mx(name) == []
    clock.now += 299
    assert await resolver.mx(name) == []
    assert dns_server.count(name, rdtype) == 1
    clock.now += 1
    assert await resolver.mx(name) == []
    assert dns_server.count(name, rdtype) == 2


async def test_positive_answer_expires_with_record_ttl(dns_server: DnsServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(dns_server, clock=clock)
    assert await resolver.a_or_aaaa("shortttl.test") == ["192.0.2.60"]  # TTL 60
    clock.now += 59.9
    await resolver.a_or_aaaa("shortttl.test")
    assert dns_server.count("shortttl.test", "A") == 1
    clock.now += 0.1
    await resolver.a_or_aaaa("shortttl.test")
    assert dns_server.count("shortttl.test", "A") == 2


async def test_ttl_is_capped_at_max_ttl(dns_server: DnsServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(dns_server, max_ttl=3600, clock=clock)
    await resolver.a_or_aaaa("longttl.test")  # TTL 86400
    clock.now += 3599
    await resolver.a_or_aaaa("longttl.test")
    assert dns_server.count("longttl.test", "A") == 1
    clock.now += 1
    await resolver.a_or_aaaa("longttl.test")
    assert dns_server.count("longttl.test", "A") == 2


async def test_cache_is_bounded(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server, max_entries=2)
    for name in ("dom1.test", "nomx.test", "mxonly.test"):
        await resolver.mx(name)
    await resolver.mx("mxonly.test")  # kept
    await resolver.mx("dom1.test")  # the oldest entry was evicted
    assert dns_server.count("mxonly.test", "MX") == 1
    assert dns_server.count("dom1.test", "MX") == 2


# ---- shared in-flight queries -------------------------------------------------------------------


async def test_concurrent_lookups_share_one_query(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    release = dns_server.hold("dom1.test")
    callers = [asyncio.create_task(resolver.mx("dom1.test")) for _ in range(20)]
    await dns_server.wait_for_query("dom1.test", "MX")
    release.set()
    assert await asyncio.gather(*callers) == [[(10, "mx.dom1.test")]] * 20
    assert dns_server.count("dom1.test", "MX") == 1


async def test_concurrent_failures_share_one_query(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    async with asyncio.timeout(FAST):
        results = await asyncio.gather(*(resolver.mx("broken.test") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, DnsTemporaryError) for r in results)
    assert dns_server.count("broken.test", "MX") == 1


async def test_cancelled_caller_does_not_cancel_the_shared_query(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    release = dns_server.hold("dom1.test")
    first = asyncio.create_task(resolver.mx("dom1.test"))
    second = asyncio.create_task(resolver.mx("dom1.test"))
    await dns_server.wait_for_query("dom1.test", "MX")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    assert await second == [(10, "mx.dom1.test")]
    assert await resolver.mx("dom1.test") == [(10, "mx.dom1.test")]  # from the cache
    assert dns_server.count("dom1.test", "MX") == 1
