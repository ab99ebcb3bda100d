"""DNS health of each permitted sender domain and its return-path: what `smtp-gateway check-domains` reports.

DMDS sends a message with the header From in the permitted domain (``user@dom1.com``) and the envelope
sender (Return-Path) at the address registered for that domain (``dmds-dom1@nl.dom1.com``), whose
subdomain receives the bounces. DMARC passes through SPF only when SPF passes for the return-path
domain *and* that domain is aligned with the From domain (relaxed mode: same organizational domain,
RFC 7489 section 3.1.2), so both domains are checked.

Problems (the domain will not work; ``DomainReport.ok`` is False, the command exits non-zero):

* the return-path is not an address ``local@domain``;
* the sender domain does not exist (no MX, A or AAAA record): DMDS refuses such senders;
* the return-path domain has neither MX nor A/AAAA, or a null MX (RFC 7505): bounces are lost;
* the return-path domain is not aligned with the From domain: DMARC cannot pass through SPF;
* a lookup timed out or failed (SERVFAIL): nothing can be concluded, try again.

Warnings (mail flows, but deliverability or DMARC protection is weaker):

* the return-path domain has no MX and relies on its A/AAAA record (implicit MX);
* no SPF record (or several, an SPF permerror) for the return-path domain or the From domain,
  or an SPF record ending in ``+all``/``all`` that authorizes every host;
* no DMARC record (checked at ``_dmarc.<from>`` and then at the organizational domain), several
  DMARC records (receivers ignore them all), a record without a valid ``p=``, or ``p=none``;
* ``aspf=s`` (strict SPF alignment) while the return-path domain differs from the From domain.

SPF and DMARC warnings are left out for a domain that already has a problem of not existing or not
receiving bounces: that must be fixed first.

The organizational domain comes from the Public Suffix List bundled in the ``publicsuffixlist``
package (never fetched at run time); names under unknown TLDs count the last label as the suffix.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Iterable
from dataclasses import asdict, dataclass
from typing import TypeVar

from publicsuffixlist import PublicSuffixList

from gateway.policy.dns import DnsResolver, DnsTemporaryError

__all__ = [
    "DomainReport",
    "aligned_relaxed",
    "check_domain",
    "check_domains",
    "format_table",
    "organizational_domain",
    "to_json",
]

_T = TypeVar("_T")
_POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class DomainReport:
    """The outcome of checking one permitted sender domain and its registered return-path."""

    domain: str
    return_path: str
    domain_exists: bool | None  # None: the lookup failed (see problems)
    return_path_mx: list[str]  # MX hosts of the return-path domain by preference; ["."] = null MX
    spf: str | None  # SPF record of the From domain
    return_path_spf: str | None  # SPF record of the return-path domain
    dmarc: str | None  # the DMARC record that applies to the From domain
    dmarc_policy: str | None  # effective policy: p=, or sp= when found at the organizational domain
    aligned: bool  # relaxed DMARC alignment of the return-path domain with the From domain
    problems: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


# ---- organizational domain and alignment (pure) ---------------------------------------------------


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package: no network access


def _normalize(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def organizational_domain(domain: str) -> str:
    """The registered domain under its public suffix (``nl.dom1.co.uk`` -> ``dom1.co.uk``).

    A name that is itself a public suffix (or empty) is returned unchanged (normalized).
    """
    name = _normalize(domain)
    if not name:
        return name
    return _psl().privatesuffix(name) or name


def aligned_relaxed(a: str, b: str) -> bool:
    """True if both domains share an organizational domain (DMARC relaxed alignment)."""
    a, b = _normalize(a), _normalize(b)
    return bool(a) and bool(b) and organizational_domain(a) == organizational_domain(b)


# ---- DNS checks -----------------------------------------------------------------------------------


def _split_address(address: str) -> str | None:
    local, sep, domain = address.strip().strip("<>").rpartition("@")
    domain = _normalize(domain)
    if not sep or not local or "." not in domain or "@" in domain:
        return None
    return domain


def _dmarc_tags(record: str) -> dict[str, str] | None:
    """Tags of a DMARC record, or None if it does not start with ``v=DMARC1`` (RFC 7489 6.6.3)."""
    parts = [part.strip() for part in record.split(";") if part.strip()]
    if not parts or [s.strip() for s in parts[0].partition("=")] != ["v", "=", "DMARC1"]:
        return None
    tags: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    return tags


def _spf_records(txt: list[str]) -> list[str]:
    return [t for t in txt if t.strip().lower() == "v=spf1" or t.strip().lower().startswith("v=spf1 ")]


async def _attempt(what: str, aw: Awaitable[_T], problems: list[str]) -> _T | None:
    try:
        return await aw
    except DnsTemporaryError as exc:
        problems.append(f"DNS timeout or server failure checking {what}: {exc}; try again later")
        return None


def _check_spf(label: str, domain: str, txt: list[str] | None, warnings: list[str]) -> str | None:
    if txt is None:
        return None  # the lookup failed: already a problem
    records = _spf_records(txt)
    if not records:
        warnings.append(f"no SPF record (TXT v=spf1) for {label} {domain}")
        return None
    if len(records) > 1:
        warnings.append(f"{len(records)} SPF records for {label} {domain}: receivers treat it as permerror")
    record = records[0]
    if record.split()[-1].lower() in ("all", "+all"):
        warnings.append(f"SPF record of {label} {domain} ends in '{record.split()[-1]}': it authorizes any host")
    return record


async def _return_path_mx(resolver: DnsResolver, rp_domain: str, problems: list[str], warnings: list[str]) -> list[str]:
    what = f"MX of return-path domain {rp_domain}"
    mx = await _attempt(what, resolver.mx(rp_domain), problems)
    if mx is None:
        return []
    hosts = [host for _, host in mx]
    if hosts == ["."]:
        problems.append(f"return-path domain {rp_domain} has a null MX (RFC 7505): it accepts no bounces")
    elif not hosts:
        addresses = await _attempt(f"A/AAAA of return-path domain {rp_domain}", resolver.a_or_aaaa(rp_domain), problems)
        if addresses == []:
            problems.append(f"return-path domain {rp_domain} has no MX, A or AAAA record: bounces cannot be delivered")
        elif addresses:
            warnings.append(f"return-path domain {rp_domain} has no MX; bounces rely on its A/AAAA record")
    return hosts


async def _dmarc(
    resolver: DnsResolver, domain: str, problems: list[str], warnings: list[str]
) -> tuple[str | None, dict[str, str] | None, bool]:
    """(record, tags, found at the organizational domain) for the From domain, as RFC 7489 6.6.3 says."""
    org = organizational_domain(domain)
    for where in dict.fromkeys((domain, org)):  # the From domain first, then its organizational domain
        txt = await _attempt(f"DMARC record _dmarc.{where}", resolver.txt(f"_dmarc.{where}"), problems)
        if txt is None:
            return None, None, False
        found = [(record, tags) for record in txt if (tags := _dmarc_tags(record)) is not None]
        if len(found) > 1:
            warnings.append(f"{len(found)} DMARC records at _dmarc.{where}: receivers ignore them all")
            return None, None, False
        if found:
            return found[0][0], found[0][1], where != domain
    warnings.append(f"no DMARC record at _dmarc.{domain}" + (f" nor _dmarc.{org}" if org != domain else ""))
    return None, None, False


class _Notes:
    """Problems and warnings of one concurrent branch, merged in a fixed order for stable output."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []


async def check_domain(resolver: DnsResolver, domain: str, return_path: str) -> DomainReport:
    """Check one sender domain and its return-path; DNS failures become problems, never exceptions."""
    domain = _normalize(domain)
    head, exists_n, mx_n, align_n, spf_n, rp_spf_n, dmarc_n = (_Notes() for _ in range(7))
    rp_domain = _split_address(return_path)
    if rp_domain is None:
        head.problems.append(f"return-path {return_path!r} is not an address local@domain")

    async def nothing() -> None:
        return None

    exists, rp_mx, spf_txt, rp_txt, (dmarc, tags, at_org) = await asyncio.gather(
        _attempt(f"existence of sender domain {domain}", resolver.domain_exists(domain), exists_n.problems),
        _return_path_mx(resolver, rp_domain, mx_n.problems, mx_n.warnings) if rp_domain else nothing(),
        _attempt(f"SPF of sender domain {domain}", resolver.txt(domain), spf_n.problems),
        _attempt(f"SPF of return-path domain {rp_domain}", resolver.txt(rp_domain), rp_spf_n.problems)
        if rp_domain
        else nothing(),
        _dmarc(resolver, domain, dmarc_n.problems, dmarc_n.warnings),
    )
    if exists is False:
        exists_n.problems.append(f"sender domain {domain} does not exist in DNS (no MX, A or AAAA record)")

    aligned = rp_domain is not None and aligned_relaxed(rp_domain, domain)
    if rp_domain is not None and not aligned:
        align_n.problems.append(
            f"return-path domain {rp_domain} is not aligned with From domain {domain} "
            f"(organizational domains {organizational_domain(rp_domain)} and {organizational_domain(domain)} "
            "differ): DMARC cannot pass through SPF"
        )

    rp_spf = _check_spf("return-path domain", rp_domain, rp_txt, rp_spf_n.warnings) if rp_domain else None
    spf = _check_spf("sender domain", domain, spf_txt, spf_n.warnings)

    policy: str | None = None
    if tags is not None:
        raw = tags.get("sp", tags.get("p")) if at_org else tags.get("p")
        policy = raw.lower() if raw and raw.lower() in _POLICIES else None
        where = f"_dmarc.{organizational_domain(domain) if at_org else domain}"
        if policy is None:
            dmarc_n.warnings.append(f"DMARC record at {where} has no valid p= policy")
        elif policy == "none":
            dmarc_n.warnings.append(f"DMARC policy of {domain} is p=none: monitoring only, spoofed mail is not refused")
        if tags.get("aspf", "r").lower() == "s" and rp_domain is not None and rp_domain != domain:
            dmarc_n.warnings.append(
                f"DMARC at {where} has aspf=s: SPF of return-path domain {rp_domain} is not strictly aligned"
            )

    # a domain that does not exist or cannot receive mail needs fixing first: skip its lesser warnings
    if mx_n.problems:
        rp_spf_n.warnings.clear()
    if exists is False:
        spf_n.warnings.clear()
        dmarc_n.warnings.clear()
    notes = (head, exists_n, mx_n, align_n, rp_spf_n, spf_n, dmarc_n)
    return DomainReport(
        domain=domain,
        return_path=return_path.strip(),
        domain_exists=exists,
        return_path_mx=rp_mx or [],
        spf=spf,
        return_path_spf=rp_spf,
        dmarc=dmarc,
        dmarc_policy=policy,
        aligned=aligned,
        problems=[p for n in notes for p in n.problems],
        warnings=[w for n in notes for w in n.warnings],
    )


async def check_domains(resolver: DnsResolver, pairs: dict[str, str], *, concurrency: int = 10) -> list[DomainReport]:
    """Check every (domain, return-path) pair concurrently; reports come in the order of ``pairs``."""
    limit = asyncio.Semaphore(concurrency)

    async def one(domain: str, return_path: str) -> DomainReport:
        async with limit:
            return await check_domain(resolver, domain, return_path)

    return list(await asyncio.gather(*(one(d, rp) for d, rp in pairs.items())))


# ---- output ---------------------------------------------------------------------------------------

_HEADER = ("DOMAIN", "RETURN-PATH", "EXISTS", "RETURN-PATH MX", "RP SPF", "SPF", "DMARC", "ALIGNED", "RESULT")


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def _row(r: DomainReport) -> tuple[str, ...]:
    mx = ", ".join(r.return_path_mx[:2]) + (" ..." if len(r.return_path_mx) > 2 else "")
    dmarc = f"p={r.dmarc_policy}" if r.dmarc_policy else ("invalid" if r.dmarc else "-")
    result = "FAIL" if r.problems else "warn" if r.warnings else "ok"
    return (
        r.domain,
        r.return_path,
        _yes_no(r.domain_exists),
        mx or "-",
        "yes" if r.return_path_spf else "-",
        "yes" if r.spf else "-",
        dmarc,
        _yes_no(r.aligned),
        result,
    )


def format_table(reports: Iterable[DomainReport]) -> str:
    """A fixed-width table, one row per domain, its problems and warnings indented below it."""
    reports = list(reports)
    rows = [_HEADER, *(_row(r) for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

    out = [line(_HEADER)]
    for report, row in zip(reports, rows[1:], strict=True):
        out.append(line(row))
        out.extend(f"    problem: {p}" for p in report.problems)
        out.extend(f"    warning: {w}" for w in report.warnings)
    bad = sum(1 for r in reports if not r.ok)
    out.append(f"{len(reports)} domain(s): {len(reports) - bad} ok, {bad} with problems")
    return "\n".join(out) + "\n"


def to_json(reports: Iterable[DomainReport]) -> str:
    """The reports as a JSON array (every field plus ``ok``)."""
    return json.dumps([{**asdict(r), "ok": r.ok} for r in reports], indent=2)
