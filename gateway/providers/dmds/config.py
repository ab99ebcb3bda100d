"""[accounts.X] with provider = "dmds": a Planisys DMDS account, its logins and its users."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import AccountBase, UserSettings, http_base_url, secret_or_file


class DmdsUser(UserSettings):
    campaign: int | None = None
    may_choose_campaign: bool = False
    campaign_from_subject: bool = False


class DmdsAccount(AccountBase):
    provider: Literal["dmds"] = "dmds"
    dmdsid: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    # Default https://api-dmds-<dmdsid>.planisys.net (upstream-apis.md §1.1).
    api_base: str | None = None
    apikey: SecretStr | None = None
    apikey_file: Path | None = None
    # Permitted sender domain -> its registered return-path address (as listed on the DMDS web).
    sender_domains: dict[str, str] = {}
    # <dmdsid>-<campaign numid> + that campaign's apikey, verified against DMDS' campania_apikey.
    smtp_api_logins: bool = True
    # <dmdsid> + the account APIKEY, campaign from a "[NN]" Subject prefix (SMTP-DMDS sandbox style).
    sandbox_logins: bool = True
    # When not empty, only these campaign numids may be used.
    campaigns: list[int] = []
    users: list[DmdsUser] = []
    archive: bool = False

    @property
    def base_url(self) -> str:
        return (self.api_base or f"https://api-dmds-{self.dmdsid}.planisys.net").rstrip("/")

    @property
    def key(self) -> str:
        assert self.apikey is not None  # _apikey_source guarantees it
        return self.apikey.get_secret_value()

    @field_validator("api_base")
    @classmethod
    def _api_base_is_a_url(cls, v: str | None) -> str | None:
        return None if v is None else http_base_url(v)

    @field_validator("sender_domains")
    @classmethod
    def _lower_domains(cls, v: dict[str, str]) -> dict[str, str]:
        return {d.lower().strip("."): rp.strip() for d, rp in v.items()}

    @model_validator(mode="after")
    def _apikey_source(self) -> DmdsAccount:
        key = secret_or_file(self.apikey, self.apikey_file, "apikey")
        object.__setattr__(self, "apikey", key)
        return self
