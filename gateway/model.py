"""Frozen value types that flow from the SMTP session to the upstream call."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is sending: the authenticated login and what it may do."""

    account: str
    login: str
    campaign: int | None = None
    # SMTP-DMDS sandbox style: the campaign comes from a "[NN]" Subject prefix.
    campaign_from_subject: bool = False
    may_choose_campaign: bool = False
    # Addresses (user@dom) or domains (@dom / dom) this login may send as; empty = any permitted domain.
    allowed_senders: tuple[str, ...] = ()
    default_from: str | None = None
    force_from: bool = False


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
    # What had to be repaired or could not be decoded ("undecodable_base64: part 3 (image/png) ..."):
    # logged by the pipeline, never sent upstream.
    defects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Leg:
    """One upstream call of a message: who it reaches. Legs after the first join the first's batch."""

    index: int
    contacts: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(a.email for a in (*self.contacts, *self.cc, *self.bcc))


@dataclass(frozen=True, slots=True)
class Submission:
    """A message accepted in an SMTP session, ready for upstream calls (or the spool)."""

    principal: Principal
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: Message
    campaign: int
    legs: tuple[Leg, ...]
    archive: bool = False
    batch_eeid: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    """The upstream's answer to one call."""

    upstream_id: str
    sent: int | None = None
