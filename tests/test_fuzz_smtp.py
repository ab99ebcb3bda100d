"""Property-based fuzzing of the SMTP command layer and of DATA against the real server over loopback.

Invariants: every reply is a well-formed SMTP reply line with an enhanced status code where RFC 2034 wants
one; no internal error, exception name or "Error:" in a reply; nothing after 221/421; the server keeps
serving; nothing reaches the upstream without a complete, valid transaction. Profiles: tests/fuzzing.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzzing import (
    LOGIN,
    MIME_TREE,
    check_reply_lines,
    message_block,
    sane_payload,
    session_script,
)
from tests.harness import LoopThread, Running, start, stop
from tests.smtputil import RECIPIENT, SENDER, RawClient, message


class FuzzTarget:
    """The gateway under fuzz and the upstream it sends to, with a repr that fits on a line (hypothesis
    prints the arguments of a failing example)."""

    def __init__(self, running: Running, upstream: Running) -> None:
        self.running, self.upstream = running, upstream

    def port(self, listener: str = "plain") -> int:
        return self.running.port(listener)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.upstream.requests

    @property
    def sent(self) -> list[dict[str, Any]]:
        return self.upstream.sent

    def __repr__(self) -> str:
        return f"<gateway on port {self.port()}>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@pytest.fixture(scope="module")
def fuzz_gateway(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """One gateway for all examples of a module (hypothesis runs many examples per test)."""
    upstream = start(loop_thread, Path(tmp_path_factory.mktemp("upstream")))
    # Generous budgets: every 250 is an upstream call made before the reply, never a message spooled after
    # a slow answer on a busy machine, which the retry worker would deliver during a later example.
    account = {"api_base": upstream.sandbox_url, "http_timeout": 60.0}
    running = start(
        loop_thread,
        Path(tmp_path_factory.mktemp("fuzz")),
        accounts={"acme": account},
        delivery={"inline_budget": 60.0},
        limits={"max_message_size": 1024 * 1024},
    )
    yield FuzzTarget(running, upstream)
    stop(running)
    stop(upstream)


# Ends a DATA left open, completes a partial line, answers a pending AUTH challenge (two lines at most),
# then QUIT: the session ends whatever state the burst left it in, and the server closes the connection.
_CLOSE = b"\r\n.\r\nQUIT\r\nQUIT\r\n"


def converse(running: FuzzTarget, chunks: list[bytes]) -> list[bytes]:
    """Send the chunks as one burst, then close the session; every reply line until the server hangs up.

    Replies are read while the burst is written: otherwise they can pile up in the server's send queue,
    and a server that closes with our unread bytes in its receive queue answers with a TCP reset, which
    discards that queue (replies the client then never sees)."""
    lines: list[bytes] = []
    with RawClient(running, timeout=20.0) as client:

        def read() -> None:
            while True:
                try:
                    line = client.file.readline()
                except (ConnectionResetError, TimeoutError, ValueError):
                    return
                if not line:
                    return
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            for chunk in chunks:
                client.sock.sendall(chunk)
            client.sock.sendall(_CLOSE)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed first (QUIT, 421, 502): what it said is still to be read
        reader.join(30.0)
        assert not reader.is_alive(), f"the server neither answered nor closed: {lines[-5:]}"
    return lines


def assert_still_serving(running: FuzzTarget, subject: str) -> None:
    before = len(running.sent)
    with RawClient(running) as client:
        client.cmd("EHLO client.test")
        assert client.login().startswith("235 ")
        assert client.cmd(f"MAIL FROM:<{SENDER}>").startswith("250 ")
        assert client.cmd(f"RCPT TO:<{RECIPIENT}>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(message(subject=subject) + b".\r\n")
        assert client.reply()[-1].startswith("250 2.0.0 Ok: queued as ")
    assert [r["body"]["asunto"] for r in running.sent[before:]] == [subject]


def queued(lines: list[bytes]) -> int:
    return sum(1 for line in lines if line.startswith(b"250 2.0.0 Ok: queued as "))


@given(script=session_script(), split=st.integers(min_value=1, max_value=4096))
def test_command_layer(fuzz_gateway: FuzzTarget, script: list[bytes], split: int) -> None:
    before = len(fuzz_gateway.requests)
    burst = b"".join(script)
    chunks = [burst[i : i + split] for i in range(0, len(burst), split)] or [b""]
    lines = converse(fuzz_gateway, chunks)
    for code in sorted({line[:3].decode("ascii", "replace") for line in lines}):
        event(f"reply {code}")  # shown by --hypothesis-show-statistics: what the fuzz reached
    event(f"messages queued: {min(queued(lines), 2)}")
    problems = check_reply_lines(lines)
    assert not problems, (problems, lines[-20:])
    # Only a complete, valid transaction reaches the upstream: one upstream call per "queued" reply.
    assert len(fuzz_gateway.requests) - before == queued(lines), lines[-20:]


def test_command_layer_leaves_the_server_serving(fuzz_gateway: FuzzTarget) -> None:
    """Runs after test_command_layer on the same server (tests of a module run in order)."""
    assert_still_serving(fuzz_gateway, "after the command fuzz")


# -- DATA ------------------------------------------------------------------------------------------------------

HEADER_LINES = [
    f"From: {SENDER}",
    f"From: =?utf-8?q?Evil=00=0D=0AName?= <{SENDER}>",
    "To: client@example.com",
    "Subject: =?utf-8?b?w6kgAA==?=",
    "Subject: caf\xe9 \x80 \x85",
    "Subject: " + "x" * 3000,
    "Subject:",
    "Content-Type: text/plain; charset=us-ascii",
    "Content-Type: text/html; charset=iso-8859-1",
    "Content-Type: multipart/mixed; boundary=zz",
    'Content-Type: multipart/alternative; boundary="zz"',
    "Content-Type: multipart/mixed",
    "Content-Transfer-Encoding: base64",
    "Content-Transfer-Encoding: quoted-printable",
    "Content-Disposition: attachment; filename*=utf-8''..%2F..%2Fevil%0D%0A.txt",
    "MIME-Version: 1.0",
    "X-Gateway-Campaign: 23",
    "X-Gateway-Archive: yes",
    "Reply-To: <>",
    "Cc: undisclosed-recipients:;",
    "Message-ID: <\x00@x>",
    "Sender: nobody@elsewhere.example",
    "\tcontinuation without a header",
    "no colon here",
]
PART_BITS = [
    "--zz",
    "--zz--",
    "--zz\r\nContent-Type: text/html\r\n\r\n<p>html \x00 part</p>",
    "--zz\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo*==junk",
    "--zz\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body",
    "--zz\r\nContent-Type: text/plain; name=/tmp/x.txt\r\n\r\nnamed text",
    ".",
    "..",
    ". leading dot",
    "=E2=82=AC",
    "4oKs",
    "\x00\x01\x02",
    "\xff\xfe",
    "\r",
    "\n.\n",
    "\r.\r",
]


@st.composite
def message_bytes(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(st.sampled_from(HEADER_LINES), max_size=8))
    body = draw(st.lists(st.sampled_from(PART_BITS) | st.text(max_size=80), max_size=12))
    text = "\r\n".join(headers) + "\r\n\r\n" + "\r\n".join(body)
    raw = text.encode("utf-8", "surrogatepass") if draw(st.booleans()) else text.encode("latin-1", "replace")
    if draw(st.booleans()):
        raw = raw.replace(b"\r\n", b"\n")
    return raw + draw(st.binary(max_size=64))


@given(raw=message_bytes() | MIME_TREE.map(lambda tree: f"From: {SENDER}\r\nTo: {RECIPIENT}\r\n".encode() + tree))
def test_data(fuzz_gateway: FuzzTarget, raw: bytes) -> None:
    before = len(fuzz_gateway.requests)
    lines = converse(
        fuzz_gateway,
        [
            b"EHLO client.test\r\n",
            LOGIN + b"\r\n",
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode(),
            message_block(raw),
        ],
    )
    problems = check_reply_lines(lines)
    assert not problems, (problems, lines)
    final = lines[next(i for i, line in enumerate(lines) if line.startswith(b"354 ")) + 1]
    event(f"DATA answered {final[:9].decode('ascii', 'replace')}")
    new = fuzz_gateway.requests[before:]
    if final.startswith(b"250 2.0.0 Ok: queued as "):
        assert len(new) == 1, final
        assert not sane_payload(new[0]["body"]), (sane_payload(new[0]["body"]), raw)
    else:
        assert final[:1] == b"5", final  # a refusal says why, permanently: the message will not get better
        assert new == [], final


def test_data_leaves_the_server_serving(fuzz_gateway: FuzzTarget) -> None:
    assert_still_serving(fuzz_gateway, "after the DATA fuzz")


def test_commands_after_quit_are_not_answered(fuzz_gateway: FuzzTarget) -> None:
    lines = converse(fuzz_gateway, [b"QUIT\r\nNOOP\r\n" + LOGIN + b"\r\nMAIL FROM:<" + SENDER.encode() + b">\r\n"])
    assert [line[:4] for line in lines] == [b"221 "]
    assert not check_reply_lines(lines)


def test_huge_line_in_a_pipelined_burst(fuzz_gateway: FuzzTarget) -> None:
    lines = converse(fuzz_gateway, [b"NOOP\r\n" + b"X" * 200_000 + b"\r\nNOOP\r\n"])
    assert not check_reply_lines(lines)
    assert [line[:10] for line in lines[:3]] == [b"250 2.0.0 ", b"500 5.5.2 ", b"250 2.0.0 "], lines


# -- regressions: what the fuzzing found, pinned ------------------------------------------------------------


def test_unknown_command_with_control_characters_gets_a_printable_reply(fuzz_gateway: FuzzTarget) -> None:
    """aiosmtpd echoes an unknown command in its 500 reply; a NUL or ESC there broke the reply line (and a
    base64 password sent after a refused AUTH came back upper-cased): the gateway never echoes it."""
    lines = converse(fuzz_gateway, [b"\x00\r\nFO\x1bO\r\n"])
    assert not check_reply_lines(lines), lines
    assert lines[:2] == [b"500 5.5.2 Command not recognized\r\n"] * 2


@pytest.mark.parametrize(
    "command",
    [b"MAIL FROM:<", b"MAIL FROM: <", b"RCPT TO:<", b"MAIL FROM:<@", b"MAIL FROM:<billing@[", b"RCPT TO:a@[1.2"],
)
def test_truncated_path_is_a_syntax_error_not_an_internal_error(fuzz_gateway: FuzzTarget, command: bytes) -> None:
    """The stdlib's address parser raised IndexError on a lone "<" and AttributeError on an unclosed domain
    literal: 451 4.3.0 Internal error before (anyone could trigger it, before AUTH)."""
    lines = converse(
        fuzz_gateway,
        [
            b"EHLO client.test\r\n",
            LOGIN + b"\r\n",
            f"MAIL FROM:<{SENDER}>\r\n".encode() if command.startswith(b"RCPT") else b"",
            command + b"\r\n",
        ],
    )
    assert not check_reply_lines(lines), lines
    assert b"553 5.1.3 malformed address\r\n" in lines, lines


_PATH_PIECES = st.sampled_from([*'<>@[]"\\().,:; \t', "a", "b", "1", "é", "\x00", "IPv6:", "::1", "=", "-", "SIZE="])
_PATHS = st.lists(st.lists(_PATH_PIECES, max_size=20).map("".join), min_size=1, max_size=6)


@given(paths=_PATHS)
def test_mail_and_rcpt_paths(fuzz_gateway: FuzzTarget, paths: list[str]) -> None:
    """The address parsers behind MAIL and RCPT: whatever the path, a reply, never an internal error."""
    commands = [f"{'MAIL FROM:' if i % 2 == 0 else 'RCPT TO:'}{path}\r\n" for i, path in enumerate(paths)]
    lines = converse(
        fuzz_gateway, [b"EHLO client.test\r\n", LOGIN + b"\r\n", "".join(commands).encode("utf-8", "surrogatepass")]
    )
    assert not check_reply_lines(lines), lines
