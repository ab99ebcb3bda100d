"""A provider's registry entry: everything the gateway outside the provider's package needs of it.

The configuration validates [accounts.X] with its account model, the composition root builds its provider,
`smtp-gateway sandbox` and the quick start mount its sandbox routes and take its options, and the tests
iterate the entries (gateway/providers/registry.py lists them). An entry is light: it names its modules'
work through functions that import them when called, so that reading the registry loads no HTTP stack.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from gateway.config.base import AccountBase, UserSettings

if TYPE_CHECKING:
    from gateway.providers.base import Provider
    from gateway.providers.sandbox import Sandbox
    from gateway.upstream.client import HttpClient
    from gateway.upstream.ratelimit import RateLimiter

A = TypeVar("A", bound=AccountBase)

# Adds a provider's routes, with their state, to the sandbox server.
Routes = Callable[["Sandbox"], None]
# Makes a password hash for a configured user (gateway.auth.passwords.hash_password).
Hasher = Callable[[str], str]


class Options(Protocol):
    """Where a provider adds its command-line options (an argparse parser or argument group)."""

    def add_argument(self, *flags: str, **kwargs: Any) -> Any: ...


def no_options(options: Options) -> None:
    return None


@dataclass(frozen=True)
class SandboxEntry:
    """The provider's part of the sandbox upstream (`smtp-gateway sandbox`, the quick start, the tests)."""

    # Its routes, with the state its options describe (parsed; the options' defaults when none were given).
    routes: Callable[[argparse.Namespace], Routes]
    # Its options of `smtp-gateway sandbox` (flags named so that no two providers' collide).
    options: Callable[[Options], None] = no_options
    # Where its routes are, for banners ("/v1"), and an account's api_base relative to the sandbox's URL
    # ("/rest"; "": the URL itself).
    prefix: str = ""
    api_base: str = ""

    def default_routes(self) -> Routes:
        """Its routes with the state its options describe when none is given."""
        parser = argparse.ArgumentParser(add_help=False)
        self.options(parser)
        return self.routes(parser.parse_args([]))


@dataclass(frozen=True)
class QuickStartEntry:
    """The provider's account in `smtp-gateway quickstart`, sending to the sandbox."""

    account: str  # its name under [accounts]
    # Its [accounts.<account>] table for the sandbox's API at this URL (configured users' hashes made with
    # the given function).
    settings: Callable[[str, Hasher], dict[str, Any]]
    routes: Callable[[], Routes]  # the sandbox's state that account needs
    howto: Callable[[int], str]  # banner lines saying how to send through it (given the SMTP port)


@dataclass(frozen=True)
class ProviderSpec(Generic[A]):
    """One provider: what [accounts.X] with `provider = "<kind>"` is and how it is served."""

    kind: str  # the `provider` key of [accounts.X]
    label: str  # the upstream's name in logs, metrics, errors and help texts ("DMDS")
    account_model: type[A]  # [accounts.X]; its users are the items of the model's `users`
    # The provider of one account, given the account's pooled HTTP client and rate limiter.
    create: Callable[[str, A, HttpClient, RateLimiter], Provider]
    sandbox: SandboxEntry | None = None
    quickstart: QuickStartEntry | None = None
    # An [accounts.X] without a `provider` key is this provider's (DMDS: configs written before there were
    # others). At most one provider is the default.
    default: bool = False

    @property
    def user_model(self) -> type[UserSettings]:
        """The model of one of its [[accounts.X.users]] (UserSettings when its account model adds none)."""
        field = self.account_model.model_fields.get("users")
        for arg in typing.get_args(field.annotation) if field is not None else ():
            if isinstance(arg, type) and issubclass(arg, UserSettings):
                return arg
        return UserSettings
