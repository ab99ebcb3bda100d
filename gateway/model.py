"""Frozen value types that flow from the SMTP session to the upstream call, the same for every provider."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is sending: the authenticated login and what it may do.

    `extra` holds what the login means to its provider (DMDS: the campaign), as JSON-able values: the
    core stores and passes it on, only the provider reads it."""

    account: str
    login: str
    # Addresses (user@dom) or domains (@dom / dom) this login may send as; empty = any permitted domain.
    allowed_senders: tuple[str, ...] = ()
    default_from: str | None = None
    force_from: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: display name and addr-spec."""

    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """What the upstream call needs from a parsed MIME message, decoded to Unicode."""

    subject: str
    from_: Address | None
    sender: Address | None
    reply_to: Address | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    html: str
    text: str | None
    attachments: tuple[Attachment, ...] = ()
    # X-Gateway-* option headers, lower-cased names without the prefix, consumed before sending.
    options: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    # Custom X- headers (not X-Gateway-*) in order, for providers that forward them (dEngage xHeaders).
    x_headers: tuple[tuple[str, str], ...] = ()
    # What had to be repaired or could not be decoded ("undecodable_base64: part 3 (image/png) ..."):
    # logged by the pipeline, never sent upstream.
    defects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Submission:
    """A message accepted in an SMTP session, ready for upstream calls (or the queue).

    `params` are the provider's per-message decisions made at acceptance (DMDS: campaign, archive,
    batch), JSON-able: the queue stores them, the provider reads them."""

    principal: Principal
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: Message
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Call:
    """One upstream call a provider plans for a submission. `key` is opaque and stable: the queue keeps
    each call's state under it, so a retry never repeats a call that was delivered."""

    key: str
    recipients: tuple[str, ...]
