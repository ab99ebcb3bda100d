"""What any SMTP client sees: EHLO extensions, enhanced status codes on every reply, limits, pipelining."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import socket
import ssl
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from gateway.ops.metrics import REGISTRY
from gateway.smtp.protocol import GatewaySMTP
from tests.configs import listener
from tests.devices_util import captured_logs, events, server_connections
from tests.harness import PASSWORD, USER, LoopThread, Running, start, stop
from tests.smtputil import ENHANCED, RECIPIENT, SENDER, RawClient, insecure_context, message
from tests.spool_helpers import wait_for


def ehlo_keywords(client: RawClient) -> list[str]:
    client.write(b"EHLO client.test\r\n")
    lines = client.reply()
    assert all(line.startswith("250") for line in lines), lines
    return [line[4:].split(" ")[0].upper() for line in lines[1:]]


def test_greeting_is_220(gateway: Running) -> None:
    with RawClient(gateway) as client:
        assert client.greeting[-1].startswith("220 ")


@pytest.mark.parametrize("listener", ["plain", "implicit"])
def test_ehlo_advertises_extensions(gateway: Running, listener: str) -> None:
    with RawClient(gateway, listener) as client:
        keywords = ehlo_keywords(client)
    for keyword in ("SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES", "AUTH"):
        assert keyword in keywords, keywords
    assert "STARTTLS" not in keywords


def test_ehlo_reply_is_one_tls_record(gateway: Running) -> None:
    """EHLO's lines go out in one write: over TLS one record, not one record (and one packet) per line."""
    context = insecure_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # no TLS 1.3 session tickets among the records
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", gateway.port("implicit")), timeout=10) as sock:

        def exchange(until: bytes) -> bytes:
            """Send what TLS has to send, then read raw records until the plaintext holds `until`."""
            raw, text = b"", b""
            while True:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                with contextlib.suppress(ssl.SSLWantReadError):
                    text += tls.read(65536)
                    if until in text:
                        return raw
                    continue
                chunk = sock.recv(65536)
                assert chunk, "connection closed"
                raw += chunk
                incoming.write(chunk)

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        exchange(b"\r\n")  # the greeting
        tls.write(b"EHLO client.test\r\n")
        raw = exchange(b"250 HELP\r\n")
    records = []
    while raw:
        records.append(raw[0])
        raw = raw[5 + int.from_bytes(raw[3:5], "big") :]
    assert records == [23], records  # one application-data record


def test_starttls_listener_offers_auth_only_after_tls(gateway: Running) -> None:
    with RawClient(gateway, "starttls") as client:
        before = ehlo_keywords(client)
        assert "STARTTLS" in before
        assert "AUTH" not in before
        assert "ENHANCEDSTATUSCODES" in before
        client.starttls()
        after = ehlo_keywords(client)
    assert "AUTH" in after
    assert "STARTTLS" not in after


def test_every_reply_carries_an_enhanced_code(gateway: Running) -> None:
    """Each command of a long session, good and bad; every final reply line has an enhanced code."""
    raw = message(subject="every reply").decode()
    script: list[tuple[str, str]] = [
        ("EHLO", "501"),  # bad syntax
        ("HELO", "501"),
        ("FROB x", "500"),  # unknown command
        ("NOOP", "250"),
        ("RSET", "250"),
        ("VRFY someone", "252"),
        ("HELP", "250"),
        ("EHLO client.test", "250"),
        (f"MAIL FROM:<{SENDER}>", "530"),  # no AUTH yet
        (f"RCPT TO:<{RECIPIENT}>", "503"),
        ("DATA", "503"),
        ("AUTH NOSUCH", "504"),
        ("__LOGIN__", "235"),
        ("__LOGIN__", "503"),  # already authenticated
        ("MAIL FROM:<>", "553"),  # null sender
        ("MAIL TO:<x@y.example>", "501"),  # bad syntax
        ("MAIL FROM:<not an address>", "553"),
        ("MAIL FROM:<someone@elsewhere.example>", "553"),  # sender not permitted
        (f"MAIL FROM:<{SENDER}>", "250"),
        (f"MAIL FROM:<{SENDER}>", "503"),  # nested MAIL
        ("RCPT TO:<bad address>", "553"),
        ("RCPT x", "501"),
        ("DATA", "503"),  # no RCPT yet
        (f"RCPT TO:<{RECIPIENT}>", "250"),
        ("DATA extra", "501"),
        ("__DATA__", "250"),
        ("NOOP", "250"),
        ("QUIT", "221"),
    ]
    seen: list[str] = []
    with RawClient(gateway) as client:
        for command, code in script:
            if command == "__LOGIN__":
                line = client.login()
            elif command == "__DATA__":
                assert client.cmd("DATA").startswith("354")
                client.write(raw.encode() + b".\r\n")
                line = client.reply()[-1]
            else:
                line = client.cmd(command)
            seen.append(line)
            assert line.startswith(code), (command, line)
            if command.startswith("EHLO ") and code == "250":
                continue  # RFC 2034 §3: EHLO's reply lines carry no enhanced code
            assert ENHANCED.match(line), (command, line)
        assert client.closed()
    assert seen[-3].startswith("250 2.0.0 Ok: queued as ")


def test_mail_without_auth_is_530(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("530 5.7.0 ")


def test_null_sender_refused_with_enhanced_code(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        line = client.cmd("MAIL FROM:<>")
    assert line.startswith("553 5.7.1 ")


def test_oversize_message_is_552(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(limits={"max_message_size": 2048})
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        client.login()
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert client.cmd("DATA").startswith("354")
        client.write(message(body=("y" * 70 + "\r\n") * 100) + b".\r\n")
        line = client.reply()[-1]
        assert line.startswith("552 5.3.4 "), line
        # The session goes on: a small message still passes.
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250")
        assert client.cmd("DATA").startswith("354")
        client.write(message(subject="small") + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
    assert [r["body"]["asunto"] for r in running.sent] == ["small"]


def test_size_parameter_over_limit_is_refused(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(limits={"max_message_size": 2048})
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        client.login()
        line = client.cmd(f"MAIL FROM:<{SENDER}> SIZE=999999")
    assert line.startswith("552 5.3.4 "), line


def test_too_many_recipients_is_452(gateway_factory: Callable[..., Running]) -> None:
    running = gateway_factory(limits={"max_recipients": 2})
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        client.login()
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert client.cmd("RCPT TO:<a@example.com>").startswith("250 2.1.5 ")
        assert client.cmd("RCPT TO:<b@example.com>").startswith("250 2.1.5 ")
        assert client.cmd("RCPT TO:<c@example.com>").startswith("452 4.5.3 ")
        assert client.cmd("DATA").startswith("354")
        client.write(message(to="a@example.com, b@example.com, c@example.com") + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
    contacts = running.sent[0]["body"]["contactos"]
    assert sorted(c["email"] for c in contacts) == ["a@example.com", "b@example.com"]


def test_pipelined_commands_get_replies_in_order(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        body = message(subject="pipelined")
        client.write(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nRCPT TO:<other@example.com>\r\nDATA\r\n".encode()
        )
        replies = [client.reply()[-1] for _ in range(4)]
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"], replies
        # The message, its end and the next commands in one write.
        client.write(body + b".\r\nNOOP\r\nQUIT\r\n")
        final = [client.reply()[-1] for _ in range(3)]
    assert final[0].startswith("250 2.0.0 Ok: queued as "), final
    assert final[1].startswith("250 2.0.0 ")
    assert final[2].startswith("221 2.0.0 ")
    assert gateway.sent[0]["body"]["asunto"] == "pipelined"


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write the server's sessions make (asyncio's StreamWriter, under aiosmtpd), in order."""
    written: list[bytes] = []
    write = asyncio.StreamWriter.write

    def spy(self: asyncio.StreamWriter, data: bytes | bytearray | memoryview) -> None:
        written.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", spy)
    return written


def test_pipelined_replies_go_out_together_complete_and_in_order(gateway: Running, sends: list[bytes]) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        client.write(
            f"RSET\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nRCPT TO:<not an address>\r\n"
            f"RCPT TO:<other@example.com>\r\nDATA\r\n".encode()
        )
        replies = [client.reply()[-1] for _ in range(6)]
        client.write(message(subject="grouped") + b".\r\nQUIT\r\n")
        final = [client.reply()[-1] for _ in range(2)]
    assert [r[:3] for r in replies] == ["250", "250", "250", "553", "250", "354"], replies
    assert [r[:3] for r in final] == ["250", "221"], final
    # RSET's, MAIL's and the first RCPT's 250 in one send with the refusal; the last RCPT's with DATA's 354.
    grouped = [w for w in sends if w.startswith(b"250 2.0.0 Ok\r\n250 2.1.0")]
    assert len(grouped) == 1 and grouped[0].count(b"\r\n") == 4 and b"553 " in grouped[0], sends
    assert any(w.startswith(b"250 2.1.5 Ok\r\n354 ") for w in sends), sends
    assert gateway.sent[0]["body"]["asunto"] == "grouped"


def test_a_client_that_waits_gets_each_reply_at_once(gateway: Running, sends: list[bytes]) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        # Nothing follows these commands until their replies came: each must be sent as it is made.
        assert client.cmd("RSET").startswith("250 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message() + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 Ok: queued as ")
    assert [w for w in sends if w.startswith(b"250 2.1.")] == [b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n"]


def test_dot_stuffing_and_bare_lf_lines(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        client.cmd(f"MAIL FROM:<{SENDER}>")
        client.cmd(f"RCPT TO:<{RECIPIENT}>")
        assert client.cmd("DATA").startswith("354")
        client.write(
            f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: dots\r\n\r\n..leading dot\nbare lf line\r\n.\r\n".encode()
        )
        assert client.reply()[-1].startswith("250 2.0.0 ")
    html = gateway.sent[0]["body"]["html"]
    assert ".leading dot\nbare lf line" in html
    assert "..leading" not in html


def test_unexpected_exception_in_data_is_451(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(gateway.app.pipeline, "prepare", boom)
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        client.cmd(f"MAIL FROM:<{SENDER}>")
        client.cmd(f"RCPT TO:<{RECIPIENT}>")
        assert client.cmd("DATA").startswith("354")
        client.write(message() + b".\r\n")
        line = client.reply()[-1]
        assert line.startswith("451 4.3.0 "), line
        assert "RuntimeError" not in line
        # The failed transaction is over: the same session can start the next one (no "nested MAIL").
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 2.1.0 ")
    assert gateway.sent == []


def test_unexpected_exception_in_mail_is_451(gateway: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    async def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("unexpected")

    monkeypatch.setattr(gateway.app.pipeline, "check_sender", boom)
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        line = client.cmd(f"MAIL FROM:<{SENDER}>")
    assert line.startswith("451 4.3.0 "), line


@pytest.mark.parametrize("command", ["MAIL", "AUTH", "DATA"])
def test_an_unexpected_exception_is_logged_once_with_its_command_and_counted_once(
    gateway: Running, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """One smtp_unexpected_error line with the command's verb (never its arguments: AUTH's carry a password)
    and the traceback; no second line for the 451 (it was command_refused, without the command)."""

    async def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("unexpected")

    target = {"MAIL": (gateway.app.pipeline, "check_sender"), "AUTH": (gateway.app.authenticator, "authenticate")}
    obj, name = target.get(command, (gateway.app.pipeline, "accept"))
    monkeypatch.setattr(obj, name, boom)
    errors = internal_errors()
    with captured_logs() as logs, RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        line = client.login()
        if command != "AUTH":
            line = client.cmd(f"MAIL FROM:<{SENDER}>")
        if command == "DATA":
            client.cmd(f"RCPT TO:<{RECIPIENT}>")
            assert client.cmd("DATA").startswith("354")
            client.write(message() + b".\r\n")
            line = client.reply()[-1]
        assert line.startswith("451 4.3.0 "), line
        assert client.cmd("NOOP").startswith("250 ")  # the session goes on
    assert internal_errors() == errors + 1
    about = [e for e in logs if e["log_level"] in ("warning", "error") or e["event"] == "command_refused"]
    assert [(e["event"], e.get("command")) for e in about] == [
        ("smtp_unexpected_error", command),
        *([("message_deferred", None)] if command == "DATA" else []),  # the transaction's summary line
    ], about
    [error] = events(logs, "smtp_unexpected_error")
    assert isinstance(error["exc_info"], RuntimeError) and error["error_type"] == "RuntimeError"
    assert PASSWORD not in str(logs)


def test_dot_stuffed_bare_lf_lines_are_unstuffed(gateway: Running) -> None:
    """smtplib sends bytes with bare LF as they are, stuffing the dots of LF-ended lines."""
    raw = f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: lf dots\n\nfirst\n.second\n..third\n".encode()
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        client.cmd(f"MAIL FROM:<{SENDER}>")
        client.cmd(f"RCPT TO:<{RECIPIENT}>")
        assert client.cmd("DATA").startswith("354")
        client.write(raw.replace(b"\n.", b"\n..") + b"\r\n.\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
    assert "first\n.second\n..third" in gateway.sent[0]["body"]["html"]


@given(st.text())
def test_a_printable_reply_has_nothing_to_replace(line: str) -> None:
    """push() runs its regex for control characters and lone surrogates only on lines that are not
    printable: every character it replaces makes a line so."""
    from gateway.smtp.protocol import _UNPRINTABLE

    if line.isprintable():
        assert _UNPRINTABLE.sub("?", line) == line
    for char in ("\x00", "\x1f", "\x7f", "\ud800", "\udfff"):
        assert not (line + char).isprintable()


# A path aiosmtpd's RFC 5322 parser reads in time quadratic in its length (12 KB: ~0.8 s of event-loop CPU,
# every session of the process waiting), and one it recurses on, once per nested comment.
SLOW_PATH = "<" + '"a".' * 3000 + "x@y.example>"
NESTED_PATH = "<" + "(" * 1200 + ">"


@pytest.mark.parametrize("greeting", ["EHLO client.test", "HELO client.test"])
def test_a_command_line_over_512_octets_is_refused_by_its_length_after_helo_too(
    gateway: Running, greeting: str
) -> None:
    """Only AUTH lines may be 12288 octets long (RFC 4954 §4; tests/test_devices_auth.py), after HELO as after
    EHLO: every other command line is refused unparsed past 512 octets."""
    with RawClient(gateway) as client:
        client.cmd(greeting)
        assert client.cmd("MAIL FROM:" + SLOW_PATH) == "500 5.5.2 Command line too long"
        assert client.cmd("MAIL FROM:" + NESTED_PATH) == "500 5.5.2 Command line too long"
        assert client.cmd("NOOP " + "x" * 508) == "500 5.5.2 Command line too long"  # 513 octets
        assert client.cmd("NOOP " + "x" * 507).startswith("250 ")  # 512 octets
        assert client.login().startswith("235 2.7.0 ")


def internal_errors() -> float:
    return REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "smtp_session"}) or 0.0


def test_deeply_nested_comments_in_a_path_are_a_syntax_error(gateway: Running) -> None:
    """aiosmtpd's address parser recurses once per nested comment: a path with ~1000 of them raised
    RecursionError, answered 451 (try again) and counted as an internal error. A command line's limit keeps
    them out now; the parser's own answer is a malformed address too."""
    errors = internal_errors()
    with RawClient(gateway) as client:
        client.cmd("HELO client.test")
        assert client.cmd("MAIL FROM:<" + "(" * 490 + ">").startswith("553 5.1.3 ")
        assert client.cmd("NOOP").startswith("250 ")
    assert internal_errors() == errors
    # Past the recursion limit: no command line is that long any more, so the parser is asked directly.
    protocol = GatewaySMTP.__new__(GatewaySMTP)
    protocol.local_part_limit = 0
    assert protocol._getaddr(NESTED_PATH) == (None, None)


def replies_until_closed(client: RawClient) -> list[str]:
    """Every reply line the gateway writes until it closes the connection."""
    lines = []
    while raw := client.file.readline():
        lines.append(raw.decode().rstrip("\r\n"))
    return lines


def test_a_client_that_half_closes_after_its_dot_still_gets_its_250(gateway: Running) -> None:
    """shutdown(SHUT_WR) after the final dot and QUIT (`nc -N`, scripted senders): the client is done writing,
    not reading. The FIN comes while the message is being delivered (a slow upstream): its 250 and the 221 still
    go out, then the gateway closes. It used to take the FIN for a disconnect: delivered, but no reply, so the
    client would send the message again."""
    gateway.fault(delay=1.0, count=1, kind="send")
    with RawClient(gateway) as client:
        client.open_data()
        client.write(message(subject="half-close") + b".\r\nQUIT\r\n")
        client.sock.shutdown(socket.SHUT_WR)
        replies = replies_until_closed(client)
    assert [line[:3] for line in replies] == ["250", "221"], replies
    assert replies[0].startswith("250 2.0.0 ")
    assert [r["body"]["asunto"] for r in gateway.requests] == ["half-close"]


def test_a_whole_session_written_then_half_closed_gets_every_reply(gateway: Running) -> None:
    blob = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    with RawClient(gateway) as client:
        client.write(
            f"EHLO client.test\r\nAUTH PLAIN {blob}\r\n".encode()
            + f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode()
            + message(subject="one write")
            + b".\r\nNOOP\r\nNOOP"  # the last line unterminated: no command
        )
        client.sock.shutdown(socket.SHUT_WR)
        replies = replies_until_closed(client)
    assert [line[:3] for line in replies if line[3:4] != "-"] == ["250", "235", "250", "250", "354", "250", "250"]
    assert [r["body"]["asunto"] for r in gateway.sent] == ["one write"]


def test_a_client_that_half_closes_in_its_data_sends_nothing(gateway: Running) -> None:
    with RawClient(gateway) as client:
        client.open_data()
        client.write(message(subject="cut short"))  # no final dot
        client.sock.shutdown(socket.SHUT_WR)
        assert replies_until_closed(client) == []
    assert gateway.requests == []


@pytest.mark.parametrize("callback", ["eof_received", "connection_lost", "data_received"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_bug_in_a_transport_callback_is_logged_once_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, loop: str, callback: str
) -> None:
    """A bug (simulated) in a callback the loop calls, not the session task: the loop caught it and gave it to
    its exception handler, whose default logged it on the asyncio logger (worded differently by each loop) and
    counted it nowhere. Now one event_loop_internal_error line with its traceback and the internal-errors
    count, on both loops; the connection is closed and the session released as before."""
    original = getattr(GatewaySMTP, callback)

    def buggy(self: GatewaySMTP, *args: Any) -> Any:
        if callback == "connection_lost":
            original(self, *args)  # the session's own release runs: the bug comes after it
            raise RuntimeError(f"simulated bug in {callback}")
        if callback == "data_received" and b"BUG" not in args[0]:
            return original(self, *args)
        raise RuntimeError(f"simulated bug in {callback}")

    def loop_errors() -> float:
        return REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "event_loop"}) or 0.0

    lt = LoopThread(uvloop.new_event_loop() if loop == "uvloop" else None)
    running = start(lt, tmp_path, listeners=[listener("plain")])
    try:
        monkeypatch.setattr(GatewaySMTP, callback, buggy)
        port = running.port()
        before = loop_errors()
        with caplog.at_level(logging.ERROR, logger="asyncio"), captured_logs() as logs:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as f:
                assert f.readline().startswith(b"220")
                if callback == "eof_received":
                    sock.shutdown(socket.SHUT_WR)
                else:
                    sock.sendall(b"BUG\r\n" if callback == "data_received" else b"QUIT\r\n")
                with contextlib.suppress(OSError):
                    while f.readline():
                        pass
            wait_for(lambda: server_connections(port) == 0, 10, "the connection closed")
            wait_for(lambda: not running.app.listeners or not running.app.listeners.sessions, 10, "session released")
            wait_for(lambda: bool(events(logs, "event_loop_internal_error")), 10, "the bug logged")
        monkeypatch.undo()
        [error] = events(logs, "event_loop_internal_error")
        assert isinstance(error["exc_info"], RuntimeError) and error["error_type"] == "RuntimeError"
        assert loop_errors() - before == 1
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []  # not a second time
    finally:
        monkeypatch.undo()
        stop(running)
        lt.close()


@pytest.mark.parametrize(
    ("listener_name", "quit_first"),
    [("plain", True), ("plain", False), ("starttls", True), ("implicit", True)],
)
def test_an_ended_session_is_freed_without_the_garbage_collector(
    gateway: Running, monkeypatch: pytest.MonkeyPatch, listener_name: str, quit_first: bool
) -> None:
    """A session over (its connection lost, its command loop ended) holds no reference to itself: without
    GatewaySMTP._unlink its command tables, its writer and its callbacks made each session and its transport,
    task, reader and writer a reference cycle, freed only by the garbage collector, which then ran for them
    (3.6 % of a process's CPU with one message per connection, 2.0-2.8 % without these). A TLS client that
    hangs up without QUIT is not covered: the session's task is cancelled then, and the task keeps its
    CancelledError, whose traceback holds the session (the collector frees those)."""
    sessions: list[weakref.ref[GatewaySMTP]] = []
    made = GatewaySMTP.connection_made

    def record(self: GatewaySMTP, transport: asyncio.BaseTransport) -> None:
        if not any(ref() is self for ref in sessions):  # STARTTLS: once more for the encrypted session
            sessions.append(weakref.ref(self))
        made(self, transport)

    monkeypatch.setattr(GatewaySMTP, "connection_made", record)
    gc.collect()
    gc.disable()
    try:
        with RawClient(gateway, listener_name) as client:
            if listener_name == "starttls":
                client.cmd("EHLO client.test")
                client.starttls()
            client.cmd("EHLO client.test")
            client.login()
            assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
            assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
            assert client.cmd("DATA").startswith("354 ")
            client.write(message(subject="freed") + b".\r\n")
            assert client.reply()[-1].startswith("250 ")
            if quit_first:
                assert client.cmd("QUIT").startswith("221 ")
        assert len(sessions) == 1
        wait_for(lambda: sessions[0]() is None, 10, "the ended session freed by its reference count")
    finally:
        gc.enable()
    assert gateway.sent[0]["body"]["asunto"] == "freed"
