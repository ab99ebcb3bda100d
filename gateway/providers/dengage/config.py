"""[accounts.X] with provider = "dengage": a dEngage account (API user), its logins and its users."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import AccountBase, UserSettings, http_base_url, secret_or_file


class DengageUser(UserSettings):
    # Report tags added to every message of this login (dEngage `tags`, filterable in its reports).
    tags: list[str] = []


class DengageAccount(AccountBase):
    provider: Literal["dengage"]
    # Per data centre: https://api.dengage.com/rest, https://tr-api.dengage.com/rest, ... (upstream-apis.md §2.1)
    api_base: str = "https://api.dengage.com/rest"
    # The API user (Settings > Identity & Access Management > API Users): secrets, from env or file.
    userkey: SecretStr | None = None
    userkey_file: Path | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    # Sender domains this gateway may use, narrowing the account's own From identities
    # (GET /rest/email/froms); empty: every identity's domain.
    sender_domains: list[str] = []
    # Seconds the froms list is kept before it is fetched again (a failed refresh keeps the old list).
    froms_ttl: float = Field(600.0, gt=0)
    # Opt-in: the API user's own userkey + password as the SMTP login, verified by a real /rest/login.
    api_user_logins: bool = False
    users: list[DengageUser] = []
    # Report tags added to every message of this account.
    tags: list[str] = []
    # dEngage allows about 30 requests/s per IP (upstream-apis.md §2.1 [C]). A token bucket lets at most
    # rate_burst + rate_limit - 1 calls through in any one second: 29 with these defaults. 0: no limit.
    rate_limit: float | None = Field(25.0, ge=0)
    rate_burst: int = Field(5, ge=1)

    @property
    def base_url(self) -> str:
        return self.api_base.rstrip("/")

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
