"""Non-blocking DNS lookups (dnspython's asyncresolver) with a TTL cache and shared in-flight queries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.TXT
import dns.resolver

__all__ = ["DnsResolver", "DnsTemporaryError"]

# EDNS0 with the DNS-flag-day buffer size: large TXT (SPF) answers fit without a TCP retry.
_EDNS_PAYLOAD = 1232


class DnsTemporaryError(Exception):
    """A lookup could not be answered now (timeout, SERVFAIL, no server replied): answer 451 4.4.3."""


Status = Literal["ok", "nxdomain", "nodata"]


@dataclass(frozen=True)
class _Result:
    """One cached answer: records for "ok"; none for NXDOMAIN ("nxdomain") or NoAnswer ("nodata")."""

    status: Status
    records: tuple[dns.rdata.Rdata, ...] = ()


_Key = tuple[str, dns.rdatatype.RdataType]  # (lower-case name without final dot, rdtype)


class DnsResolver:
    """Async stub resolver with an in-memory cache.

    Positive answers are kept ``min(TTL, max_ttl)`` seconds, negative ones (NXDOMAIN, NoAnswer)
    ``negative_ttl`` seconds; temporary failures are never cached. Concurrent lookups of the same
    (name, type) share one query. ``clock`` is injectable for tests (defaults to ``time.monotonic``).
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        port: int = 53,
        timeout: float = 3.0,
        max_ttl: int = 3600,
        negative_ttl: int = 300,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
        else:
            resolver = dns.asyncresolver.Resolver()  # system resolv.conf
        resolver.port = port
        resolver.timeout = timeout  # per attempt
        resolver.lifetime = timeout  # whole lookup, all attempts and servers
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        self._resolver = resolver
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[_Key, tuple[float, _Result]] = {}
        self._inflight: dict[_Key, asyncio.Task[_Result]] = {}

    # ---- public lookups -------------------------------------------------------------------

    async def domain_exists(self, domain: str) -> bool:
        """True if the domain has an MX, A or AAAA record; False on NXDOMAIN or none of those."""
        mx = await self._lookup(domain, dns.rdatatype.MX)
        if mx.status == "ok":
            return True
        if mx.status == "nxdomain":
            return False
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            if (await self._lookup(domain, rdtype)).status == "ok":
                return True
        return False

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """(preference, host) pairs sorted by preference; a null MX (RFC 7505) is (0, ".")."""
        result = await self._lookup(domain, dns.rdatatype.MX)
        pairs = [
            (r.preference, r.exchange.to_text(omit_final_dot=True).lower())
            for r in result.records
            if isinstance(r, dns.rdtypes.ANY.MX.MX)
        ]
        return sorted(pairs)

    async def txt(self, domain: str) -> list[str]:
        """Each TXT record's character-strings joined into one string."""
        result = await self._lookup(domain, dns.rdatatype.TXT)
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in result.records
            if isinstance(r, dns.rdtypes.ANY.TXT.TXT)
        ]

    async def a_or_aaaa(self, domain: str) -> list[str]:
        """IPv4 then IPv6 addresses of the domain; [] if it has none."""
        a, aaaa = await asyncio.gather(
            self._lookup(domain, dns.rdatatype.A), self._lookup(domain, dns.rdatatype.AAAA)
        )
        return [r.to_text() for r in (*a.records, *aaaa.records)]

    # ---- cache and in-flight sharing -----------------------------------------------------

    async def _lookup(self, domain: str, rdtype: dns.rdatatype.RdataType) -> _Result:
        name = domain.strip().rstrip(".").lower()
        key: _Key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                return cached[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        # shield: a cancelled caller must not cancel the query the other callers wait for
        return await asyncio.shield(task)

    def _finished(self, key: _Key, task: asyncio.Task[_Result]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: every caller may have been cancelled

    async def _query(self, key: _Key) -> _Result:
        name, rdtype = key
        try:
            if not name:
                raise dns.name.EmptyLabel
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return _Result("nxdomain")  # not a valid domain name: it cannot exist (not cached)
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return self._store(key, _Result("nxdomain"), self._negative_ttl)
        except dns.resolver.NoAnswer:
            return self._store(key, _Result("nodata"), self._negative_ttl)
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"DNS timeout looking up {name} {_type(rdtype)}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(
                f"no DNS server answered for {name} {_type(rdtype)} (SERVFAIL or refused)"
            ) from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"DNS lookup of {name} {_type(rdtype)} failed: {exc}") from exc
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        if not records:
            return self._store(key, _Result("nodata"), self._negative_ttl)
        # a CNAME chain is only as fresh as its shortest-lived link
        ttl = min(rrset.ttl for rrset in answer.response.answer)
        return self._store(key, _Result("ok", records), min(ttl, self._max_ttl))

    def _store(self, key: _Key, result: _Result, ttl: int) -> _Result:
        if ttl <= 0:
            return result
        if len(self._cache) >= self._max_entries:
            now = self._clock()
            for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[k]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]  # oldest insertion first
        self._cache[key] = (self._clock() + ttl, result)
        return result


def _type(rdtype: dns.rdatatype.RdataType) -> str:
    return dns.rdatatype.to_text(rdtype)
