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
import structlog

from gateway.core.cache import AsyncCache, Fresh
from gateway.ops.metrics import DNS_RESOLVER_FAILURES

__all__ = ["DnsResolver", "DnsResolverBroken", "DnsTemporaryError"]

log = structlog.get_logger("gateway.dns")

# EDNS0 with the DNS-flag-day buffer size: large TXT (SPF) answers fit without a TCP retry.
_EDNS_PAYLOAD = 1232
# How long the verdict of a resolver check stands (a failing resolver is not re-checked on every lookup).
_VERDICT_TTL = 10.0
# Verdicts kept, one per top-level domain (and the root) checked.
_VERDICT_ENTRIES = 2_000
# A broken resolver is logged at error level at most this often, however many lookups fail meanwhile.
_LOG_INTERVAL = 60.0


class DnsTemporaryError(Exception):
    """A lookup could not be answered now (timeout, SERVFAIL, no server replied): answer 451 4.4.3.

    Its message is in the gateway's own words (a reply may quote it); `detail` is what dnspython said, for the
    log only: a library's exception text is no reply (it may change with any release, and names internals).
    """

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class DnsResolverBroken(DnsTemporaryError):
    """The resolver itself is not working, not just one domain's DNS: a lookup failed (or was denied without
    proof) and so did the check of the name's top-level domain, which any working resolver answers.

    Typical causes: no DNS server reachable, a server that refuses or SERVFAILs everything, a resolver that
    answers NXDOMAIN for every name (a filtering or captive network), no nameserver in /etc/resolv.conf.
    """

    def __init__(self, name: str, lookup: str, reason: str, detail: str = "") -> None:
        super().__init__(f"DNS resolver not answering (looking up {name} {lookup}: {reason})", detail)
        self.name = name
        self.reason = reason


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
        # Why the resolver cannot work at all (no nameserver configured), else None.
        self._unconfigured: str | None = None
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = list(nameservers)
        else:
            try:
                resolver = dns.asyncresolver.Resolver()  # system resolv.conf
            except dns.resolver.NoResolverConfiguration as exc:
                resolver = dns.asyncresolver.Resolver(configure=False)
                self._unconfigured = f"no nameserver in /etc/resolv.conf ({exc}) and dns.nameservers is empty"
        resolver.port = port
        resolver.timeout = timeout  # per attempt
        resolver.lifetime = timeout  # whole lookup, all attempts and servers
        resolver.use_edns(0, 0, _EDNS_PAYLOAD)
        self._resolver = resolver
        self._max_ttl = max_ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._cache: AsyncCache[_Key, _Result] = AsyncCache(max_entries, clock=clock)
        # resolver checks: probe zone -> why it failed (None: it works)
        self._verdicts: AsyncCache[str, str | None] = AsyncCache(_VERDICT_ENTRIES, clock=clock)
        self._broken_since_log = 0  # broken-resolver lookups not yet logged
        self._last_broken_log: float | None = None
        self._broken = False

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
        a, aaaa = await asyncio.gather(self._lookup(domain, dns.rdatatype.A), self._lookup(domain, dns.rdatatype.AAAA))
        return [r.to_text() for r in (*a.records, *aaaa.records)]

    async def check(self, domain: str | None = None) -> str | None:
        """Why the resolver is not working (None if it is), judged by the top-level domain of ``domain``
        (the root without one): a working resolver answers that, whatever becomes of the domain itself."""
        if self._unconfigured is not None:
            return self._unconfigured
        return await self._verdict(_probe_zone(domain.strip().rstrip(".").lower() if domain else ""))

    # ---- cache and in-flight sharing -----------------------------------------------------

    async def _lookup(self, domain: str, rdtype: dns.rdatatype.RdataType) -> _Result:
        key: _Key = (domain.strip().rstrip(".").lower(), rdtype)
        return await self._cache.get(key, lambda: self._query(key))

    async def _query(self, key: _Key) -> Fresh[_Result]:
        name, rdtype = key
        try:
            if not name:
                raise dns.name.EmptyLabel
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return Fresh(_Result("nxdomain"), 0)  # not a valid domain name: it cannot exist (not cached)
        if self._unconfigured is not None:
            self._note_broken(self._unconfigured)
            # _unconfigured quotes dnspython (for the startup report and the log): not for a reply.
            raise DnsResolverBroken(name, _type(rdtype), "no nameserver configured", self._unconfigured)
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            if not _vouched(exc):
                # RFC 2308 §3: a real NXDOMAIN carries the SOA of the zone that vouches for it. Without one
                # it may come from a resolver that denies every name: believe it only if DNS works.
                await self._confirm_resolver(name, rdtype, "NXDOMAIN without SOA")
            return Fresh(_Result("nxdomain"), self._negative_ttl)
        except dns.resolver.NoAnswer:
            return Fresh(_Result("nodata"), self._negative_ttl)
        except dns.exception.Timeout as exc:
            await self._confirm_resolver(name, rdtype, "timeout")
            raise DnsTemporaryError(f"DNS timeout looking up {name} {_type(rdtype)}") from exc
        except dns.resolver.NoNameservers as exc:
            await self._confirm_resolver(name, rdtype, "SERVFAIL or refused")
            raise DnsTemporaryError(f"no DNS server answered for {name} {_type(rdtype)} (SERVFAIL or refused)") from exc
        except dns.exception.DNSException as exc:
            detail = f"{type(exc).__name__}: {exc}"
            await self._confirm_resolver(name, rdtype, "lookup error", detail)
            raise DnsTemporaryError(f"DNS lookup of {name} {_type(rdtype)} failed", detail) from exc
        records = tuple(answer.rrset) if answer.rrset is not None else ()
        if not records:
            return Fresh(_Result("nodata"), self._negative_ttl)
        # a CNAME chain is only as fresh as its shortest-lived link
        ttl = min(rrset.ttl for rrset in answer.response.answer)
        return Fresh(_Result("ok", records), min(ttl, self._max_ttl))

    # ---- is it the domain or the resolver? --------------------------------------------------

    async def _confirm_resolver(
        self, name: str, rdtype: dns.rdatatype.RdataType, failure: str, detail: str = ""
    ) -> None:
        """After a failed lookup of ``name``: raise DnsResolverBroken if the resolver itself is not working.
        `failure` is in the gateway's words; `detail` (dnspython's) goes to the log only."""
        why = await self._verdict(_probe_zone(name))
        if why is not None:
            self._note_broken(f"{name} {_type(rdtype)}: {failure}; {why}" + (f" ({detail})" if detail else ""))
            raise DnsResolverBroken(name, _type(rdtype), f"{failure}; {why}", detail) from None

    async def _verdict(self, zone: str) -> str | None:
        return await self._verdicts.get(zone, lambda: self._probe(zone))

    async def _probe(self, zone: str) -> Fresh[str | None]:
        return Fresh(await self._ask_soa(zone), _VERDICT_TTL)

    async def _ask_soa(self, zone: str) -> str | None:
        """Ask for the SOA of a top-level domain (or the root): None if the resolver answered it credibly."""
        what = f"check of {zone} SOA"
        try:
            await self._resolver.resolve(dns.name.from_text(zone), dns.rdatatype.SOA, search=False)
        except dns.resolver.NoAnswer:
            pass  # NOERROR: the resolver works
        except dns.resolver.NXDOMAIN as exc:
            if not _vouched(exc):
                return f"{what}: NXDOMAIN without SOA"
        except dns.exception.Timeout:
            return f"{what}: timeout"
        except dns.resolver.NoNameservers:
            return f"{what}: SERVFAIL or refused"
        except dns.exception.DNSException:
            return f"{what}: lookup error"  # the verdict may reach a reply: not dnspython's words
        if self._broken:  # only a passed check ends it: one name resolving proves little
            self._broken = False
            log.info("dns_resolver_recovered", check=f"{zone} SOA")
        return None

    def _note_broken(self, reason: str) -> None:
        """Log a broken resolver at error level, at most once a minute (counting the lookups in between)."""
        self._broken = True
        self._broken_since_log += 1
        DNS_RESOLVER_FAILURES.inc()
        now = self._clock()
        if self._last_broken_log is None or now - self._last_broken_log >= _LOG_INTERVAL:
            log.error(
                "dns_resolver_broken",
                nameservers=[str(ns) for ns in self._resolver.nameservers],
                port=self._resolver.port,
                reason=reason,
                failed_lookups=self._broken_since_log,
            )
            self._last_broken_log = now
            self._broken_since_log = 0


def _probe_zone(name: str) -> str:
    """The top-level domain of ``name`` as an absolute name (``example.com`` -> ``com.``); the root for none."""
    tld = name.rpartition(".")[2]
    return f"{tld}." if tld else "."


def _vouched(exc: dns.resolver.NXDOMAIN) -> bool:
    """Whether an NXDOMAIN came with the SOA of the zone that denies the name."""
    return any(
        rrset.rdtype == dns.rdatatype.SOA
        for response in exc.responses().values()  # type: ignore[no-untyped-call]
        for rrset in response.authority
    )


def _type(rdtype: dns.rdatatype.RdataType) -> str:
    return dns.rdatatype.to_text(rdtype)
