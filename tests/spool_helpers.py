"""Shared helpers for the spool tests: send over SMTP, wait for a condition with a bounded deadline."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.queue.sqlite import SqliteQueue
from tests.harness import PASSWORD, USER

T = TypeVar("T")


def message(subject: str, to: tuple[str, ...] = ("client@example.com",), body: str = "hello", extra: str = "") -> bytes:
    head = f"From: billing@acme.example\r\nTo: {', '.join(to)}\r\nSubject: {subject}\r\n{extra}\r\n"
    return (head + body + "\r\n").encode()


def send(
    port: int,
    subject: str,
    to: tuple[str, ...] = ("client@example.com",),
    body: str = "hello",
    bcc: tuple[str, ...] = (),
    extra: str = "",
) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        for rcpt in (*to, *bcc):
            client.rcpt(rcpt)
        code, text = client.data(message(subject, to, body, extra))
    return code, text.decode()


def wait_for(check: Callable[[], T | None], timeout: float = 15.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def spool_rows(path: Path, *states: str) -> list[dict[str, object]]:
    """The queue's messages in these states (all by default), read as the queue CLI would."""

    async def read() -> list[dict[str, object]]:
        store = SqliteQueue(path)
        try:
            return await store.list(states or ("queued", "inflight", "dead"))
        finally:
            await store.close()

    return asyncio.run(read())


def make_queue(path: Path) -> Path:
    """An (empty) SQLite queue as `serve` leaves it: made by the queue store itself."""

    async def make() -> None:
        store = SqliteQueue(path)
        try:
            await store.open()
        finally:
            await store.close()

    asyncio.run(make())
    return path
