"""`smtp-gateway serve` itself (a subprocess on uvloop, as in production): refused TLS handshakes are one
info line per client and no traceback; SIGHUP reloads the certificate without dropping open sessions, and a
broken certificate file keeps the old one."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.smtp.tls import write_self_signed
from tests.configs import listener, serve_config, write
from tests.devices_util import b64
from tests.harness import PASSWORD, USER
from tests.procs import complete_lines, spawn
from tests.smtputil import RECIPIENT, SENDER, insecure_context
from tests.spool_helpers import wait_for
from tests.test_tls_profiles import client_context


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    cert: Path
    key: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in complete_lines(self.log):
            if line.startswith("{"):
                event = json.loads(line)
                if name is None or event["event"] == name:
                    found.append(event)
        return found

    @property
    def ports(self) -> dict[str, int]:
        [ready] = self.events("ready")
        return dict(ready["listeners"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    settings = serve_config(tmp_path, listeners=[listener("implicit", "implicit"), listener("starttls", "starttls")])
    cert, key = Path(settings["tls"]["cert_file"]), Path(settings["tls"]["key_file"])
    config = write(tmp_path / "gateway.toml", settings)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = spawn(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    served = Served(proc, log, cert, key)
    try:
        wait_for(lambda: served.events("ready") or proc.poll() is not None, 20, "gateway ready")
        assert proc.poll() is None, log.read_text()
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def refused(port: int, source: str, starttls: bool) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        if starttls:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"EHLO printer.lan\r\nSTARTTLS\r\n")
            while not reader.readline().startswith(b"220 "):
                pass
        try:
            client_context("TLSv1").wrap_socket(sock).close()
            return False
        except (ssl.SSLError, ConnectionResetError):
            return True


def peer_certificate(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, insecure_context().wrap_socket(sock) as tls:
        cert = tls.getpeercert(binary_form=True)
        assert cert is not None
        return cert


def test_handshake_failures_and_certificate_reload(served: Served, tmp_path: Path) -> None:
    ports = served.ports
    assert refused(ports["implicit"], "127.0.0.1", starttls=False)
    assert refused(ports["starttls"], "127.0.0.2", starttls=True)
    assert refused(ports["implicit"], "127.0.0.1", starttls=False)  # same client again: not logged again
    wait_for(lambda: len(served.events("tls_handshake_failed")) == 2, 20, "two handshake-failure lines")

    old = peer_certificate(ports["implicit"])
    with (
        socket.create_connection(("127.0.0.1", ports["implicit"]), timeout=10) as raw,
        insecure_context().wrap_socket(raw) as session,
    ):
        reader = session.makefile("rb")

        def command(line: str) -> bytes:
            session.sendall(line.encode() + b"\r\n")
            while True:
                reply = reader.readline()
                if reply[3:4] != b"-":
                    return reply

        reader.readline()
        command("EHLO client.test")
        assert command(f"AUTH LOGIN {b64(USER)}").startswith(b"334 ")
        assert command(b64(PASSWORD)).startswith(b"235 ")

        new_cert, new_key = write_self_signed(tmp_path / "renewed")
        shutil.copy(new_cert, served.cert)
        shutil.copy(new_key, served.key)
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served.events("tls_reloaded"), 20, "tls_reloaded")
        renewed = peer_certificate(ports["implicit"])
        assert renewed != old
        # The session from before the reload goes on.
        assert command(f"MAIL FROM:<{SENDER}>").startswith(b"250 ")
        assert command(f"RCPT TO:<{RECIPIENT}>").startswith(b"250 ")

        served.cert.write_text("not a certificate\n")
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served.events("tls_reload_failed"), 20, "tls_reload_failed")
        assert peer_certificate(ports["implicit"]) == renewed
        assert command("RSET").startswith(b"250 ")
        assert command("QUIT").startswith(b"221 ")

    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    text = served.log.read_text()
    assert "Traceback" not in text, text
    lines = served.events("tls_handshake_failed")
    assert [(e["listener"], e["offered"], e["level"]) for e in lines] == [
        ("implicit", "TLSv1", "info"),
        ("starttls", "TLSv1", "info"),
    ]
    errors = [e["event"] for e in served.events() if e["level"] in ("error", "critical")]
    assert errors == ["tls_reload_failed"]
    [failed] = served.events("tls_reload_failed")
    assert str(served.cert) in failed["reason"]


@pytest.mark.parametrize("listener", ["implicit", "starttls"])
def test_stop_with_a_tls_client_that_quit_but_never_answers_close_notify(served: Served, listener: str) -> None:
    """A sloppy device: QUIT, 221, then it neither answers the server's close_notify nor closes its socket.
    The drain aborts its connection after the grace period and the stop sequence runs to its end."""
    port = served.ports[listener]
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if listener == "starttls":
        plain = raw.makefile("rb")
        plain.readline()
        raw.sendall(b"EHLO printer.lan\r\nSTARTTLS\r\n")
        while not plain.readline().startswith(b"220 "):
            pass
        plain.close()
    with insecure_context().wrap_socket(raw) as session, session.makefile("rb") as reader:
        if listener == "implicit":
            assert reader.readline().startswith(b"220 ")
        session.sendall(b"EHLO printer.lan\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        session.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221 ")
        # The socket stays open and unread (the server's close_notify waits in it) while the gateway stops.
        served.proc.send_signal(signal.SIGTERM)
        status = served.proc.wait(30)
    text = served.log.read_text()
    assert "Traceback" not in text, text
    assert status == 0, text
    assert served.events("stopped"), text
