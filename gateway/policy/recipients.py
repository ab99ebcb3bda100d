"""Pure: a login's allowed recipients (addresses, domains, subdomains), parsed, checked for overlaps, matched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.policy.senders import ascii_address, ascii_domain, domain_of


def _entry(entry: str) -> tuple[str, str]:
    """("address", a@dom), ("domain", dom) or ("subdomains", dom) for `*.dom`. ValueError when it is none."""
    text = entry.strip()
    if text.startswith("*."):
        kind, value = "subdomains", ascii_domain(text[2:])
    elif "@" in text.lstrip("@"):
        kind, value = "address", ascii_address(text)
    else:
        kind, value = "domain", ascii_domain(text.lstrip("@"))
    domain = domain_of(value) if kind == "address" else value
    labels = domain.split(".")
    if not domain or "*" in value or " " in value or "" in labels or (kind == "address" and not value.split("@")[0]):
        raise ValueError(f"{entry!r} is not an address (a@dom), a domain (dom, @dom) or subdomains (*.dom)")
    return kind, value


def _covers(kind: str, value: str, address_or_domain: str) -> bool:
    """Whether the rule (kind, value) allows everything `address_or_domain` (an address or a domain) names."""
    domain = domain_of(address_or_domain) if "@" in address_or_domain else address_or_domain
    if kind == "address":
        return value == address_or_domain
    if kind == "domain":
        return domain == value
    return domain.endswith("." + value)


@dataclass(frozen=True, slots=True)
class RecipientRules:
    """The recipients one login may send to (Amazon SES' ses:Recipients condition, Postfix's
    check_recipient_access per login): exact addresses, whole domains, or every subdomain of a domain."""

    addresses: frozenset[str]
    domains: frozenset[str]
    subdomains: tuple[str, ...]  # ".dom" suffixes

    @classmethod
    def parse(cls, entries: Sequence[str]) -> RecipientRules:
        """The rules of `entries`. ValueError for an entry that is no address or domain, one given twice, or one
        that another already covers (bob@acme.example beside acme.example): an overlap says the list is not
        what its author thinks."""
        parsed = [(entry, *_entry(entry)) for entry in entries]
        for i, (entry, kind, value) in enumerate(parsed):
            for j, (other, other_kind, other_value) in enumerate(parsed):
                if (kind, value) == (other_kind, other_value):
                    if j < i:
                        raise ValueError(f"{entry!r} is listed twice")
                    continue
                shown = value if kind != "subdomains" else f"*.{value}"
                if _covers(other_kind, other_value, value if kind != "subdomains" else "x." + value):
                    raise ValueError(f"{shown!r} is already covered by {other!r}: list it once")
        return cls(
            addresses=frozenset(v for _, k, v in parsed if k == "address"),
            domains=frozenset(v for _, k, v in parsed if k == "domain"),
            subdomains=tuple("." + v for _, k, v in parsed if k == "subdomains"),
        )

    def allows(self, address: str) -> bool:
        """Whether `address` (as the recipient check normalized it: the domain in its xn-- form) is allowed."""
        lowered = ascii_address(address)
        domain = domain_of(lowered)
        return lowered in self.addresses or domain in self.domains or domain.endswith(self.subdomains)
