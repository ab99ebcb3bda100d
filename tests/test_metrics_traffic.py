"""/metrics scraped before and after real traffic: each counter moves as it should (sessions by listener and
TLS version, AUTH results, lockouts, refusals by reply code, limits, messages, deliveries, retries, dead
letters, upstream calls, rate-limit waits) and the queue's depth and oldest age by state follow the queue.
/readyz says 503, with the reason, while the queue cannot store messages."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway import app as app_module
from tests.devices_util import raw_send
from tests.harness import PASSWORD, Running
from tests.ops_util import scraped, start_data
from tests.smtputil import RawClient, message
from tests.spool_helpers import send, wait_for
from tests.test_spool_e2e import small_fs  # noqa: F401  (a fixture)

Factory = Callable[..., Running]
FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}


@pytest.fixture(autouse=True)
def fresh_queue_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "QUEUE_STATS_EVERY", 0.1)


def fill_disk(directory: Path) -> Path:
    """Fill the file system to its last block (unbuffered, so closing the file cannot fail too)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 512)
    return filler


def metrics(gw: Running) -> str:
    assert gw.app.operator is not None
    return httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/metrics", timeout=5).text


def ready(gw: Running) -> httpx.Response:
    assert gw.app.operator is not None
    return httpx.get(f"http://127.0.0.1:{gw.app.operator.port}/readyz", timeout=5)


@pytest.fixture
def gw(gateway_factory: Factory) -> Iterator[Running]:
    yield gateway_factory(
        http={"port": 0},
        delivery=FAST,
        limits={
            "max_sessions_per_ip": 2,
            "data_timeout": 1.0,
            "auth_failures_per_ip": 1,
            "auth_delay_max": 0.05,
            "auth_lockout_failures": 2,
        },
        accounts={"acme": {"rate_limit": 1000.0}},
    )


def test_counters_move_with_real_traffic(gw: Running) -> None:
    before = metrics(gw)

    def moved(name: str, **labels: str) -> float:
        return scraped(metrics(gw), name, **labels) - scraped(before, name, **labels)

    # A message over STARTTLS: a session, its TLS version, AUTH ok, one message, one upstream call.
    with RawClient(gw, "starttls") as client:
        client.cmd("EHLO metrics.test")
        client.starttls()
        client.cmd("EHLO metrics.test")
        assert client.login().startswith("235 ")
        assert raw_send(client, message(subject="counted")).startswith("250 2.0.0 ")
        assert client.cmd("MAIL FROM:<mallory@evil.example>").startswith("553 5.7.1 ")
    version = [line for line in metrics(gw).splitlines() if line.startswith("smtp_gateway_sessions_tls_total{")]
    assert moved("smtp_gateway_sessions_total", listener="starttls") == 1
    assert moved("smtp_gateway_sessions_tls_total", listener="starttls") == 1 and "TLSv1." in version[0]
    assert moved("smtp_gateway_auth_total", result="ok") == 1
    assert moved("smtp_gateway_messages_total", result="2xx") == 1
    assert moved("smtp_gateway_deliveries_total", path="inline", verdict="delivered") == 1
    assert moved("smtp_gateway_upstream_seconds_count", account="acme", outcome="ok") == 1
    assert moved("smtp_gateway_rate_limit_wait_seconds_count", account="acme") == 1
    assert moved("smtp_gateway_refusals_total", code="553 5.7.1") == 1

    # A wrong password, then a lockout (the second failure of 127.0.0.7).
    with RawClient(gw, source="127.0.0.7") as client:
        client.cmd("EHLO guesser.test")
        assert client.login("scanner", "wrong").startswith("535 ")
        assert client.login("scanner", "wrong again").startswith("421 4.7.0 Too many failed logins")
    with RawClient(gw, source="127.0.0.7") as client:
        client.cmd("EHLO guesser.test")
        assert client.login("scanner", PASSWORD).startswith("421 ")
    assert moved("smtp_gateway_auth_total", result="invalid") == 2
    assert moved("smtp_gateway_auth_total", result="locked_out") == 1
    assert moved("smtp_gateway_auth_lockouts_total") == 1
    assert moved("smtp_gateway_auth_delayed_total") == 1
    assert moved("smtp_gateway_refusals_total", code="535 5.7.8") == 1
    assert moved("smtp_gateway_refusals_total", code="421 4.7.0") == 2

    # Too many sessions from one address.
    with (
        RawClient(gw, source="127.0.0.8"),
        RawClient(gw, source="127.0.0.8"),
        socket.create_connection(("127.0.0.1", gw.port()), source_address=("127.0.0.8", 0)) as third,
    ):
        assert third.makefile("rb").readline().startswith(b"421 4.7.0 ")
    assert moved("smtp_gateway_connections_refused_total", listener="plain", reason="max_sessions_per_ip") == 1
    assert moved("smtp_gateway_refusals_total", code="421 4.7.0") == 3

    # A DATA that never ends.
    with RawClient(gw) as client:
        start_data(client, "slow.test")
        client.write(b"Subject: never ends\r\n")
        assert client.reply()[-1].startswith("421 4.4.2 ")
    assert moved("smtp_gateway_limit_hits_total", limit="data_timeout") == 1
    assert moved("smtp_gateway_refusals_total", code="421 4.4.2") == 1
    wait_for(lambda: scraped(metrics(gw), "smtp_gateway_sessions_active") == 0, 10, "no session open")


def test_queue_figures_retries_and_dead_letters(gw: Running) -> None:
    before = metrics(gw)

    def moved(name: str, **labels: str) -> float:
        return scraped(metrics(gw), name, **labels) - scraped(before, name, **labels)

    # The upstream is down: queued (250), then retried, then delivered once it is back.
    gw.fault(status=503, count=None)
    assert send(gw.port(), "waits in the queue")[0] == 250
    wait_for(lambda: scraped(metrics(gw), "smtp_gateway_queue_messages", state="queued") == 1, 10, "queued: 1")
    wait_for(lambda: moved("smtp_gateway_deliveries_total", path="queue", verdict="queued") >= 1, 10, "a retry")
    # Queued, or in flight while a retry runs: its age shows in one of the two.
    assert scraped(metrics(gw), "smtp_gateway_queue_oldest_age_seconds") > 0
    assert moved("smtp_gateway_deliveries_total", path="inline", verdict="queued") == 1
    gw.clear_faults()
    wait_for(
        lambda: moved("smtp_gateway_deliveries_total", path="queue", verdict="delivered") == 1,
        10,
        "delivered by a retry",
    )
    wait_for(lambda: scraped(metrics(gw), "smtp_gateway_queue_messages", state="queued") == 0, 10, "queue empty")
    assert scraped(metrics(gw), "smtp_gateway_queue_oldest_age_seconds", state="queued") == 0

    # Refused for good on a retry: a dead letter.
    gw.fault(status=503, count=1)
    assert send(gw.port(), "dies on retry")[0] == 250
    gw.fault(status=400, count=None, reason="contenido invalido")
    wait_for(lambda: scraped(metrics(gw), "smtp_gateway_queue_messages", state="dead") == 1, 10, "one dead letter")
    assert moved("smtp_gateway_deliveries_total", path="queue", verdict="refused") == 1
    assert moved("smtp_gateway_dead_letters_total", cause="refused") == 1
    assert scraped(metrics(gw), "smtp_gateway_queue_stats_age_seconds") < 5


def test_readyz_while_the_queue_cannot_store(gateway_factory: Factory, small_fs: Path) -> None:  # noqa: F811
    gw = gateway_factory(
        http={"port": 0}, delivery={**FAST, "spool_path": str(small_fs / "spool.sqlite3"), "spool_reserve": 256 * 1024}
    )
    assert ready(gw).status_code == 200
    gw.fault(status=503, count=None)
    assert send(gw.port(), "stored", body="y" * 20_000)[0] == 250
    filler = fill_disk(small_fs)
    code, text = send(gw.port(), "no room", body="y" * 300_000)
    assert (code, text[:5]) == (452, "4.3.1")
    answer = ready(gw)
    assert answer.status_code == 503
    assert any("queue: cannot store new messages" in p for p in answer.json()["problems"])
    gw.clear_faults()
    filler.unlink()
    # Room again: the next message stored clears it.
    gw.fault(status=503, count=None)
    wait_for(lambda: send(gw.port(), "room again")[0] == 250, 20, "a message stored again")
    wait_for(lambda: ready(gw).status_code == 200, 20, "ready again")


def test_readyz_while_the_queue_cannot_be_opened(gateway_factory: Factory, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    gw = gateway_factory(http={"port": 0}, delivery={**FAST, "spool_path": str(blocker / "spool.sqlite3")})
    answer = ready(gw)
    assert answer.status_code == 503
    assert any(p.startswith("queue: cannot be read") for p in answer.json()["problems"])
    assert send(gw.port(), "the healthy path needs no queue")[0] == 250


def test_auth_failure_ips_goes_down_when_the_failures_expire(gateway_factory: Factory) -> None:
    """smtp_gateway_auth_failure_ips follows the failures remembered: once they have expired it is read again
    (every QUEUE_STATS_EVERY), not kept at its peak until the next AUTH failure."""
    gw = gateway_factory(
        http={"port": 0},
        limits={"auth_failure_window": 0.5, "auth_lockout_time": 0.5},
    )
    with RawClient(gw) as client:
        client.cmd("EHLO t")
        assert client.login("scanner", "wrong").startswith("535")
    assert scraped(metrics(gw), "smtp_gateway_auth_failure_ips") == 1
    # The failure is forgotten after its window; the figure follows without another AUTH failure.
    wait_for(lambda: scraped(metrics(gw), "smtp_gateway_auth_failure_ips") == 0, what="the gauge back at 0")
