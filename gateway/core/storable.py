"""Pure: text as a database column can hold it, the same on every backend.

PostgreSQL's text cannot hold U+0000 (psycopg refuses the whole write with DataError); SQLite can. Text the
gateway did not write itself (an upstream's reason or id, a client's envelope or Subject) may carry one: it is
replaced by U+FFFD before it is stored, in the queue and in the ledger, on both backends alike, so a write
never fails for what a vendor or a client said, and a queue moved between backends reads the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, overload

from gateway.core.records import CallRow, Decision

NUL = "\x00"
REPLACEMENT = "\ufffd"


@overload
def storable(text: str) -> str: ...
@overload
def storable(text: None) -> None: ...
def storable(text: str | None) -> str | None:
    """`text` with every NUL replaced by U+FFFD (the same object when it has none: the common case is free)."""
    if text is None or NUL not in text:
        return text
    return text.replace(NUL, REPLACEMENT)


def storable_call(call: CallRow) -> CallRow:
    """A call row whose texts (recipients, upstream id, error) can be stored. The key is left as it is: it is
    matched against the plan's keys (addresses, which SMTP never carries a NUL in)."""
    if all(NUL not in (t or "") for t in (call.recipients, call.upstream_id, call.error)):
        return call
    return replace(
        call, recipients=storable(call.recipients), upstream_id=storable(call.upstream_id), error=storable(call.error)
    )


def storable_decision(decision: Decision) -> Decision:
    """A decision whose texts (last error, dead reason, each call's) can be stored."""
    return replace(
        decision,
        last_error=storable(decision.last_error),
        dead_reason=storable(decision.dead_reason),
        calls={key: storable_call(call) for key, call in decision.calls.items()},
    )


def storable_values(values: Sequence[Any]) -> Sequence[Any]:
    """A statement's parameters with every text made storable (the same sequence when none holds a NUL)."""
    if not any(isinstance(v, str) and NUL in v for v in values):
        return values
    return tuple(storable(v) if isinstance(v, str) else v for v in values)
