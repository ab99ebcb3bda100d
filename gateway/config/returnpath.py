"""The return path's settings (docs/after-250.md): each account's event polling and delivery status notices,
the webhooks, and the [return_path] section that paces the workers."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.section import Section, secret_or_file
from gateway.config.urls import SecretPathUrl, refuse_credentials
from gateway.core.events import EVENT_TYPES

# What a webhook can be told about: the vendors' event types read back (gateway/core/events.py) and `dead`,
# a recipient whose message became a dead letter.
WEBHOOK_EVENTS = (*EVENT_TYPES, "dead")


def check_notify(value: str | None) -> str | None:
    """`sender`, `off` or an address."""
    if value is None:
        return None
    text = value.strip()
    if text.lower() in ("sender", "off"):
        return text.lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in text):
        raise ValueError('must be "sender", "off" or an address (user@example.com)')
    return text


class EventSettings(Section):
    """[accounts.X.events]: reading the vendor's event API back (off by default: its paths and answers are not
    confirmed, docs/after-250.md lists what is not)."""

    enabled: bool = Field(
        False,
        description="Poll this account's event API: recipient states, timeline events, suppressions, notices "
        "and webhooks follow from what it reports.",
    )
    interval: float = Field(60.0, gt=0, description="Seconds between two polls of the account's events.")
    overlap: float = Field(
        900.0,
        ge=0,
        le=12 * 3600,
        description="Seconds each window reaches back over the end of the previous one, so that events the vendor "
        "records late are read all the same (an event read twice is stored once).",
    )
    lag: float = Field(
        60.0,
        ge=0,
        description="Seconds a window stops short of now: the newest events are read by the next poll, when the "
        "vendor has had time to record them.",
    )
    page_size: int = Field(100, ge=10, le=1000, description="Events asked for per page.")
    lease: float = Field(
        120.0,
        ge=10,
        description="Seconds an instance holds the account's poll (renewed with each page): another instance takes "
        "it over, where it stopped, only after this.",
    )
    timezone: str = Field(
        "UTC",
        description="The zone of the vendor's date-times that carry none (the window's bounds and the events' "
        "times), e.g. `America/Argentina/Buenos_Aires`.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if v.upper() == "UTC":
            return "UTC"
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as Europe/Madrid, or UTC)") from None
        return v


class DsnSettings(Section):
    """[accounts.X.dsn]: delivery status notifications (RFC 3464) to the senders of this account's messages."""

    notify: str = Field(
        "sender",
        description="Who is told when a recipient bounces, is reported not sent, or its message becomes a dead "
        "letter: `sender` (the envelope sender), an address, or `off`; the default of the account's logins (a "
        "login's own `notify` wins).",
    )
    from_domain: str | None = Field(
        None,
        description="The domain of the notices' From (`MAILER-DAEMON@<from_domain>`); unset: the domain of the "
        "return path the account registered for the sender's domain, else the sender's own domain.",
    )
    per_sender: int = Field(
        10, ge=0, description="Notices one sender address gets at most per `window`; more are not sent (counted)."
    )
    window: float = Field(3600.0, gt=0, description="Seconds over which `per_sender` counts.")

    @field_validator("notify")
    @classmethod
    def _notify(cls, v: str) -> str:
        checked = check_notify(v)
        assert checked is not None
        return checked

    @field_validator("from_domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        if v is None:
            return None
        domain = v.strip().strip(".").lower().lstrip("@")
        if "." not in domain or "@" in domain:
            raise ValueError("a domain such as example.com")
        return domain


def _loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1): not a name that merely begins with "127."."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class WebhookSettings(Section):
    """A [[webhooks]] table: events POSTed as signed JSON to an application."""

    name: str = Field(min_length=1, description="The webhook's name in logs, metrics and the timeline.")
    # Printed with everything after its host masked: chat and automation services put the hook's token there.
    url: SecretPathUrl = Field(description="Where each event is POSTed (https://...; http:// only to loopback).")
    events: list[str] = Field(
        list(WEBHOOK_EVENTS),
        description="The event types sent: " + ", ".join(f"`{e}`" for e in WEBHOOK_EVENTS) + " (default: all).",
    )
    accounts: list[str] = Field([], description="Only these accounts' events; empty: every account's.")
    secret: SecretStr | None = Field(
        None, description="The key of each delivery's HMAC-SHA256 signature (required: here or in `secret_file`)."
    )
    secret_file: Path | None = Field(None, description="A file holding the secret on its first line.")
    timeout: float = Field(10.0, gt=0, le=120, description="Seconds one delivery may take before it is retried.")
    max_age: float = Field(
        24 * 3600.0,
        gt=0,
        description="Seconds an event is retried (exponential backoff with jitter) before it fails for good.",
    )
    backoff: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds before the first retry; each next wait doubles (with +-50 % jitter), at most an hour.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http(s):// URL")
        refuse_credentials(parts, "the secret signs each delivery instead")
        try:
            port = parts.port  # raises for a port out of range or not a number
        except ValueError:
            port = 0
        if port == 0:
            # Else accepted here and refused by the HTTP client at every POST (a ValueError per delivery).
            raise ValueError("its port is not a number from 1 to 65535")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError("events travel in clear over http://: use https:// (http:// only to loopback)")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(WEBHOOK_EVENTS))
        if unknown:
            raise ValueError(f"unknown event type {', '.join(unknown)} (known: {', '.join(WEBHOOK_EVENTS)})")
        return v

    @model_validator(mode="after")
    def _secret_source(self) -> WebhookSettings:
        object.__setattr__(self, "secret", secret_or_file(self.secret, self.secret_file, "secret"))
        return self

    @property
    def key(self) -> bytes:
        assert self.secret is not None  # _secret_source guarantees it
        return self.secret.get_secret_value().encode()


class ReturnPathSettings(Section):
    """[return_path]: how often its workers look for work another instance left (their own is seen at once)."""

    poll_interval: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds between looks for notices to send and webhook deliveries due (also another instance's).",
    )
    suppression_refresh: float = Field(
        30.0,
        gt=0,
        description="Seconds between reloads of the suppression lists RCPT TO is checked against (in memory; "
        "entries this instance adds apply at once).",
    )
    webhook_concurrency: int = Field(
        8,
        ge=1,
        le=256,
        description="Webhook deliveries under way at once; one webhook's at most an even share (at least one),"
        " which it always has (a reload's added webhook too, the total then over this until older ones end).",
    )
