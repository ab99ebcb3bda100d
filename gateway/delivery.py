"""Upstream delivery of a Submission: the legs of one message, first leg first, the rest in its batch."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import Deferred, Rejected
from gateway.model import SendResult, Submission
from gateway.upstream.base import Driver


@dataclass
class Outcome:
    """Per-leg results of one delivery attempt."""

    delivered: dict[int, str] = field(default_factory=dict)  # leg index -> upstream id
    deferred: dict[int, Deferred] = field(default_factory=dict)
    rejected: dict[int, Rejected] = field(default_factory=dict)

    @property
    def first_id(self) -> str | None:
        return self.delivered.get(0) or (next(iter(self.delivered.values())) if self.delivered else None)

    @property
    def complete(self) -> bool:
        return not self.deferred


class Delivery:
    """Runs the upstream calls for submissions through the account's shared driver."""

    def __init__(self, drivers: Mapping[str, Driver]) -> None:
        self._drivers = drivers

    async def attempt(self, submission: Submission, done: Mapping[int, str] | None = None) -> Outcome:
        """Deliver every leg not in `done`. Legs after the first join the first leg's batch (reuse_eeid)."""
        driver = self._drivers[submission.principal.account]
        outcome = Outcome(delivered=dict(done or {}))
        pending = [leg for leg in submission.legs if leg.index not in outcome.delivered]
        if not pending:
            return outcome
        batch = submission.batch_eeid or outcome.first_id
        first, rest = pending[0], pending[1:]
        if batch is None:
            # The first call opens the batch; the others must wait for its eeid.
            try:
                result = await driver.send(submission, first, None)
            except Deferred as exc:
                outcome.deferred.update({leg.index: exc for leg in pending})
                return outcome
            except Rejected as exc:
                # Nothing was sent: the whole message is refused while the client is still there.
                outcome.rejected[first.index] = exc
                return outcome
            outcome.delivered[first.index] = result.upstream_id
            batch = result.upstream_id
        else:
            rest = pending
        if rest:
            results = await asyncio.gather(
                *(driver.send(submission, leg, batch) for leg in rest), return_exceptions=True
            )
            for leg, res in zip(rest, results, strict=True):
                if isinstance(res, SendResult):
                    outcome.delivered[leg.index] = res.upstream_id
                elif isinstance(res, Deferred):
                    outcome.deferred[leg.index] = res
                elif isinstance(res, Rejected):
                    outcome.rejected[leg.index] = res
                elif isinstance(res, BaseException):
                    raise res
        return outcome
