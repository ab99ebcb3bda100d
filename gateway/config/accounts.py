"""What an [accounts.X] table may be: the account model of each provider, chosen by the table's `provider` key.

The configuration sits below the providers and names none of them: the provider registry
(gateway/providers/registry.py) adds each provider's model to MODELS, and the settings build their account
type from it when they load (settings.settings_model).
"""

from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from gateway.config.base import AccountBase


class AccountModels:
    """The account model of each provider kind, in the order they were added."""

    def __init__(self) -> None:
        self._models: dict[str, type[AccountBase]] = {}
        # The provider of an [accounts.X] table without a `provider` key (configs written when there was one).
        self._default: str | None = None

    def add(self, kind: str, model: type[AccountBase], *, default: bool = False) -> None:
        """Accept [accounts.X] tables with `provider = "<kind>"` as `model`."""
        if kind in self._models:
            raise ValueError(f"provider {kind!r} is registered already")
        if default and self._default is not None:
            raise ValueError(f"an account without a provider key is a {self._default!r} account already")
        self._models[kind] = model
        if default:
            self._default = kind

    def remove(self, kind: str) -> None:
        """No longer accept `kind` (a provider registered for a while, as the tests do)."""
        del self._models[kind]
        if self._default == kind:
            self._default = None

    def account_type(self) -> Any:
        """The type of an [accounts.X] table now: the models as a union tagged by `provider`, so that an
        error names the table's location and, for an unknown provider, the valid ones."""
        if not self._models:
            raise LookupError("no provider is registered: import gateway.providers.registry first")
        members = tuple(Annotated[model, Tag(kind)] for kind, model in self._models.items())
        return Annotated[typing.Union[members], Discriminator(self._account_kind)]  # noqa: UP007 - built at run time

    def _account_kind(self, value: Any) -> str:
        # The method's name is in the refusal of an unknown provider ("... found using _account_kind() ...").
        default = self._default or ""
        if isinstance(value, dict):
            return str(value.get("provider", default))
        return str(getattr(value, "provider", default))


MODELS = AccountModels()
