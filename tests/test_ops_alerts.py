"""The counters the shipped alert rules (config/prometheus-alerts.yml) watch with `increase(...) > 0` exist at 0
from the start for every label value known then: Prometheus' increase() over a series whose first sample is
already 1 is 0, so without them the first dead letter, refused reload or internal error of each kind in a
process's life would never fire its alert."""

from __future__ import annotations

import ast
import contextlib
import re
import typing
from collections.abc import Callable
from pathlib import Path

import httpx

from gateway.core.errors import GatewayError
from gateway.core.records import DeadCause
from gateway.ops import metrics
from gateway.upstream.client import HttpClient
from tests.harness import Running

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"


def _series(text: str) -> set[str]:
    """Every `name{labels}` on a /metrics page."""
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_alerted_series_exist_after_start(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(http={"port": 0})
    assert gw.app.operator is not None
    series = _series(httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/metrics", timeout=5).text)
    expected = {
        'smtp_gateway_config_reloads_total{result="invalid"}',
        'smtp_gateway_config_reloads_total{result="tls_failed"}',
        'smtp_gateway_dead_letters_total{cause="expired"}',
        'smtp_gateway_dead_letters_total{cause="refused"}',
        'smtp_gateway_internal_errors_total{where="accept"}',
        'smtp_gateway_descriptors_exhausted_total{where="accept"}',
        *(f'smtp_gateway_upstream_auth_refused_total{{account="{a}"}}' for a in gw.settings.accounts),
        *(
            f'smtp_gateway_connections_refused_total{{listener="{name}",reason="max_sessions"}}'
            for name in gw.app.ports
        ),
    }
    assert not expected - series, sorted(expected - series)


def test_a_reload_adds_the_new_accounts_series() -> None:
    metrics.zero_alerted(["added-by-reload"])
    assert (
        metrics.REGISTRY.get_sample_value("smtp_gateway_upstream_auth_refused_total", {"account": "added-by-reload"})
        == 0.0
    )


def _literal_labels(metric: str, label: str) -> set[str]:
    """The literal values the gateway's code gives `label` at `<metric>.labels(...)` (f-strings: their
    fixed parts with each hole a `*`)."""
    found: set[str] = set()
    for path in GATEWAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "labels"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == metric
            ):
                continue
            for keyword in node.keywords:
                if keyword.arg == label and isinstance(keyword.value, ast.Constant):
                    found.add(str(keyword.value.value))
                elif keyword.arg == label and isinstance(keyword.value, ast.JoinedStr):
                    found.add("".join(v.value if isinstance(v, ast.Constant) else "*" for v in keyword.value.values))
    return found


def test_every_literal_label_value_is_zeroed() -> None:
    # f"{path}_delivery": path is "inline" or "queue".
    places = {re.sub(r"^\*", "inline", p) for p in _literal_labels("INTERNAL_ERRORS", "where")}
    places |= {re.sub(r"^\*", "queue", p) for p in _literal_labels("INTERNAL_ERRORS", "where")}
    assert places <= set(metrics.INTERNAL_ERROR_PLACES), places - set(metrics.INTERNAL_ERROR_PLACES)
    assert _literal_labels("CONFIG_RELOADS", "result") <= set(metrics.RELOAD_RESULTS)
    assert _literal_labels("CONNECTIONS_REFUSED", "reason") <= set(metrics.CONNECTION_REFUSAL_REASONS)
    assert set(typing.get_args(DeadCause)) == set(metrics.DEAD_CAUSES)


async def test_webhook_and_jwks_calls_are_not_an_accounts_upstream_calls() -> None:
    """A webhook POST (or a JWKS fetch) is timed in smtp_gateway_outbound_http_seconds{client}, not under an
    `account` of smtp_gateway_upstream_seconds: a receiver that is down does not fire SmtpGatewayUpstreamFailing
    for an account named "webhooks", nor is an issuer's fetch summed into an account of the same name."""
    http = HttpClient(
        "",
        upstream="webhook",
        account="webhooks",
        timeout=5.0,
        transport=httpx.MockTransport(lambda request: httpx.Response(503)),
        vendor=False,
    )
    labels = {"endpoint": "webhook", "outcome": "server_error"}
    vendor = metrics.REGISTRY.get_sample_value("smtp_gateway_upstream_seconds_count", {"account": "webhooks", **labels})
    other = metrics.REGISTRY.get_sample_value(
        "smtp_gateway_outbound_http_seconds_count", {"client": "webhooks", **labels}
    )
    try:
        with contextlib.suppress(GatewayError):
            await http.request("webhook", "POST", "http://127.0.0.1:9/h", headers={}, content=b"{}")
    finally:
        await http.aclose()
    assert (
        metrics.REGISTRY.get_sample_value("smtp_gateway_upstream_seconds_count", {"account": "webhooks", **labels})
        == vendor
    )
    assert (
        metrics.REGISTRY.get_sample_value("smtp_gateway_outbound_http_seconds_count", {"client": "webhooks", **labels})
        == (other or 0.0) + 1
    )


def test_the_gateways_webhook_client_is_not_a_vendors(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory()
    assert gw.app.returnpath is not None
    assert gw.app.returnpath.http.vendor is False
