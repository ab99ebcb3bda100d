"""[console]: the operator console in the browser (gateway/console/), served by the operator endpoint: who may
sign in, how long a session lasts, and the key its cookies are signed with."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.base import Section, scrypt_hash, secret_or_file

if TYPE_CHECKING:
    from gateway.config.settings import HttpSettings

# A session key shorter than this is refused: it signs every cookie (HMAC-SHA256).
MIN_SECRET = 32


class ConsoleAdmin(Section):
    """Someone who may sign in to the console, with a password hash made by `smtp-gateway hash-password`."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
        description="The name typed at sign-in; the audit log names every action by it.",
    )
    password_hash: SecretStr = Field(description="The password's hash, made by `smtp-gateway hash-password`.")

    @field_validator("password_hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        return scrypt_hash(v)


class ConsoleSettings(Section):
    """The operator console (docs/console.md) at /console/ on the operator endpoint (`[http]`); off unless
    enabled, with at least one admin. Reloaded on SIGHUP."""

    enabled: bool = Field(False, description="Serve the console at /console/ on the operator endpoint.")
    admins: list[ConsoleAdmin] = Field(
        [], description="Who may sign in (name and password hash); at least one when enabled."
    )
    session_secret: SecretStr | None = Field(
        None,
        description="The key session cookies are signed with (HMAC-SHA256), at least 32 characters; unset: a "
        "random key per start, so every session ends at a restart and each `serve --workers N` worker has its own.",
    )
    session_secret_file: Path | None = Field(
        None, description="A file holding `session_secret` on its first line (instead of `session_secret`)."
    )
    idle_timeout: float = Field(
        1800.0, gt=0, description="Seconds without a request after which a session ends (sign in again)."
    )
    session_lifetime: float = Field(
        12 * 3600.0, gt=0, description="Seconds after sign-in at which a session ends however active it is."
    )
    allow_without_tls: bool = Field(
        False,
        description="Allow the console on a non-loopback `http.address` without `http.tls_cert_file`: passwords "
        "and cookies would travel in clear; only behind a TLS-terminating proxy.",
    )

    @model_validator(mode="after")
    def _usable(self) -> ConsoleSettings:
        secret = secret_or_file(self.session_secret, self.session_secret_file, "session_secret", required=False)
        if secret is not None and len(secret.get_secret_value()) < MIN_SECRET:
            raise ValueError(f"session_secret: at least {MIN_SECRET} characters (e.g. `openssl rand -hex 32`)")
        object.__setattr__(self, "session_secret", secret)
        names = [a.name.lower() for a in self.admins]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"admins: the name {', '.join(twice)} is used twice")
        if self.enabled and not self.admins:
            raise ValueError(
                "enabled = true needs at least one [[console.admins]] (name, and password_hash made by "
                "`smtp-gateway hash-password`)"
            )
        if self.session_lifetime < self.idle_timeout:
            raise ValueError("session_lifetime must be at least idle_timeout")
        return self


def check(console: ConsoleSettings, http: HttpSettings, is_loopback: bool) -> None:
    """What [console] needs of [http]: a port to be served on; TLS off loopback. ValueError."""
    if not console.enabled:
        return
    if http.port is None:
        raise ValueError("console.enabled needs the operator endpoint: set http.port (the console is /console/ there)")
    if not is_loopback and not http.tls and not console.allow_without_tls:
        raise ValueError(
            f"console: the operator endpoint on {http.address} (not loopback) would take console passwords and "
            "session cookies in clear: set http.tls_cert_file and http.tls_key_file, or "
            "console.allow_without_tls = true behind a TLS-terminating proxy"
        )
