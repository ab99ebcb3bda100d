"""DATA spilled to a temporary file past limits.spill_above: the upstream and the ledger see exactly what they see
of the same message held in memory (dot-unstuffing across the file's writes included, inline and from the
queue), and no file is left behind, open or named, however the message ends."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import smtplib
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gateway.core.spill as spill_module
from gateway.core.spill import SpillFile
from gateway.ledger.model import Query
from gateway.ops.metrics import REGISTRY
from tests.devices_util import captured_logs, events
from tests.harness import DENGAGE_SENDER, DENGAGE_USER, PASSWORD, PASSWORD_HASH, USER, Running
from tests.smtputil import RawClient
from tests.spool_helpers import wait_for
from tests.test_cli import run_cli, write_config
from tests.test_large_messages import attachment_of, scan

MIB = 1024 * 1024
FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2}


def spilled() -> float:
    return REGISTRY.get_sample_value("smtp_gateway_messages_spilled_total") or 0.0


def open_in(directory: Path) -> list[str]:
    """This process's open files in `directory` (the gateway runs in the test's process): spill files show
    as "<directory>/#<inode> (deleted)" (O_TMPFILE) or their unlinked name."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile (listdir's own descriptor)
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


def nothing_left(directory: Path) -> None:
    wait_for(lambda: not open_in(directory), 10, f"spill files closed: {open_in(directory)}")
    assert os.listdir(directory) == []


def spilling(gateway_factory: Callable[..., Running], tmp_path: Path, above: int, **overrides: Any) -> Running:
    directory = tmp_path / "spill"
    directory.mkdir(parents=True, exist_ok=True)
    limits = {"max_message_size": 20 * MIB, "spill_above": above, "spill_dir": str(directory)}
    return gateway_factory(limits=limits, **overrides)


def message(pdf: bytes) -> bytes:
    """A message with dotted lines (smtplib stuffs them), bare-LF lines, a small and a large attachment."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "billing@acme.example", "client@example.com", "Spilled"
    msg.set_content("line one\n.a dotted line\n..two dots\n.\nend\n")
    msg.add_attachment(b"small\x00" * 100, maintype="application", subtype="octet-stream", filename="small.bin")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="scan.pdf")
    # Bare LF in the preamble-free text part's neighbour: smtplib sends bytes as given, stuffing "\n." too.
    return msg.as_bytes().replace(b"end\r\n", b"end\n.bare\nx\r\n", 1)


def submit(port: int, raw: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        code, text = client.data(raw)
    assert code == 250, text
    return text.decode()


def kept_request(gw: Running, reply: str) -> Any:
    assert gw.app.ledger_writer is not None and gw.app.ledger is not None
    gw.loop.run(gw.app.ledger_writer.flush())
    [row] = gw.loop.run(gw.app.ledger.find(Query(reply_id=reply.rsplit(" ", 1)[1]))).records
    found = gw.loop.run(gw.app.ledger.get(row.id))
    assert found is not None and found.request
    return found.request


def test_a_spilled_message_reaches_the_upstream_and_the_ledger_as_the_same_message_in_memory(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    pdf = os.urandom(700 * 1024)
    raw = message(pdf)
    in_memory = gateway_factory(limits={"max_message_size": 20 * MIB, "spill_above": 0})
    before = spilled()
    reply = submit(in_memory.port(), raw)
    assert spilled() == before
    gw = spilling(gateway_factory, tmp_path, 4096)
    spilled_reply = submit(gw.port(), raw)
    assert spilled() == before + 1
    [expected], [sent] = in_memory.sent, gw.sent
    assert sent["body"] == expected["body"] and attachment_of_named(sent, "scan.pdf") == pdf
    assert kept_request(gw, spilled_reply) == kept_request(in_memory, reply)
    nothing_left(tmp_path / "spill")


def test_a_spilled_message_reaches_a_dengage_account_as_the_same_message_in_memory(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    raw = message(os.urandom(500 * 1024)).replace(b"billing@acme.example", DENGAGE_SENDER.encode())
    bodies = []
    before = spilled()
    for above in (0, 4096):
        gw = spilling(gateway_factory, tmp_path / str(above), above, dengage={})
        with smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
            client.login(DENGAGE_USER, PASSWORD)
            client.sendmail(DENGAGE_SENDER, ["client@example.com"], raw)
        [sent] = gw.calls("send", provider="dengage", status=200)
        bodies.append(sent["body"])
        nothing_left(tmp_path / str(above) / "spill")
    assert bodies[0] == bodies[1] and "scan.pdf" in str(bodies[0])
    assert spilled() == before + 1


def test_a_spilled_message_with_nothing_to_lift_is_parsed_from_its_file_as_in_memory(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    # Text and small attachments only: no base64 body is lifted, so the parser reads the file's mapping itself
    # (the fast splitter takes bytes in memory only, and declines this one by size).
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "billing@acme.example", "client@example.com", "Long report"
    msg.set_content("".join(f"line {n}: {'report text ' * 6}\n" for n in range(4000)))
    msg.add_alternative("<p>" + "report <b>html</b> " * 8000 + "</p>", subtype="html")
    raw = msg.as_bytes()
    assert len(raw) > 300 * 1024
    in_memory = gateway_factory(limits={"max_message_size": 20 * MIB, "spill_above": 0})
    submit(in_memory.port(), raw)
    before = spilled()
    gw = spilling(gateway_factory, tmp_path, 64 * 1024)
    submit(gw.port(), raw)
    assert spilled() == before + 1
    [expected], [sent] = in_memory.sent, gw.sent
    assert sent["body"] == expected["body"]
    nothing_left(tmp_path / "spill")


def attachment_of_named(entry: dict[str, Any], name: str) -> bytes:
    [found] = [a for a in entry["body"]["adjuntos"] if a["nombre"] == name]
    return base64.b64decode(found["contenido"])


def test_dot_stuffing_and_the_terminator_across_the_files_writes(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    """The threshold is set so that the file's first write happens exactly when the first part has arrived:
    it ends between the "\\n" and the "." of a stuffed line, then between "\\r\\n." and "\\r\\n"."""
    head = b"From: billing@acme.example\r\nTo: client@example.com\r\nSubject: dots\r\n\r\n" + b"filler line\r\n" * 500
    first, rest = head + b"..x\r", b"\n..\r\n.y\r\nlast\r\n.\r\n"
    cut_in_terminator = (head + b"last\r\n.", b"\r\n")
    reference = gateway_factory()
    cases = ((first, rest), cut_in_terminator)
    for part, tail in cases:
        with RawClient(reference) as client:
            client.cmd("EHLO client.test")
            client.login()
            client.cmd("MAIL FROM:<billing@acme.example>")
            client.cmd("RCPT TO:<client@example.com>")
            client.cmd("DATA")
            assert client.cmd((part + tail)[:-2].decode()).startswith("250")
    # The first write comes once all but the last 4 bytes (a terminator may begin there) pass the threshold.
    gws = [spilling(gateway_factory, tmp_path / str(n), len(part) - 4) for n, (part, _) in enumerate(cases)]
    for gw, (part, tail) in zip(gws, cases, strict=True):
        directory = gw.settings.limits.spill_dir
        assert directory is not None
        with RawClient(gw) as client:
            client.cmd("EHLO client.test")
            client.login()
            client.cmd("MAIL FROM:<billing@acme.example>")
            client.cmd("RCPT TO:<client@example.com>")
            assert client.cmd("DATA").startswith("354")
            client.write(part)
            wait_for(lambda d=Path(directory): open_in(d), 10, "the first write to the file")
            client.write(tail)
            assert client.reply()[-1].startswith("250")
        nothing_left(Path(directory))
    assert [g.sent[0]["body"] for g in gws] == [r["body"] for r in reference.sent]
    assert reference.sent[0]["body"] != reference.sent[1]["body"]


def test_a_spilled_message_queued_during_an_outage_is_delivered_byte_identical(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    gw = spilling(gateway_factory, tmp_path, 64 * 1024, delivery=FAST)
    gw.fault(status=503, count=2, kind="send")  # the inline call and the first retry fail
    raw, pdf = scan(3 * MIB)
    reply = submit(gw.port(), raw)
    assert len(reply.rsplit(" ", 1)[1]) == 16, reply  # queued
    wait_for(lambda: len(gw.sent) == 1, 30, "retried from the queue")
    assert attachment_of(gw.sent[0]) == pdf
    nothing_left(tmp_path / "spill")


def test_a_client_gone_mid_data_leaves_no_file(gateway_factory: Callable[..., Running], tmp_path: Path) -> None:
    gw = spilling(gateway_factory, tmp_path, 64 * 1024)
    raw, _ = scan(3 * MIB)
    directory = tmp_path / "spill"
    with RawClient(gw) as client:
        client.open_data()
        client.write(raw[: 2 * MIB])
        wait_for(lambda: open_in(directory), 10, "spilling")
        client.reset_on_close()
    nothing_left(directory)
    assert gw.sent == []


def test_a_spill_directory_that_cannot_take_the_file_answers_452_and_loses_nothing_accepted(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    gw = spilling(gateway_factory, tmp_path, 64 * 1024)
    (tmp_path / "spill").rmdir()  # removed under the running gateway (check-config reports it before a start)
    raw, _ = scan(MIB)
    failures = REGISTRY.get_sample_value("smtp_gateway_spill_failures_total") or 0.0
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        assert client.data(raw) == (452, b"4.3.1 Insufficient system storage")
        # The session goes on: a message below the threshold is accepted.
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        assert client.data(b"Subject: small\r\n\r\nhi\r\n")[0] == 250
    assert REGISTRY.get_sample_value("smtp_gateway_spill_failures_total") == failures + 1
    assert len(gw.sent) == 1


def test_check_config_names_a_spill_directory_it_cannot_write(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    config = write_config(tmp_path, limits={"spill_dir": str(missing)})
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode != 0
    assert f"problem: limits.spill_dir {missing} is not a writable directory" in result.stderr
    config = write_config(tmp_path, limits={"spill_dir": str(missing), "spill_above": 0})
    assert run_cli("check-config", "-c", str(config)).returncode == 0


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=80),
    sub=st.binary(max_size=4),
    start=st.one_of(st.none(), st.integers(-90, 90)),
    end=st.one_of(st.none(), st.integers(-90, 90)),
)
def test_a_spilled_message_answers_the_bytes_methods_the_mime_code_uses_as_bytes_does(
    data: bytes, sub: bytes, start: int | None, end: int | None
) -> None:
    if not data:
        return  # a spill file is never empty
    spill = SpillFile()
    spill.write(data)
    mapped = spill.mapped()
    try:
        with _small_pieces():
            assert mapped.find(sub, start, end) == data.find(sub, start, end)
            if sub:
                assert mapped.count(sub) == data.count(sub)
            assert mapped.startswith(sub, start or 0) == data.startswith(sub, start or 0)
            assert mapped.strip() == data.strip()
    finally:
        mapped.discard()
    assert mapped.closed


@contextlib.contextmanager
def _small_pieces() -> Iterator[None]:
    """Pieces of 7 bytes: every search crosses the pieces' edges."""
    saved, spill_module._PIECE = spill_module._PIECE, 7
    try:
        yield
    finally:
        spill_module._PIECE = saved


def test_a_spilled_message_resent_with_its_idempotency_key_is_delivered_once(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    gw = spilling(gateway_factory, tmp_path, 4096)
    raw = b"X-Gateway-Idempotency-Key: scan-0001\r\n" + message(os.urandom(300 * 1024))
    first, again = submit(gw.port(), raw), submit(gw.port(), raw)
    assert first == again  # the resend is answered with the first delivery's id
    assert len(gw.sent) == 1
    nothing_left(tmp_path / "spill")


def test_a_spilled_message_of_a_test_login_sends_nothing_and_leaves_nothing(
    gateway_factory: Callable[..., Running], tmp_path: Path
) -> None:
    trial = {"username": "trial", "password_hash": PASSWORD_HASH, "campaign": 22, "test_mode": True}
    gw = spilling(gateway_factory, tmp_path, 4096, extra_users=[trial])
    before = spilled()
    with smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
        client.login("trial", PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        code, reply = client.data(message(os.urandom(300 * 1024)))
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as TEST-"), reply
    assert spilled() == before + 1 and gw.requests == []
    nothing_left(tmp_path / "spill")


def _quota_take_fails(*_: Any) -> Any:
    raise RuntimeError("quota store bug")


@pytest.mark.parametrize("way", ["quota refusal", "quota store fails", "client gone while counted"])
def test_a_spilled_message_that_never_reaches_accept_leaves_no_file_open(
    gateway_factory: Callable[..., Running], tmp_path: Path, way: str
) -> None:
    # The end of DATA can end before the pipeline has the message: the login's byte quota refuses it (552,
    # without SIZE= only known then), its quota store fails (451), or the client leaves while it is counted.
    # The session only drops its reference; the file (and its space) must go all the same.
    metered = {
        "username": "metered",
        "password_hash": PASSWORD_HASH,
        "campaign": 22,
        "quota": {"bytes_per_day": 100_000},
    }
    gw = spilling(gateway_factory, tmp_path, 64 * 1024, extra_users=[metered])
    directory = tmp_path / "spill"
    counting = threading.Event()
    per_login = gw.app.listeners.handlers["plain"].per_login
    assert per_login is not None
    if way == "quota store fails":
        per_login.quotas.take = _quota_take_fails  # type: ignore[method-assign]
    elif way == "client gone while counted":

        async def stuck(*_: Any) -> Any:
            counting.set()
            await asyncio.get_running_loop().create_future()  # a shared store's transaction that never ends

        per_login.quotas.take = stuck  # type: ignore[method-assign]
    raw, _ = scan(MIB)  # over the byte quota, and spilled
    with RawClient(gw) as client:
        client.cmd("EHLO client.test")
        assert client.login("metered", PASSWORD).startswith("235 ")
        assert client.cmd("MAIL FROM:<billing@acme.example>").startswith("250 ")  # no SIZE=
        assert client.cmd("RCPT TO:<client@example.com>").startswith("250 ")
        assert client.cmd("DATA").startswith("354 ")
        client.write(raw + b".\r\n")
        if way == "client gone while counted":
            assert counting.wait(10), "the quota store was never asked"
            assert open_in(directory), "the message was not spilled"
            client.reset_on_close()
        else:
            expected = "552 5.3.4 " if way == "quota refusal" else "451 4.3.0 "
            reply = client.reply()[-1]
            assert reply.startswith(expected), reply
    nothing_left(directory)
    assert gw.sent == []


def test_a_spill_file_that_cannot_take_a_compacted_attachment_answers_452_as_a_full_disk_during_data(
    gateway_factory: Callable[..., Running], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lifted attachment's base64 is compacted in place in the file (SpillMap.put, os.pwrite). On a
    # copy-on-write file system (btrfs, ZFS) or a thin volume that write allocates blocks: it can fail with
    # ENOSPC as any write, and is answered as a spill directory that cannot take DATA, not as a bug (451).
    gw = spilling(gateway_factory, tmp_path, 64 * 1024)
    raw, _ = scan(MIB)  # spilled, its attachment lifted and compacted in the file

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spill_module.os, "pwrite", full)  # SpillMap.put is its only caller
    failures = REGISTRY.get_sample_value("smtp_gateway_spill_failures_total") or 0.0
    bugs = REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "accept"}) or 0.0
    with captured_logs() as logs, smtplib.SMTP("127.0.0.1", gw.port(), timeout=60) as client:
        client.login(USER, PASSWORD)
        client.mail("billing@acme.example")
        client.rcpt("client@example.com")
        assert client.data(raw) == (452, b"4.3.1 Insufficient system storage")
    assert REGISTRY.get_sample_value("smtp_gateway_spill_failures_total") == failures + 1
    assert (REGISTRY.get_sample_value("smtp_gateway_internal_errors_total", {"where": "accept"}) or 0.0) == bugs
    [failed] = events(logs, "data_spill_failed")
    assert failed["directory"] == str(tmp_path / "spill") and "No space left on device" in failed["error"]
    [deferred] = events(logs, "message_deferred")
    assert deferred["reason"].endswith("limits.spill_dir: No space left on device"), deferred
    assert gw.sent == []
    nothing_left(tmp_path / "spill")
