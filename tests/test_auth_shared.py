"""Brute force against several processes at once: the AUTH failures of one client IP (and its attempts in
flight) are counted for every process and instance on the queue, so parallel guesses spread over
`serve --workers 2`, or over two instances on one PostgreSQL queue, stop at the configured lockout plus at
most one guess per process (docs/limits.md)."""

from __future__ import annotations

import base64
import itertools
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.configs import listener, serve_config, write
from tests.harness import PASSWORD, USER, Running
from tests.pgserver import PgCluster
from tests.procs import events, kill, serve
from tests.smtputil import ENHANCED, RawClient
from tests.spool_helpers import wait_for

LOCKOUT = 10
LIMITS = {
    "auth_failures_per_ip": LOCKOUT,  # no waits before it: the guesses go as fast as they can
    "auth_lockout_failures": LOCKOUT,
    "auth_lockout_time": 600,
    "max_auth_failures": 3,
    "max_sessions_per_ip": 100,
}
ATTACKERS = 16
LOCKED = "Too many failed logins from your address"


def attack(ports: list[int]) -> list[str]:
    """ATTACKERS threads guessing the configured user's password over fresh connections to `ports` in turn,
    each until it is told the address is locked out; every reply to AUTH."""
    replies: list[str] = []
    guesses = (f"guess-{n}" for n in itertools.count())
    lock = threading.Lock()

    def guesser(first: int) -> None:
        for n in itertools.count(first):
            try:
                with smtplib.SMTP("127.0.0.1", ports[n % len(ports)], timeout=30) as client:
                    client.ehlo("guesser.test")
                    for _ in range(3):
                        with lock:
                            password = next(guesses)
                        try:
                            code, text = client.docmd("AUTH", "PLAIN " + plain(USER, password))
                        except smtplib.SMTPServerDisconnected:
                            break
                        with lock:
                            replies.append(f"{code} {text.decode()}")
                        if LOCKED in text.decode():
                            return
                        if code != 535:
                            break
            except (OSError, smtplib.SMTPException):
                continue
            assert n < first + 200, "never locked out"

    threads = [threading.Thread(target=guesser, args=(k,)) for k in range(ATTACKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return replies


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def guesses(*logs: Path) -> int:
    """Passwords actually checked: failed AUTHs that were not refused unchecked (locked out)."""
    return sum(1 for log in logs for e in events(log, "auth_failed") if e.get("checked", True))


def test_serve_workers_share_the_lockout(tmp_path: Path) -> None:
    reserved = socket.socket()  # the workers' shared port (SO_REUSEPORT), held so it stays theirs
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    log = tmp_path / "gateway.log"
    supervisor = None
    try:
        config = serve_config(tmp_path, listeners=[listener("plain", port=port, reuse_port=True)], limits=LIMITS)
        supervisor, _ = serve(write(tmp_path / "gateway.toml", config), log, "--workers", "2")
        wait_for(lambda: len(events(log, "listener_started")) == 2 or None, 20, "two workers listening")
        replies = attack([port])
        checked = guesses(log)
        assert LOCKOUT <= checked <= LOCKOUT + 2, checked  # two workers: one guess each past it at most
        assert all(r.startswith(("535 5.7.8", "421 4.7.0")) and ENHANCED.match(r) for r in replies)
        assert len(events(log, "auth_lockout")) == 1
        # Stopped as a service manager does: SIGKILL would leave the workers running, holding the port.
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        supervisor = None
    finally:
        kill(supervisor)
        reserved.close()


def test_two_instances_on_one_postgresql_queue_share_the_lockout(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        ports: list[int] = []
        config: dict[str, Any] = serve_config(tmp_path, delivery={"queue_url": url}, limits=LIMITS)
        for name, log in zip("ab", logs, strict=True):
            proc, bound = serve(write(tmp_path / f"{name}.toml", config), log)
            procs.append(proc)
            ports.append(bound["plain"])
        attack(ports)
        checked = guesses(*logs)
        assert LOCKOUT <= checked <= LOCKOUT + 2, checked  # two instances: one guess each past it at most
        assert sum(len(events(log, "auth_lockout")) for log in logs) == 1
        # Both refuse the address now, unchecked.
        for port in ports:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("guesser.test")
                code, text = client.docmd("AUTH", "PLAIN " + plain(USER, "one more"))
                assert (code, LOCKED in text.decode()) == (421, True)
    finally:
        for proc in procs:
            kill(proc)


# -- in-process gateways on one queue: the shared record decides at every AUTH --------------------------------

LOCKED_REPLY = "421 4.7.0 " + LOCKED
PAIR_LIMITS = {"auth_failures_per_ip": 3, "auth_lockout_failures": 3, "auth_lockout_time": 600, "max_auth_failures": 5}


def _pair(gateway_factory: Callable[..., Running], tmp_path: Path, queue: str) -> tuple[Running, Running]:
    delivery: dict[str, Any] = {"spool_path": str(tmp_path / "shared.sqlite3")}
    if queue:
        delivery["queue_url"] = queue
    first = gateway_factory(delivery=delivery, listeners=[listener()], limits=PAIR_LIMITS)
    second = gateway_factory(delivery=delivery, listeners=[listener()], limits=PAIR_LIMITS, sandbox=first.sandbox)
    return first, second


def _login(gw: Running, source: str, password: str) -> str:
    with RawClient(gw, source=source) as client:
        client.cmd("EHLO client.test")
        return client.login(USER, password)


def _lock_out(gw: Running, source: str) -> None:
    with RawClient(gw, source=source) as client:
        client.cmd("EHLO guesser.test")
        replies = [client.login(USER, f"wrong-{n}") for n in range(3)]
    assert replies[-1].startswith(LOCKED_REPLY), replies


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest) -> str:
    return "" if request.param == "sqlite" else request.getfixturevalue("pg_cluster").new_database()


def test_a_locked_out_address_is_refused_by_every_process_the_right_password_included(
    gateway_factory: Callable[..., Running], tmp_path: Path, queue: str
) -> None:
    """docs/limits.md: no password hash is spent on a locked-out address, the right password included, on any
    process (before the fix another process that had seen nothing of it checked the password and said 235)."""
    first, second = _pair(gateway_factory, tmp_path, queue)
    _lock_out(first, "127.0.0.3")
    logins = [_login(second, "127.0.0.3", PASSWORD) for _ in range(3)]
    assert all(r.startswith(LOCKED_REPLY) for r in logins), logins


def test_a_lockout_lifted_on_one_console_is_lifted_in_every_process(
    gateway_factory: Callable[..., Running], tmp_path: Path, queue: str
) -> None:
    """The lift deletes the shared record; every process reads it at its next AUTH (before the fix the second
    process kept refusing from its memory until auth_lockout_time ran out)."""
    first, second = _pair(gateway_factory, tmp_path, queue)
    _lock_out(first, "127.0.0.2")
    assert _login(second, "127.0.0.2", PASSWORD).startswith(LOCKED_REPLY)  # the second process knows it now
    assert first.loop.run(first.app.lockouts.lift("smtp", "127.0.0.2"))
    assert _login(first, "127.0.0.2", PASSWORD).startswith("235 ")
    reply = _login(second, "127.0.0.2", PASSWORD)
    assert reply.startswith("235 "), f"still locked out on the other process after the lift: {reply}"


def test_every_process_lists_the_lockouts_of_every_process(
    gateway_factory: Callable[..., Running], tmp_path: Path, queue: str
) -> None:
    """The console's list of held-back addresses is read from the shared records: a lockout made through one
    process, and another address's recent failures, show on a process that never saw either address."""
    first, second = _pair(gateway_factory, tmp_path, queue)
    _lock_out(first, "127.0.0.4")
    assert _login(first, "127.0.0.5", "wrong").startswith("535 ")
    listed = {lo.client: lo for lo in second.loop.run(second.app.lockouts.in_force()) if lo.scope == "smtp"}
    assert set(listed) == {"127.0.0.4", "127.0.0.5"}, listed
    assert listed["127.0.0.4"].until > time.time() + 500 and listed["127.0.0.4"].shared
    assert (listed["127.0.0.5"].until, listed["127.0.0.5"].failures) == (0.0, 1)
    assert second.loop.run(second.app.lockouts.lift("smtp", "127.0.0.4"))
    assert {lo.client for lo in first.loop.run(first.app.lockouts.in_force())} == {"127.0.0.5"}
