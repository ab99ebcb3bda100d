"""The providers: one registry entry each (spec.py), and the one place that turns an [accounts.X] table into
its Provider. Importing this module registers them, so that the settings accept their account models
(gateway/config/accounts.py): the composition roots (the CLI, the app, the tests) import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.config.accounts import MODELS
from gateway.config.base import AccountBase
from gateway.providers.dengage.spec import SPEC as DENGAGE
from gateway.providers.dmds.spec import SPEC as DMDS
from gateway.providers.spec import ProviderSpec

if TYPE_CHECKING:
    from gateway.core.outcome import UpstreamHealth
    from gateway.providers.base import Provider
    from gateway.queue.store import QueueStore
    from gateway.upstream.ratelimit import RateLimiter

# Every provider, in the order help texts, banners and the quick start show them. A provider: its package
# (gateway/providers/<kind>/, whose spec.py holds its entry) and its entry here.
PROVIDERS: tuple[ProviderSpec[Any], ...] = (DMDS, DENGAGE)

_SPECS: dict[str, ProviderSpec[Any]] = {}


def register(spec: ProviderSpec[Any]) -> None:
    """Serve [accounts.X] tables with `provider = "<spec.kind>"` (the built-in providers are registered on
    import; a provider from elsewhere, such as a test's, registers itself)."""
    if spec.kind in _SPECS:
        raise ValueError(f"provider {spec.kind!r} is registered already")
    if any(s.account_model is spec.account_model for s in _SPECS.values()):
        raise ValueError(f"{spec.account_model.__name__} is another provider's account model")
    MODELS.add(spec.kind, spec.account_model, default=spec.default)
    _SPECS[spec.kind] = spec


def unregister(kind: str) -> None:
    del _SPECS[kind]
    MODELS.remove(kind)


def specs() -> tuple[ProviderSpec[Any], ...]:
    """The registered providers, in order."""
    return tuple(_SPECS.values())


def spec_for(account: AccountBase) -> ProviderSpec[Any]:
    for spec in _SPECS.values():
        if type(account) is spec.account_model:
            return spec
    raise LookupError(f"no provider is registered for {type(account).__name__}")


def limiter_for(name: str, account: AccountBase, store: QueueStore | None = None) -> RateLimiter:
    """The account's rate limit: shared through the queue store by every process and instance on it
    (so N of them stay under the upstream's limit together), or this process's own without a store."""
    from gateway.upstream.ratelimit import SharedBucket, TokenBucket, Unlimited

    if account.rate_limit is None:
        return Unlimited()
    if store is None:
        return TokenBucket(account.rate_limit, account.rate_burst, account=name)
    return SharedBucket(store.rate_slots, store.rate_pause, account.rate_limit, account.rate_burst, account=name)


def build(
    name: str, account: AccountBase, store: QueueStore | None = None, health: UpstreamHealth | None = None
) -> Provider:
    """The account's provider with its own pooled HTTP client and (unless given a shared one) rate limiter;
    `health` hears what its upstream says outside delivery calls."""
    from gateway.upstream.client import HttpClient

    spec = spec_for(account)
    http = HttpClient(
        account.base_url,
        upstream=spec.label,
        account=name,
        timeout=account.http_timeout,
        max_connections=account.max_connections,
        transport=account.http_client,
    )
    provider = spec.create(name, account, http, limiter_for(name, account, store))
    if health is not None:
        provider.health = health
    return provider


for _spec in PROVIDERS:
    register(_spec)
