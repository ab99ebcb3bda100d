"""Pytest plugin: a loopback authoritative DNS server (``dns_server``) serving ``dns_zones``.

Register it from tests/conftest.py with ``pytest_plugins = ["tests.conftest_dns"]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from gateway.policy.dns import DnsResolver
from tests.dnsserver import DnsServer, ZoneData
from tests.harness import LoopThread

SPF = '"v=spf1 ip4:192.0.2.1 -all"'
MX = "10 mx.dom1.test."
# The resolvers' timeout in tests: a loopback answer must always come before it, on a CI machine whose two
# cores run the whole suite (0.3 s did not, once); a name that never answers costs it per lookup.
DNS_TIMEOUT = 2.0


def make_zones() -> ZoneData:
    """Test zones: sender domains with their return-path domains, and the failure cases.

    ``nosuch.test`` is absent (NXDOMAIN); ``slow.test`` never answers; ``broken.test`` is SERVFAIL.
    """
    return ZoneData(
        zones={
            "test": {
                # a good sender domain; its return-path dmds-dom1@nl.dom1.test
                "dom1.test": [("MX", 300, MX), ("TXT", 300, SPF), ("A", 300, "192.0.2.1")],
                "mx.dom1.test": [("A", 300, "192.0.2.25")],
                "_dmarc.dom1.test": [("TXT", 300, '"v=DMARC1; p=reject"')],
                "nl.dom1.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                "news.dom1.test": [("A", 300, "192.0.2.2")],  # DMARC from the organizational domain
                # only an A record (no MX, SPF or DMARC); only an MX; only a TXT
                "nomx.test": [("A", 300, "192.0.2.10")],
                "mxonly.test": [("MX", 300, MX)],
                "txtonly.test": [("TXT", 300, '"hello"')],
                "v6only.test": [("AAAA", 300, "2001:db8::1")],
                # MX and SPF, no DMARC
                "nodmarc.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                "nl.nodmarc.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                # DMARC p=quarantine but return-path bounce@other.test
                "misaligned.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                "_dmarc.misaligned.test": [("TXT", 300, '"v=DMARC1; p=quarantine"')],
                "other.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                # p=none, and sp= for subdomains
                "pnone.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                "_dmarc.pnone.test": [("TXT", 300, '"v=DMARC1; p=none; rua=mailto:d@pnone.test"')],
                "spdom.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                "_dmarc.spdom.test": [("TXT", 300, '"v=DMARC1; p=reject; sp=quarantine; aspf=s"')],
                "sub.spdom.test": [("MX", 300, MX), ("TXT", 300, SPF)],
                # a TXT record of several character-strings; a TTL above any sane cap
                "split.test": [("TXT", 300, '"v=spf1 " "ip4:192.0.2.1 " "-all"')],
                "longttl.test": [("A", 86400, "192.0.2.50")],
                "shortttl.test": [("A", 60, "192.0.2.60")],
                "multimx.test": [("MX", 300, "20 mx2.dom1.test."), ("MX", 300, "5 MX1.dom1.test.")],
                "nullmx.test": [("MX", 300, "0 ."), ("A", 300, "192.0.2.70")],
                # too big for one UDP answer: the resolver retries over TCP
                "bigtxt.test": [("TXT", 300, " ".join(f'"{c * 250}"' for c in "abcdef"))],
            }
        },
        servfail={"broken.test"},
        blackhole={"slow.test"},
    )


@pytest.fixture
def dns_zones() -> ZoneData:
    return make_zones()


@pytest_asyncio.fixture
async def dns_server(dns_zones: ZoneData) -> AsyncIterator[DnsServer]:
    server = await DnsServer(dns_zones).start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def dns_resolver(dns_server: DnsServer) -> DnsResolver:
    return DnsResolver(["127.0.0.1"], port=dns_server.port, timeout=DNS_TIMEOUT)


@contextlib.contextmanager
def dns_on_thread(loop_thread: LoopThread, zones: ZoneData) -> Iterator[DnsServer]:
    """The loopback DNS server on the harness' background loop, so a subprocess can query it."""

    async def start() -> DnsServer:
        return await DnsServer(zones).start()

    server = loop_thread.run(start())
    try:
        yield server
    finally:
        loop_thread.run(server.close())
