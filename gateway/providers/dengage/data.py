"""Pure: what a dEngage login (Principal.extra) and a dEngage message (Submission.params) carry through the
core and the queue, with their JSON as the queue stores it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

from gateway.core.model import TypedData


@dataclass(frozen=True, slots=True)
class DengageLogin(TypedData):
    """The report tags a login adds to each of its messages (a configured user's `tags`)."""

    tags: tuple[str, ...] = ()

    def to_json(self) -> Mapping[str, Any]:
        return {"tags": list(self.tags)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(tags=tuple(str(t) for t in data.get("tags") or ()))


@dataclass(frozen=True, slots=True)
class DengageParams(TypedData):
    """A message's decisions made at acceptance: its report tags (account, login, X-Gateway-Tags), the
    content template it uses, and `ref`, chosen once and kept with the queued message: the seed of each
    call's idempotency key."""

    tags: tuple[str, ...] = ()
    template: str | None = None
    ref: str | None = None

    def to_json(self) -> Mapping[str, Any]:
        return {"tags": list(self.tags), "template": self.template, "ref": self.ref}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            tags=tuple(str(t) for t in data.get("tags") or ()),
            template=data.get("template") or None,
            ref=data.get("ref") or None,
        )
