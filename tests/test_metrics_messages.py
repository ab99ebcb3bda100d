"""smtp_gateway_messages_total counts every message whose data the client sent, once, by the class of the reply
to it: the session's own replies at the end of DATA (552 over max_message_size, 452 with no room to spill, 451
for a bug outside the pipeline) as well as the pipeline's, and a DATA refused before 354 not at all."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import PASSWORD, USER, Running
from tests.ops_util import sample
from tests.smtputil import RawClient

KIB = 1024
SMALL = b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: small\r\n\r\nhi\r\n"


def counts() -> dict[str, float]:
    return {result: sample("smtp_gateway_messages_total", result=result) for result in ("2xx", "4xx", "5xx")}


def moved(before: dict[str, float]) -> dict[str, float]:
    after = counts()
    return {result: after[result] - before[result] for result in after if after[result] != before[result]}


def data(client: smtplib.SMTP, raw: bytes) -> int:
    client.mail("billing@acme.example")
    client.rcpt("client@example.com")
    code, _ = client.data(raw)
    return code


def test_every_reply_to_a_messages_data_is_counted_once_by_its_class(
    gateway_factory: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "spill"
    directory.mkdir()
    limits = {"max_message_size": 256 * KIB, "spill_above": 64 * KIB, "spill_dir": str(directory)}
    gw = gateway_factory(limits=limits)
    big = SMALL + (b"x" * 998 + b"\r\n") * 200  # spilled: well past spill_above, within max_message_size
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
        client.login(USER, PASSWORD)

        before = counts()
        assert data(client, SMALL) == 250
        assert moved(before) == {"2xx": 1}

        # Read to its end, then refused by the session (the pipeline never sees it).
        before = counts()
        assert data(client, SMALL + (b"y" * 998 + b"\r\n") * 300) == 552
        assert moved(before) == {"5xx": 1}

        # No room to keep it: the spill directory is gone (452 4.3.1 from the session, not the pipeline).
        directory.rmdir()
        before = counts()
        assert data(client, big) == 452
        assert moved(before) == {"4xx": 1}

        # A bug in the pipeline: answered 451 by the pipeline itself, counted there once (not again).
        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("unexpected")

        monkeypatch.setattr(gw.app.pipeline, "prepare", broken)
        before = counts()
        assert data(client, SMALL) == 451
        assert moved(before) == {"4xx": 1}

        # A bug before the pipeline answers (the handler's hook fails): the session's 451.
        monkeypatch.setattr(gw.app.pipeline, "accept", broken)
        before = counts()
        assert data(client, SMALL) == 451
        assert moved(before) == {"4xx": 1}


def test_a_data_command_refused_before_354_is_no_message(gateway: Running) -> None:
    before = counts()
    with RawClient(gateway) as client:
        client.cmd("EHLO client.test")
        client.login()
        client.cmd("MAIL FROM:<billing@acme.example>")
        assert client.cmd("DATA").startswith("503 ")  # no RCPT yet
    assert moved(before) == {}
