"""TLS as devices meet it, on the stdlib asyncio loop and on uvloop (what `smtp-gateway serve` runs):
refused handshakes are logged once per client IP at info level with what the client offered (never a
traceback), a failed handshake frees its session, STARTTLS inside TLS is answered, certificates reload."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gateway.observability import REGISTRY
from gateway.smtp.server import Listeners
from gateway.tlsutil import write_self_signed
from tests.devices_util import captured_logs, events, listener, raw_send
from tests.harness import LoopThread, Running, start, stop
from tests.smtputil import RawClient, insecure_context, message
from tests.spool_helpers import wait_for
from tests.test_tls_profiles import client_context


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_thread_any(request: pytest.FixtureRequest) -> Iterator[LoopThread]:
    lt = LoopThread(uvloop.new_event_loop() if request.param == "uvloop" else None)
    unexpected: list[dict[str, Any]] = []
    # Whatever the loop would report through its exception handler (asyncio's "SSL handshake failed"
    # traceback, uvloop's "Fatal error on transport") is recorded here and fails the test.
    lt.loop.call_soon_threadsafe(lt.loop.set_exception_handler, lambda loop, context: unexpected.append(context))
    yield lt
    lt.close()
    assert unexpected == []


@pytest.fixture
def gw(loop_thread_any: LoopThread, tmp_path: Path) -> Iterator[Running]:
    running = start(
        loop_thread_any,
        tmp_path,
        listeners=[
            listener("plain"),
            listener("starttls", "starttls"),
            listener("implicit", "implicit"),
            listener("legacy", "starttls", tls_profile="legacy"),
        ],
    )
    yield running
    stop(running)


@pytest.fixture
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    """The structlog events of the test; none at error level, and nothing from asyncio/aiosmtpd's loggers."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with captured_logs() as logs:
        yield logs
    assert [e for e in logs if e["log_level"] in ("error", "critical") or "exc_info" in e] == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING and r.name in ("asyncio", "mail.log")] == []


def listeners(running: Running) -> Listeners:
    assert running.app.listeners is not None
    return running.app.listeners


def tls1_over_starttls(port: int, source: str = "127.0.0.1") -> bool:
    """A TLS 1.0-only device doing STARTTLS; True if the handshake succeeded."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO printer.lan\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
        try:
            client_context("TLSv1").wrap_socket(sock).close()
            return True
        except (ssl.SSLError, ConnectionResetError):
            return False


def implicit_from(port: int, context: ssl.SSLContext, source: str) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        try:
            context.wrap_socket(sock).close()
            return True
        except (ssl.SSLError, ConnectionResetError):
            return False


def test_refused_handshakes_are_one_info_line_per_client(
    gw: Running, no_error_logs: list[dict[str, Any]]
) -> None:
    def failures(offered: str) -> float:
        labels = {"listener": "implicit", "offered": offered}
        return REGISTRY.get_sample_value("smtp_gateway_tls_handshake_failures_total", labels) or 0.0

    before = failures("TLSv1.1")
    assert not implicit_from(gw.port("implicit"), client_context("TLSv1"), "127.0.0.1")
    wait_for(lambda: events(no_error_logs, "tls_handshake_failed"), 10, "the failure line")
    # The same client again (another old version): counted, not logged again.
    assert not implicit_from(gw.port("implicit"), client_context("TLSv1.1"), "127.0.0.1")
    wait_for(lambda: failures("TLSv1.1") > before, 10, "the second failure counted")
    # Another client: its own line, here over STARTTLS.
    assert not tls1_over_starttls(gw.port("starttls"), "127.0.0.2")
    wait_for(lambda: len(events(no_error_logs, "tls_handshake_failed")) == 2, 10, "the second client's line")
    first, second = events(no_error_logs, "tls_handshake_failed")
    assert first["log_level"] == second["log_level"] == "info"
    assert (first["listener"], first["profile"], first["offered"]) == ("implicit", "intermediate", "TLSv1")
    assert first["reason"] == "UNSUPPORTED_PROTOCOL"
    assert "tls_profile = \"legacy\"" in first["hint"]
    assert first["peer"].startswith("127.0.0.1:") and first["offered_ciphers"]
    assert (second["listener"], second["offered"], second["peer"].split(":")[0]) == ("starttls", "TLSv1", "127.0.0.2")
    # The next line for 127.0.0.1 (after the interval) says how many were left out.
    listeners(gw).handshake_failures.interval = 0.0
    assert not implicit_from(gw.port("implicit"), client_context("TLSv1"), "127.0.0.1")
    wait_for(lambda: len(events(no_error_logs, "tls_handshake_failed")) == 3, 10, "the line after the interval")
    assert events(no_error_logs, "tls_handshake_failed")[2]["suppressed"] == 1


def test_a_failed_handshake_frees_its_session(gw: Running, no_error_logs: list[dict[str, Any]]) -> None:
    """Before: every failed implicit-TLS handshake kept its session object, until max_sessions said 421."""
    for _ in range(5):
        assert not implicit_from(gw.port("implicit"), client_context("TLSv1"), "127.0.0.3")
        assert not tls1_over_starttls(gw.port("starttls"), "127.0.0.3")
    wait_for(lambda: not listeners(gw).sessions, 10, "sessions released")


def test_legacy_listener_takes_tls1_then_auth(gw: Running, no_error_logs: list[dict[str, Any]]) -> None:
    assert tls1_over_starttls(gw.port("legacy"))
    with RawClient(gw, "legacy") as client:
        client.cmd("EHLO printer.lan")
        client.starttls()
        client.cmd("EHLO printer.lan")
        assert client.login().startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="legacy")).startswith("250 2.0.0 ")
    assert events(no_error_logs, "tls_handshake_failed") == []


def test_silent_and_plaintext_clients_on_the_implicit_port(gw: Running, no_error_logs: list[dict[str, Any]]) -> None:
    # A TCP health check: connects, says nothing, leaves. Counted only.
    socket.create_connection(("127.0.0.1", gw.port("implicit")), timeout=10).close()
    # A device configured for plain SMTP on the TLS port.
    with socket.create_connection(("127.0.0.1", gw.port("implicit")), timeout=10,
                                  source_address=("127.0.0.4", 0)) as sock:
        sock.sendall(b"EHLO printer.lan\r\n")
        assert sock.recv(100) == b""  # closed, without a plaintext reply it could not read anyway
    wait_for(lambda: events(no_error_logs, "tls_handshake_failed"), 10, "the plaintext client's line")
    wait_for(lambda: not listeners(gw).sessions, 10, "sessions released")
    [line] = events(no_error_logs, "tls_handshake_failed")
    assert line["offered"] == "plaintext" and "STARTTLS or plain listener" in line["hint"]


def test_starttls_inside_tls_is_refused_and_the_session_goes_on(
    gw: Running, no_error_logs: list[dict[str, Any]]
) -> None:
    with RawClient(gw, "starttls") as client:
        client.cmd("EHLO client.test")
        client.starttls()
        client.cmd("EHLO client.test")
        assert client.cmd("STARTTLS") == "554 5.5.1 TLS already active"
        assert client.login().startswith("235 2.7.0 ")
        assert raw_send(client, message(subject="still encrypted")).startswith("250 2.0.0 ")
    with RawClient(gw, "implicit") as client:
        client.cmd("EHLO client.test")
        assert client.cmd("STARTTLS") == "554 5.5.1 TLS already active"
        assert client.login().startswith("235 2.7.0 ")
    assert [r["body"]["asunto"] for r in gw.sent] == ["still encrypted"]


def _peer_certificate(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            insecure_context().wrap_socket(sock) as tls:
        cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def test_certificates_reload_without_dropping_sessions(
    gw: Running, tmp_path: Path, no_error_logs: list[dict[str, Any]]
) -> None:
    tls = gw.settings.tls
    assert tls.cert_file is not None and tls.key_file is not None
    old = _peer_certificate(gw.port("implicit"))
    with RawClient(gw, "implicit") as open_session:
        open_session.cmd("EHLO client.test")
        assert open_session.login().startswith("235 ")
        # A renewal: new files in place, then what SIGHUP runs.
        new_cert, new_key = write_self_signed(tmp_path / "renewed")
        shutil.copy(new_cert, tls.cert_file)
        shutil.copy(new_key, tls.key_file)
        assert gw.loop.run(listeners(gw).reload_tls())
        renewed = _peer_certificate(gw.port("implicit"))
        assert renewed != old
        assert tls1_over_starttls(gw.port("legacy"))  # every TLS listener got the new files
        # The session opened before the reload goes on.
        assert raw_send(open_session, message(subject="across the reload")).startswith("250 2.0.0 ")
        # A broken file: the current certificate stays, and the log says why.
        tls.cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
        assert not gw.loop.run(listeners(gw).reload_tls())
        assert _peer_certificate(gw.port("implicit")) == renewed
        assert raw_send(open_session, message(subject="after a failed reload")).startswith("250 2.0.0 ")
    [reloaded] = events(no_error_logs, "tls_reloaded")
    assert reloaded["listeners"] == ["implicit", "legacy", "starttls"]
    failed = [e for e in no_error_logs if e["event"] == "tls_reload_failed"]
    assert len(failed) == 1 and str(tls.cert_file) in failed[0]["reason"]
    # An error-level line is right for an operator's broken file; the fixture's check is about handshakes.
    no_error_logs.remove(failed[0])


def test_session_timeout_bounds_the_handshake(loop_thread_any: LoopThread, tmp_path: Path) -> None:
    """A client that opens the implicit port and stalls mid-handshake is cut off, and its slot freed."""
    running = start(loop_thread_any, tmp_path, limits={"session_timeout": 0.5},
                    listeners=[listener("implicit", "implicit")])
    try:
        with captured_logs() as logs, socket.create_connection(
            ("127.0.0.1", running.port("implicit")), timeout=10
        ) as sock:
            hello = _client_hello_bytes()
            sock.sendall(hello[: len(hello) // 2])  # half a ClientHello, then nothing
            assert sock.recv(100) == b""
            wait_for(lambda: not listeners(running).sessions, 10, "session released")
        [line] = events(logs, "tls_handshake_failed")
        assert line["reason"] == "HANDSHAKE_TIMEOUT"
    finally:
        stop(running)


def _client_hello_bytes() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()

