"""Configuration: the settings models and loader (settings.py), the building blocks every provider's account
model shares (base.py), the account models by provider (accounts.py), the key table (keys.py), the checks
`serve` makes before it starts (preflight.py) and what a reload may change (reload.py)."""

from __future__ import annotations

from gateway.config.returnpath import DsnSettings, EventSettings, ReturnPathSettings, WebhookSettings
from gateway.config.settings import (
    CONFIG_ENV,
    ConfigError,
    ConfigFileError,
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
    "ConfigFileError",
    "DeliverySettings",
    "DnsSettings",
    "DsnSettings",
    "EventSettings",
    "HttpSettings",
    "LedgerSettings",
    "LimitsSettings",
    "ListenerSettings",
    "LogSettings",
    "ReturnPathSettings",
    "Settings",
    "TlsSettings",
    "WebhookSettings",
    "load_settings",
    "masked_dump",
]
