"""Pure: what happens to a message after an attempt. The one place that rule is written.

    every call done                                   -> delivered  (reply: the first call's upstream id)
    nothing done, something refused, nothing pending  -> refused    (inline: that 5xx; queued: dead letter)
    some done, the rest refused                       -> dead       (the client had its 250; operators see
                                                                     which recipients were refused)
    a call met a bug (Outcome.failed)                 -> that call pending, the others as answered; a dead
                                                         letter once bugs struck `max_internal_errors` times
    something still pending (deferred, or skipped)    -> queued     (next attempt per the schedule, or
                                                                     the upstream's Retry-After) or dead
                                                                     when the lifetime is over

Calls the provider skipped (they wait for a call that failed: DMDS batches) share that call's fate: they
are refused with it when the message is refused, else they stay pending. A call whose answer was lost
(AnswerLost, or a lease that expired after it was sent) is "ambiguous": the `ambiguous` policy resends it
(at-least-once, the default) or holds the message as a dead letter for an operator to decide.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace

from gateway.core.errors import RateLimited, Rejected
from gateway.core.model import Call
from gateway.core.outcome import Outcome, bug_reason
from gateway.core.records import CallRow, DeadCause, Decision, DeliveryState, RetryPolicy, Verdict
from gateway.upstream.response import MIN_RETRY_AFTER


def fresh(plan: Sequence[Call], now: float, policy: RetryPolicy) -> DeliveryState:
    """A message nobody has tried yet."""
    calls = {c.key: CallRow(c.key, ",".join(c.recipients)) for c in plan}
    return DeliveryState(calls=calls, attempts=0, created=now, expires=now + policy.max_lifetime)


def resume(before: DeliveryState) -> tuple[DeliveryState, list[str]]:
    """A claimed message whose calls may have been sent by an owner that died ('sending'): those calls
    are ambiguous. Returns the message with them pending again (counted in `lost`) and their keys."""
    lost = [key for key, row in before.calls.items() if row.state == "sending"]
    if not lost:
        return before, []
    calls = dict(before.calls)
    for key in lost:
        row = calls[key]
        calls[key] = replace(
            row,
            state="pending",
            lost=row.lost + 1,
            error="the previous attempt's answer was lost (instance stopped mid-call)",
        )
    return replace(before, calls=calls), lost


def hold(before: DeliveryState, keys: Sequence[str], now: float) -> Decision:
    """The `ambiguous = "hold"` policy: a message with calls that may have been delivered stops here."""
    reason = (
        f"held: the upstream may already have call(s) {', '.join(keys)} (answer lost); "
        "`smtp-gateway queue requeue` resends them"
    )
    return Decision(
        "dead",
        dict(before.calls),
        before.attempts,
        now,
        reason,
        dead_reason=reason,
        internal_errors=before.internal_errors,
        dead_cause="held",
    )


def decide(
    before: DeliveryState, outcome: Outcome, policy: RetryPolicy, now: float, rng: random.Random | None = None
) -> Decision:
    calls = dict(before.calls)
    for key, upstream_id in outcome.delivered.items():
        calls[key] = replace(calls[key], state="done", upstream_id=upstream_id, error=None)
    for key, refusal in outcome.rejected.items():
        calls[key] = replace(calls[key], state="rejected", error=refusal.reason)
    lost_now = outcome.ambiguous
    for key, deferral in outcome.deferred.items():
        row = calls[key]
        calls[key] = replace(row, state="pending", error=deferral.reason, lost=row.lost + (key in lost_now))
    for key in outcome.skipped:
        calls[key] = replace(calls[key], state="pending")
    for key, bug in outcome.failed.items():
        calls[key] = replace(calls[key], state="pending", error=bug_reason(bug))
    # Only the calls that met a bug are the internal error: the others keep their answers (done stays done).
    internal_errors = before.internal_errors + (1 if outcome.failed else 0)
    attempts = before.attempts + 1
    error = outcome.first_reason()
    states = [row.state for row in calls.values()]
    done, rejected = states.count("done"), states.count("rejected")
    attempted_pending = any(calls[k].state == "pending" and k not in outcome.skipped for k in calls)

    def decision(
        verdict: Verdict,
        next_attempt: float = now,
        dead_reason: str | None = None,
        refusal: Rejected | None = None,
        cause: DeadCause | None = None,
    ) -> Decision:
        return Decision(verdict, calls, attempts, next_attempt, error, dead_reason, refusal, internal_errors, cause)

    if done == len(calls):
        return decision("delivered")
    if not done and rejected and not attempted_pending:
        # Nothing reached anyone and the upstream refused: the whole message is refused (the skipped
        # calls were never sent; they share the refusal).
        first = next(iter(outcome.rejected.values()), None)
        for key in outcome.skipped:
            calls[key] = replace(calls[key], state="rejected", error=calls[key].error or error)
        return decision(
            "refused", refusal=first, dead_reason="refused by upstream: " + _refusals(calls), cause="refused"
        )
    if "pending" not in states:
        return decision("dead", dead_reason="refused by upstream: " + _refusals(calls), cause="refused")
    if outcome.failed and internal_errors >= policy.max_internal_errors:
        last = bug_reason(next(iter(outcome.failed.values())))
        reason = f"internal error {internal_errors} times (see the log); last: {last}"
        return decision("dead", dead_reason=reason, cause="internal_error")
    if now >= before.expires:
        return decision(
            "dead",
            dead_reason=(f"expired after {attempts} attempts in {now - before.created:.0f}s; last error: {error}"),
            cause="expired",
        )
    return decision("queued", next_attempt=min(now + _wait(outcome, policy, attempts, rng), before.expires))


def internal_error(
    before: DeliveryState, reason: str, policy: RetryPolicy, now: float, rng: random.Random | None = None
) -> Decision:
    """An attempt that failed with a bug (logged with its traceback by the owner): retried on the normal
    schedule, and a dead letter once it has happened `max_internal_errors` times."""
    count = before.internal_errors + 1
    attempts = before.attempts + 1
    if count >= policy.max_internal_errors:
        return Decision(
            "dead",
            dict(before.calls),
            attempts,
            now,
            reason,
            internal_errors=count,
            dead_reason=f"internal error {count} times (see the log); last: {reason}",
            dead_cause="internal_error",
        )
    next_attempt = min(now + policy.delay(attempts, rng), before.expires)
    return Decision("queued", dict(before.calls), attempts, next_attempt, reason, internal_errors=count)


def _wait(outcome: Outcome, policy: RetryPolicy, attempts: int, rng: random.Random | None) -> float:
    deferrals = list(outcome.deferred.values())
    if deferrals and all(isinstance(d, RateLimited) and (d.retry_after or 0.0) > 0 for d in deferrals):
        # Only rate limits, each naming a pause: come back when the upstream said to, not on the outage
        # schedule, and never sooner than the rate limiter's own pause. A 429 naming none, or 0
        # (HttpResponse.retry_after reads Retry-After: 0 or a past date as none), waits on the schedule: due
        # again at once, such a message was sent as fast as the upstream answered, for its whole lifetime.
        return max(MIN_RETRY_AFTER, *(d.retry_after or 0.0 for d in deferrals if isinstance(d, RateLimited)))
    return policy.delay(attempts, rng)


def _refusals(calls: Mapping[str, CallRow]) -> str:
    return "; ".join(f"call {r.key} ({r.recipients}): {r.error}" for r in calls.values() if r.state == "rejected")
