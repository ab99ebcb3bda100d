"""Configuration models: the only module that reads environment variables and config files."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from gateway.config import keys, logins
from gateway.config.accounts import MODELS
from gateway.config.base import AccountBase, Section, scrypt_hash, secret_or_file
from gateway.config.console import ConsoleSettings
from gateway.config.console import check as check_console
from gateway.config.oauth import OAuthSettings
from gateway.config.returnpath import ReturnPathSettings, WebhookSettings
from gateway.config.section import UnreadableFile
from gateway.core import queueurl

ENV_PREFIX = "GATEWAY_"
CONFIG_ENV = "GATEWAY_CONFIG"
# GATEWAY_* names that other software sets and that are no settings: CGI's GATEWAY_INTERFACE, and the
# variables Kubernetes injects for a Service named "gateway" (GATEWAY_SERVICE_HOST, GATEWAY_PORT_587_TCP, ...).
FOREIGN_ENV = re.compile(
    r"GATEWAY_(CONFIG|INTERFACE|SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)


_Section = Section


# Networks wider than these prefixes reach far beyond any LAN (0.0.0.0/0, ::/0, 2000::/3, ...): a trusted
# network that wide is refused unless the listener sets allow_wide_trusted_network (docs/devices.md).
WIDEST_TRUSTED_PREFIX = {4: 8, 6: 16}


class TrustedNetwork(_Section):
    """Clients from `network` may send without AUTH, as the configured user `login` (Postfix mynetworks)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network = Field(
        description="The clients' network, e.g. `192.168.10.0/24`."
    )
    login: str = Field(description="The configured user these clients send as.")


class ListenerSettings(_Section):
    """One SMTP listener: an address and port, its TLS mode and who may send through it."""

    name: str = Field(
        "submission", description="The listener's name in logs and metrics; a reload knows listeners by it."
    )
    address: str = Field("127.0.0.1", description="The address to listen on (`0.0.0.0` or `::` for every address).")
    port: int = Field(587, ge=0, le=65535, description="The TCP port; 0: any free port (tests).")
    tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls",
        description="`starttls`: a plain connect with STARTTLS offered (submission, 587); `implicit`: TLS from the "
        "first byte (465); `none`: no TLS at all, only for trusted networks or loopback.",
    )
    # The profiles are Mozilla's server-side TLS profiles (gateway/smtp/tls.py).
    tls_profile: Literal["modern", "intermediate", "legacy"] = Field(
        "intermediate",
        description="`modern`: TLS 1.3 only; `intermediate`: TLS 1.2 and newer with ECDHE and AEAD suites; "
        "`legacy`: also TLS 1.0/1.1 and CBC/3DES suites, for old printers (opt-in).",
    )
    allow_insecure_auth: bool = Field(
        False,
        description="Allow AUTH on a connection that is not (yet) encrypted. Off by default: the password would "
        "travel in clear; only for loopback or a trusted LAN.",
    )
    login_aliases: dict[str, str] = Field(
        {},
        description='AUTH usernames in e-mail form mapped to logins, e.g. `{ "scanner@acme.com" = "scanner" }`, '
        "for devices that insist on an `@` (checked first, case-insensitively).",
    )
    strip_login_domain: bool = Field(
        False, description="An AUTH username `login@anything` is checked as `login` (never guessed otherwise)."
    )
    trusted: list[TrustedNetwork] = Field(
        [],
        description="Networks whose clients send without AUTH, each as one configured user; the most specific "
        "network wins.",
    )
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        [],
        description="Shorthand for several networks with one login: clients from these networks send without AUTH "
        "as `trusted_login`.",
    )
    trusted_login: str | None = Field(
        None, description="The configured user clients of `trusted_networks` act as (required with them)."
    )
    allow_wide_trusted_network: bool = Field(
        False,
        description="Allow a trusted network shorter than /8 (IPv4) or /16 (IPv6): it would let most of the "
        "Internet send without AUTH.",
    )
    reuse_port: bool = Field(
        False,
        description="SO_REUSEPORT: several gateway processes listen on this port and the kernel spreads connections "
        "over them (`serve --workers N` sets it); they share one queue.",
    )
    drop_invalid_header_addresses: bool = Field(
        False,
        description="An invalid To or Cc address that is not an envelope recipient (a scanner's "
        "`scan@printer.local`) is left out of the message's headers instead of refusing the message with 550 "
        "5.1.3; who receives is unchanged (the envelope decides). For devices behind this listener.",
    )
    proxy_protocol: bool = Field(
        False,
        description="Behind a load balancer: every connection starts with a PROXY protocol header (v1 or v2) "
        "naming the real client; accepted only from `proxy_trusted`, other peers are closed.",
    )
    proxy_trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(
        [],
        description="The load balancers' own addresses (required with `proxy_protocol`), e.g. "
        '`["10.0.0.5/32"]`: every host in these networks may claim any client address in a PROXY header; wider '
        "than /8 (IPv4) or /16 (IPv6) is refused unless `allow_wide_proxy_trusted`.",
    )
    allow_wide_proxy_trusted: bool = Field(
        False,
        description="Allow a `proxy_trusted` network shorter than /8 (IPv4) or /16 (IPv6): any host in it could "
        "claim a trusted network's address (mail without AUTH) or a fresh address per AUTH guess (no lockout).",
    )

    @field_validator("login_aliases")
    @classmethod
    def _aliases_are_addresses(cls, v: dict[str, str]) -> dict[str, str]:
        for address in v:
            if "@" not in address:
                raise ValueError(f"{address!r} is not an address: a login alias maps a whole address to a login")
        return {address.strip().lower(): login for address, login in v.items()}

    @model_validator(mode="after")
    def _trusted_pair(self) -> ListenerSettings:
        if self.proxy_protocol and not self.proxy_trusted:
            raise ValueError(
                "proxy_protocol needs proxy_trusted: the load balancers' addresses (a PROXY header "
                "from anyone else would let any client claim any address)"
            )
        if not self.allow_wide_proxy_trusted:
            # The same width rule as trusted networks: a balancer network that wide lets anyone who reaches the
            # listener claim any client address, which beats trusted networks and every per-IP defence.
            for network in self.proxy_trusted:
                if network.prefixlen < WIDEST_TRUSTED_PREFIX[network.version]:
                    raise ValueError(
                        f"listener {self.name!r}: proxy_trusted network {network} is wider than "
                        f"/{WIDEST_TRUSTED_PREFIX[network.version]}: every host in it could claim any client "
                        "address in a PROXY header; list the load balancers' own addresses (/32, /128) "
                        "(or set allow_wide_proxy_trusted = true if this is really meant)"
                    )
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
    """The certificate every TLS listener presents. A reload loads the files again (certificate renewals)."""

    cert_file: Path | None = Field(
        None, description="The certificate chain (PEM), e.g. `fullchain.pem`; required when a listener uses TLS."
    )
    key_file: Path | None = Field(None, description="The certificate's private key (PEM).")
    extra_cert_file: Path | None = Field(
        None,
        description="A second certificate with the other key type (RSA beside ECDSA, or the reverse); OpenSSL picks "
        "the one the client can use. Devices limited to TLS 1.0 and RSA key exchange need an RSA certificate.",
    )
    extra_key_file: Path | None = Field(
        None, description="The second certificate's private key (with `extra_cert_file`)."
    )

    @model_validator(mode="after")
    def _extra_pair(self) -> TlsSettings:
        if (self.extra_cert_file is None) != (self.extra_key_file is None):
            raise ValueError("extra_cert_file and extra_key_file go together")
        return self


class LimitsSettings(_Section):
    """What one client may take. Per-IP limits count an IPv6 client by its /64."""

    # As SES's 40 MB: a scan of about 30 MB fits (base64 adds a third). The upstreams' own limits are not
    # documented (upstream-apis.md).
    max_message_size: int = Field(
        40 * 1024 * 1024,
        ge=1024,
        description="Bytes a message may have (advertised in EHLO SIZE); bigger: 552 5.3.4. Raise it for bigger "
        "scans only if the account's API takes them.",
    )
    max_large_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Bytes of messages larger than `large_message_threshold` one process holds at once (from DATA "
        "to their first delivery attempt's end); a message past it gets 452 4.3.1. A plain-text body made HTML "
        "counts by that HTML: its size plus what escaping adds (4 bytes a '&', 3 a '<' or '>'), 552 5.3.4 if more "
        "than this. Memory for them: at most about 1.5 times this for scans (base64 attachments pass through "
        "undecoded) and up to about 6 times for large plain-text bodies, which are decoded, made HTML and sent as "
        "JSON, whatever their text (bench/scan.py --kind text, text-amp; docs/performance.md).",
    )
    large_message_threshold: int = Field(
        1024 * 1024,
        ge=0,
        description="Messages up to this many bytes never count against `max_large_bytes` (a plain-text body: "
        "counted with what escaping adds to its HTML).",
    )
    # Not lower: a scan of a few hundred KB (the printers' usual) costs about 10 % more CPU through a file, and
    # 50 sessions of messages just below this size stay well under 150 MiB (docs/performance.md).
    spill_above: int = Field(
        512 * 1024,
        ge=0,
        description="A message's DATA past this many bytes goes to an unlinked temporary file in `spill_dir` as it "
        "arrives and waits for its API call there, not in the process's memory; 0: never.",
    )
    spill_dir: str | None = Field(
        None,
        description="Directory of those files (they have no name there, and go when the message's first delivery "
        "attempt ends); default: the system's temporary directory (`TMPDIR`, else /tmp).",
    )
    malloc_mmap_threshold: int = Field(
        4 * 1024 * 1024,
        ge=0,
        le=32 * 1024 * 1024,
        description="Freed blocks this big or bigger go back to the kernel at once (glibc's mmap threshold, set at "
        "start); 0: glibc's default, which lets freed buffers of big messages stay in the process's memory. "
        "`MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` in the environment wins.",
    )
    max_recipients: int = Field(50, ge=1, description="RCPT TO per message; more: 452 4.5.3.")
    command_timeout: float = Field(
        300.0,
        gt=0,
        description="Seconds a client may stay silent between commands (and within DATA between two reads); then "
        "421 4.4.2 and the connection is closed.",
    )
    session_timeout: float | None = Field(
        None, gt=0, description="The older name of `command_timeout`, still read: when set, it is the command timeout."
    )
    data_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds the whole DATA phase may take, from 354 to the final dot, however the bytes trickle "
        "in; then 421 4.4.2.",
    )
    max_auth_failures: int = Field(
        3, ge=1, description="Failed AUTH attempts on one connection; then 421 4.7.0 and disconnect."
    )
    max_sessions: int = Field(1000, ge=1, description="Concurrent SMTP sessions; more: 421 4.7.0.")
    max_sessions_per_ip: int = Field(20, ge=1, description="Concurrent sessions from one client IP; more: 421 4.7.0.")
    max_commands_before_data: int = Field(
        100,
        ge=1,
        description="Commands other than an accepted MAIL/RCPT before a message is sent (counted anew after each "
        "DATA); then 421 4.7.0 and the connection is closed.",
    )
    auth_failures_per_ip: int = Field(
        10,
        ge=1,
        description="AUTH failures of one client IP, across connections, within `auth_failure_window`, from which "
        "each attempt first waits (1 s, doubling up to `auth_delay_max`).",
    )
    auth_failure_window: float = Field(300.0, gt=0, description="Seconds AUTH failures per client IP are counted in.")
    auth_delay_max: float = Field(
        8.0, ge=0, description="The longest wait before a throttled AUTH attempt, in seconds."
    )
    auth_lockout_failures: int = Field(
        20,
        ge=1,
        description="AUTH failures of one client IP within the window at which it gets 421 4.7.0 at AUTH for "
        "`auth_lockout_time`, without any check (at least `auth_failures_per_ip`).",
    )
    auth_lockout_time: float = Field(900.0, gt=0, description="Seconds a locked-out client IP stays locked out.")
    max_tracked_ips: int = Field(
        100_000,
        ge=100,
        description="Client IPs whose AUTH failures are remembered at most (bounds the memory under a flood from "
        "many addresses).",
    )
    messages_per_minute: float = Field(
        0.0,
        ge=0,
        description="Messages per minute per login (a token bucket of accepted MAIL FROMs: a refused one costs "
        "nothing); past it MAIL FROM gets 451 4.7.1. 0: no limit.",
    )
    message_burst: int = Field(
        0,
        ge=0,
        description="Messages a login may send at once within `messages_per_minute` (0: `messages_per_minute`).",
    )

    @model_validator(mode="after")
    def _older_names(self) -> LimitsSettings:
        if self.session_timeout is not None and "command_timeout" not in self.model_fields_set:
            object.__setattr__(self, "command_timeout", self.session_timeout)
        if self.auth_lockout_failures < self.auth_failures_per_ip:
            raise ValueError("auth_lockout_failures must be at least auth_failures_per_ip")
        return self

    @model_validator(mode="after")
    def _budget_fits_a_message(self) -> LimitsSettings:
        if self.max_large_bytes < self.max_message_size:
            raise ValueError("max_large_bytes must be at least max_message_size (a message that size would never pass)")
        return self


_PASSWORD_IN_URL = "holds a password: put it in queue_password (or queue_password_file, or PGPASSWORD)"


def _shown_queue_url(url: str) -> str:
    """The queue's URL as check-config and the console print it (the queue's own lines show it alike)."""
    return queueurl.shown(url)


# The queue's URL: the value itself for the code, without a password in model_dump(mode="json") (masked_dump).
ShownQueueUrl = Annotated[str, PlainSerializer(_shown_queue_url, when_used="json")]


class DeliverySettings(_Section):
    """How messages reach the upstream: the queue, retries, leases and resends."""

    mode: Literal["store-and-forward", "passthrough"] = Field(
        "store-and-forward",
        description="`store-and-forward`: a message the upstream cannot take now is queued and the client gets "
        "250; `passthrough`: never queue, the client gets 451 and must retry itself.",
    )
    inline_budget: float = Field(
        10.0, gt=0, description="Seconds the client waits for the API before the message is queued (and gets 250)."
    )
    spool_path: Path = Field(
        Path("var/spool.sqlite3"),
        description="The SQLite queue file (one machine, any number of local processes), unless `queue_url` is set.",
    )
    spool_reserve: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="Bytes of disk kept free beside the SQLite queue and released only when the disk fills up, so "
        "messages already queued can still be retried and deleted (new ones get 452 4.3.1 until there is room).",
    )
    queue_url: ShownQueueUrl = Field(
        "",
        description="A PostgreSQL queue shared by several machines, `postgresql://user@host:5432/db` (no password "
        "in it); empty: the SQLite queue at `spool_path`.",
    )
    queue_password: SecretStr | None = Field(
        None, description="The PostgreSQL queue's password (or `queue_password_file`, or libpq's `PGPASSWORD`)."
    )
    queue_password_file: Path | None = Field(None, description="A file holding the queue's password on its first line.")
    retry_schedule: list[float] = Field(
        [60, 300, 900, 1800, 3600, 7200, 14400],
        description="Seconds between delivery attempts of a queued message; the last interval repeats.",
    )
    retry_jitter: float = Field(0.2, ge=0, le=1, description="Randomisation of each interval (0.2: +-20 %).")
    max_lifetime: float = Field(
        5 * 24 * 3600, gt=0, description="Seconds a message may stay in the queue before it is dead-lettered."
    )
    concurrency: int = Field(4, ge=1, description="Parallel retry deliveries per account.")
    poll_interval: float = Field(
        1.0,
        gt=0,
        description="Longest the retry worker sleeps between looks at the queue: bounds how soon a `smtp-gateway "
        "queue retry` or `requeue` made by another process is acted on.",
    )
    probe_interval: float = Field(
        15.0,
        gt=0,
        description="While an account's upstream is down, one queued message is tried this often (seconds); the "
        "first success makes the whole backlog due.",
    )
    instance_name: str = Field(
        "",
        description="This instance's name in the queue's leases (owner `<name>:<pid>:<place>-<nonce>`); empty: "
        "the host name. A name per machine (container, pod) makes logs easier to read; a shared one is safe.",
    )
    lease_seconds: float = Field(
        60.0,
        ge=1,
        description="How long a claimed message is leased to its instance (renewed every third of it while its "
        "call runs); an instance that died loses its leases after this.",
    )
    ambiguous: Literal["resend", "hold"] = Field(
        "resend",
        description="A call sent whose answer was lost (read timeout, reset, its instance died mid-call) may have "
        "been delivered: `resend` it (at-least-once, counted) or `hold` the message as a dead letter for review.",
    )
    shutdown_timeout: float = Field(
        10.0, ge=0, description="On SIGTERM: seconds running upstream calls get to finish and be recorded."
    )
    idempotency_window: float = Field(
        24 * 3600,
        gt=0,
        description="Seconds an idempotency key is remembered: a message resent with the same key within it gets "
        "the first one's 250 and is not sent again (`X-Gateway-Idempotency-Key`, or Message-ID and envelope per "
        "account).",
    )

    @field_validator("queue_url")
    @classmethod
    def _no_password_in_url(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL (leave it empty for the SQLite queue at spool_path)")
        # libpq also takes the password as a query parameter (postgresql://u@h/db?password=...), and the client
        # key's passphrase as ?sslpassword=: the URL is printed and logged, so neither may be in it.
        query = urllib.parse.unquote(v.partition("?")[2]).lower()
        names = {p.partition("=")[0].strip() for p in query.split("&")}
        users = queueurl.user_parts(v)
        if any(":" in user for user in users) or "password" in names:
            raise ValueError(_PASSWORD_IN_URL)
        if any("%3a" in user.lower() for user in users):
            # libpq decodes the user part after splitting it at its ':': `gateway%3Asecret@` is the user name
            # "gateway:secret", no role, and most likely a password written where it does not belong.
            raise ValueError(
                "holds a percent-encoded ':' (%3A) in its user name: libpq would take all of it as the user "
                "name, so it most likely holds a password: put the password in queue_password (or "
                "queue_password_file, or PGPASSWORD)"
            )
        if "sslpassword" in names:
            raise ValueError(
                "holds the client key's passphrase (sslpassword=): give libpq an unencrypted sslkey readable only "
                "by the gateway, or set it in a service file (PGSERVICEFILE)"
            )
        problem = _conninfo_problem(v) if v else None
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _password_source(self) -> DeliverySettings:
        password = secret_or_file(self.queue_password, self.queue_password_file, "queue_password", required=False)
        object.__setattr__(self, "queue_password", password)
        return self


# libpq's sslmode values: libpq checks them only when it connects.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


# What libpq's URL messages quote that is libpq's own text, not the URL's: `matching "]"`, `separator "="`.
_LIBPQ_QUOTED = ("]", "=", ":", "/")


def _unquoted(reason: str) -> str:
    """libpq's reason without the URL's text: libpq ends it with the URL, or the part it could not read, in
    quotes (`invalid percent-encoded token: "..."`), and names a wrong character (`unexpected character "x"`):
    the refusal names the key and the problem, the text is the operator's and may be a password."""
    reason = reason.partition(': "')[0].removesuffix(" in URI")
    reason = re.sub(r'\s*"([^"]*)"', lambda m: m[0] if m[1] in _LIBPQ_QUOTED else "", reason)
    return reason.strip() or "unreadable"


def _conninfo_problem(url: str) -> str | None:
    """What libpq would refuse in the queue's URL, said at config load where the key is named: libpq parses the
    URL only when it connects, and a malformed one, an unknown query parameter, a port out of range or an
    unknown sslmode came out as psycopg's traceback or as "cannot connect" to a server never tried. The
    problem is named, the text never quoted: a password misplaced in the URL is what libpq most often
    cannot read (as a port, a percent-encoded token or a query parameter)."""
    import psycopg  # only with a PostgreSQL queue

    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        return f"is not a URL libpq can read: {_unquoted(reason)}"
    for port in str(info.get("port") or "").split(","):  # one per host: postgresql://h1:5432,h2:5433/db
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return "has a port that is not a port number (1-65535)"
    sslmode = info.get("sslmode")
    if sslmode is not None and sslmode not in _SSLMODES:
        return f"sslmode is not one of {', '.join(_SSLMODES)}"
    return None


class DnsSettings(_Section):
    """The resolver and the checks made on sender and recipient domains."""

    nameservers: list[str] = Field([], description="Name server addresses; empty: the system's (`/etc/resolv.conf`).")
    port: int = Field(53, description="The name servers' port.")
    timeout: float = Field(
        3.0, gt=0, description="Seconds one lookup may take; a timeout is a temporary 451 4.4.3, never a rejection."
    )
    max_ttl: int = Field(3600, description="The longest a positive answer is cached, in seconds.")
    negative_ttl: int = Field(300, description='How long "does not exist" is cached, in seconds.')
    check_sender_domain: bool = Field(True, description="The MAIL FROM domain must exist (an MX, A or AAAA record).")
    check_recipient_domains: bool = Field(
        False, description="Recipient domains must exist (off: the upstream API validates them)."
    )


class LogSettings(_Section):
    """The log's level and format (written to stderr)."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="The lowest level logged.")
    format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="`auto`: console lines on a terminal, JSON lines otherwise (systemd, Docker, a file); `json` or "
        "`console` force one.",
    )


class LedgerSettings(_Section):
    """The message ledger (docs/after-250.md): a record of every message answered 250."""

    enabled: bool = Field(True, description="Record every message answered 250 in the ledger.")
    retention: float = Field(
        7 * 24 * 3600,
        gt=0,
        description="Seconds a record is kept after its message was accepted; older ones are pruned, but for "
        "those with a webhook delivery or a notice still pending. At least `delivery.max_lifetime` plus the "
        "largest `[[webhooks]] max_age`.",
    )
    flush_interval: float = Field(
        0.5,
        gt=0,
        le=10,
        description="Records are written off the SMTP path, in one transaction this often (or sooner when many wait).",
    )
    buffer: int = Field(
        100_000,
        ge=1000,
        description="Rows waiting to be written at most; past it the oldest are dropped (counted, logged), never "
        "the reply.",
    )
    keep_requests: bool = Field(
        True,
        description="Keep each message's planned upstream requests (the body as JSON, attachments as their size): "
        "the largest part of a record and of the ledger's cost per message.",
    )
    keep_bodies: bool = Field(
        False,
        description="Keep the message's text (its HTML as sent) in the kept requests; false: its size only, as for "
        "attachments. The body is most of a request: kept, it is message content at rest for `retention` and "
        "costs the ledger more CPU and disk per message. A test-mode login's requests always keep it.",
    )


class ApiToken(_Section):
    """A bearer token for the message API, stored as a hash made by `smtp-gateway hash-password`."""

    name: str = Field(min_length=1, description="The token's name, for the audit log (never the token).")
    token_hash: SecretStr = Field(description="The token's hash, made by `smtp-gateway hash-password`.")

    @field_validator("token_hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        return scrypt_hash(v)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(address: str) -> bool:
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class HttpSettings(_Section):
    """The operator endpoint: /healthz, /readyz, /metrics (Prometheus) and, with API tokens, the message API
    (/api/v1/messages). No port: disabled."""

    address: str = Field("127.0.0.1", description="The address the operator endpoint listens on.")
    port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Its port; unset: no operator endpoint. `serve --workers N`: worker i uses port + i.",
    )
    api_tokens: list[ApiToken] = Field(
        [], description="Who may use /api/v1 (`Authorization: Bearer <token>`); none listed: the API answers 404."
    )
    tls_cert_file: Path | None = Field(
        None, description="Serve the endpoint over HTTPS with this certificate (with `tls_key_file`)."
    )
    tls_key_file: Path | None = Field(None, description="The HTTPS certificate's private key.")
    allow_api_without_tls: bool = Field(
        False,
        description="Allow the API on a non-loopback address without TLS (its tokens would travel in clear): "
        "only behind a TLS-terminating proxy.",
    )

    @model_validator(mode="after")
    def _api_safe(self) -> HttpSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        names = [t.name for t in self.api_tokens]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"api_tokens: the name {', '.join(duplicates)} is used twice")
        if (
            self.api_tokens
            and self.tls_cert_file is None
            and not is_loopback(self.address)
            and not self.allow_api_without_tls
        ):
            raise ValueError(
                f"the message API on {self.address} (not loopback) would take its tokens in clear: set "
                "tls_cert_file and tls_key_file, or allow_api_without_tls = true behind a TLS-terminating proxy"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    hostname: str = Field(
        "smtp-gateway.localdomain", description="The name announced in the SMTP greeting and the EHLO reply."
    )
    listeners: list[ListenerSettings] = Field([ListenerSettings()], description="One table per address and port.")
    tls: TlsSettings = Field(TlsSettings(), description="The certificate TLS listeners present.")
    limits: LimitsSettings = Field(LimitsSettings(), description="What one client may take.")
    # Each [accounts.X] is its provider's model, chosen by its `provider` key: settings_model() gives the
    # class that validates them (load_settings uses it).
    accounts: dict[str, AccountBase] = Field(
        {}, description="One table per upstream account, chosen by its `provider` key."
    )
    delivery: DeliverySettings = Field(DeliverySettings(), description="The queue, retries and resends.")
    dns: DnsSettings = Field(DnsSettings(), description="The resolver and the domain checks.")
    log: LogSettings = Field(LogSettings(), description="The log's level and format.")
    http: HttpSettings = Field(HttpSettings(), description="The operator endpoint.")
    ledger: LedgerSettings = Field(
        LedgerSettings(), description="The message ledger: records of every message answered 250."
    )
    oauth: OAuthSettings = Field(OAuthSettings(), description="Token logins (AUTH XOAUTH2, OAUTHBEARER).")
    console: ConsoleSettings = Field(
        ConsoleSettings(), description="The operator console in the browser, on the operator endpoint."
    )
    networks: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = Field(
        {},
        description="Named networks the logins' `networks` and `require_tls_except` may name, e.g. `printers = "
        '["192.168.20.0/24"]`.',
    )
    webhooks: list[WebhookSettings] = Field(
        [], description="Applications told of each event read back (signed JSON POSTs, retried from the queue)."
    )
    return_path: ReturnPathSettings = Field(
        ReturnPathSettings(), description="How the event pollers, notices and webhooks are paced."
    )

    @field_validator("networks")
    @classmethod
    def _network_names(
        cls, v: dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]
    ) -> dict[str, list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
        for name, nets in v.items():
            if not logins.NAME.match(name):
                raise ValueError(f"{name!r}: a network name is letters, digits, '_' and '-', starting with a letter")
            logins.no_overlap([(str(n), n) for n in nets], f"networks.{name}")
        return v

    # A TLS listener without tls.cert_file/key_file is not refused here: commands that serve no SMTP (queue,
    # check-domains) work without a certificate; `serve` and `check-config` say what is missing
    # (gateway/config/preflight.py).
    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        check_consistent(self)
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


def check_consistent(settings: Settings) -> None:
    """What no single section can check: a login belongs to one account, every trusted network's login is a
    configured user, every login's controls resolve (gateway/config/logins.py). ValueError, its text starting
    with the keys it is about."""
    where: dict[str, str] = {}
    for name, account in settings.accounts.items():
        for i, user in enumerate(account.configured_users):
            key = f"accounts.{name}.users[{i}].username"
            first = where.setdefault(user.username, key)
            if first != key:
                # Authentication would find only one of them: the other user's every login would get 535.
                raise ValueError(
                    f"{first} and {key}: the login {user.username!r} is in two accounts; a login must be unique "
                    "across accounts: rename one of them"
                )
    users = set(where)
    for listener in settings.listeners:
        for _, login in listener.trusted_map:
            if login not in users:
                raise ValueError(f"listeners[{listener.name}]: trusted login {login!r} is not a user")
    logins.check(settings)
    check_console(settings.console, settings.http, is_loopback(settings.http.address))
    names = [w.name for w in settings.webhooks]
    for webhook in settings.webhooks:
        if names.count(webhook.name) > 1:
            raise ValueError(f"webhooks: the name {webhook.name!r} is used twice")
        unknown = sorted(set(webhook.accounts) - set(settings.accounts))
        if unknown:
            raise ValueError(f"webhooks[{webhook.name}].accounts: no account {', '.join(unknown)}")
    check_retention(settings)


def check_retention(settings: Settings) -> None:
    """A record must outlive what may still be written about its message: a dead letter's `dead` row and
    notice come up to `delivery.max_lifetime` after acceptance, and its webhook deliveries are retried for
    their `max_age` after that. A shorter retention would prune the record (and a notice or a delivery
    written with its acceptance time) at the next prune."""
    if not settings.ledger.enabled:
        return
    age = max((w.max_age for w in settings.webhooks), default=0.0)
    floor = settings.delivery.max_lifetime + age
    if settings.ledger.retention < floor:
        what = "delivery.max_lifetime" + (" plus the largest webhooks max_age" if age else "")
        raise ValueError(
            f"ledger.retention: {settings.ledger.retention:g} seconds is shorter than {what} "
            f"({floor:g} seconds): a record could be pruned while its message may still become a dead letter "
            f"or its webhooks be delivered; raise ledger.retention to at least {floor:g}"
        )


class ConfigError(Exception):
    """A configuration problem, naming the offending key."""


class ConfigFileError(ConfigError):
    """A file the configuration names (a certificate, a CA file, a `*_file` secret) that cannot be read or loaded:
    a problem of the machine (exit status 1), not of the configuration's text (2). Its text names the key."""


def settings_model(path: Path | None = None) -> type[Settings]:
    """Settings whose [accounts.X] tables are validated by the registered providers' models (config/accounts.py),
    read from the TOML file at `path` (and the environment)."""
    account = MODELS.account_type()

    class LoadedSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)
        accounts: dict[str, account] = {}  # type: ignore[valid-type]

    return LoadedSettings


def config_keys() -> keys.Node:
    """Every key the configuration has, derived from the models (nothing listed by hand)."""
    return keys.tree(settings_model())


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Build Settings from the TOML file (or $GATEWAY_CONFIG), the environment and overrides.

    Raises ConfigError, whose text names the problem and the fix: a missing or unreadable file, a TOML
    syntax error (file:line:column), a GATEWAY_* variable that sets nothing (with the nearest valid name),
    an invalid or unknown key.
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    if path is not None and not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"config file {what}: {path} (give a TOML file with --config FILE or ${CONFIG_ENV})")
    unknown = keys.unknown_env(os.environ, config_keys(), ENV_PREFIX, "__", FOREIGN_ENV)
    if unknown:
        raise ConfigError("\n".join(unknown))
    # Checked here, not left to pydantic-settings: its error names only the section ('field "accounts"'), and
    # older releases pass the text on to a validation error that names no variable at all.
    not_json = keys.env_not_json(os.environ, config_keys(), ENV_PREFIX, "__", FOREIGN_ENV)
    if not_json:
        raise ConfigError(
            "\n".join(
                f"{name} is not JSON: a list or table set in the environment must be JSON, e.g. "
                f"""{name}='["a", "b"]' or '{{"key": "value"}}'"""
                for name in not_json
            )
        )

    try:
        return settings_model(path)(**overrides)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        # Only files that cannot be read (a secret not mounted, its permissions): this machine (exit 1).
        unreadable = all(isinstance(e.get("ctx", {}).get("error"), UnreadableFile) for e in errors)
        raise (ConfigFileError if unreadable else ConfigError)(format_validation_error(exc, path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_error(path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except SettingsError as exc:
        # pydantic-settings' words, e.g. 'error parsing value for field "listeners" from source "EnvSettingsSource"'
        raise ConfigError(f"{exc}: a list or table set in the environment must be JSON") from None


def _toml_error(path: Path | None, exc: tomllib.TOMLDecodeError) -> str:
    # Python 3.11's message ends "(at line L, column C)"; lineno/colno attributes came only in 3.14.
    m = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", str(exc))
    if m is None:
        return f"{path}: TOML syntax error: {exc}"
    return f"{path}:{m[2]}:{m[3]}: TOML syntax error: {m[1]}"


def format_validation_error(exc: ValidationError, path: Path | None = None) -> str:
    root = config_keys()
    lines = []
    # The input is only looked at (a table where a list of tables belongs), never printed: it may hold secrets.
    for err in exc.errors(include_input=True, include_url=False):
        key, parent = keys.display_key(root, err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg))  # our own words, without pydantic's "Value error, "
        if err["type"] == "extra_forbidden" and err["loc"]:
            near = keys.suggest_key(parent, str(err["loc"][-1]))
            msg = "unknown key" + (f"; did you mean {near}?" if near else "")
        if err["type"] == "list_type" and _list_of_tables(parent, err["loc"]):
            if isinstance(err.get("input"), dict):
                # `[listeners]` for `[[listeners]]`, the commonest TOML slip: pydantic's "a valid list" names
                # no fix.
                msg = f"a list of tables: write each one under [[{key}]] (two brackets), not [{key}]"
            else:  # `listeners = "x"`: no single-bracket table to undo (review today6b F3)
                msg = f"must be a list of tables, each one under [[{key}]]"
        lines.append(f"{key}: {msg}" if key else msg)  # a check of the whole names its keys itself
    where = f" in {path}" if path is not None else ""
    return f"invalid configuration{where}:\n  " + "\n  ".join(lines)


def _list_of_tables(parent: keys.Node | None, loc: tuple[int | str, ...]) -> bool:
    """Whether the key at `loc` (under `parent`) holds a list of tables, as `listeners` and `users` do."""
    if parent is None or parent.kind != "model" or not loc:
        return False
    node = parent.fields.get(str(loc[-1]))
    return node is not None and node.kind == "sequence" and node.item is not None and node.item.kind == "model"


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data with every secret masked (SecretStr dumps as '**********')."""
    return settings.model_dump(mode="json")
