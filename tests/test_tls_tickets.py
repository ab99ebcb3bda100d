"""Shared TLS session-ticket keys (gateway/smtp/tickets.py): a session issued by one server context resumes on
another with the same keys (as the workers of `serve --workers N` have), and not on one with its own keys.
This is also the canary of the ctypes call it relies on (OpenSSL's SSL_CTX_ctrl on CPython's SSLContext)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.ops.supervisor import Supervisor
from gateway.smtp import tickets
from gateway.smtp.tls import server_context, write_self_signed

VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, Path]]:
    return [write_self_signed(tmp_path_factory.mktemp("cert"))]


@pytest.fixture
def shared() -> Iterator[bytes]:
    secret = tickets.new_secret()
    tickets.share(secret)
    yield secret
    tickets.share(None)


def _serve(context: ssl.SSLContext, listener: socket.socket, errors: list[BaseException]) -> None:
    try:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(10)
            tls.sendall(b"ok")
    except (OSError, ssl.SSLError) as exc:
        errors.append(exc)


def connect(
    server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession | None, bool]:
    """One TLS connection to a server with `server`'s context: the client's session, and whether it resumed."""
    errors: list[BaseException] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        thread = threading.Thread(target=_serve, args=(server, listener, errors))
        thread.start()
        tls = client.wrap_socket(socket.create_connection(listener.getsockname(), timeout=10), session=session)
        with tls:
            tls.sendall(b"hi")
            assert tls.recv(10) == b"ok"  # a TLS 1.3 ticket is taken in with the reads
            result = tls.session, tls.session_reused
        thread.join(10)
    assert not errors
    return result


def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    return context


@pytest.mark.parametrize("version", VERSIONS, ids=["TLSv1.2", "TLSv1.3"])
def test_another_context_with_the_same_keys_resumes_the_session(
    version: ssl.TLSVersion, chain: list[tuple[Path, Path]], shared: bytes
) -> None:
    client = client_context(version)
    session, reused = connect(server_context("intermediate", chain), client)
    assert session is not None and not reused
    # Another worker: its own context, the same shared secret.
    assert connect(server_context("intermediate", chain), client, session)[1]


@pytest.mark.parametrize("version", VERSIONS, ids=["TLSv1.2", "TLSv1.3"])
def test_contexts_with_their_own_keys_do_not_resume(version: ssl.TLSVersion, chain: list[tuple[Path, Path]]) -> None:
    client = client_context(version)
    session, _ = connect(server_context("intermediate", chain), client)
    # OpenSSL's random keys per context: what each worker had without the shared secret.
    assert not connect(server_context("intermediate", chain), client, session)[1]


def test_keys_are_derived_per_profile_and_set(chain: list[tuple[Path, Path]], shared: bytes) -> None:
    modern, intermediate = server_context("modern", chain), server_context("intermediate", chain)
    assert tickets.get_keys(intermediate) == tickets.derive(shared, "intermediate")
    assert tickets.get_keys(modern) == tickets.derive(shared, "modern") != tickets.get_keys(intermediate)


def test_the_secret_travels_through_a_pipe() -> None:
    secret = tickets.new_secret()
    read, write = tickets.secret_pipe(secret)
    try:
        assert tickets.read_secret(read) == secret  # read while the supervisor's end stays open
    finally:
        os.close(read)
        os.close(write)
    read, write = tickets.secret_pipe(secret[:5])
    os.close(write)
    with pytest.raises(ValueError, match="5 bytes"):
        tickets.read_secret(read)
    os.close(read)


@pytest.mark.parametrize("version", VERSIONS, ids=["TLSv1.2", "TLSv1.3"])
def test_a_sighup_rotates_every_workers_keys(version: ssl.TLSVersion, chain: list[tuple[Path, Path]]) -> None:
    """The supervisor's SIGHUP writes a fresh secret into each worker's pipe before passing the signal on:
    the contexts the reload builds take it, so the keys (which could decrypt every recorded session that got
    a ticket under them) do not live as long as the supervisor. Workers still resume each other's sessions."""
    supervisor = Supervisor([], 2)
    worker = {}
    for slot in (0, 1):  # what _spawn hands each worker
        worker[slot], supervisor.ticket_pipes[slot] = tickets.secret_pipe(supervisor.ticket_secret)
    try:
        tickets.follow(worker[0])  # (one process stands for both workers: they share what the pipes say)
        client = client_context(version)
        first = server_context("intermediate", chain)
        session, _ = connect(first, client)
        assert tickets.get_keys(first) == tickets.derive(supervisor.ticket_secret, "intermediate")
        old_secret = supervisor.ticket_secret

        supervisor._forward(signal.SIGHUP, None)  # no worker process to pass it on to here
        assert supervisor.ticket_secret != old_secret
        assert os.read(worker[1], 128) == old_secret + supervisor.ticket_secret  # the other worker's pipe too
        reloaded = server_context("intermediate", chain)
        assert tickets.get_keys(reloaded) == tickets.derive(supervisor.ticket_secret, "intermediate")
        assert not connect(reloaded, client, session)[1]  # a ticket under the old keys: a full handshake
        renewed, _ = connect(reloaded, client)
        assert connect(server_context("intermediate", chain), client, renewed)[1]  # and across workers
    finally:
        tickets.share(None)
        for fd in (*worker.values(), *supervisor.ticket_pipes.values()):
            with contextlib.suppress(OSError):
                os.close(fd)


class _Started:
    """What Popen returns, for a worker that is never run."""

    pid = 424242

    def poll(self) -> int | None:
        return None

    def send_signal(self, signum: int) -> None:
        pass


def test_a_sighup_while_a_worker_is_being_started_reaches_its_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotation writes into the pipes the supervisor knows; a worker's is known once Popen has returned.
    A SIGHUP inside Popen (a worker restarted as `systemctl reload` runs) must still reach the new worker,
    which would otherwise keep the retired keys and resume none of its siblings' tickets."""
    supervisor = Supervisor([], 2)
    child: dict[str, int] = {}

    def popen(args: list[str], **kwargs: object) -> _Started:
        supervisor._forward(signal.SIGHUP, None)
        child["fd"] = os.dup(int(args[args.index("--ticket-keys-fd") + 1]))  # the worker's copy of the read end
        return _Started()

    monkeypatch.setattr("gateway.ops.supervisor.subprocess.Popen", popen)
    try:
        supervisor._spawn(0)
        os.set_blocking(child["fd"], False)
        read = os.read(child["fd"], 4096)  # what the worker takes: the first secret, then the newest
        assert read[-tickets.SECRET_SIZE :] == supervisor.ticket_secret
    finally:
        for fd in (*child.values(), *supervisor.ticket_pipes.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
