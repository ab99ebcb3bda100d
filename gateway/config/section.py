"""The base of every configuration table, and secrets kept in files: what the settings models share."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr


class Section(BaseModel):
    """A config table: unknown keys are errors that name the key; values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UnreadableFile(ValueError):
    """A file the configuration names cannot be read: a problem of this machine (its permissions, a secret not
    mounted), which load_settings reports with exit status 1, not as an invalid value (2)."""


def read_secret_file(path: Path, what: str) -> SecretStr:
    """A secret kept in its own file (Docker/Kubernetes secrets, systemd credentials): first line only."""
    try:
        value = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UnreadableFile(f"{what}: cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
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
