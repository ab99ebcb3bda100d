"""PROXY protocol v1 and v2 on listeners behind a load balancer: honoured from `proxy_trusted` addresses
(127.0.0.1 here), refused from others (127.0.0.2); the real client is what limits, logs, AUTH throttling
and trusted networks see; implicit TLS reads the header before the handshake. Last, HAProxy itself in
front (send-proxy-v2), when it is installed."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, load_settings
from gateway.smtp.tls import write_self_signed
from tests.configs import gateway_config
from tests.devices_util import events, raw_send, require_tool
from tests.harness import LoopThread, Running, start, stop
from tests.ops_util import captured_with_context, proxy_v1, proxy_v2, sample
from tests.procs import spawn
from tests.smtputil import RawClient, message
from tests.spool_helpers import wait_for
from tests.test_tls_profiles import client_context

Factory = Callable[..., Running]


def proxied(name: str, tls: str = "none", **keys: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "address": "127.0.0.1",
        "port": 0,
        "tls": tls,
        "proxy_protocol": True,
        "proxy_trusted": ["127.0.0.1/32"],
    }
    if tls == "none":
        entry["allow_insecure_auth"] = True
    return {**entry, **keys}


@pytest.fixture
def gw(gateway_factory: Factory) -> Running:
    return gateway_factory(listeners=[proxied("lb"), proxied("lb-tls", "implicit")])


def send_through(gw: Running, header: bytes, subject: str, listener: str = "lb") -> str:
    with RawClient(gw, listener, proxy=header, tls=listener == "lb-tls") as client:
        assert client.greeting[-1].startswith("220 ")
        client.cmd("EHLO client.test")
        assert client.login().startswith("235 ")
        return raw_send(client, message(subject=subject))


@pytest.mark.parametrize(
    "header",
    [
        proxy_v1("203.0.113.7", 40001),
        proxy_v2("203.0.113.7", 40001),
        proxy_v2("203.0.113.7", 40001, tlv=b"\x05\x00\x03abc"),
    ],
    ids=["v1", "v2", "v2-with-tlv"],
)
def test_header_from_a_trusted_balancer_names_the_client(gw: Running, header: bytes) -> None:
    with captured_with_context() as logs:
        assert send_through(gw, header, "proxied").startswith("250 2.0.0 ")
    [auth] = events(logs, "auth_ok")
    assert auth["peer"] == "203.0.113.7:40001"
    [summary] = events(logs, "message_accepted")
    assert summary["peer"] == "203.0.113.7:40001" and summary["listener"] == "lb"


def test_ipv6_client_through_v1_and_v2(gw: Running) -> None:
    with captured_with_context() as logs:
        for header in (proxy_v1("2001:db8::7", 40002, "2001:db8::1"), proxy_v2("2001:db8::8", 40003, "2001:db8::1")):
            assert send_through(gw, header, "v6").startswith("250 2.0.0 ")
    assert [e["peer"] for e in events(logs, "auth_ok")] == ["2001:db8::7:40002", "2001:db8::8:40003"]


def test_implicit_tls_reads_the_header_before_the_handshake(gw: Running) -> None:
    with captured_with_context() as logs:
        assert send_through(gw, proxy_v2("198.51.100.9", 40004), "tls", listener="lb-tls").startswith("250 2.0.0 ")
    [auth] = events(logs, "auth_ok")
    assert (auth["peer"], auth["listener"]) == ("198.51.100.9:40004", "lb-tls")


def test_untrusted_address_is_refused_without_a_word(gw: Running) -> None:
    before = sample("smtp_gateway_connections_refused_total", listener="lb", reason="proxy_untrusted")
    with captured_with_context() as logs:
        for header in (proxy_v1("203.0.113.7", 40005), proxy_v2("203.0.113.7", 40006)):
            with socket.create_connection(
                ("127.0.0.1", gw.port("lb")), timeout=10, source_address=("127.0.0.2", 0)
            ) as sock:
                # The peer may already have closed (RST) when the header goes out.
                try:
                    sock.sendall(header)
                    assert sock.recv(100) == b""
                except ConnectionResetError:
                    pass
    refused = events(logs, "connection_refused")
    assert [(e["reason"], e["peer"]) for e in refused] == [("proxy_untrusted", "127.0.0.2")]  # one line a minute
    assert sample("smtp_gateway_connections_refused_total", listener="lb", reason="proxy_untrusted") == before + 2


def test_a_client_without_a_header_is_refused(gw: Running) -> None:
    with captured_with_context() as logs, socket.create_connection(("127.0.0.1", gw.port("lb")), timeout=10) as sock:
        sock.sendall(b"EHLO sneaky.test\r\n")
        assert sock.recv(100) == b""
    [refused] = events(logs, "connection_refused")
    assert refused["reason"] == "proxy_invalid"


def test_drain_closes_a_connection_still_waiting_for_its_header(gw: Running) -> None:
    """A shutdown does not wait PROXY_HEADER_TIMEOUT for a balancer that connected and said nothing yet:
    the connection is closed, without a line (the balancer would pass it on as the server's greeting)."""
    listeners = gw.app.listeners
    assert listeners is not None
    with socket.create_connection(("127.0.0.1", gw.port("lb")), timeout=10) as sock:
        wait_for(lambda: len(listeners.gates) == 1, 10, "the connection waiting for its header")
        gw.loop.run(listeners.drain(2.0))
        assert not listeners.gates
        assert sock.recv(100) == b""


def test_balancer_health_check_is_its_own_client(gw: Running) -> None:
    """v2 LOCAL (and v1 UNKNOWN): the balancer talks for itself, as itself."""
    with captured_with_context() as logs:
        for header in (proxy_v2(None), b"PROXY UNKNOWN\r\n"):
            with RawClient(gw, "lb", proxy=header) as client:
                assert client.greeting[-1].startswith("220 ")
                assert client.cmd("NOOP").startswith("250 ")
                assert client.cmd("BOGUS").startswith("500 ")
    assert [e["peer"].rsplit(":", 1)[0] for e in events(logs, "command_refused")] == ["127.0.0.1", "127.0.0.1"]


def test_v2_local_with_an_address_block_is_the_balancer(gw: Running) -> None:
    """v2 LOCAL may carry an address block (family TCP4 here); the spec says the receiver must ignore it, so the
    session is the balancer's, not the block's 203.0.113.99 (limits, lockouts, trusted networks, logs)."""
    body = socket.inet_aton("203.0.113.99") + socket.inet_aton("192.0.2.1") + struct.pack("!HH", 4242, 25)
    local = proxy_v2(None)[:12] + struct.pack("!BBH", 0x20, 0x11, len(body)) + body
    with captured_with_context() as logs, RawClient(gw, "lb", proxy=local) as client:
        assert client.greeting[-1].startswith("220 ")
        assert client.cmd("BOGUS").startswith("500 ")
    [refused] = events(logs, "command_refused")
    assert refused["peer"].rsplit(":", 1)[0] == "127.0.0.1", refused["peer"]


def test_limits_count_the_real_client(gateway_factory: Factory) -> None:
    """max_sessions_per_ip = 1: two clients behind the one balancer both get in; one client twice does not."""
    gw = gateway_factory(listeners=[proxied("lb")], limits={"max_sessions_per_ip": 1})
    with (
        RawClient(gw, "lb", proxy=proxy_v1("203.0.113.10", 1)) as first,
        RawClient(gw, "lb", proxy=proxy_v1("203.0.113.11", 1)) as second,
    ):
        assert first.greeting[-1].startswith("220 ") and second.greeting[-1].startswith("220 ")
        with RawClient(gw, "lb", proxy=proxy_v1("203.0.113.10", 2)) as again:
            assert again.greeting[-1] == "421 4.7.0 Too many connections from your address, try again later"


def test_auth_lockout_is_per_real_client(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        listeners=[proxied("lb")], limits={"auth_failures_per_ip": 1, "auth_delay_max": 0, "auth_lockout_failures": 1}
    )
    with RawClient(gw, "lb", proxy=proxy_v1("203.0.113.20", 1)) as bad:
        bad.cmd("EHLO bad.test")
        assert bad.login("scanner", "wrong").startswith("421 4.7.0 Too many failed logins")
    with RawClient(gw, "lb", proxy=proxy_v1("203.0.113.20", 2)) as bad:
        bad.cmd("EHLO bad.test")
        assert bad.cmd("AUTH LOGIN").startswith("421 4.7.0 ")
    # The balancer's other clients are not locked out with it.
    assert send_through(gw, proxy_v1("203.0.113.21", 3), "good").startswith("250 2.0.0 ")


def test_trusted_networks_see_the_real_client(gateway_factory: Factory) -> None:
    gw = gateway_factory(listeners=[proxied("lb", trusted=[{"network": "203.0.113.0/24", "login": "scanner"}])])
    with RawClient(gw, "lb", proxy=proxy_v2("203.0.113.30", 1)) as device:
        device.cmd("EHLO printer.lan")
        assert raw_send(device, message(subject="trusted through the balancer")).startswith("250 2.0.0 ")
    with RawClient(gw, "lb", proxy=proxy_v2("198.51.100.30", 1)) as stranger:
        stranger.cmd("EHLO stranger.test")
        assert stranger.cmd("MAIL FROM:<billing@acme.example>").startswith("530 5.7.0 ")


def test_proxy_protocol_needs_its_balancers() -> None:
    from gateway.config import ListenerSettings

    with pytest.raises(ValueError, match="proxy_trusted"):
        ListenerSettings(proxy_protocol=True)


@pytest.mark.parametrize(
    ("wide", "limit"), [(["0.0.0.0/0"], 8), (["::/0"], 16), (["10.0.0.5/32", "0.0.0.0/1"], 8), (["2000::/3"], 16)]
)
def test_a_proxy_trusted_network_wider_than_a_trusted_one_is_refused(
    tmp_path: Path, wide: list[str], limit: int
) -> None:
    """Every host in proxy_trusted may claim any client address (a trusted network's: mail without AUTH; a fresh
    one per AUTH guess: no lockout), so it gets the trusted networks' width rule (proxy3 F1)."""
    with pytest.raises(ConfigError) as info:
        load_settings(None, **gateway_config(tmp_path, listeners=[proxied("lb", proxy_trusted=wide)]))
    said = str(info.value)
    assert f"listener 'lb': proxy_trusted network {wide[-1]} is wider than /{limit}" in said
    assert "allow_wide_proxy_trusted" in said


@pytest.mark.parametrize("network", ["10.0.0.5/32", "10.0.0.0/8", "fd00::5/128", "2001::/16"])
def test_balancer_sized_proxy_trusted_networks_are_accepted(tmp_path: Path, network: str) -> None:
    load_settings(None, **gateway_config(tmp_path, listeners=[proxied("lb", proxy_trusted=[network])]))


def test_a_wide_proxy_trusted_when_forced_starts_with_a_warning(gateway_factory: Factory) -> None:
    """The opt-in is the operator's word that anyone reaching the listener may name any client: it works as said,
    a forged header naming a trusted network's address sends without AUTH, and every start says so."""
    lan = [{"network": "192.168.20.0/24", "login": "scanner"}]
    with captured_with_context() as logs:
        gw = gateway_factory(
            listeners=[proxied("lb", proxy_trusted=["0.0.0.0/0"], allow_wide_proxy_trusted=True, trusted=lan)]
        )
    [warning] = events(logs, "proxy_trusted_wide_allowed")
    assert warning["log_level"] == "warning" and (warning["listener"], warning["networks"]) == ("lb", ["0.0.0.0/0"])
    with RawClient(gw, "lb", proxy=proxy_v1("192.168.20.7", 1234)) as forged:
        forged.cmd("EHLO anyone")
        assert raw_send(forged, message(subject="forced")).startswith("250 2.0.0 ")


def test_session_lines_name_the_balancer_beside_the_client(gw: Running) -> None:
    """With several balancers, a session is traced to the one that relayed it: `proxy_peer` beside `peer`."""
    with captured_with_context() as logs:
        assert send_through(gw, proxy_v2("203.0.113.7", 40001), "traced").startswith("250 2.0.0 ")
        assert send_through(gw, proxy_v1("198.51.100.9", 40004), "tls", listener="lb-tls").startswith("250 2.0.0 ")
    summaries = events(logs, "message_accepted")
    assert [s["peer"] for s in summaries] == ["203.0.113.7:40001", "198.51.100.9:40004"]
    assert all(s["proxy_peer"].rsplit(":", 1)[0] == "127.0.0.1" for s in summaries), summaries


def test_lines_outside_the_session_task_name_the_balancer_too(gateway_factory: Factory) -> None:
    """Review today6b F2: the command timeout's line (logged by a timer, outside the session task's context)
    and a refused implicit-TLS handshake's (before any session) had `peer` but no `proxy_peer`."""
    gw = gateway_factory(listeners=[proxied("lb"), proxied("lb-tls", "implicit")], limits={"command_timeout": 1.0})
    with captured_with_context() as logs:
        with RawClient(gw, "lb", proxy=proxy_v2("203.0.113.7", 40001)) as client:
            assert client.greeting[-1].startswith("220 ")
            client.cmd("EHLO client.test")
            wait_for(lambda: bool(events(logs, "session_timeout")), 10, "the command timeout")
        with socket.create_connection(("127.0.0.1", gw.port("lb-tls")), timeout=10) as sock:
            sock.sendall(proxy_v2("198.51.100.9", 40004))
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                client_context("TLSv1").wrap_socket(sock)  # the profile refuses TLS 1.0
        wait_for(lambda: bool(events(logs, "tls_handshake_failed")), 10, "the handshake failure line")
    [timeout] = events(logs, "session_timeout")
    [handshake] = events(logs, "tls_handshake_failed")
    assert (timeout["peer"], handshake["peer"]) == ("203.0.113.7:40001", "198.51.100.9:40004")
    assert timeout.get("proxy_peer", "").startswith("127.0.0.1:"), timeout
    assert handshake.get("proxy_peer", "").startswith("127.0.0.1:"), handshake


def test_a_direct_session_has_no_balancer(gateway_factory: Factory) -> None:
    gw = gateway_factory(listeners=[{**proxied("direct"), "proxy_protocol": False, "proxy_trusted": []}])
    with captured_with_context() as logs, RawClient(gw, "direct") as client:
        client.cmd("EHLO direct.test")
        assert client.login().startswith("235 ")
        assert raw_send(client, message(subject="direct")).startswith("250 2.0.0 ")
    [summary] = events(logs, "message_accepted")
    assert "proxy_peer" not in summary


# -- HAProxy in front ----------------------------------------------------------------------------------------

HAPROXY_CFG = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind fd@{front}
    default_backend gateways
backend gateways
    server gw1 127.0.0.1:{back} send-proxy-v2
"""


# -- a header, then gone: the slot comes back (docs/limits.md: "in any state, frees its slots at once") ------

MAX_PER_IP = 3
MAX_SESSIONS = 10


def header_then_gone(port: int, header: bytes, how: str) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(header)
    sock.close()


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize(
    "header",
    [proxy_v1("203.0.113.9", 40000), proxy_v2(None)],  # a client's header; a health check's LOCAL
    ids=["v1-client", "v2-local-health-check"],
)
@pytest.mark.parametrize("name", ["lb", "lb-tls"])
def test_a_header_then_gone_frees_its_slot(
    loop_thread_any: LoopThread, tmp_path: Path, name: str, header: bytes, how: str
) -> None:
    """A balancer's health check with send-proxy, or a client that left right after the balancer forwarded
    its header: the gate ends before the session could begin, and no slot may stay taken (before the fix,
    all of them leaked until every new client got 421)."""
    running = start(
        loop_thread_any,
        tmp_path,
        listeners=[proxied("lb"), proxied("lb-tls", "implicit")],
        limits={"max_sessions_per_ip": MAX_PER_IP, "max_sessions": MAX_SESSIONS},
    )
    try:
        listeners = running.app.listeners
        assert listeners is not None
        for _ in range(2 * MAX_SESSIONS):
            header_then_gone(running.port(name), header, how)
        # A sentinel accepted after all of them: once it is answered, the gateway has taken them all in.
        with RawClient(running, "lb", proxy=proxy_v1("198.51.100.2", 41001)):
            pass
        wait_for(lambda: not listeners.sessions and not listeners.gates, 10, "every slot released")
        assert listeners.defenses is not None
        key = "127.0.0.1" if header.startswith(b"\r\n") else "203.0.113.9"  # LOCAL: the balancer's own
        assert listeners.defenses.sessions.open(key) == 0  # the per-IP count is back too
        # Past what max_sessions_per_ip and max_sessions would have allowed: the same client is greeted.
        with RawClient(running, "lb", proxy=header) as client:
            assert client.greeting[-1].startswith("220 "), client.greeting
    finally:
        stop(running)


def greets(port: int) -> bool:
    """The gateway's greeting came through: HAProxy accepts on `port` and relays."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(4) == b"220 "
    except OSError:
        return False


@contextlib.contextmanager
def haproxy_on(binary: str, config: Path, front: socket.socket) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy with `config`, handed the listening socket `front` (bind fd@N); stopped after the block."""
    proc = spawn(
        [binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=[front.fileno()]
    )
    front.close()  # HAProxy's now
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def front_socket() -> tuple[socket.socket, int]:
    """HAProxy's frontend: a socket the test listens on and hands over, so its port is known before HAProxy
    starts and no other program can take it meanwhile."""
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen()
    return front, front.getsockname()[1]


@pytest.fixture
def haproxy(gw: Running, tmp_path: Path) -> Iterator[int]:
    binary = require_tool("haproxy", "haproxy")
    front, port = front_socket()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CFG.format(front=front.fileno(), back=gw.port("lb")))
    with haproxy_on(binary, config, front) as proc:
        wait_for(lambda: greets(port) or proc.poll() is not None, 15, "haproxy relaying to the gateway")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield port


def test_haproxy_send_proxy_v2(gw: Running, haproxy: int) -> None:
    with (
        captured_with_context() as logs,
        socket.create_connection(("127.0.0.1", haproxy), timeout=10, source_address=("127.0.0.5", 0)) as sock,
    ):
        client = sock.makefile("rwb")

        def command(line: str) -> str:
            client.write(line.encode() + b"\r\n")
            client.flush()
            while True:
                reply = client.readline().decode()
                if reply[3:4] != "-":
                    return reply.rstrip("\r\n")

        assert client.readline().startswith(b"220 ")
        command("EHLO behind.haproxy")
        assert command("AUTH PLAIN AHNjYW5uZXIAc2Nhbm5lci1wYXNzd29yZA==").startswith("235 ")  # scanner
        assert command("MAIL FROM:<billing@acme.example>").startswith("250 ")
        assert command("RCPT TO:<client@example.com>").startswith("250 ")
        assert command("DATA").startswith("354 ")
        assert command("Subject: via haproxy\r\n\r\nhello\r\n.").startswith("250 2.0.0 ")
        command("QUIT")
    [summary] = events(logs, "message_accepted")
    assert summary["peer"].startswith("127.0.0.5:")  # the client HAProxy saw, not HAProxy itself
    assert gw.sent[-1]["body"]["asunto"] == "via haproxy"


def last_check(stats: Path) -> str | None:
    """The result of HAProxy's last health check of gw1 (`L7OK`, `L6RSP`, ...), None before the first one."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(stats))
            sock.sendall(b"show stat\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    except OSError:  # not listening yet
        return None
    header, *rows = answer.lstrip("# ").splitlines()
    for row in csv.DictReader(rows, fieldnames=header.split(",")):
        if row["svname"] == "gw1":
            status = row["check_status"].lstrip("* ")
            return None if status in ("", "INI") else status
    return None


def test_the_shipped_haproxy_cfg_checks_an_https_endpoint(gateway_factory: Factory, tmp_path: Path) -> None:
    """config/haproxy.cfg as shipped (this machine's addresses and ports, a lower maxconn, faster checks) in front
    of a gateway whose operator endpoint has a certificate, as it must off loopback with the API or the console:
    its /readyz checks speak HTTPS, so the server comes UP and a client gets the greeting. Checked over plain
    HTTP, every check failed and HAProxy closed every client (proxy3 F2)."""
    binary = require_tool("haproxy", "haproxy")
    cert, key = write_self_signed(tmp_path / "http-tls")
    gw = gateway_factory(
        listeners=[proxied("sub", "starttls")], http={"port": 0, "tls_cert_file": str(cert), "tls_key_file": str(key)}
    )
    assert gw.app.operator is not None
    shipped = (Path(__file__).parent.parent / "config" / "haproxy.cfg").read_text()
    # Only the submission frontend and one gateway (the smtps frontend would bind :465).
    sections = [s for s in shipped.split("\n\n") if not s.startswith(("frontend smtps", "backend gateways_465"))]
    text = re.sub(r"\n +server gw2 .*", "", "\n\n".join(sections)).rstrip("\n") + "\n"
    text = text.replace("maxconn 20000", "maxconn 100").replace("bind :587", "bind fd@FRONT")
    text = text.replace("10.0.0.11:587", f"127.0.0.1:{gw.port('sub')}")
    text = text.replace("port 8080", f"port {gw.app.operator.port}").replace("inter 5s", "inter 100ms")
    # HAProxy counts a server UP until its checks fail: its stats socket tells when a check has been done.
    stats = tmp_path / "stats.sock"
    text = text.replace("\nglobal\n", f"\nglobal\n    stats socket {stats}\n")
    # "server gw2", not "gw2": the temporary directory's path names the xdist worker (popen-gw2).
    assert "server gw2" not in text and ":465" not in text and "stats socket" in text, text
    front, port = front_socket()  # only now: an assertion above would leave it open
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace("bind fd@FRONT", f"bind fd@{front.fileno()}"))
    with haproxy_on(binary, config, front) as proc:
        checked = wait_for(lambda: proc.poll() is not None or last_check(stats), 15, "haproxy's first check")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert checked == "L7OK", f"the /readyz check failed ({checked}): HAProxy would mark every gateway DOWN"
        assert greets(port)
