"""The console's one-time passwords under `serve --workers N`: the console of one worker issues the password,
and the kernel gives its SMTP session to any worker sharing the listener (SO_REUSEPORT). The password verifies
itself under the secret the supervisor shares with the workers (gateway/auth/onetime.py), so any worker takes
it; each takes it once, and a replayed, expired or forged one is refused like a wrong password."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator

import pytest

from gateway.auth.onetime import OneTimeLogins
from gateway.smtp import tickets
from tests.configs import listener
from tests.console_util import Client, base, console_gateway
from tests.devices_util import plain_blob
from tests.harness import USER, Running
from tests.ops_util import captured_with_context
from tests.smtputil import RawClient
from tests.test_console import TEST_SEND


@pytest.fixture
def shared_secret() -> Iterator[bytes]:
    """The secret as `serve --workers N` gives it to a worker: through the supervisor's pipe."""
    secret = tickets.new_secret()
    read, write = tickets.secret_pipe(secret)
    tickets.follow(read)  # (one process stands for both workers: they share what the pipes say)
    try:
        yield secret
    finally:
        tickets.share(None)
        for fd in (read, write):
            with contextlib.suppress(OSError):  # (follow closes the read end when the write end is gone)
                os.close(fd)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.asyncio
async def test_console_test_send_works_whichever_worker_takes_the_session(
    gateway_factory: Callable[..., Running], shared_secret: bytes
) -> None:
    port = _free_port()
    shared = [listener("starttls", "starttls", port=port, reuse_port=True)]
    first = console_gateway(gateway_factory, listeners=shared)
    console_gateway(gateway_factory, listeners=shared)  # the second worker on the same listener
    replies = []
    async with Client(base(first)) as admin:
        await admin.signin()
        with captured_with_context() as logs:
            for _ in range(8):
                status, _, page = await admin.form("/console/test-send", "/console/test-send", dict(TEST_SEND))
                assert status == 200
                replies.append("Accepted" in page)
    # Every test send is accepted, whichever worker the kernel gave its SMTP connection to ...
    assert all(replies), replies
    # ... and no AUTH failure is counted against the login or loopback.
    assert not [e for e in logs if e["event"] == "auth_failed"]


def _auth(gw: Running, password: str) -> str:
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        return client.cmd(f"AUTH PLAIN {plain_blob(USER, password)}")


def test_a_replayed_expired_or_forged_one_time_password_is_refused(gateway: Running, shared_secret: bytes) -> None:
    onetime = gateway.app.onetime
    good = onetime.issue(USER)
    assert _auth(gateway, good).startswith("235 ")
    assert _auth(gateway, good).startswith("535 ")  # replayed on the worker that took it
    assert _auth(gateway, onetime.issue(USER, ttl=-1)).startswith("535 ")  # expired
    # Issued under another key (a process that does not share the secret), or altered: forged.
    assert _auth(gateway, OneTimeLogins().issue(USER)).startswith("535 ")
    fresh = onetime.issue(USER)
    altered = fresh[:-3] + ("A" if fresh[-3] != "A" else "B") + fresh[-2:]
    assert _auth(gateway, altered).startswith("535 ")
    assert _auth(gateway, fresh).startswith("235 ")  # (the altered one did not use it up)


def test_a_one_time_password_is_verified_by_another_worker_and_across_a_rotation() -> None:
    secret = tickets.new_secret()
    read, write = tickets.secret_pipe(secret)
    tickets.follow(read)
    try:
        worker_a = OneTimeLogins(shared=tickets.shared_secrets)
        worker_b = OneTimeLogins(shared=tickets.shared_secrets)
        assert worker_b.redeem("scanner", worker_a.issue("scanner"))
        assert not OneTimeLogins().redeem("scanner", worker_a.issue("scanner"))  # a process without the secret
        before, older = worker_a.issue("scanner"), worker_a.issue("scanner")
        tickets.send(write, tickets.new_secret())  # a SIGHUP's rotation
        after = worker_a.issue("scanner")
        assert worker_b.redeem("scanner", before)  # issued just before it: still taken, within its minute
        assert worker_b.redeem("scanner", after)
        tickets.send(write, tickets.new_secret())  # the next one: the first secret is no longer known
        assert not worker_b.redeem("scanner", older)
    finally:
        tickets.share(None)
        os.close(write)
        with contextlib.suppress(OSError):
            os.close(read)
