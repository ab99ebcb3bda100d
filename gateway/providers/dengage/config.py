"""[accounts.X] with provider = "dengage": a dEngage account (API user), its logins and its users."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import AccountBase, UserSettings, http_base_url, secret_or_file
from gateway.config.returnpath import EventSettings
from gateway.config.urls import ShownUrl


class DengageEventSettings(EventSettings):
    """[accounts.X.events] of a dEngage account: GetTransactionalEmailReport by time window, filtered by a tag
    the gateway adds to each message it sends while events are read."""

    page_size: int = Field(100, ge=100, le=1000, description="Report rows asked for per page (dEngage: 100 to 1000).")
    tag: str = Field(
        "smtp-gateway",
        description="Added to every message's `tags` while events are enabled, and the report is filtered by it "
        "(other systems' mail on the account stays out); empty: no tag, the whole account's report.",
    )


# A request field as a dotted path ("content.fromAddress").
FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
# Fields the gateway fills itself (gateway/providers/dengage/wire.py): a From field may be none of them, nor
# go inside one (the objects `send` and `content` hold other fields too).
LEAF_FIELDS = ("send.to", "content.subject", "content.html", "content.templateId", "replyTo", "tags")
GATEWAY_FIELDS = frozenset({"send", "content", "attachments", "xHeaders", *LEAF_FIELDS})
SUBJECT_PLACEHOLDERS = ("login", "account", "from", "from_name", "date")
X_HEADER_PATTERN = re.compile(r"[Xx]-[A-Za-z0-9*?][A-Za-z0-9*?-]*")


class DengageUser(UserSettings):
    """A configured login of a dEngage account."""

    tags: list[str] = Field([], description="Report tags added to every message of this login (dEngage `tags`).")


class DengageAccount(AccountBase):
    """A dEngage account: its API user, the sender domains it may use, logins and users."""

    provider: Literal["dengage"] = Field(description="`dengage`.")
    # The data centres' URLs: upstream-apis.md §2.1.
    api_base: ShownUrl = Field(
        "https://api.dengage.com/rest",
        description="The API's base URL, per data centre: `https://api.dengage.com/rest`, "
        "`https://tr-api.dengage.com/rest`, ...",
    )
    userkey: SecretStr | None = Field(
        None,
        description="The API user's user key (Settings > Identity & Access Management > API Users; required: "
        "here or in `userkey_file`).",
    )
    userkey_file: Path | None = Field(None, description="A file holding the user key on its first line.")
    password: SecretStr | None = Field(
        None, description="The API user's password (required: here or in `password_file`)."
    )
    password_file: Path | None = Field(None, description="A file holding the password on its first line.")
    sender_domains: list[str] = Field(
        [],
        description="Sender domains this gateway may use, narrowing the account's own From identities "
        "(`GET /rest/email/froms`); empty: every identity's domain.",
    )
    froms_ttl: float = Field(
        600.0,
        gt=0,
        description="Seconds the From identities are kept before they are fetched again (a failed refresh keeps "
        "the old list).",
    )
    api_user_logins: bool = Field(
        False,
        description="Opt-in: the API user's own user key and password as an SMTP login, verified by a real "
        "`/rest/login`.",
    )
    users: list[DengageUser] = Field([], description="Logins configured here, each with its password hash.")
    tags: list[str] = Field([], description="Report tags added to every message of this account.")
    events: DengageEventSettings = Field(DengageEventSettings(), description="Reading dEngage's report back.")
    # Where the From goes: no field name is confirmed (upstream-apis.md §2.3), so none is sent by default.
    from_address_field: str | None = Field(
        None,
        description="The request field, a dotted path such as `content.fromAddress`, that carries the message's "
        "From address; unset (the default): not sent, and the mail goes out under the account's default sender. "
        "Set it once dEngage has confirmed the name (`smtp-gateway check-upstream` cannot tell).",
    )
    from_name_field: str | None = Field(
        None, description="The request field (a dotted path) that carries the From's display name; unset: not sent."
    )
    from_identity_field: str | None = Field(
        None,
        description="The request field (a dotted path such as `content.fromId`) that carries the id of the From "
        "identity (`GET /rest/email/froms`) with the message's From address, else the first identity of its "
        "domain; unset: not sent.",
    )
    default_subject: str | None = Field(
        None,
        description='The Subject of a message without one, which dEngage refuses: a template, e.g. "(no subject)" '
        'or "Scan from {login}", with {login}, {account}, {from} (the From address), {from_name} (its display '
        "name, else the address) and {date} (the day it was accepted, YYYY-MM-DD, UTC); `{{`/`}}` for braces. "
        "Unset: such messages are refused with 554 5.6.0.",
    )
    forward_x_headers: list[str] = Field(
        [],
        description="The custom X- headers forwarded to dEngage (`xHeaders`), matched without regard to case, `*` "
        'standing for any characters: `["X-Mailer", "X-Custom-*"]`. Empty (the default): none (they carry '
        "client addresses and spam scores).",
    )
    # dEngage allows about 30 requests/s per IP (upstream-apis.md §2.1 [C]). A token bucket lets at most
    # rate_burst + rate_limit - 1 calls through in any one second: 26 with these defaults. Not 29 (a burst of 5):
    # what leaves within a second does not arrive within one (the loop, the connection, the network), and the
    # sandbox enforcing 30/s saw 30 in one second of its own clock from a burst of 5 in test_dengage_e2e's burst.
    rate_limit: float | None = Field(
        25.0,
        ge=0,
        description="Requests per second to the API, shared by every session, retry and instance (dEngage "
        "allows about 30 per IP); 0: no limit.",
    )
    rate_burst: int = Field(
        2, ge=1, description="How many requests may go at once: at most `rate_limit + rate_burst - 1` a second."
    )

    @property
    def base_url(self) -> str:
        return self.api_base.rstrip("/")

    def sender_domain_names(self) -> tuple[str, ...]:
        return tuple(self.sender_domains)

    @property
    def api_userkey(self) -> str:
        assert self.userkey is not None  # _secret_sources guarantees it
        return self.userkey.get_secret_value()

    @property
    def api_password(self) -> str:
        assert self.password is not None  # _secret_sources guarantees it
        return self.password.get_secret_value()

    @field_validator("api_base")
    @classmethod
    def _api_base_is_a_url(cls, v: str) -> str:
        return http_base_url(v)

    @field_validator("sender_domains")
    @classmethod
    def _lower_domains(cls, v: list[str]) -> list[str]:
        return [d.lower().strip().strip(".").lstrip("@") for d in v]

    @field_validator("from_address_field", "from_name_field", "from_identity_field")
    @classmethod
    def _field_path(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        if not FIELD_PATH.fullmatch(v):
            raise ValueError(f"{v!r} is not a request field: names separated by dots, e.g. content.fromAddress")
        if v in GATEWAY_FIELDS or any(v.startswith(f"{taken}.") for taken in (*LEAF_FIELDS, "attachments", "xHeaders")):
            raise ValueError(f"{v!r} is a field the gateway fills itself")
        return v

    @field_validator("default_subject")
    @classmethod
    def _subject_template(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"{v!r}: {exc} (write {{{{ and }}}} for braces)") from None
        unknown = sorted(set(names) - set(SUBJECT_PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}}: use {', '.join('{' + p + '}' for p in SUBJECT_PLACEHOLDERS)}"
            )
        if not v.strip():
            raise ValueError("must not be empty (dEngage refuses an empty Subject)")
        return v

    @field_validator("forward_x_headers")
    @classmethod
    def _x_header_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not X_HEADER_PATTERN.fullmatch(pattern) or pattern.lower().startswith("x-gateway-"):
                raise ValueError(
                    f"{pattern!r} is not an X- header name or pattern (X-Mailer, X-Custom-*); X-Gateway-* "
                    "options are never forwarded"
                )
        return v

    @property
    def sends_from(self) -> bool:
        """Whether the requests carry the message's From (an address or an identity field is set)."""
        return bool(self.from_address_field or self.from_identity_field)

    def notes(self) -> list[str]:
        if self.sends_from:
            return super().notes()
        return [
            *super().notes(),
            "dEngage mail goes out under the account's default sender: no request field carries the message's "
            "From (dEngage has not confirmed one); set from_address_field or from_identity_field once it has",
        ]

    @field_validator("rate_limit")
    @classmethod
    def _zero_is_unlimited(cls, v: float | None) -> float | None:
        return v or None

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, v: list[str]) -> list[str]:
        return [t.strip() for t in v if t.strip()]

    @model_validator(mode="after")
    def _secret_sources(self) -> DengageAccount:
        object.__setattr__(self, "userkey", secret_or_file(self.userkey, self.userkey_file, "userkey"))
        object.__setattr__(self, "password", secret_or_file(self.password, self.password_file, "password"))
        return self
