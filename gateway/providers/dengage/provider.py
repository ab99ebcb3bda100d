"""dEngage provider: being built (issue #8)."""

from __future__ import annotations

from gateway.providers.dengage.config import DengageAccount
from gateway.settings import ConfigError
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter


class DengageProvider:
    kind = "dengage"

    def __init__(self, account: str, settings: DengageAccount, http: HttpClient, limiter: RateLimiter) -> None:
        raise ConfigError(f"accounts.{account}: provider 'dengage' is not available in this build yet")
