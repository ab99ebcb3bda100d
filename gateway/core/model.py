"""Frozen value types that flow from the SMTP session to the upstream call, the same for every provider."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self


class ProviderData(Protocol):
    """What a login or a message means to its provider (Principal.extra, Submission.params): the core
    carries it without reading it, the queue stores `to_json()`, and only the provider reads it."""

    def to_json(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class StoredData:
    """Provider data as the queue stored it (JSON), until its provider reads it as its own type
    (TypedData.read); also the data of a provider that keeps none."""

    json: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> Mapping[str, Any]:
        return self.json


class TypedData:
    """Base of a provider's own data types (frozen dataclasses): `to_json` for the queue, `from_json` to
    read back what the queue stored, written by this version or an older one (missing keys: defaults)."""

    __slots__ = ()

    def to_json(self) -> Mapping[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        raise NotImplementedError

    @classmethod
    def read(cls, value: ProviderData) -> Self:
        """`value` as this type: itself, or read from what the queue stored. Another provider's data is
        a bug (a provider only ever gets its own account's logins and messages): TypeError."""
        if isinstance(value, cls):
            return value
        if isinstance(value, StoredData):
            return cls.from_json(value.json)
        raise TypeError(f"{type(value).__name__} given where {cls.__name__} was expected")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is sending: the authenticated login and what it may do.

    `extra` is what the login means to its provider (DMDS: the campaign), in the provider's own type."""

    account: str
    login: str
    # Addresses (user@dom) or domains (@dom / dom) this login may send as; empty = any permitted domain.
    allowed_senders: tuple[str, ...] = ()
    default_from: str | None = None
    force_from: bool = False
    extra: ProviderData = field(default_factory=StoredData)
    # Which of the login's credentials it used, for metrics and logs (never the secret): a password's label,
    # "current" or "previous" (a DMDS campaign's apikey), "oauth:<issuer>"; "" without AUTH (trusted network).
    credential: str = ""
    # When that credential stops working (epoch seconds; None: not known to): a cached login ends there too.
    credential_expires: float | None = None


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox: display name and addr-spec."""

    email: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    """An attachment or inline image. Its content is either `data` (decoded bytes) or, for a large part
    that arrived as valid base64, `b64`: that base64 text without line breaks, carried to the API as it
    came (the API wants base64 too; decoding and encoding again would cost time and a second copy)."""

    filename: str
    content_type: str
    data: bytes = b""
    content_id: str | None = None
    inline: bool = False
    # bytes, or a view into the SMTP session's buffer where the part's text was compacted (bigparts).
    b64: bytes | memoryview | None = None

    def base64(self) -> bytes | memoryview:
        """The content as base64 text (no line breaks)."""
        return self.b64 if self.b64 is not None else base64.b64encode(self.data)

    def decoded(self) -> bytes:
        """The content as bytes (decodes a carried-through part: for tests and tools, not the hot path)."""
        return self.data if self.b64 is None else base64.b64decode(self.b64)

    @property
    def size(self) -> int:
        """Decoded size in bytes (without decoding)."""
        if self.b64 is None:
            return len(self.data)
        return len(self.b64) // 4 * 3 - bytes(self.b64[-2:]).count(b"=")


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
    batch), in the provider's own type."""

    principal: Principal
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: Message
    params: ProviderData = field(default_factory=StoredData)


@dataclass(frozen=True, slots=True)
class Call:
    """One upstream call a provider plans for a submission. `key` is opaque and stable: the queue keeps
    each call's state under it, so a retry never repeats a call that was delivered."""

    key: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from, for its ledger record: the listener's name, the client as the gateway saw
    it (behind a PROXY header, the real client: "ip:port"), the message's size in bytes as received, and what
    a delivery status notice about it would need."""

    listener: str = ""
    peer: str = ""
    size: int | None = None
    # Whom a delivery status notice about this message would go to (None: nobody), and then its header block
    # as received (a notice quotes it); `dsn_of`: this message is itself a notice, about that local id.
    notify: str | None = None
    headers: str | None = None
    dsn_of: str | None = None


@dataclass(slots=True)
class Receipt:
    """What became of one message, for its transaction's log line: filled in by the pipeline and the
    delivery owner while the SMTP session waits (the one mutable type here)."""

    queue_id: str | None = None  # stored in the queue under this local id
    upstream_ids: list[str] = field(default_factory=list)  # delivered: the upstream's ids, first call first
    # Mails the upstream says it sent for this message (DMDS `sent`, copies included), where it says: a count
    # of sends, which may be lower than the recipients, never a delivery.
    upstream_sent: int | None = None
    reason: str | None = None  # refused or deferred: why (for the log; the client sees the reply)
    # A resend (its idempotency key's) answered with this earlier message's 250: nothing was sent, so a
    # per-login quota that counted the message gives it back.
    resend_of: str | None = None
