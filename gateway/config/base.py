"""Configuration building blocks shared by gateway/config/settings.py and every provider's account model."""

from __future__ import annotations

import datetime
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.returnpath import DsnSettings, EventSettings, check_notify
from gateway.config.section import Section, read_secret_file, secret_or_file
from gateway.config.urls import refuse_credentials
from gateway.core.scrypt import parse_hash
from gateway.policy.senders import ascii_address, ascii_domain, domain_of, sender_entry

__all__ = ["AccountBase", "Section", "UserSettings", "read_secret_file", "secret_or_file"]


def http_base_url(value: str) -> str:
    """An upstream's base URL, http:// or https:// with a host: anything else would make every message's
    call fail (451 4.3.0) while check-config said OK. The errors never quote the value: it may hold a key."""
    text = value.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise ValueError("must be an http:// or https:// URL: its host or port cannot be read") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host, written whole, e.g. https://api.example.com")
    refuse_credentials(parts, "the account's keys authenticate its calls: remove them from the URL")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        # Each call's path is appended to the base (base + "/v1/version/"): after a query it would land inside
        # it, and no call could work. Keys go in the account's key settings, never in the URL.
        raise ValueError(
            "must have no query or fragment (?... or #...): each call's path is appended to it; "
            "the account's keys go in its own settings"
        )
    return text


def scrypt_hash(v: SecretStr) -> SecretStr:
    """A whole hash as `smtp-gateway hash-password` prints it (ValueError otherwise, never quoting it)."""
    try:
        parse_hash(v.get_secret_value())
    except ValueError as exc:
        # A hash no password can match would answer every login 535, with nothing in the log to say why.
        raise ValueError(f"{exc}; run `smtp-gateway hash-password` and paste its whole line") from None
    return v


class PasswordEntry(Section):
    """One of a login's valid passwords: several at once let a password be changed device by device."""

    hash: SecretStr = Field(description="The password's scrypt hash, made by `smtp-gateway hash-password`.")
    expires: datetime.datetime | datetime.date | None = Field(
        None,
        description="When it stops working: a date (`2027-01-31`: from 00:00 UTC that day on) or a date and time "
        "(UTC unless it names an offset); unset: never.",
    )
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,39}$",
        description="Its name in metrics and logs (never the hash), e.g. `2026-q4`; unset: its position, `1`, `2`, ...",
    )

    @field_validator("hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        return scrypt_hash(v)

    @property
    def expires_at(self) -> float | None:
        """When it stops working, in epoch seconds (None: never)."""
        value = self.expires
        if value is None:
            return None
        if not isinstance(value, datetime.datetime):
            value = datetime.datetime.combine(value, datetime.time(), datetime.UTC)
        elif value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()


class QuotaSettings(Section):
    """Messages and bytes a login may send per hour and per day (clock hours and days, UTC), counted across
    every process and instance on the queue. Unset on a user: the account's; 0: no limit."""

    messages_per_hour: int | None = Field(None, ge=0, description="Messages per clock hour; past it: 452 4.7.1.")
    messages_per_day: int | None = Field(None, ge=0, description="Messages per day (UTC); past it: 452 4.7.1.")
    bytes_per_hour: int | None = Field(
        None, ge=0, description="Message bytes per clock hour; past it: 452 4.7.1 (a SIZE= at MAIL, or the message)."
    )
    bytes_per_day: int | None = Field(None, ge=0, description="Message bytes per day (UTC); past it: 452 4.7.1.")


class LoginRules(Section):
    """Per-login controls, on a user (unset: the account's) and on an account (the default of its logins, the
    logins its provider checks included). gateway/config/logins.py resolves and checks them."""

    networks: list[str] | None = Field(
        None,
        description="Where the login may be used from: networks (`192.168.20.0/24`), addresses, or names of "
        "`[networks]` entries; AUTH from elsewhere gets the wrong-password reply. Unset or empty: anywhere.",
    )
    require_tls: bool | None = Field(
        None, description="AUTH only inside TLS (538 5.7.11 otherwise, the password unchecked)."
    )
    require_tls_except: list[str] | None = Field(
        None,
        description="Networks (or `[networks]` names) where `require_tls` does not apply, e.g. the LAN of a "
        "printer that cannot do TLS.",
    )
    allowed_recipients: list[str] | None = Field(
        None,
        description="The only recipients allowed: addresses (`a@dom`), domains (`dom` or `@dom`) or subdomains "
        "(`*.dom`); others get 550 5.7.1 at RCPT. Unset or empty: any.",
    )
    quota: QuotaSettings | None = Field(None, description="Messages and bytes per hour and per day.")
    test_mode: bool | None = Field(
        None,
        description="Go through everything (AUTH, policy, parsing, the request built) but send nothing: the reply "
        "is `250 2.0.0 Ok: queued as TEST-<id>`.",
    )


class UserSettings(LoginRules):
    """A login listed in config. The password is stored as a hash made by `smtp-gateway hash-password`."""

    username: str = Field(min_length=1, description="The AUTH username; unique within its account.")
    password_hash: SecretStr | None = Field(
        None,
        description="The password's scrypt hash, made by `smtp-gateway hash-password` (starts with `scrypt$`); or "
        "`passwords`.",
    )
    passwords: list[PasswordEntry] = Field(
        [],
        max_length=4,
        description="Several valid passwords at once, each with an optional expiry and label (key rotation), "
        'e.g. `[{ hash = "scrypt$...", expires = 2027-01-31, label = "old" }, { hash = "scrypt$..." }]`; instead '
        "of `password_hash`.",
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
    def _is_hash(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else scrypt_hash(v)

    @model_validator(mode="after")
    def _one_password_source(self) -> UserSettings:
        if self.password_hash is not None and self.passwords:
            raise ValueError("set password_hash or passwords, not both (move the hash into passwords to rotate it)")
        if self.password_hash is None and not self.passwords:
            raise ValueError("password_hash (or passwords) is required")
        labels = [label for _, label in self.credentials()]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"passwords: label {', '.join(twice)} given twice")
        return self

    def credentials(self) -> list[tuple[PasswordEntry, str]]:
        """Every password entry with its label (`password_hash` is entry `1`, never expiring)."""
        if self.password_hash is not None:
            return [(PasswordEntry(hash=self.password_hash), "1")]
        return [(entry, entry.label or str(n)) for n, entry in enumerate(self.passwords, 1)]


class AccountBase(LoginRules):
    """What every upstream account has, whatever its provider. A provider's model adds its own keys: its
    `provider: Literal["<kind>"]`, where its API is (`base_url`), its `users` (UserSettings or a subclass)."""

    credential_cache_ttl: float = Field(
        300.0, ge=0, description="Seconds a verified login (or a known campaign) is remembered."
    )
    negative_cache_ttl: float = Field(30.0, ge=0, description="Seconds a refused login is remembered.")
    http_timeout: float = Field(
        30.0,
        gt=0,
        description=(
            "Seconds each phase of one API call may take: connecting, writing the body, the whole answer "
            "(docs/operations/upstream.md)."
        ),
    )
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

    def notes(self) -> list[str]:
        """What an operator should know about this account's settings though nothing is wrong with them
        (`check-config` prints them as notes, `serve` logs them once at startup as `account_note`). A provider
        that adds its own keeps these (super().notes())."""
        return [note for user in self.configured_users for note in self.sender_notes(user)]

    def sender_notes(self, user: UserSettings) -> list[str]:
        """A user's sender keys that cannot work as written: `force_from` with no `default_from` to force, and,
        where the account names its sender domains (DMDS: all it may use; dEngage: the identities it narrows
        to), an `allowed_senders` entry or a `default_from` outside them, or a `default_from` outside the
        login's `allowed_senders`. Each is refused at run time only where it is used (553, 550) while the
        login's other senders work, and configurations holding them loaded before these checks existed: so
        they are notes, never a refusal that would stop `serve` after an upgrade."""
        where = f"users[{user.username}]"
        notes = []
        if user.force_from and not user.default_from:
            notes.append(
                f"{where}.force_from: true without default_from does nothing (there is no From to force): set "
                "default_from, or remove force_from"
            )
        named = self.sender_domain_names()
        if not named:
            return notes
        domains = {ascii_domain(d) for d in named}
        shown = ", ".join(sorted(named))
        # A registered return-path (DMDS) is a MAIL FROM of its domain, so an address entry may name one.
        return_paths = {ascii_address(rp) for rp in self.return_paths().values()}
        for entry in user.allowed_senders:
            kind, value = sender_entry(entry)
            if (domain_of(value) if kind == "address" else value) not in domains and value not in return_paths:
                notes.append(
                    f"{where}.allowed_senders: {entry!r} is outside the account's sender_domains ({shown}): the "
                    "login can never send as it (553); remove the entry or add the domain"
                )
        if user.default_from:
            default = ascii_address(user.default_from)
            if domain_of(default) not in domains:
                notes.append(
                    f"{where}.default_from: {user.default_from!r} is outside the account's sender_domains "
                    f"({shown}): every message it gives a From to is refused (550)"
                )
            elif user.allowed_senders and not any(
                value == (default if kind == "address" else domain_of(default))
                for kind, value in map(sender_entry, user.allowed_senders)
            ):
                notes.append(
                    f"{where}.default_from: {user.default_from!r} is not among the login's allowed_senders: every "
                    "message it gives a From to is refused (550)"
                )
        return notes

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
