"""The one rule from an attempt's outcome to a message's next state (gateway/delivery/transition.py)."""

from __future__ import annotations

import random

import pytest

from gateway.core import records
from gateway.core.errors import AnswerLost, RateLimited, UpstreamRejected, UpstreamUnavailable
from gateway.core.model import Call
from gateway.core.outcome import Outcome
from gateway.core.records import RetryPolicy
from gateway.delivery import transition

POLICY = RetryPolicy((10.0, 20.0), 0.0, 100.0)
NOW = 1000.0
TWO = (Call("0", ("a@x.example",)), Call("1", ("b@x.example",)))


def fresh() -> records.DeliveryState:
    return transition.fresh(TWO, NOW, POLICY)


def test_all_delivered() -> None:
    d = transition.decide(fresh(), Outcome(delivered={"0": "E0", "1": "E1"}), POLICY, NOW)
    assert (d.verdict, d.first_id, d.attempts) == ("delivered", "E0", 1)


def test_first_call_refused_refuses_the_message_and_the_skipped_call_with_it() -> None:
    refusal = UpstreamRejected("invalid email")
    d = transition.decide(fresh(), Outcome(rejected={"0": refusal}, skipped={"1"}), POLICY, NOW)
    assert d.verdict == "refused" and d.refusal is refusal and d.dead_cause == "refused"
    assert [c.state for c in d.calls.values()] == ["rejected", "rejected"]


def test_one_refused_while_another_is_deferred_is_not_a_refusal() -> None:
    d = transition.decide(
        fresh(),
        Outcome(rejected={"0": UpstreamRejected("bad")}, deferred={"1": UpstreamUnavailable("503")}),
        POLICY,
        NOW,
    )
    assert d.verdict == "queued" and d.next_attempt == NOW + 10.0


def test_some_delivered_the_rest_refused_is_a_dead_letter_naming_the_refused() -> None:
    d = transition.decide(
        fresh(), Outcome(delivered={"0": "E0"}, rejected={"1": UpstreamRejected("no such")}), POLICY, NOW
    )
    assert d.verdict == "dead" and d.first_id == "E0"
    assert d.dead_reason == "refused by upstream: call 1 (b@x.example): no such" and d.dead_cause == "refused"


def test_deferred_and_skipped_calls_wait_on_the_schedule_then_expire() -> None:
    outcome = Outcome(deferred={"0": UpstreamUnavailable("DMDS answered 500")}, skipped={"1"})
    d = transition.decide(fresh(), outcome, POLICY, NOW)
    assert d.verdict == "queued" and d.next_attempt == NOW + 10.0
    assert [c.state for c in d.calls.values()] == ["pending", "pending"]
    late = transition.decide(fresh(), outcome, POLICY, NOW + 100)
    assert late.verdict == "dead" and late.dead_reason is not None and late.dead_reason.startswith("expired")
    assert late.dead_cause == "expired"


def test_the_next_attempt_never_passes_the_lifetime() -> None:
    d = transition.decide(fresh(), Outcome(deferred={"0": UpstreamUnavailable("x")}, skipped={"1"}), POLICY, NOW + 95)
    assert d.next_attempt == NOW + 100


def test_rate_limits_come_back_when_the_upstream_says() -> None:
    outcome = Outcome(deferred={"0": RateLimited("429", retry_after=3.0), "1": RateLimited("429", retry_after=5.0)})
    assert transition.decide(fresh(), outcome, POLICY, NOW).next_attempt == NOW + 5.0
    mixed = Outcome(deferred={"0": RateLimited("429", retry_after=3.0), "1": UpstreamUnavailable("503")})
    assert transition.decide(fresh(), mixed, POLICY, NOW).next_attempt == NOW + 10.0


def test_a_rate_limit_naming_no_pause_waits_on_the_schedule_and_none_comes_back_within_a_second() -> None:
    """Retry-After: 0 (read as none) was due again at once: a message sent as fast as the upstream answered 429
    for its whole lifetime. It goes on the schedule; a pause asked under a second is a second."""
    zero = Outcome(deferred={"0": RateLimited("429", retry_after=0.0), "1": RateLimited("429", retry_after=0.0)})
    assert transition.decide(fresh(), zero, POLICY, NOW).next_attempt == NOW + 10.0
    short = Outcome(deferred={"0": RateLimited("429", retry_after=0.01), "1": RateLimited("429", retry_after=0.2)})
    assert transition.decide(fresh(), short, POLICY, NOW).next_attempt == NOW + 1.0


def test_a_lost_answer_is_counted_on_its_call() -> None:
    d = transition.decide(
        fresh(), Outcome(delivered={"0": "E"}, deferred={"1": AnswerLost("read timeout")}), POLICY, NOW
    )
    assert d.verdict == "queued" and d.calls["1"].lost == 1 and d.calls["0"].lost == 0


def test_resume_turns_sending_calls_into_ambiguous_pending_ones() -> None:
    before = fresh()
    sending = records.DeliveryState(
        calls={"0": before.calls["0"].__class__("0", "a@x.example", "sending"), "1": before.calls["1"]},
        attempts=1,
        created=NOW,
        expires=NOW + 100,
    )
    resumed, lost = transition.resume(sending)
    assert lost == ["0"] and resumed.calls["0"].state == "pending" and resumed.calls["0"].lost == 1
    held = transition.hold(resumed, lost, NOW)
    assert held.verdict == "dead" and held.dead_reason is not None and "queue requeue" in held.dead_reason
    assert held.dead_cause == "held"


def test_internal_errors_retry_then_dead_letter() -> None:
    before = fresh()
    first = transition.internal_error(before, "KeyError: x", POLICY, NOW)
    assert (first.verdict, first.internal_errors) == ("queued", 1)
    again = records.DeliveryState(first.calls, first.attempts, NOW, NOW + 100, first.internal_errors)
    second = transition.internal_error(again, "KeyError: x", POLICY, NOW)
    third = transition.internal_error(
        records.DeliveryState(second.calls, 2, NOW, NOW + 100, 2), "KeyError: x", POLICY, NOW
    )
    assert second.verdict == "queued" and third.verdict == "dead"
    assert third.dead_reason is not None and "internal error 3 times" in third.dead_reason
    assert third.dead_cause == "internal_error" and second.dead_cause is None


def test_retry_policy_schedule_and_jitter() -> None:
    policy = RetryPolicy((60, 300), 0.2, 1000)
    rng = random.Random(1)
    delays = [policy.delay(n, rng) for n in (1, 2, 3, 9)]
    assert 48 <= delays[0] <= 72 and all(240 <= d <= 360 for d in delays[1:])
    assert policy.delay(1) == pytest.approx(60)
