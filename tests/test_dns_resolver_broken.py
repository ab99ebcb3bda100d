"""A resolver that cannot answer is not a domain that does not exist: DnsResolverBroken (451), logged once a
minute, against real resolvers on loopback: nothing listening, REFUSED / SERVFAIL for everything, and one that
answers NXDOMAIN for every name (as a filtering or captive network's does)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from structlog.testing import capture_logs

from gateway.ops.metrics import DNS_RESOLVER_FAILURES
from gateway.policy.dns import DnsResolver, DnsResolverBroken, DnsTemporaryError
from tests.conftest_dns import DNS_TIMEOUT, MX, make_zones
from tests.dnsserver import DnsServer, ZoneData
from tests.test_dns import FakeClock

FAST = 5 * DNS_TIMEOUT  # failure bound: two lookups of DNS_TIMEOUT each when nothing answers


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback UDP port where nothing answers: held by this test and never read."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest_asyncio.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[DnsServer]:
    srv = await DnsServer(request.param).start()
    try:
        yield srv
    finally:
        await srv.close()


def _everything(rcode_set: str) -> ZoneData:
    data = ZoneData(zones={})
    getattr(data, rcode_set).update({"com", "example", "test"})
    return data


async def test_nothing_answering_is_a_broken_resolver(silent_port: int) -> None:
    resolver = DnsResolver(["127.0.0.1"], port=silent_port, timeout=DNS_TIMEOUT)
    async with asyncio.timeout(FAST):
        with pytest.raises(DnsResolverBroken) as info:
            await resolver.domain_exists("example.com")
    assert str(info.value).startswith("DNS resolver not answering (looking up example.com MX: timeout; ")
    assert "check of com. SOA: timeout" in info.value.reason
    assert await resolver.check("example.com") == "check of com. SOA: timeout"


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        (ZoneData(zones={}), "SERVFAIL or refused"),  # REFUSED for every name
        (_everything("servfail"), "SERVFAIL or refused"),
        (_everything("bogus_nxdomain"), "NXDOMAIN without SOA"),  # denies every name
    ],
    indirect=["server"],
    ids=["refused", "servfail", "nxdomain-for-everything"],
)
async def test_a_resolver_failing_every_name_is_broken(server: DnsServer, reason: str) -> None:
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT)
    async with asyncio.timeout(FAST):
        with pytest.raises(DnsResolverBroken) as info:
            await resolver.domain_exists("acme.example")
        assert isinstance(info.value, DnsTemporaryError)  # a 451 wherever DnsTemporaryError is handled
        assert info.value.reason == f"{reason}; check of example. SOA: {reason}"
        assert server.count("example", "SOA") == 1
        assert await resolver.check("acme.example") == f"check of example. SOA: {reason}"


@pytest.mark.parametrize("server", [make_zones()], indirect=True)
async def test_one_domain_failing_is_not_the_resolver(server: DnsServer) -> None:
    """SERVFAIL or silence for one domain, while its top-level domain answers: a per-domain failure."""
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT)
    async with asyncio.timeout(FAST):
        for domain in ("broken.test", "slow.test"):
            with pytest.raises(DnsTemporaryError) as info:
                await resolver.domain_exists(domain)
            assert not isinstance(info.value, DnsResolverBroken)
        assert await resolver.check("dom1.test") is None
    assert server.count("test", "SOA") == 1  # one check, its verdict reused


@pytest.mark.parametrize("server", [make_zones()], indirect=True)
async def test_a_vouched_nxdomain_needs_no_check(server: DnsServer) -> None:
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT)
    assert await resolver.domain_exists("nosuch.test") is False
    assert server.queries == [("nosuch.test", "MX")]


@pytest.mark.parametrize("server", [make_zones()], indirect=True)
async def test_an_unvouched_nxdomain_is_believed_when_dns_works(server: DnsServer) -> None:
    server.data.bogus_nxdomain.add("gone.test")  # NXDOMAIN without SOA for this name only
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT)
    assert await resolver.domain_exists("gone.test") is False
    assert server.queries == [("gone.test", "MX"), ("test", "SOA")]


@pytest.mark.parametrize("server", [_everything("bogus_nxdomain")], indirect=True)
async def test_denials_of_a_broken_resolver_are_not_cached(server: DnsServer) -> None:
    clock = FakeClock()
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT, clock=clock)
    with pytest.raises(DnsResolverBroken):
        await resolver.domain_exists("acme.example")
    # the resolver is repaired: once the verdict has expired the domain is found at once
    server.data.bogus_nxdomain.clear()
    server.data.zones["example"] = {"acme.example": [("MX", 300, MX)]}
    clock.now += 11
    assert await resolver.domain_exists("acme.example") is True


@pytest.mark.parametrize("server", [ZoneData(zones={})], indirect=True)
async def test_broken_resolver_is_logged_once_a_minute(server: DnsServer) -> None:
    clock = FakeClock()
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT, clock=clock)
    failures = DNS_RESOLVER_FAILURES._value.get()
    with capture_logs() as logs:
        for i in range(5):
            with pytest.raises(DnsResolverBroken):
                await resolver.domain_exists(f"d{i}.example")
            clock.now += 5
        clock.now += 40  # 60 s after the first
        with pytest.raises(DnsResolverBroken):
            await resolver.domain_exists("later.example")
    # Every failed lookup counted (the SmtpGatewayDnsResolverBroken alert), the log sampled.
    assert DNS_RESOLVER_FAILURES._value.get() == failures + 6
    broken = [e for e in logs if e["event"] == "dns_resolver_broken"]
    assert [(e["log_level"], e["failed_lookups"]) for e in broken] == [("error", 1), ("error", 5)]
    assert broken[0]["nameservers"] == ["127.0.0.1"] and broken[0]["port"] == server.port
    assert "check of example. SOA: SERVFAIL or refused" in broken[0]["reason"]


@pytest.mark.parametrize("server", [ZoneData(zones={})], indirect=True)
async def test_recovery_is_logged_when_the_check_passes_again(server: DnsServer) -> None:
    clock = FakeClock()
    resolver = DnsResolver(["127.0.0.1"], port=server.port, timeout=DNS_TIMEOUT, clock=clock)
    with capture_logs() as logs:
        with pytest.raises(DnsResolverBroken):
            await resolver.domain_exists("acme.example")
        server.data.zones["example"] = {"acme.example": [("MX", 300, MX)]}
        clock.now += 11
        assert await resolver.check("acme.example") is None
    assert [e["event"] for e in logs] == ["dns_resolver_broken", "dns_resolver_recovered"]
