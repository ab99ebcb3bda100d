"""Pure: reading an upstream's JSON answers whose key names are not confirmed.

Each field is read from a table of candidate names (first match wins, letter case ignored: dEngage is an
ASP.NET API), and a Reading notes which name matched and which keys no table named, so that
`smtp-gateway check-upstream` can show how an answer was understood and the providers can log it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Candidates = Sequence[str]


@dataclass
class Reading:
    """How answers were read: field (with where it is, "identities[].address") -> the key that held it (first
    seen), and the keys nobody expected (with where they are)."""

    matched: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)

    def fields(
        self, obj: Mapping[str, Any], table: Mapping[str, Candidates], where: str = "", known: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The fields of `obj` that it has, each from its first candidate name present. `where` prefixes the
        names noted ("data[]."); `known`: keys that are expected but not read."""
        keys = {k.lower(): k for k in obj if isinstance(k, str)}
        expected = {name.lower() for name in known}
        out: dict[str, Any] = {}
        for name, candidates in table.items():
            expected.update(c.lower() for c in candidates)
            for candidate in candidates:
                key = keys.get(candidate.lower())
                if key is not None:
                    out[name] = obj[key]
                    self.matched.setdefault(where + name, key)
                    break
        for key in obj:
            noted = f"{where}{key}"
            if str(key).lower() not in expected and noted not in self.unexpected:
                self.unexpected.append(noted)
        return out

    def first(self, obj: Any, name: str, candidates: Candidates, where: str = "") -> Any:
        """One field of `obj` (None when `obj` is no object or has none of the names), keys not noted."""
        if not isinstance(obj, Mapping):
            return None
        keys = {k.lower(): k for k in obj if isinstance(k, str)}
        for candidate in candidates:
            key = keys.get(candidate.lower())
            if key is not None:
                self.matched.setdefault(where + name, key)
                return obj[key]
        return None

    def describe(self) -> str:
        """ "field=key, ..." and the unexpected keys, for a log line or a report."""
        matched = ", ".join(f"{name}={key}" for name, key in self.matched.items()) or "nothing recognised"
        extra = f"; not expected: {', '.join(self.unexpected)}" if self.unexpected else ""
        return matched + extra


def number(value: Any) -> int | None:
    """An integer as answers write it: 4, 4.0, "4" or "-4"; None for anything else (a bool is no number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        digits = value.strip().removeprefix("-")
        if digits.isascii() and digits.isdigit():
            return int(value.strip())
    return None


def keys(obj: Mapping[Any, Any], most: int = 12) -> str:
    """ "keys: a, b, c" of an answer's object, for an error that says what came instead (names cut short)."""
    names = sorted(str(k)[:40] for k in obj)
    shown = ", ".join(names[:most]) + (f", and {len(names) - most} more" if len(names) > most else "")
    return f"keys: {shown}" if names else "an empty object"
