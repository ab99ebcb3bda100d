"""[accounts.X] with provider = "dmds": a Planisys DMDS account, its logins and its users."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import AccountBase, UserSettings, http_base_url, secret_or_file
from gateway.config.returnpath import EventSettings
from gateway.config.urls import ShownUrl


class DmdsEventSettings(EventSettings):
    """[accounts.X.events] of a DMDS account: `ver_eventos` by time window, and the invalid contacts."""

    invalid_interval: float = Field(
        3600.0,
        ge=0,
        description="Seconds between reads of DMDS' invalid contacts (`GET /v1/contactos/invalidos/`), whose "
        "addresses (minus the whitelisted) join the suppression list; 0: never read.",
    )


class DmdsUser(UserSettings):
    """A configured login of a DMDS account."""

    campaign: int | None = Field(None, description="The campaign numid this login's mail is sent under.")
    may_choose_campaign: bool = Field(
        False, description="The login may send under another campaign with an `X-Gateway-Campaign` header."
    )
    campaign_from_subject: bool = Field(
        False, description="Take the campaign from a `[NN]` Subject prefix (removed before sending) instead."
    )


class DmdsAccount(AccountBase):
    """A Planisys DMDS account (REST v1): its API key, permitted sender domains, logins and users."""

    provider: Literal["dmds"] = Field(
        "dmds", description="`dmds` (the default: a table without `provider` is a DMDS account)."
    )
    dmdsid: str = Field(
        pattern=r"^[A-Za-z0-9_.]+$", description="The dedicated DMDS name; the API's host and the logins use it."
    )
    # The default follows upstream-apis.md §1.1.
    api_base: ShownUrl | None = Field(
        None, description="The API's base URL; unset: `https://api-dmds-<dmdsid>.planisys.net`."
    )
    apikey: SecretStr | None = Field(None, description="The account APIKEY (required: here or in `apikey_file`).")
    apikey_file: Path | None = Field(
        None, description="A file holding the APIKEY on its first line, instead of `apikey`."
    )
    sender_domains: dict[str, str] = Field(
        {},
        description="Permitted sender domain -> its registered return-path address, as listed on the DMDS web.",
    )
    smtp_api_logins: bool = Field(
        True,
        description="Accept DMDS SMTP-API logins: `<dmdsid>-<campaign numid>` with that campaign's apikey, "
        "verified by DMDS.",
    )
    sandbox_logins: bool = Field(
        True,
        description="Accept the SMTP-DMDS sandbox login: `<dmdsid>` with the account APIKEY, the campaign from "
        "a `[NN]` Subject prefix.",
    )
    campaigns: list[int] = Field([], description="When not empty, only these campaign numids may be used.")
    apikey_grace: float = Field(
        0.0,
        ge=0,
        description="Seconds a campaign's previous apikey still logs in (SMTP-API logins) after DMDS first answers "
        "a new one, while devices move to it; 0: from then on only the new key (a verified login is still "
        "remembered for `credential_cache_ttl`).",
    )
    users: list[DmdsUser] = Field([], description="Logins configured here, each with its password hash.")
    archive: bool = Field(
        False,
        description="The default of DMDS `archive` (a witness copy; needs the DMDS archiving licence); "
        "`X-Gateway-Archive` overrides it per message.",
    )
    events: DmdsEventSettings = Field(DmdsEventSettings(), description="Reading DMDS' events back.")

    @property
    def base_url(self) -> str:
        return (self.api_base or f"https://api-dmds-{self.dmdsid}.planisys.net").rstrip("/")

    def sender_domain_names(self) -> tuple[str, ...]:
        return tuple(self.sender_domains)

    def return_paths(self) -> dict[str, str]:
        return dict(self.sender_domains)

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
