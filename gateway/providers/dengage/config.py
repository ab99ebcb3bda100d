"""[accounts.X] with provider = "dengage": a dEngage account (API user), its logins and its users."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import AccountBase, UserSettings, secret_or_file
from gateway.config.returnpath import EventSettings


class DengageEventSettings(EventSettings):
    """[accounts.X.events] of a dEngage account: GetTransactionalEmailReport by time window, filtered by a tag
    the gateway adds to each message it sends while events are read."""

    page_size: int = Field(100, ge=100, le=1000, description="Report rows asked for per page (dEngage: 100 to 1000).")
    tag: str = Field(
        "smtp-gateway",
        description="Added to every message's `tags` while events are enabled, and the report is filtered by it "
        "(other systems' mail on the account stays out); empty: no tag, the whole account's report.",
    )


class DengageUser(UserSettings):
    """A configured login of a dEngage account."""

    tags: list[str] = Field([], description="Report tags added to every message of this login (dEngage `tags`).")


class DengageAccount(AccountBase):
    """A dEngage account: its API user, the sender domains it may use, logins and users."""

    provider: Literal["dengage"] = Field(description="`dengage`.")
    # The data centres' URLs: upstream-apis.md §2.1.
    api_base: str = Field(
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
    # dEngage allows about 30 requests/s per IP (upstream-apis.md §2.1 [C]). A token bucket lets at most
    # rate_burst + rate_limit - 1 calls through in any one second: 29 with these defaults.
    rate_limit: float | None = Field(
        25.0,
        ge=0,
        description="Requests per second to the API, shared by every session, retry and instance (dEngage "
        "allows about 30 per IP); 0: no limit.",
    )
    rate_burst: int = Field(
        5, ge=1, description="How many requests may go at once: at most `rate_limit + rate_burst - 1` a second."
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

    @field_validator("sender_domains")
    @classmethod
    def _lower_domains(cls, v: list[str]) -> list[str]:
        return [d.lower().strip().strip(".").lstrip("@") for d in v]

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
