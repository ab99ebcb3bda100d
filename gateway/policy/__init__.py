"""Sender and recipient policy: the pure rules (senders.py), the DNS checks the SMTP path makes (dns.py) and
the operator's report on sender domains (domaincheck.py). The face is the pure part."""

from __future__ import annotations

from gateway.policy.senders import (
    SenderPolicy,
    apply_from_policy,
    ascii_address,
    ascii_domain,
    check_recipient,
    check_sender,
    domain_of,
)

__all__ = [
    "SenderPolicy",
    "apply_from_policy",
    "ascii_address",
    "ascii_domain",
    "check_recipient",
    "check_sender",
    "domain_of",
]
