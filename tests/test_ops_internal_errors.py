"""A bug where nobody awaits its task (a SIGHUP's reload, the periodic figures) or in a message-API handler is
logged once with its traceback by the gateway's own event and counted in smtp_gateway_internal_errors_total,
as the delivery paths do; a periodic loop goes on after it."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import structlog

from gateway import app as app_module
from gateway.ops.api import MessageApi
from gateway.ops.metrics import INTERNAL_ERRORS
from tests.configs import hash_for_tests
from tests.harness import Running
from tests.spool_helpers import wait_for


def errors(where: str) -> float:
    return INTERNAL_ERRORS.labels(where=where)._value.get()


async def hup(gw: Running) -> None:
    gw.app.request_reload()  # as the SIGHUP handler does: on the loop, the reload a task of its own


def test_a_reload_bug_is_logged_and_counted(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory()

    def broken() -> object:
        raise RuntimeError("a bug while building the new configuration")

    gw.app.source = broken  # type: ignore[assignment]
    before = errors("reload")
    with structlog.testing.capture_logs() as logs:
        gw.loop.run(hup(gw))
        wait_for(lambda: errors("reload") == before + 1, 10, "the reload's bug counted")
    [line] = [e for e in logs if e["event"] == "config_reload_internal_error"]
    assert line["log_level"] == "error" and "exc_info" in line


def test_a_periodic_loop_survives_a_bug(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "QUEUE_STATS_EVERY", 0.05)
    rounds: list[int] = []

    def figures(self: app_module.App) -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise KeyError("a bug in one round")

    monkeypatch.setattr(app_module.App, "_auth_figures", figures)
    before = errors("background")
    with structlog.testing.capture_logs() as logs:
        gateway_factory()
        wait_for(lambda: len(rounds) >= 3, 10, "the loop's later rounds")
    assert errors("background") == before + 1
    [line] = [e for e in logs if e["event"] == "background_task_internal_error"]
    assert line["task"] == "queue_stats" and "exc_info" in line


def test_an_api_handler_bug_is_a_counted_500(
    gateway_factory: Callable[..., Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "api-token-for-the-tests"

    async def broken(self: MessageApi, request: object, name: str) -> object:
        raise KeyError("a bug in a handler")

    monkeypatch.setattr(MessageApi, "search", broken)  # before the routes are installed
    gw = gateway_factory(http={"port": 0, "api_tokens": [{"name": "ci", "token_hash": hash_for_tests(token)}]})
    before = errors("api")
    assert gw.app.operator is not None
    with structlog.testing.capture_logs() as logs:
        response = httpx.get(
            f"http://127.0.0.1:{gw.app.operator.port}/api/v1/messages",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
    assert (response.status_code, response.json()["error"]) == (500, "internal_error")
    assert errors("api") == before + 1
    [line] = [e for e in logs if e["event"] == "api_internal_error"]
    assert line["token"] == "ci" and "exc_info" in line
