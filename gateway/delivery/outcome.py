"""Pure: the per-call results of one delivery attempt, keyed by the provider's opaque call keys."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.errors import AnswerLost, Deferred, Rejected


@dataclass
class Outcome:
    """What one attempt learnt: each call attempted is delivered, deferred (temporary) or rejected.

    `skipped` calls were not attempted because the provider's call order made them wait for another
    call that did not succeed (DMDS: later calls join the first call's batch). A call that was sent but
    whose answer was lost is deferred with an AnswerLost: the upstream may have it (see `ambiguous`)."""

    delivered: dict[str, str] = field(default_factory=dict)  # call key -> upstream id
    deferred: dict[str, Deferred] = field(default_factory=dict)
    rejected: dict[str, Rejected] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)

    @property
    def ambiguous(self) -> set[str]:
        return {key for key, exc in self.deferred.items() if isinstance(exc, AnswerLost)}

    def first_reason(self) -> str | None:
        for exc in (*self.rejected.values(), *self.deferred.values()):
            return exc.reason
        return None
