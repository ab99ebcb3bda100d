"""Helpers shared by the device-compatibility tests: raw DATA, log capture, real client tools."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.smtputil import RECIPIENT, SENDER, RawClient


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def plain_blob(user: str, password: str) -> str:
    """An AUTH PLAIN response: authzid NUL authcid NUL password, base64."""
    return b64(f"\0{user}\0{password}")


def raw_send(client: RawClient, content: bytes, mail_from: str = SENDER, rcpt: str = RECIPIENT) -> str:
    """MAIL/RCPT/DATA over a RawClient; `content` is sent as is, then CRLF.CRLF. Returns the DATA reply."""
    reply = client.cmd(f"MAIL FROM:<{mail_from}>")
    assert reply.startswith("250 "), reply
    reply = client.cmd(f"RCPT TO:<{rcpt}>")
    assert reply.startswith("250 "), reply
    assert client.cmd("DATA").startswith("354 ")
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    client.write(content + b".\r\n")
    return client.reply()[-1]


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event emitted meanwhile (from any thread), as dicts with 'event' and 'log_level'."""
    with structlog.testing.capture_logs() as events:
        yield events


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


def require_tool(tool: str, package: str) -> str:
    """The path of a real client program the test needs.

    In CI (CI=true) .ci/run installs it, so a missing tool fails the test; elsewhere the test is skipped,
    naming the Debian package to install.
    """
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is not None:
        return path
    message = f"{tool} not found: apt-get install {package}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (.ci/run installs it)")
    pytest.skip(message)


def require_root(why: str) -> None:
    if os.geteuid() == 0:
        return
    message = f"needs root: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def server_connections(port: int) -> int:
    """This process's TCP sockets bound to local `port` that are not listening: the connections a listener
    on that port accepted and has not closed yet (its clients' sockets have another local port)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: TCP_LISTEN
                inodes.add(f"socket:[{inode}]")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # an fd closed meanwhile (listdir's own, another thread's)
            count += os.readlink(f"/proc/self/fd/{fd}") in inodes
    return count
