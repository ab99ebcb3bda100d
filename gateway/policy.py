"""Pure sender policy: address syntax, permitted sender domains and return-paths, header From checks."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from gateway import replies
from gateway.errors import PolicyRejected
from gateway.model import Address, Message, Principal
from gateway.replies import Reply
from gateway.settings import AccountSettings


@lru_cache(maxsize=8192)
def _validate(address: str, smtputf8: bool) -> str:
    # Syntax only: deliverability (DNS) is gateway.dns' job, asynchronously.
    result = validate_email(address, check_deliverability=False, allow_smtputf8=smtputf8)
    return result.normalized


def normalize_address(address: str, smtputf8: bool, bad: Reply) -> str:
    """Validate one address; the refusal carries email-validator's explanation."""
    try:
        return _validate(address, smtputf8)
    except EmailNotValidError as exc:
        raise PolicyRejected(reply=bad.with_text(f"<{address}>: {exc}")) from None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def return_paths(account: AccountSettings) -> dict[str, str]:
    """Registered return-path address (lower-cased) -> its sender domain."""
    return {rp.lower(): domain for domain, rp in account.sender_domains.items()}


def sender_permitted(account: AccountSettings, principal: Principal, address: str) -> bool:
    """MAIL FROM may be a permitted domain's return-path or any address in a permitted domain."""
    lowered = address.lower()
    domain = return_paths(account).get(lowered) or domain_of(lowered)
    if domain not in account.sender_domains:
        return False
    return login_may_use(principal, lowered, domain)


def login_may_use(principal: Principal, address: str, domain: str) -> bool:
    """A login limited to given addresses or domains (Postfix smtpd_sender_login_maps)."""
    if not principal.allowed_senders:
        return True
    for entry in principal.allowed_senders:
        if "@" in entry.lstrip("@"):
            if entry == address:
                return True
        elif entry.lstrip("@") == domain:
            return True
    # A login limited to some addresses may still use the return-path of their domains.
    return False


def check_sender(account: AccountSettings, principal: Principal, address: str, smtputf8: bool) -> str:
    """MAIL FROM policy. Returns the normalized address or raises PolicyRejected (553)."""
    normalized = normalize_address(address, smtputf8, replies.BAD_SENDER)
    lowered = normalized.lower()
    rp_domain = return_paths(account).get(lowered)
    if rp_domain is not None:
        # The return-path belongs to the domain, not to one login's addresses.
        if login_may_use(principal, lowered, rp_domain) or any(
            domain_of(e) == rp_domain or e.lstrip("@") == rp_domain for e in principal.allowed_senders
        ):
            return normalized
    elif sender_permitted(account, principal, normalized):
        return normalized
    raise PolicyRejected(
        reply=replies.SENDER_NOT_OWNED.with_text(
            f"<{address}>: Sender address rejected: not owned by {principal.login}"
        )
    )


def check_recipient(address: str, smtputf8: bool) -> str:
    return normalize_address(address, smtputf8, replies.BAD_RECIPIENT)


def apply_from_policy(
    account: AccountSettings, principal: Principal, message: Message, mail_from: str, smtputf8: bool
) -> Message:
    """Header From/Sender policy at the end of DATA (550 5.7.1), with per-login default/forced From.

    Missing From: the login's default_from, else the envelope sender (as sendmail does).
    """
    from_ = message.from_
    if principal.force_from and principal.default_from:
        from_ = Address(principal.default_from, from_.name if from_ else "")
    elif from_ is None:
        from_ = Address(principal.default_from or mail_from)
    checked: list[tuple[str, Address]] = [("From", from_)]
    if message.sender is not None:
        checked.append(("Sender", message.sender))
    for header, addr in checked:
        normalize_address(addr.email, smtputf8, replies.HEADER_FROM_REJECTED.with_text(f"{header}: header"))
        domain = domain_of(addr.email)
        if domain not in account.sender_domains:
            raise PolicyRejected(
                reply=replies.HEADER_FROM_REJECTED.with_text(
                    f"{header}: header domain {domain} is not a permitted sender domain for this account"
                )
            )
        if not login_may_use(principal, addr.email.lower(), domain):
            raise PolicyRejected(
                reply=replies.HEADER_FROM_REJECTED.with_text(
                    f"{header}: header <{addr.email}> is not owned by {principal.login}"
                )
            )
    for header, value in (("Reply-To", message.reply_to),):
        if value is not None:
            normalize_address(value.email, smtputf8, Reply(550, "5.1.3", f"{header}: header"))
    return message if from_ is message.from_ else replace(message, from_=from_)
