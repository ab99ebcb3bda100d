"""Configuration building blocks shared by gateway/config/settings.py and every provider's account model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.returnpath import DsnSettings, EventSettings, check_notify
from gateway.config.section import Section, read_secret_file, secret_or_file

__all__ = ["AccountBase", "Section", "UserSettings", "read_secret_file", "secret_or_file"]


class UserSettings(Section):
    """A login listed in config. The password is stored as a hash made by `smtp-gateway hash-password`."""

    username: str = Field(min_length=1, description="The AUTH username; unique within its account.")
    password_hash: SecretStr = Field(
        description="The password's scrypt hash, made by `smtp-gateway hash-password` (starts with `scrypt$`)."
    )
    allowed_senders: list[str] = Field(
        [],
        description="Addresses (`user@dom`) or domains (`@dom` or `dom`) this login may send as; empty: any "
        "address of the account's permitted sender domains.",
    )
    default_from: str | None = Field(None, description="The From address used when the message has none.")
    force_from: bool = Field(
        False, description="Replace the message's From with `default_from` (the display name is kept)."
    )
    notify: str | None = Field(
        None,
        description="Who is told of this login's messages that bounce, are not sent or become dead letters: "
        "`sender`, an address, or `off`; unset: the account's `dsn.notify`.",
    )

    @field_validator("notify")
    @classmethod
    def _notify(cls, v: str | None) -> str | None:
        return check_notify(v)

    @field_validator("password_hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("scrypt$"):
            raise ValueError("must be a hash made by `smtp-gateway hash-password` (starts with 'scrypt$')")
        return v


class AccountBase(Section):
    """What every upstream account has, whatever its provider. A provider's model adds its own keys: its
    `provider: Literal["<kind>"]`, where its API is (`base_url`), its `users` (UserSettings or a subclass)."""

    credential_cache_ttl: float = Field(
        300.0, ge=0, description="Seconds a verified login (or a known campaign) is remembered."
    )
    negative_cache_ttl: float = Field(30.0, ge=0, description="Seconds a refused login is remembered.")
    http_timeout: float = Field(30.0, gt=0, description="Seconds one API call may take.")
    max_connections: int = Field(50, ge=1, description="Pooled keep-alive HTTP connections to the account's API.")
    # aiohttp's transport costs much less CPU per request than httpx's own (docs/development/benchmarks.md).
    http_client: Literal["aiohttp", "httpx"] = Field(
        "aiohttp", description="The HTTP transport under httpx: `aiohttp` (less CPU per call) or httpx's own."
    )
    rate_limit: float | None = Field(
        None,
        gt=0,
        description="Requests per second to this account's API, shared by the inline path and the retry worker "
        "(and by every instance on a PostgreSQL queue); unset: no limit.",
    )
    rate_burst: int = Field(10, ge=1, description="How many requests may go at once within `rate_limit`.")
    idempotency_from_message_id: bool = Field(
        False,
        description="Opt-in: the Message-ID with the envelope (sender, recipients) is the message's idempotency "
        "key, so a client that resends after losing the 250 does not deliver twice. For clients that keep the "
        "Message-ID on a resend (most MTAs and mail libraries do); `X-Gateway-Idempotency-Key` always works.",
    )

    events: EventSettings = Field(EventSettings(), description="Reading the vendor's events back.")
    dsn: DsnSettings = Field(DsnSettings(), description="Delivery status notifications to the senders.")
    suppress_recipients: bool = Field(
        True,
        description="Refuse at RCPT TO (550 5.1.1) the addresses on this account's suppression list (hard bounces, "
        "not sent, complaints, the vendor's invalid contacts) instead of taking mail the vendor would drop.",
    )

    @property
    def base_url(self) -> str:
        """The account's API base URL, without a trailing slash."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its API is (base_url)")

    @property
    def configured_users(self) -> Sequence[UserSettings]:
        """The SMTP logins listed under this account (its model's `users`; none if it has no such key)."""
        users: Sequence[UserSettings] = getattr(self, "users", ())
        return users

    def sender_domain_names(self) -> Sequence[str]:
        """The sender domains this account's configuration names (empty: none named)."""
        return ()

    def return_paths(self) -> Mapping[str, str]:
        """Sender domain -> the return-path address registered for it, where the upstream has such
        addresses (`smtp-gateway check-domains` checks them)."""
        return {}

    @model_validator(mode="after")
    def _unique_users(self) -> AccountBase:
        names = [u.username for u in self.configured_users]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"users listed twice: {', '.join(duplicates)}")
        return self
