"""Turns an [accounts.X] table into its Provider: the one place that knows every provider package.

A third provider: a new package here (config model, wire module, provider, sandbox routes), its model in
the AccountSettings union (gateway/config/settings.py), and one line in `build` below.
"""

from __future__ import annotations

from gateway.config import AccountSettings
from gateway.providers.base import Provider
from gateway.providers.dengage.config import DengageAccount
from gateway.providers.dmds.config import DmdsAccount
from gateway.queue.store import QueueStore
from gateway.upstream.client import HttpClient
from gateway.upstream.ratelimit import RateLimiter, SharedBucket, TokenBucket, Unlimited


def limiter_for(name: str, account: AccountSettings, store: QueueStore | None = None) -> RateLimiter:
    """The account's rate limit: shared through the queue store by every process and instance on it
    (so N of them stay under the upstream's limit together), or this process's own without a store."""
    if account.rate_limit is None:
        return Unlimited()
    if store is None:
        return TokenBucket(account.rate_limit, account.rate_burst, account=name)
    return SharedBucket(store.rate_slot, store.rate_pause, account.rate_limit, account.rate_burst, account=name)


def build(name: str, account: AccountSettings, store: QueueStore | None = None) -> Provider:
    """The account's provider with its own pooled HTTP client and (unless given a shared one) rate limiter."""
    limiter = limiter_for(name, account, store)
    if isinstance(account, DmdsAccount):
        from gateway.providers.dmds.provider import DmdsProvider

        http = HttpClient(
            account.base_url,
            upstream="DMDS",
            account=name,
            timeout=account.http_timeout,
            max_connections=account.max_connections,
            transport=account.http_client,
        )
        return DmdsProvider(name, account, http, limiter)
    if isinstance(account, DengageAccount):
        from gateway.providers.dengage.provider import DengageProvider

        http = HttpClient(
            account.base_url,
            upstream="dEngage",
            account=name,
            timeout=account.http_timeout,
            max_connections=account.max_connections,
            transport=account.http_client,
        )
        return DengageProvider(name, account, http, limiter)
    raise TypeError(f"no provider for {type(account).__name__}")  # pragma: no cover - the config union is closed
