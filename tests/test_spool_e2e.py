"""Store-and-forward end to end (in-process gateway + sandbox): outage, drain in order, dead letters,
the shielded inline call, per-leg retries, passthrough, and a full or read-only spool (452 4.3.1)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Running
from tests.spool_helpers import send, spool_rows, wait_for

FAST = {"retry_schedule": [0.3], "retry_jitter": 0.0, "poll_interval": 0.2, "inline_budget": 2.0}


def _subjects(gw: Running) -> list[str]:
    return [r["body"].get("asunto") for r in gw.sent]


def test_outage_spools_then_drains_in_order_then_dead_letters(gateway_factory: Callable[..., Running]) -> None:
    # Tried again once after 0.3 s, then not for an hour: the outage ends while every message waits (ending it
    # during a round of retries would let the message being tried then go first).
    gw = gateway_factory(delivery={**FAST, "concurrency": 1, "retry_schedule": [0.3, 3600]})
    gw.fault(status=503, count=None)
    replies = [send(gw.port(), f"outage {i}") for i in range(6)]
    assert all(code == 250 for code, _ in replies)
    ids = [text.rsplit(" ", 1)[1] for _, text in replies]
    assert all(len(i) == 16 for i in ids)  # local ids, not upstream eeids
    path = gw.settings.delivery.spool_path
    assert sorted(r["id"] for r in spool_rows(path, "queued", "inflight")) == sorted(ids)

    def waiting() -> bool:
        rows = spool_rows(path)
        return len(rows) == 6 and all(r["attempts"] == 2 and r["state"] == "queued" for r in rows)

    wait_for(waiting, what="a retry during the outage, then an hour's wait")
    assert gw.sent == []
    gw.clear_faults()
    # The upstream is back: the next message goes through at once, and its success wakes the queue, which
    # drains oldest first instead of waiting out the hour.
    assert send(gw.port(), "after the outage")[0] == 250
    wait_for(lambda: len(gw.sent) == 7, what="drain")
    assert _subjects(gw) == ["after the outage", *(f"outage {i}" for i in range(6))]
    wait_for(lambda: spool_rows(path) == [] or None, what="spool empty")


def test_dead_letter_after_lifetime(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery={**FAST, "max_lifetime": 1.0})
    gw.fault(status=500, count=None)
    code, text = send(gw.port(), "doomed")
    assert code == 250
    path = gw.settings.delivery.spool_path
    [dead] = wait_for(lambda: spool_rows(path, "dead"), what="dead letter")
    assert dead["id"] == text.rsplit(" ", 1)[1]
    assert dead["dead_reason"].startswith("expired") and "500" in dead["dead_reason"]
    assert gw.sent == []


def test_slow_upstream_is_not_cancelled_and_not_resent(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery={**FAST, "inline_budget": 0.3})
    gw.fault(delay=1.0, count=1)
    code, text = send(gw.port(), "slow")
    assert code == 250
    local_id = text.rsplit(" ", 1)[1]
    assert len(local_id) == 16
    path = gw.settings.delivery.spool_path
    assert [r["state"] for r in spool_rows(path)] == ["inflight"]
    wait_for(lambda: spool_rows(path) == [] or None, what="background call recorded")
    assert len(gw.sent) == 1  # finished in the background, recorded as delivered, not retried


def test_retry_sends_only_the_failed_leg_in_the_same_batch(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    gw.fault(delay=0, count=1)  # a no-op fault: lets the first call through
    gw.fault(status=500, count=1)  # ... and fails the second leg
    code, text = send(gw.port(), "two legs", to=("a@example.com", "b@example.com"), bcc=("c@example.com",))
    assert code == 250
    wait_for(lambda: len(gw.sent) == 2, what="retried leg")
    first, second = gw.sent
    assert first["body"]["contacto"]["email"] == "a@example.com"
    assert first["body"]["copia_oculta"] == [{"bcc_email": "c@example.com"}]
    assert second["body"]["contacto"]["email"] == "b@example.com"
    assert second["body"]["reuse_eeid"] is True and second["body"]["eeid"] == first["upstream_id"]
    assert text.endswith(first["upstream_id"])  # the client got the batch id from the first leg
    wait_for(lambda: spool_rows(gw.settings.delivery.spool_path) == [] or None, what="spool empty")


def test_passthrough_never_spools(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery={**FAST, "mode": "passthrough", "inline_budget": 0.3})
    gw.fault(status=500, count=1)
    code, text = send(gw.port(), "pass")
    assert (code, text[:5]) == (451, "4.4.1")
    gw.fault(delay=1.0, count=1)
    code, text = send(gw.port(), "slow pass")
    assert (code, text[:5]) == (451, "4.4.1") and "inline budget" in text
    assert spool_rows(gw.settings.delivery.spool_path) == []


def test_permanent_refusal_stays_5xx(gateway_factory: Callable[..., Running]) -> None:
    gw = gateway_factory(delivery=FAST)
    gw.fault(status=400, count=1, reason="contenido invalido")
    code, text = send(gw.port(), "refused")
    assert code == 554 and "contenido invalido" in text
    assert spool_rows(gw.settings.delivery.spool_path) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, so the spool's disk can really fill up or become read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system to its last block with one file; returns it (unlink it to make room)."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    return filler


def test_full_disk_answers_452_never_250(gateway_factory: Callable[..., Running], small_fs: Path) -> None:
    gw = gateway_factory(delivery={**FAST, "spool_path": str(small_fs / "spool.sqlite3")})
    gw.fault(status=503, count=None)
    filler = fill(small_fs)
    code, text = send(gw.port(), "no room", body="y" * 300_000)
    assert (code, text[:5]) == (452, "4.3.1")
    filler.unlink()
    code, text = send(gw.port(), "room again", body="y" * 300_000)
    assert code == 250


def test_read_only_spool_answers_452(gateway_factory: Callable[..., Running], small_fs: Path) -> None:
    # The tmpfs is remounted read-only before the server starts (a mounted file system with the spool open
    # for writing cannot be remounted read-only: EBUSY). The server still starts; the healthy path works.
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    gw = gateway_factory(delivery={**FAST, "spool_path": str(small_fs / "spool.sqlite3")})
    code, _ = send(gw.port(), "healthy path needs no spool")
    assert code == 250
    gw.fault(status=503, count=None)
    code, text = send(gw.port(), "read only")
    assert (code, text[:5]) == (452, "4.3.1")
    assert len(gw.sent) == 1


def test_a_full_disk_does_not_stall_retries_of_stored_messages(
    gateway_factory: Callable[..., Running], small_fs: Path
) -> None:
    """The queue keeps a reserve beside it; when the disk fills up, the reserve is released so that the
    messages already stored are still claimed, delivered and deleted, while new ones get 452."""
    gw = gateway_factory(delivery={**FAST, "spool_path": str(small_fs / "spool.sqlite3"), "spool_reserve": 512 * 1024})
    gw.fault(status=503, count=None)
    stored = [send(gw.port(), f"stored {i}", body="y" * 20_000) for i in range(5)]
    assert all(code == 250 for code, _ in stored)
    fill(small_fs)
    gw.clear_faults()
    wait_for(lambda: len(gw.sent) == 5, what="stored messages delivered on a full disk")
    wait_for(lambda: spool_rows(gw.settings.delivery.spool_path) == [] or None, what="and deleted")
    code, text = send(gw.port(), "new while full", body="y" * 300_000)
    assert (code, text[:5]) in ((250, "2.0.0"), (452, "4.3.1"))  # delivered inline, or no room to store it


def test_a_queue_that_filled_its_own_disk_recovers_alone_once_drained(
    gateway_factory: Callable[..., Running], small_fs: Path
) -> None:
    """A real 2 MiB tmpfs filled by nothing but the queue: while the upstream is down, messages are queued
    until the queue has no room (452, /readyz 503). Once the backlog is delivered, the space the queue freed
    goes back to the file system (incremental vacuum, WAL truncated), the reserve is taken back, and new
    messages are queued again (and /readyz is 200) with nobody touching the disk."""
    spool = small_fs / "spool.sqlite3"
    gw = gateway_factory(delivery={**FAST, "spool_path": str(spool), "spool_reserve": 512 * 1024}, http={"port": 0})
    assert gw.app.operator is not None
    readyz = f"http://127.0.0.1:{gw.app.operator.port}/readyz"
    gw.fault(status=503, count=None)
    queued = 0
    while (reply := send(gw.port(), f"backlog {queued}", body="y" * 20_000))[0] == 250:
        queued += 1
        assert queued < 200, "the queue never filled the disk"
    assert reply[1].startswith("4.3.1 ") and queued >= 10
    wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 503 or None, what="/readyz 503 while full")
    gw.clear_faults()
    wait_for(lambda: len(gw.sent) == queued, 30, "the backlog delivered")
    wait_for(lambda: spool_rows(spool) == [] or None, what="and deleted")
    gw.fault(status=503, count=1)  # the next message needs the queue again
    wait_for(lambda: send(gw.port(), "needs the queue", body="y" * 20_000)[0] == 250, 10, "queued again")
    wait_for(lambda: httpx.get(readyz, timeout=5).status_code == 200 or None, 10, "/readyz 200 again")
    wait_for(lambda: len(gw.sent) == queued + 1, what="and delivered")
