"""Limits against a real gateway on loopback: sessions in total and per client IP (127.0.0.1 vs 127.0.0.2),
the idle and DATA deadlines (a slowloris no longer holds its slot), commands before DATA, messages per
login. A bad actor on one address never denies service to another."""

from __future__ import annotations

import base64
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import pytest

from gateway.core.replies import codes
from gateway.ops.metrics import REGISTRY
from gateway.smtp.server import Listeners
from tests.devices_util import captured_logs, events, raw_send
from tests.harness import PASSWORD, PASSWORD_HASH, USER, LoopThread, Running, start, stop
from tests.ops_util import captured_with_context, start_data
from tests.smtputil import RECIPIENT, SENDER, RawClient, message
from tests.spool_helpers import wait_for

Factory = Callable[..., Running]
OTHER = "other-user"


def listeners(gw: Running) -> Listeners:
    assert gw.app.listeners is not None
    return gw.app.listeners


def greeting(gw: Running, source: str) -> str:
    with socket.create_connection(("127.0.0.1", gw.port()), timeout=10, source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline().decode().rstrip("\r\n")


def test_sessions_per_ip_are_limited_and_other_addresses_unaffected(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_sessions_per_ip": 3})
    with ExitStack() as stack, captured_logs() as logs:
        held = [stack.enter_context(RawClient(gw, source="127.0.0.1")) for _ in range(3)]
        assert all(c.greeting[-1].startswith("220 ") for c in held)
        assert greeting(gw, "127.0.0.1") == "421 4.7.0 Too many connections from your address, try again later"
        # Another client address is served at once, and can send.
        with RawClient(gw, source="127.0.0.2") as other:
            assert other.greeting[-1].startswith("220 ")
            other.cmd("EHLO other.test")
            assert other.login().startswith("235 ")
            assert raw_send(other, message(subject="from .2")).startswith("250 2.0.0 ")
        # A session that ends frees its slot at once.
        held[0].close()
        wait_for(lambda: len(listeners(gw).sessions) == 2, 10, "the closed session released")
        assert greeting(gw, "127.0.0.1").startswith("220 ")
    [refused] = events(logs, "connection_refused")
    assert (refused["reason"], refused["client"], refused["limit"]) == ("max_sessions_per_ip", "127.0.0.1", 3)


def test_total_sessions_are_limited(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_sessions": 2})
    with RawClient(gw, source="127.0.0.1"), RawClient(gw, source="127.0.0.2"):
        assert greeting(gw, "127.0.0.3") == "421 4.7.0 Too many connections, try again later"
    wait_for(lambda: not listeners(gw).sessions, 10, "sessions released")
    assert greeting(gw, "127.0.0.3").startswith("220 ")


def test_connect_and_close_flood_releases_every_slot(gateway_factory: Factory) -> None:
    """In-process (the asyncio loop); tests/test_hostile_serve.py floods `serve` on uvloop."""
    gw = gateway_factory(limits={"max_sessions": 20, "max_sessions_per_ip": 20})
    before = _handled()
    for _ in range(60):
        socket.create_connection(("127.0.0.1", gw.port()), timeout=10).close()
    # Connections the kernel queued faster than they were accepted may be refused while the session
    # slots are taken: wait until the gateway has seen all 60, then every slot must be free.
    wait_for(lambda: _handled() - before >= 60, 10, "the 60 connections handled")
    wait_for(lambda: not listeners(gw).sessions, 10, "every session released")
    assert greeting(gw, "127.0.0.1").startswith("220 ")


def _handled() -> float:
    """Connections the plain listeners took as sessions or refused for max_sessions (process-wide)."""
    return sum(
        REGISTRY.get_sample_value(name, {"listener": "plain", **labels}) or 0.0
        for name, labels in (
            ("smtp_gateway_sessions_total", {}),
            ("smtp_gateway_connections_refused_total", {"reason": "max_sessions"}),
        )
    )


def test_idle_client_is_told_and_cut_off(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"command_timeout": 1.0})
    with captured_with_context() as logs, RawClient(gw) as client:
        # Says nothing after the greeting: the server speaks first.
        assert client.reply()[-1] == "421 4.4.2 gw.test Error: timeout exceeded, closing connection"
        assert client.closed()
    wait_for(lambda: not listeners(gw).sessions, 10, "session released")
    [line] = events(logs, "session_timeout")
    assert line["limit"] == "command_timeout"
    assert line["session"] and line["peer"].startswith("127.0.0.1:")  # a timer's line carries the session too


def test_each_command_gives_an_idle_client_its_whole_timeout_again(gateway_factory: Factory) -> None:
    """command_timeout counts from the last command: a client that keeps talking stays, however long in all;
    once silent, it is cut off no sooner than the timeout after its last command."""
    gw = gateway_factory(limits={"command_timeout": 2.0})
    with RawClient(gw) as client:  # the greeting read
        started = time.monotonic()
        for _ in range(5):  # 3 s in all: past the timeout, never silent for as long (1.4 s to spare each time)
            time.sleep(0.6)
            assert client.cmd("NOOP").startswith("250 ")
        last = time.monotonic()
        assert last - started > 2.0
        assert client.reply()[-1] == "421 4.4.2 gw.test Error: timeout exceeded, closing connection"
        # The timeout counts from the server's reading of the last NOOP, a little before `last` (its reply's
        # way back to this thread, which a loaded machine can stretch): a timer left at an earlier deadline
        # would have cut a NOOP above instead.
        assert time.monotonic() - last >= 1.5
        assert client.closed()


def test_a_delivery_slower_than_command_timeout_is_answered_not_timed_out(gateway_factory: Factory) -> None:
    """command_timeout is for a silent client, not for one waiting for its message's delivery (which may take
    inline_budget, then the queue's store): the timer used to fire during it, telling the client 421 (send it
    again) for a message that was then delivered. It runs again from the reply on."""
    gw = gateway_factory(limits={"command_timeout": 1.0}, delivery={"inline_budget": 5.0})
    gw.fault(delay=2.5, count=1, kind="send")  # the upstream answers within the inline budget
    with RawClient(gw) as client:
        client.open_data()
        client.write(message(subject="slow upstream") + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 ")
        assert client.reply()[-1] == "421 4.4.2 gw.test Error: timeout exceeded, closing connection"
        assert client.closed()
    assert [r["body"]["asunto"] for r in gw.requests] == ["slow upstream"]


def _slowloris(gw: Running, source: str, stop: threading.Event, outcome: list[str]) -> None:
    """DATA, then one byte at a time, never the final dot."""
    with RawClient(gw, source=source) as client:
        start_data(client, "slow.test")
        for byte in b"Subject: slow\r\n\r\n" * 1000:
            if stop.is_set():
                return
            readable, _, _ = select.select([client.sock], [], [], 0.2)
            if readable:  # only the server's deadline speaks now
                outcome.append(client.reply()[-1])
                return
            try:
                client.write(bytes([byte]))
            except OSError:
                outcome.append("closed")
                return


def test_data_slowloris_is_cut_off_and_locks_nobody_out(gateway_factory: Factory) -> None:
    """Before: bytes trickling in reset the timeout, so a slow DATA never ended; N of them took every slot."""
    gw = gateway_factory(limits={"max_sessions": 3, "data_timeout": 3.0, "command_timeout": 10.0})
    stop = threading.Event()
    outcomes: list[list[str]] = [[] for _ in range(3)]
    with captured_logs() as logs:
        threads = [
            threading.Thread(target=_slowloris, args=(gw, f"127.0.0.{n + 1}", stop, outcomes[n])) for n in range(3)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: sum(s.in_data for s in listeners(gw).sessions) == 3, 10, "three sessions in DATA")
            assert greeting(gw, "127.0.0.9").startswith("421 ")  # every slot is taken meanwhile
            for thread in threads:
                thread.join(20)
        finally:
            stop.set()
        assert [o[:1] for o in outcomes] == [
            ["421 4.4.2 gw.test Error: DATA not completed within 3 s, closing connection"]
        ] * 3
        wait_for(lambda: not listeners(gw).sessions, 10, "slots released")
        with RawClient(gw, source="127.0.0.9") as client:
            client.cmd("EHLO fine.test")
            assert client.login().startswith("235 ")
            assert raw_send(client, message(subject="after the slowloris")).startswith("250 2.0.0 ")
    aborted = events(logs, "message_aborted")
    assert [a["reason"] for a in aborted] == ["data_timeout"] * 3
    assert [r["body"]["asunto"] for r in gw.sent] == ["after the slowloris"]


def test_data_timeout_is_for_the_whole_data_phase_not_per_chunk(gateway_factory: Factory) -> None:
    """A message that arrives in time is not cut off however it is split."""
    gw = gateway_factory(limits={"data_timeout": 3.0})
    with RawClient(gw) as client:
        start_data(client, "ok.test")
        for part in (message(subject="in parts")[:20], message(subject="in parts")[20:], b".\r\n"):
            client.write(part)
        assert client.reply()[-1].startswith("250 2.0.0 ")


def test_commands_before_data_are_limited(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_commands_before_data": 5})
    with captured_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO chatty.test")
        assert client.login().startswith("235 ")
        # A message resets the count: a persistent session sends as many as it likes.
        for n in range(3):
            assert client.cmd("NOOP").startswith("250 ")
            assert client.cmd("RSET").startswith("250 ")
            assert raw_send(client, message(subject=f"message {n}")).startswith("250 2.0.0 ")
        # Refused MAIL/RCPT count like any other command.
        assert client.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("553 ")
        for _ in range(4):
            assert client.cmd("NOOP").startswith("250 ")
        assert client.cmd("NOOP") == "421 4.7.0 Too many commands without sending mail, closing connection"
        assert client.closed()
    [cut] = events(logs, "session_cut_off")
    assert cut["limit"] == "max_commands_before_data"


def test_noop_before_each_message_on_a_long_connection(gateway: Running) -> None:
    # A connection pool (JavaMail's isConnected()) checks its connection with NOOP before each message: the
    # NOOP limit (100) holds per message, not per connection (Postfix's smtpd_junk_command_limit).
    with RawClient(gateway) as client:
        client.cmd("EHLO pool.test")
        assert client.login().startswith("235 ")
        for n in range(105):
            assert client.cmd("NOOP").startswith("250 "), f"message {n}"
            assert raw_send(client, message(subject=f"pooled {n}")).startswith("250 2.0.0 "), f"message {n}"
    assert len(gateway.sent) == 105


def test_command_counts_restart_after_a_message_but_not_auth(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_commands_before_data": 1000})
    with captured_logs() as logs:
        with RawClient(gw) as client:
            client.cmd("EHLO chatty.test")
            for _ in range(9):  # AUTH's limit is 10 per connection
                assert client.cmd("AUTH UNKNOWN").startswith("504 ")
            assert client.login().startswith("235 ")  # the tenth
            for n in range(2):
                for _ in range(20):
                    assert client.cmd("HELP").startswith("250 ")
                for _ in range(4):
                    assert client.cmd("BOGUS") == "500 5.5.2 Command not recognized"
                assert raw_send(client, message(subject=f"message {n}")).startswith("250 2.0.0 ")
            # A refused message restarts nothing.
            for _ in range(20):
                client.cmd("HELP")
            assert client.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("553 ")
            assert client.cmd("HELP") == "421 4.7.0 HELP sent too many times"
            assert client.closed()
        with RawClient(gw) as client:
            client.cmd("EHLO chatty.test")
            for _ in range(4):
                client.cmd("BOGUS")
            assert client.cmd("BOGUS") == "502 5.5.1 Too many unrecognized commands, goodbye."
            assert client.closed()
        with RawClient(gw) as client:
            client.cmd("EHLO chatty.test")
            for _ in range(9):
                client.cmd("AUTH UNKNOWN")
            assert client.login().startswith("235 ")
            assert raw_send(client, message(subject="after ten AUTH")).startswith("250 2.0.0 ")
            # AUTH is a security limit: counted for the whole connection.
            assert client.cmd("AUTH PLAIN") == "421 4.7.0 AUTH sent too many times"
            assert client.closed()
    cuts = [(cut["limit"], cut["command"]) for cut in events(logs, "session_cut_off")]
    assert cuts == [("command_call_limit", "HELP"), ("unknown_commands", "unknown"), ("command_call_limit", "AUTH")]


# Lines aiosmtpd answers itself, before any command lookup: each is an unrecognised command all the same.
JUNK_LINES = {"empty": b"\r\n", "8bit-verb": b"\xc3\xa9HLO x\r\n", "too-long": b"NOOP " + b"x" * 600 + b"\r\n"}


@pytest.mark.parametrize("junk", JUNK_LINES.values(), ids=JUNK_LINES.keys())
def test_junk_lines_count_as_unrecognised_commands(gateway: Running, junk: bytes) -> None:
    """Without this, a client kept its session (and per-IP) slot for ever with one junk line per
    command_timeout: the fifth ends the session, as the fifth unknown command does."""
    with captured_logs() as logs, RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.write(junk * 7)  # pipelined: the lines behind the fifth get no reply
        replies = [client.reply()[-1] for _ in range(5)]
        assert client.closed()
    assert replies[:4] == [replies[0]] * 4 and replies[0].startswith("500 5.5.2 "), replies
    assert replies[4] == "502 5.5.1 Too many unrecognized commands, goodbye."
    assert [(cut["limit"], cut["command"]) for cut in events(logs, "session_cut_off")] == [
        ("unknown_commands", "unknown")
    ]


def test_junk_lines_count_towards_max_commands_before_data(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_commands_before_data": 5})
    with RawClient(gw) as client:
        client.cmd("EHLO chatty.test")
        for _ in range(3):
            assert client.cmd("NOOP").startswith("250 ")
        assert client.cmd("") == "500 5.5.2 Syntax error"  # the fifth command
        assert client.cmd("") == "421 4.7.0 Too many commands without sending mail, closing connection"
        assert client.closed()


# A pipelining client past a limit, in one write: (the line sent, the limit, the reply that ends the session).
PIPELINED_PAST = {
    "NOOP": (b"NOOP\r\n" * 110, "command_call_limit", "421 4.7.0 NOOP sent too many times"),
    "RSET": (b"RSET\r\n" * 110, "max_commands_before_data", "421 4.7.0 Too many commands without sending mail"),
    "unknown": (b"BOGUS\r\n" * 10, "unknown_commands", "502 5.5.1 Too many unrecognized commands, goodbye."),
    "junk": (b"\r\n" * 10, "unknown_commands", "502 5.5.1 Too many unrecognized commands, goodbye."),
}


@pytest.mark.parametrize("case", PIPELINED_PAST.keys())
def test_a_pipelining_client_past_a_limit_is_cut_off_once(
    loop_thread_any: LoopThread, tmp_path: Path, case: str
) -> None:
    """The lines behind the one that ended the session are not handled: before, the next could hit a limit
    again (or another one), logged and counted twice. One reply ends the
    session, one session_cut_off line, one count (docs/limits.md), on both loops."""
    lines, limit, last = PIPELINED_PAST[case]

    def hits() -> float:
        return REGISTRY.get_sample_value("smtp_gateway_limit_hits_total", {"limit": limit}) or 0.0

    # NOOP: max_commands_before_data (100 by default) would come first.
    gw = start(loop_thread_any, tmp_path, limits={"max_commands_before_data": 1000} if case == "NOOP" else {})
    try:
        before = hits()
        with captured_logs() as logs, RawClient(gw) as client:
            client.cmd("EHLO pipelining.test")
            client.write(lines)
            received = []
            with suppress(OSError):
                while raw := client.file.readline():
                    received.append(raw.decode().rstrip("\r\n"))
            wait_for(lambda: not listeners(gw).sessions, 10, "the session ended")
        ends = [line for line in received if line[:3] in ("421", "502")]
        assert ends and ends[0].startswith(last), received
        assert len(ends) == 1, ends
        assert [cut["limit"] for cut in events(logs, "session_cut_off")] == [limit]
        assert hits() - before == 1
    finally:
        stop(gw)


def test_the_line_that_hits_the_unknown_command_limit_is_not_logged(gateway: Running) -> None:
    """A client that goes on sending its base64 AUTH lines after AUTH was refused (or never started): each is
    an unknown command, and the fifth ends the session. Its line (base64 of a password, upper-cased by the
    parser) is in no log line, as in no reply."""
    secret = "Tr0ub4dor&3-horse"
    line = base64.b64encode(secret.encode()).decode()
    with captured_logs() as logs, RawClient(gateway) as client:
        client.cmd("EHLO script.test")
        for _ in range(4):
            assert client.cmd("BOGUS") == "500 5.5.2 Command not recognized"
        assert client.cmd(line).startswith("502 ")  # the fifth: the session ends
        assert client.closed()
    [cut] = events(logs, "session_cut_off")
    assert (cut["limit"], cut["command"]) == ("unknown_commands", "unknown")
    assert line.upper() not in repr(logs).upper(), [e for e in logs if line.upper() in repr(e).upper()]


def test_messages_per_minute_per_login(gateway_factory: Factory) -> None:
    gw = gateway_factory(
        limits={"messages_per_minute": 2},
        extra_users=[{"username": OTHER, "password_hash": PASSWORD_HASH, "campaign": 22}],
    )
    with captured_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO busy.test")
        assert client.login().startswith("235 ")
        for n in range(2):
            assert raw_send(client, message(subject=f"busy {n}")).startswith("250 2.0.0 ")
        reply = client.cmd(f"MAIL FROM:<{SENDER}>")
        assert reply.startswith(f"451 4.7.1 Message rate limit reached for {USER}; try again in ")
        # Another login is not slowed down by this one.
        with RawClient(gw) as other:
            other.cmd("EHLO calm.test")
            assert other.login(OTHER, PASSWORD).startswith("235 ")
            assert raw_send(other, message(subject="calm")).startswith("250 2.0.0 ")
    [limited] = events(logs, "message_rate_limited")
    assert limited["login"] == USER


def test_a_refused_mail_costs_no_message_of_the_rate(gateway_factory: Factory) -> None:
    # messages_per_minute counts accepted MAILs (docs/per-login.md): refusals for the sender or the quota do not
    # use up the rate.
    gw = gateway_factory(limits={"messages_per_minute": 2})
    with RawClient(gw) as client:
        client.cmd("EHLO busy.test")
        assert client.login().startswith("235 ")
        for n in range(2):
            for _ in range(3):
                assert client.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("553 ")
            assert raw_send(client, message(subject=f"busy {n}")).startswith("250 2.0.0 ")
        assert client.cmd("MAIL FROM:<someone@elsewhere.example>").startswith("451 4.7.1 Message rate limit")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("451 4.7.1 Message rate limit")
    assert len(gw.sent) == 2


def test_too_many_recipients_is_logged(gateway_factory: Factory) -> None:
    gw = gateway_factory(limits={"max_recipients": 1})
    with captured_logs() as logs, RawClient(gw) as client:
        client.cmd("EHLO many.test")
        assert client.login().startswith("235 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd("RCPT TO:<a@example.com>").startswith("250 ")
        assert client.cmd("RCPT TO:<b@example.com>") == "452 4.5.3 Too many recipients"
    [line] = [e for e in events(logs, "recipient_rejected")]
    assert line["reply"] == "452 4.5.3 Too many recipients"


def test_starttls_is_counted_for_the_whole_connection(gateway_factory: Factory) -> None:
    """STARTTLS 2 per connection (docs/limits.md): the handshake, then a STARTTLS inside TLS (refused, the
    session goes on encrypted), and the third ends the connection; a message sent between restarts nothing."""
    gw = gateway_factory(listeners=[{"name": "starttls", "address": "127.0.0.1", "port": 0, "tls": "starttls"}])
    with RawClient(gw, "starttls") as client:
        client.cmd("EHLO printer.test")
        client.starttls()
        client.cmd("EHLO printer.test")
        assert client.login().startswith("235 ")
        assert client.cmd("STARTTLS") == "554 5.5.1 TLS already active"
        assert raw_send(client, message(subject="between")).startswith("250 2.0.0 ")
        assert client.cmd("STARTTLS") == "421 4.7.0 STARTTLS sent too many times"
        assert client.closed()
    assert len(gw.sent) == 1


@pytest.fixture
def every_refusal(gateway_factory: Factory) -> Iterator[tuple[Running, list[dict[str, Any]]]]:
    gw = gateway_factory(
        listeners=[
            {"name": "plain", "address": "127.0.0.1", "port": 0, "tls": "none", "allow_insecure_auth": True},
            {"name": "starttls", "address": "127.0.0.1", "port": 0, "tls": "starttls"},
        ],
        limits={"max_message_size": 2048},
    )
    with captured_logs() as logs:
        yield gw, logs


def test_every_refusal_is_logged_once(every_refusal: tuple[Running, list[dict[str, Any]]]) -> None:
    """552, 530, 538, 504, 503, 500, 501 ...: each refusal the client sees is one log line."""
    gw, logs = every_refusal
    seen: list[str] = []
    with RawClient(gw, "starttls") as client:
        client.cmd("EHLO refused.test")
        seen.append(client.login())  # 538: AUTH before TLS
        seen.append(client.cmd(f"MAIL FROM:<{SENDER}>"))  # 530
    with RawClient(gw) as client:
        seen.append(client.cmd("MAIL FROM:<a@b.example>"))  # 503 before EHLO
        client.cmd("EHLO refused.test")
        seen.append(client.cmd("AUTH CRAM-MD5"))  # 504
        seen.append(client.cmd("BOGUS"))  # 500
        assert client.login().startswith("235 ")
        seen.append(client.cmd("RCPT TO:<x@example.com>"))  # 503 need MAIL
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(b"Subject: big\r\n\r\n" + b"x" * 4096 + b"\r\n.\r\n")
        seen.append(client.reply()[-1])  # 552
    assert [codes(s) for s in seen] == [
        "538 5.7.11",
        "530 5.7.0",
        "503 5.5.1",
        "504 5.5.4",
        "500 5.5.2",
        "503 5.5.1",
        "552 5.3.4",
    ]
    logged = [e.get("reply") for e in logs if e.get("reply", "")[:1] in ("4", "5")]
    assert logged == seen
    [big] = events(logs, "message_rejected")
    assert big["reply"] == seen[-1] and big["rcpts"] == 1 and big["login"] == USER


def test_one_summary_line_per_data(gateway_factory: Factory) -> None:
    gw = gateway_factory()
    with captured_with_context() as logs, RawClient(gw) as client:
        client.cmd("EHLO summary.test")
        assert client.login().startswith("235 ")
        reply = raw_send(client, message(subject="summarised"))
        assert reply.startswith("250 2.0.0 ")
        refused = raw_send(client, message(subject="bad from", sender="mallory@evil.example"))
        assert refused.startswith("550 5.7.1 ")
    summaries = [e for e in logs if e["event"].startswith("message_") and "duration" in e]
    assert [e["event"] for e in summaries] == ["message_accepted", "message_rejected"]
    accepted, rejected = summaries
    assert accepted["upstream_id"] == reply.rsplit(" ", 1)[1]
    assert (accepted["login"], accepted["account"], accepted["sender"], accepted["rcpts"]) == (USER, "acme", SENDER, 1)
    assert accepted["size"] == len(message(subject="summarised")) and accepted["duration"] >= 0
    assert rejected["reply"] == refused and "evil.example" in rejected["reason"]
    # Every line of the session carries its id (bound in the session's task), and the same one.
    session_lines = [
        e for e in logs if e["event"] in ("auth_ok", "message_sent", "message_accepted", "message_rejected")
    ]
    assert len({e["session"] for e in session_lines}) == 1 and all(e["listener"] == "plain" for e in session_lines)
