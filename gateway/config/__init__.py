"""Configuration: the settings models and loader (settings.py), the building blocks every provider's account
model shares (base.py), the account models by provider (accounts.py), the key table (keys.py), the checks
`serve` makes before it starts (preflight.py) and what a reload may change (reload.py)."""

from __future__ import annotations

from gateway.config.settings import (
    CONFIG_ENV,
    ConfigError,
    DeliverySettings,
    DnsSettings,
    HttpSettings,
    LedgerSettings,
    LimitsSettings,
    ListenerSettings,
    LogSettings,
    Settings,
    TlsSettings,
    load_settings,
    masked_dump,
)

__all__ = [
    "CONFIG_ENV",
    "ConfigError",
    "DeliverySettings",
    "DnsSettings",
    "HttpSettings",
    "LedgerSettings",
    "LimitsSettings",
    "ListenerSettings",
    "LogSettings",
    "Settings",
    "TlsSettings",
    "load_settings",
    "masked_dump",
]
