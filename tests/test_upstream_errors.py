"""Upstream failures as the SMTP client sees them, with the sandbox's injected faults."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import structlog

from gateway.ops.metrics import REGISTRY
from tests.harness import Running
from tests.smtputil import ENHANCED, message, send, session
from tests.spool_helpers import wait_for


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def submit(running: Running) -> tuple[int, str]:
    with session(running) as client:
        code, text = send(client, message())
    assert ENHANCED.match(f"{code} {text}"), (code, text)
    return code, text


def test_403_on_our_key_is_451_470(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(delivery={"mode": "passthrough"})
    running.fault(status=403)
    code, text = submit(running)
    assert (code, text[:5]) == (451, "4.7.0")


def test_4xx_with_reason_is_554_with_that_reason(gateway: Running) -> None:
    gateway.fault(status=400, reason="contacto email invalido")
    code, text = submit(gateway)
    assert code == 554
    assert text == "5.6.0 contacto email invalido"
    assert gateway.sent == []


def test_status_err_is_554_with_reason(gateway: Running) -> None:
    gateway.fault(mode="err", reason="campana pausada")
    code, text = submit(gateway)
    assert (code, text) == (554, "5.6.0 campana pausada")


def test_sandbox_validation_error_reaches_the_client(gateway: Running) -> None:
    with session(gateway) as client:
        code, text = send(client, message(), ["user@invalid"])
    assert code in (553, 554), text
    assert text.startswith("5.")


@pytest.mark.parametrize(
    ("fault", "status"),
    [({"status": 500}, "4.4.1"), ({"status": 503}, "4.4.1"), ({"status": 429}, "4.4.5"), ({"mode": "reset"}, "4.4.1")],
)
def test_temporary_failures_are_4xx_in_passthrough(
    gateway_factory: Callable[..., Running], fault: dict[str, object], status: str
) -> None:
    running = gateway_factory(delivery={"mode": "passthrough"})
    running.fault(**fault)
    code, text = submit(running)
    assert 400 <= code < 500, text
    assert text.startswith(status), text
    assert running.sent == []


def test_slow_upstream_is_4xx_in_passthrough(gateway_factory: Callable[..., Running]) -> None:
    """... and when the call then succeeds, the client's resend after its 451 will be a duplicate: the
    `passthrough_late` window, counted and logged (`late_answer_after_451`) with the call's upstream id."""
    running = gateway_factory(delivery={"mode": "passthrough", "inline_budget": 0.3})
    running.fault(delay=1.0)
    late = {"account": "acme", "cause": "passthrough_late"}
    before = metric("smtp_gateway_ambiguous_calls_total", **late)
    with structlog.testing.capture_logs() as logs:
        code, text = submit(running)
        assert 400 <= code < 500, text
        wait_for(lambda: metric("smtp_gateway_ambiguous_calls_total", **late) > before, what="the late answer")
    assert metric("smtp_gateway_ambiguous_calls_total", **late) == before + 1
    [sent] = running.sent
    [event] = [e for e in logs if e["event"] == "late_answer_after_451"]
    assert (event["verdict"], event["upstream_id"]) == ("delivered", sent["upstream_id"])


def test_recovery_after_fault(gateway: Running) -> None:
    gateway.fault(status=400, reason="once")
    assert submit(gateway)[0] == 554
    assert submit(gateway)[0] == 250
    assert len(gateway.sent) == 1
