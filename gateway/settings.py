"""Configuration models: the only module that reads environment variables and config files."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "GATEWAY_"
CONFIG_ENV = "GATEWAY_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Networks wider than these prefixes reach far beyond any LAN (0.0.0.0/0, ::/0, 2000::/3, ...): a trusted
# network that wide is refused unless the listener sets allow_wide_trusted_network (README, Devices).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 16}


class TrustedNetwork(_Section):
    """Clients from `network` may send without AUTH, as the configured user `login` (Postfix mynetworks)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    login: str


class ListenerSettings(_Section):
    name: str = "submission"
    address: str = "127.0.0.1"
    port: int = Field(587, ge=0, le=65535)
    # starttls: plain connect, STARTTLS offered (submission, 587); implicit: TLS from the first byte (465);
    # none: no TLS at all, only for explicitly trusted networks or loopback.
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    # Mozilla's server-side TLS profiles (gateway/tlsutil.py): modern = TLS 1.3 only; intermediate = TLS 1.2+
    # with ECDHE + AEAD suites; legacy = also TLS 1.0/1.1 and CBC/3DES suites for old printers (opt-in).
    tls_profile: Literal["modern", "intermediate", "legacy"] = "intermediate"
    # AUTH on a connection that is not (yet) encrypted. Off by default: the password would travel in clear.
    allow_insecure_auth: bool = False
    # AUTH usernames in email form, for devices that insist on an "@": a whole address mapped to a login
    # (checked first, case-insensitively), and/or "login@anything" stripped to "login". Never guessed.
    login_aliases: dict[str, str] = {}
    strip_login_domain: bool = False
    # Clients from these networks send without AUTH, each network as one configured user; the most specific
    # network wins. `trusted_networks` + `trusted_login` is the shorthand for several networks, one login.
    trusted: list[TrustedNetwork] = []
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    trusted_login: str | None = None
    # A trusted network shorter than /8 (IPv4) or /16 (IPv6) is refused unless this is true.
    allow_wide_trusted_network: bool = False
    # SO_REUSEPORT: several gateway processes may listen on this port and the kernel spreads
    # connections over them. Each process needs its own delivery.spool_path (see README, Performance).
    reuse_port: bool = False
    # Proxy protocol etc. deliberately absent: not needed yet.

    @field_validator("login_aliases")
    @classmethod
    def _aliases_are_addresses(cls, v: dict[str, str]) -> dict[str, str]:
        for address in v:
            if "@" not in address:
                raise ValueError(f"{address!r} is not an address: a login alias maps a whole address to a login")
        return {address.strip().lower(): login for address, login in v.items()}

    @model_validator(mode="after")
    def _trusted_pair(self) -> ListenerSettings:
        if self.trusted_networks and not self.trusted_login:
            raise ValueError("trusted_networks needs trusted_login (the login those clients act as)")
        if not self.allow_wide_trusted_network:
            for network, _ in self.trusted_map:
                if network.prefixlen < WIDEST_TRUSTED_PREFIX[network.version]:
                    raise ValueError(
                        f"trusted network {network} is wider than /{WIDEST_TRUSTED_PREFIX[network.version]}: "
                        "it would let most of the Internet send without AUTH; list the LAN's own networks "
                        "(or set allow_wide_trusted_network = true if this is really meant)"
                    )
        return self

    @property
    def trusted_map(self) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
        """Every trusted network with its login, most specific first (the first match wins)."""
        pairs = [(t.network, t.login) for t in self.trusted]
        if self.trusted_login:
            pairs += [(network, self.trusted_login) for network in self.trusted_networks]
        return sorted(pairs, key=lambda pair: -pair[0].prefixlen)


class TlsSettings(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None
    # A second certificate with the other key type (RSA beside ECDSA, or the reverse); OpenSSL picks the one
    # the client can use. Devices limited to TLS 1.0 and RSA key exchange need an RSA certificate.
    extra_cert_file: Path | None = None
    extra_key_file: Path | None = None

    @model_validator(mode="after")
    def _extra_pair(self) -> TlsSettings:
        if (self.extra_cert_file is None) != (self.extra_key_file is None):
            raise ValueError("extra_cert_file and extra_key_file go together")
        return self


class LimitsSettings(_Section):
    max_message_size: int = Field(25 * 1024 * 1024, ge=1024)
    max_recipients: int = Field(50, ge=1)
    session_timeout: float = Field(300.0, gt=0)
    max_auth_failures: int = Field(3, ge=1)
    max_sessions: int = Field(1000, ge=1)


class UserSettings(_Section):
    """A login listed in config. The password is stored as a hash made by `smtp-gateway hash-password`."""

    username: str
    password_hash: SecretStr
    campaign: int | None = None
    may_choose_campaign: bool = False
    campaign_from_subject: bool = False
    allowed_senders: list[str] = []
    default_from: str | None = None
    force_from: bool = False

    @field_validator("password_hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("scrypt$"):
            raise ValueError("must be a hash made by `smtp-gateway hash-password` (starts with 'scrypt$')")
        return v


class AccountSettings(_Section):
    provider: Literal["dmds"] = "dmds"
    dmdsid: str = Field(pattern=r"^[A-Za-z0-9_.]+$")
    # Default https://api-dmds-<dmdsid>.planisys.net (upstream-apis.md §1.1).
    api_base: str | None = None
    apikey: SecretStr
    # Permitted sender domain -> its registered return-path address (as listed on the DMDS web).
    sender_domains: dict[str, str] = {}
    # <dmdsid>-<campaign numid> + that campaign's apikey, verified against DMDS' campania_apikey.
    smtp_api_logins: bool = True
    # <dmdsid> + the account APIKEY, campaign from a "[NN]" Subject prefix (SMTP-DMDS sandbox style).
    sandbox_logins: bool = True
    # When not empty, only these campaign numids may be used.
    campaigns: list[int] = []
    users: list[UserSettings] = []
    credential_cache_ttl: float = Field(300.0, ge=0)
    negative_cache_ttl: float = Field(30.0, ge=0)
    http_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(50, ge=1)
    # HTTP transport under httpx: aiohttp's costs ~0.3 ms CPU per request, httpx's own ~1.3 ms (bench/README.md).
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    archive: bool = False

    @property
    def base_url(self) -> str:
        return (self.api_base or f"https://api-dmds-{self.dmdsid}.planisys.net").rstrip("/")

    @field_validator("sender_domains")
    @classmethod
    def _lower_domains(cls, v: dict[str, str]) -> dict[str, str]:
        return {d.lower().strip("."): rp.strip() for d, rp in v.items()}


class DeliverySettings(_Section):
    # store-and-forward: a message the upstream cannot take now is spooled and the client gets 250.
    # passthrough: never spool; the client gets 451 and must retry itself.
    mode: Literal["store-and-forward", "passthrough"] = "store-and-forward"
    inline_budget: float = Field(10.0, gt=0)
    spool_path: Path = Path("var/spool.sqlite3")
    retry_schedule: list[float] = [60, 300, 900, 1800, 3600, 7200, 14400]
    retry_jitter: float = Field(0.2, ge=0, le=1)
    max_lifetime: float = Field(5 * 24 * 3600, gt=0)
    concurrency: int = Field(4, ge=1)
    # Longest the retry worker sleeps between looks at the spool: bounds how soon a
    # `smtp-gateway queue retry|requeue` made by another process is acted on.
    poll_interval: float = Field(1.0, gt=0)
    # On SIGTERM: how long running retry calls (and calls spooled in flight) get to finish and record.
    shutdown_timeout: float = Field(10.0, ge=0)


class DnsSettings(_Section):
    nameservers: list[str] = []
    port: int = 53
    timeout: float = Field(3.0, gt=0)
    max_ttl: int = 3600
    negative_ttl: int = 300
    check_sender_domain: bool = True
    check_recipient_domains: bool = False


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "console"


class HttpSettings(_Section):
    """The operator endpoint: /healthz, /readyz and /metrics (Prometheus). No port: disabled."""

    address: str = "127.0.0.1"
    port: int | None = Field(None, ge=0, le=65535)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    hostname: str = "smtp-gateway.localdomain"
    listeners: list[ListenerSettings] = [ListenerSettings()]
    tls: TlsSettings = TlsSettings()
    limits: LimitsSettings = LimitsSettings()
    accounts: dict[str, AccountSettings] = {}
    delivery: DeliverySettings = DeliverySettings()
    dns: DnsSettings = DnsSettings()
    log: LogSettings = LogSettings()
    http: HttpSettings = HttpSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        needs_cert = any(listener.tls != "none" for listener in self.listeners)
        if needs_cert and not (self.tls.cert_file and self.tls.key_file):
            raise ValueError("tls.cert_file and tls.key_file are required by a starttls/implicit listener")
        logins = {u.username for a in self.accounts.values() for u in a.users}
        for listener in self.listeners:
            for _, login in listener.trusted_map:
                if login not in logins:
                    raise ValueError(f"listeners[{listener.name}]: trusted login {login!r} is not a user")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments > GATEWAY_* environment > the TOML file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


class ConfigError(Exception):
    """A configuration problem, naming the offending key."""


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from the TOML file (or $GATEWAY_CONFIG), the environment and overrides."""
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        return _FileSettings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{key}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data with every secret masked (SecretStr dumps as '**********')."""
    return settings.model_dump(mode="json")
