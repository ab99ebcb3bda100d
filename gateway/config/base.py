"""Configuration building blocks shared by gateway/config/settings.py and every provider's account model."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.core.scrypt import parse_hash


class Section(BaseModel):
    """A config table: unknown keys are errors that name the key; values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_secret_file(path: Path, what: str) -> SecretStr:
    """A secret kept in its own file (Docker/Kubernetes secrets, systemd credentials): first line only."""
    try:
        value = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.__class__.__name__}") from None
    if not value:
        raise ValueError(f"{what}: {path} is empty")
    return SecretStr(value)


def secret_or_file(value: SecretStr | None, path: Path | None, what: str, *, required: bool = True) -> SecretStr | None:
    """`x` or `x_file`, never both; with neither, an error when the secret is required."""
    if value is not None and path is not None:
        raise ValueError(f"set {what} or {what}_file, not both")
    if path is not None:
        return read_secret_file(path, f"{what}_file")
    if value is None and required:
        raise ValueError(f"{what} (or {what}_file) is required")
    return value


def http_base_url(value: str) -> str:
    """An upstream's base URL, http:// or https:// with a host: anything else would make every message's
    call fail (451 4.3.0) while check-config said OK."""
    text = value.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        example = text.split("://", 1)[-1].lstrip("/") or "api.example.com"
        raise ValueError(
            f"{text!r} is not an http:// or https:// URL with a host: write it whole, e.g. https://{example}"
        )
    return text


class UserSettings(Section):
    """A login listed in config. The password is stored as a hash made by `smtp-gateway hash-password`."""

    username: str = Field(min_length=1)
    password_hash: SecretStr
    # Addresses (user@dom) or domains (@dom / dom) this login may send as; empty = any permitted domain.
    allowed_senders: list[str] = []
    default_from: str | None = None
    force_from: bool = False

    @field_validator("password_hash")
    @classmethod
    def _is_hash(cls, v: SecretStr) -> SecretStr:
        try:
            parse_hash(v.get_secret_value())
        except ValueError as exc:
            # A hash no password can match would answer every login 535, with nothing in the log to say why.
            raise ValueError(f"{exc}; run `smtp-gateway hash-password` and paste its whole line") from None
        return v


class AccountBase(Section):
    """What every upstream account has, whatever its provider."""

    credential_cache_ttl: float = Field(300.0, ge=0)
    negative_cache_ttl: float = Field(30.0, ge=0)
    http_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(50, ge=1)
    # HTTP transport under httpx: aiohttp's costs much less CPU per request than httpx's own
    # (docs/development/benchmarks.md).
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    # Requests per second to this account's API, shared by the inline path and the retry worker (and by
    # every instance on a PostgreSQL queue); None: no limit. `rate_burst`: how many may go at once.
    rate_limit: float | None = Field(None, gt=0)
    rate_burst: int = Field(10, ge=1)
    # Opt-in: the Message-ID with the envelope (sender, recipients) is the message's idempotency key, so a
    # client that resends after losing the 250 does not deliver twice. For clients that keep the
    # Message-ID on a resend (most MTAs and mail libraries do); X-Gateway-Idempotency-Key always works.
    idempotency_from_message_id: bool = False

    @model_validator(mode="after")
    def _unique_users(self) -> AccountBase:
        users = getattr(self, "users", [])
        names = [u.username for u in users]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"users listed twice: {', '.join(duplicates)}")
        return self
