"""Pure sender policy: address syntax, permitted sender domains and return-paths, header From checks."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache

import idna
from email_validator import EmailNotValidError, validate_email

from gateway.core import replies
from gateway.core.errors import PolicyRejected
from gateway.core.model import Address, Message, Principal
from gateway.core.replies import Reply


@dataclass(frozen=True, slots=True)
class SenderPolicy:
    """Which sender domains an account may use now, as lower-case ASCII (IDNA) names, from its provider.

    `return_paths`: a registered return-path address -> the domain it belongs to (DMDS); such an
    address is a valid MAIL FROM but not a header From."""

    domains: frozenset[str]
    return_paths: Mapping[str, str] = field(default_factory=dict)
    # Name the permitted domains in a refusal (dEngage: the account's From identities).
    name_domains: bool = False

    def permitted_hint(self) -> str:
        """A refusal's suffix " (permitted: a.example, b.example)", or "" when domains are not named."""
        if not self.name_domains:
            return ""
        shown = sorted(self.domains)
        text = ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "")
        return f" (permitted: {text or 'none'})"


class _UpstreamCannotTake(Exception):
    pass


# U+DC80..U+DCFF: the bytes 0x80..0xFF of a line that is not UTF-8, as surrogateescape decodes them.
_UNDECODED = re.compile("[\udc80-\udcff]")


@lru_cache(maxsize=8192)
def _validate(address: str, smtputf8: bool) -> str:
    # Syntax only: deliverability (DNS) is gateway.policy.dns' job, asynchronously.
    result = validate_email(address, check_deliverability=False, allow_smtputf8=smtputf8)
    if result.ascii_email is None:
        # DMDS refuses these ("Internationalized characters before the @-sign are not supported.").
        raise _UpstreamCannotTake(address)
    # An internationalized domain travels as its IDNA (xn--) form, which the API accepts.
    return result.ascii_email


def normalize_address(address: str, smtputf8: bool, bad: Reply) -> str:
    """Validate one address; the refusal carries email-validator's explanation."""
    undecoded = _UNDECODED.findall(address)
    if undecoded:
        # Bytes that are not UTF-8 reach here as lone surrogates (aiosmtpd decodes with surrogateescape):
        # email-validator would name them as code points ("U+DCF6"), which the client never sent.
        shown = ", ".join(dict.fromkeys(f"0x{ord(c) - 0xDC00:02X}" for c in undecoded[:8]))
        raise PolicyRejected(
            reply=bad.with_text(f"<{address}>: The address contains 8-bit bytes that are not UTF-8: {shown}")
        )
    try:
        return _validate(address, smtputf8)
    except EmailNotValidError as exc:
        raise PolicyRejected(reply=bad.with_text(f"<{address}>: {exc}")) from None
    except _UpstreamCannotTake:
        raise PolicyRejected(
            reply=replies.UTF8_LOCALPART.with_text(
                f"<{address}>: Internationalized characters before the @-sign are not supported by the upstream API"
            )
        ) from None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def ascii_domain(domain: str) -> str:
    """A domain as compared and sent: lower case, no final dot, IDNA (xn--) form when internationalized."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


def ascii_address(address: str) -> str:
    local, at, domain = address.strip().rpartition("@")
    return f"{local}@{ascii_domain(domain)}".lower() if at else address.strip().lower()


def sender_permitted(senders: SenderPolicy, principal: Principal, address: str) -> bool:
    """MAIL FROM may be a permitted domain's return-path or any address in a permitted domain."""
    lowered = ascii_address(address)
    domain = senders.return_paths.get(lowered) or domain_of(lowered)
    if domain not in senders.domains:
        return False
    return login_may_use(principal, lowered, domain)


def sender_entry(entry: str) -> tuple[str, str]:
    """An allowed_senders entry as ("address", a@dom) or ("domain", dom); "@dom" and "dom" are domains."""
    entry = entry.strip()
    if "@" in entry.lstrip("@"):
        return "address", ascii_address(entry)
    return "domain", ascii_domain(entry.lstrip("@"))


def login_may_use(principal: Principal, address: str, domain: str) -> bool:
    """A login limited to given addresses or domains (Postfix smtpd_sender_login_maps)."""
    if not principal.allowed_senders:
        return True
    address, domain = ascii_address(address), ascii_domain(domain)
    for kind, value in map(sender_entry, principal.allowed_senders):
        if value == (address if kind == "address" else domain):
            return True
    return False


def check_sender(senders: SenderPolicy, principal: Principal, address: str, smtputf8: bool) -> str:
    """MAIL FROM policy. Returns the normalized address or raises PolicyRejected (553)."""
    if not address.strip().strip("<>"):
        # The gateway relays no bounces: a null sender is refused like a sender the login does not own.
        raise PolicyRejected(reply=replies.NULL_SENDER)
    normalized = normalize_address(address, smtputf8, replies.BAD_SENDER)
    lowered = ascii_address(normalized)
    rp_domain = senders.return_paths.get(lowered)
    if rp_domain is not None:
        # The return-path belongs to the domain, not to one login's addresses: a login limited to some
        # addresses of a domain may use that domain's return-path.
        if login_may_use(principal, lowered, rp_domain) or any(
            domain_of(value) == rp_domain for _, value in map(sender_entry, principal.allowed_senders)
        ):
            return normalized
    elif sender_permitted(senders, principal, normalized):
        return normalized
    domain = domain_of(lowered)
    if senders.name_domains and domain not in senders.domains:
        raise PolicyRejected(
            reply=replies.SENDER_NOT_OWNED.with_text(
                f"<{address}>: Sender address rejected: domain {domain} is not a permitted sender domain"
                f"{senders.permitted_hint()}"
            )
        )
    raise PolicyRejected(
        reply=replies.SENDER_NOT_OWNED.with_text(
            f"<{address}>: Sender address rejected: not owned by {principal.login}"
        )
    )


def check_recipient(address: str, smtputf8: bool) -> str:
    return normalize_address(address, smtputf8, replies.BAD_RECIPIENT)


def _header_address(header: str, addr: Address, smtputf8: bool) -> Address:
    """One header address validated (550 5.1.3 naming the header) and normalized (IDN domain as xn--)."""
    try:
        email = normalize_address(addr.email, smtputf8, replies.HEADER_SYNTAX)
    except PolicyRejected as exc:
        raise PolicyRejected(reply=exc.reply.with_text(f"{header}: header {exc.reply.text}")) from None
    return addr if email == addr.email else Address(email, addr.name)


def _display(
    header: str, addresses: tuple[Address, ...], smtputf8: bool, drop_invalid: bool, dropped: list[str]
) -> tuple[Address, ...]:
    """A To or Cc header's addresses, validated and normalized. The envelope decides who receives, so an
    address here is never a recipient of its own: an invalid one is refused with a reply that says it is
    not a recipient, or, with `drop_invalid`, left out of the header (noted in `dropped`)."""
    kept: list[Address] = []
    for addr in addresses:
        try:
            kept.append(_header_address(header, addr, smtputf8))
        except PolicyRejected as exc:
            problem = exc.reply.text.removeprefix(f"{header}: header ")
            if not drop_invalid:
                raise PolicyRejected(
                    reply=replies.HEADER_ONLY_SYNTAX.with_text(
                        f"{header}: header address {problem} (the address is not a recipient of this message)"
                    )
                ) from None
            dropped.append(f"header_address_dropped: {header} {problem}")
    return tuple(kept)


def apply_from_policy(
    senders: SenderPolicy,
    principal: Principal,
    message: Message,
    mail_from: str,
    smtputf8: bool,
    drop_invalid_header_addresses: bool = False,
) -> Message:
    """Header policy at the end of DATA, with per-login default/forced From.

    From and Sender must be in a permitted domain the login may use (550 5.7.1); every address of From,
    Sender, Reply-To, To and Cc must be valid (550 5.1.3, 553 5.6.7 for a local part the upstream
    cannot take) and travels normalized. An invalid To or Cc address (never a recipient: the envelope
    decides) is refused with HEADER_ONLY_SYNTAX, or with `drop_invalid_header_addresses` left out of the
    header and recorded as a defect. Missing From: the login's default_from, else the envelope sender (as
    sendmail does).
    """
    from_ = message.from_
    if principal.force_from and principal.default_from:
        from_ = Address(principal.default_from, from_.name if from_ else "")
    elif from_ is None:
        from_ = Address(principal.default_from or mail_from)
    from_ = _header_address("From", from_, smtputf8)
    sender = _header_address("Sender", message.sender, smtputf8) if message.sender is not None else None
    permitted = senders.domains
    for header, addr in (("From", from_), ("Sender", sender)):
        if addr is None:
            continue
        domain = domain_of(addr.email)
        if domain not in permitted:
            raise PolicyRejected(
                reply=replies.HEADER_FROM_REJECTED.with_text(
                    f"{header}: header domain {domain} is not a permitted sender domain for this account"
                    f"{senders.permitted_hint()}"
                )
            )
        if not login_may_use(principal, addr.email, domain):
            raise PolicyRejected(
                reply=replies.HEADER_FROM_REJECTED.with_text(
                    f"{header}: header <{addr.email}> is not owned by {principal.login}"
                )
            )
    reply_to = _header_address("Reply-To", message.reply_to, smtputf8) if message.reply_to is not None else None
    dropped: list[str] = []
    to = _display("To", message.to, smtputf8, drop_invalid_header_addresses, dropped)
    cc = _display("Cc", message.cc, smtputf8, drop_invalid_header_addresses, dropped)
    if (from_, sender, reply_to, to, cc) == (message.from_, message.sender, message.reply_to, message.to, message.cc):
        return message
    defects = (*message.defects, *dropped)
    return replace(message, from_=from_, sender=sender, reply_to=reply_to, to=to, cc=cc, defects=defects)
