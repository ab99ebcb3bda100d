"""Pure: the records of a message's delivery state, shared by the transition that decides it and the
queue backends that store it."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.core.errors import Rejected

CallState = Literal["pending", "sending", "done", "rejected"]
Verdict = Literal["delivered", "refused", "queued", "dead"]
# Why a message ended as a dead letter (or was refused): the dead-letter metric's cause label.
DeadCause = Literal["refused", "expired", "held", "internal_error", "corrupt"]


@dataclass(frozen=True, slots=True)
class CallRow:
    """One call's stored state. `lost`: how many times its answer was lost after sending."""

    key: str
    recipients: str
    state: CallState = "pending"
    upstream_id: str | None = None
    error: str | None = None
    lost: int = 0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    schedule: tuple[float, ...]
    jitter: float
    max_lifetime: float
    ambiguous: Literal["resend", "hold"] = "resend"
    max_internal_errors: int = 3

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds after the `attempts`-th failed attempt (1-based); the last interval repeats."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        if self.jitter and rng is not None:
            base *= 1 + rng.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """A message's delivery state as an attempt finds it: its calls, attempts so far and lifetime."""

    calls: Mapping[str, CallRow]
    attempts: int
    created: float
    expires: float
    internal_errors: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    calls: dict[str, CallRow]
    attempts: int
    next_attempt: float
    last_error: str | None
    dead_reason: str | None = None
    refusal: Rejected | None = None  # verdict "refused": the upstream's refusal, for the client's 5xx
    internal_errors: int = 0
    dead_cause: DeadCause | None = None  # verdicts "dead" and "refused": why, as a bounded set

    @property
    def first_id(self) -> str | None:
        return next((c.upstream_id for c in self.calls.values() if c.state == "done"), None)
