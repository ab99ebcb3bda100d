"""An instance paused past its lease (SIGSTOP here; a long GC pause or a frozen VM alike) must not send what a
sibling took over meanwhile, and a paused instance's rate-limit slots must not all be spent the moment it
wakes. Real `serve` processes on one queue (PostgreSQL, and SQLite shared by two processes), the sandbox in
a subprocess recording when each request arrived."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import smtplib
import sqlite3
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.configs import serve_config, write
from tests.harness import PASSWORD, USER
from tests.pgserver import PgCluster
from tests.procs import complete_lines, events, kill, serve, start_sandbox
from tests.spool_helpers import message, wait_for

RATE = 2.0  # calls a second, one at a time: a paused instance's calls wait for their slots
MESSAGES = 8


def accepted(record: Path) -> list[dict[str, Any]]:
    """The sends the sandbox accepted, in the order they arrived (a line it is writing now: at the next read)."""
    found: list[dict[str, Any]] = []
    for line in complete_lines(record) if record.exists() else ():
        entry = json.loads(line)
        if entry["kind"] == "send" and entry["status"] == 200:
            found.append(entry)
    return sorted(found, key=lambda e: e["at"])


def send_all(port: int, subjects: list[str]) -> dict[str, str]:
    """Each message in its own session, all at once; the reply's id by subject (each must be a 250)."""
    replies: dict[str, str] = {}

    def one(subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login(USER, PASSWORD)
            client.mail("billing@acme.example")
            client.rcpt("client@example.com")
            code, text = client.data(message(subject))
            if code == 250:
                replies[subject] = text.decode().rsplit(" ", 1)[1]

    threads = [threading.Thread(target=one, args=(s,)) for s in subjects]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(replies) == sorted(subjects)
    return replies


def pause_quiet(proc: subprocess.Popen[bytes], queue: dict[str, Any], record: Path) -> int:
    """SIGSTOP `proc` at a moment none of its calls is between its fencing check and its recorded answer (the
    queue has no call marked 'sending'): a call checked, then paused before it is sent or answered, is the
    window the sibling counts as ambiguous (docs/delivery.md), which is not what these tests are about. On
    SQLite, also outside a write transaction: a process paused while it holds the file's one write lock
    stops its siblings' queue until it resumes (docs/operations/instances.md). Returns how many calls the
    upstream had accepted then."""
    spool = Path(queue["spool_path"]) if "spool_path" in queue else None
    for _ in range(50):
        wait_for(lambda: sending(queue) == 0 or None, 10, "no call being sent")
        os.kill(proc.pid, signal.SIGSTOP)
        if (spool is None or not writing(proc.pid, spool)) and sending(queue) == 0:
            return len(accepted(record))
        os.kill(proc.pid, signal.SIGCONT)
    raise AssertionError("never found the process quiet")


def sending(queue: dict[str, Any]) -> int:
    """Calls marked as being sent (checked, not yet answered and recorded), read from the queue itself."""
    sql = "SELECT COUNT(*) FROM calls WHERE state = 'sending'"
    if "queue_url" in queue:
        with psycopg.connect(queue["queue_url"], autocommit=True) as conn:
            row = conn.execute(sql).fetchone()
    else:
        with contextlib.closing(sqlite3.connect(f"file:{queue['spool_path']}?mode=ro", uri=True, timeout=30)) as db:
            row = db.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def writing(pid: int, spool: Path) -> bool:
    """Whether `pid` holds the WAL write lock of the SQLite queue `spool` (byte 120 of its -shm file, a POSIX
    lock /proc/locks lists with the file's device and inode)."""
    inode = str(os.stat(spool.with_name(spool.name + "-shm")).st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # 3: POSIX ADVISORY WRITE <pid> <major>:<minor>:<inode> <start> <end>
        if fields[3:5] == ["WRITE", str(pid)] and fields[5].rsplit(":", 1)[1] == inode and fields[6] == "120":
            return True
    return False


def within_rate(times: list[float]) -> list[float]:
    """The gaps between calls shorter than one slot allows: one slot may be reached late (by at most one
    interval, ratelimit.lateness_allowed), every other call is an interval after the one before it."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    short = [round(g, 3) for g in gaps if g < 1.0 / RATE - 0.3]
    return short if len(short) > 1 else []


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The [delivery] keys of a queue two processes share."""
    if request.param == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        yield {"queue_url": cluster.new_database()}
    else:
        yield {"spool_path": str(tmp_path / "shared.sqlite3")}


def test_an_instance_paused_past_its_lease_sends_nothing_its_sibling_took_over(
    tmp_path: Path, queue: dict[str, Any]
) -> None:
    record = tmp_path / "requests.jsonl"
    sandbox, sandbox_url = start_sandbox(record)
    procs: list[subprocess.Popen[bytes]] = []
    paused = None
    try:
        delivery = {
            **queue,
            "inline_budget": 0.5,  # the calls waiting for their slots are stored in flight, leased to A
            "lease_seconds": 2.0,
            "retry_schedule": [0.5],
            "retry_jitter": 0.0,
            "poll_interval": 0.2,
            "concurrency": 20,
        }
        config = serve_config(
            tmp_path,
            sandbox_url,
            delivery=delivery,
            http={"port": 0},
            accounts={"acme": {"rate_limit": RATE, "rate_burst": 1}},
        )
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        ports = []
        for name, log in zip("ab", logs, strict=True):
            proc, bound = serve(write(tmp_path / f"{name}.toml", config), log)
            procs.append(proc)
            ports.append(bound)
        subjects = [f"paused {n}" for n in range(MESSAGES)]
        send_all(ports[0]["plain"], subjects)  # to A: one call a slot, the rest waiting in A for theirs
        sent_by_a = pause_quiet(procs[0], queue, record)
        paused = procs[0]
        assert sent_by_a < MESSAGES - 2, "A must still have calls waiting when it is paused"
        # A's leases run out; B takes the messages over and delivers every one.
        wait_for(lambda: len(accepted(record)) == MESSAGES, 60, "B delivering what A held")
        os.kill(procs[0].pid, signal.SIGCONT)
        paused = None
        fenced = MESSAGES - sent_by_a
        # A wakes with its calls' slots long past: each takes a fresh slot, then finds its lease over.
        wait_for(lambda: len(events(logs[0], "settle_fenced")) >= fenced or None, 60, "A ending every attempt")
        copies = Counter(e["body"]["asunto"] for e in accepted(record))
        assert copies == Counter(dict.fromkeys(subjects, 1)), "a message delivered twice"
        assert not events(logs[1], "delivery_ambiguous")  # B sent calls A never had: nothing to count
        assert sum(len(e["calls"]) for e in events(logs[0], "delivery_fenced")) == fenced
        counted = metric(ports[0]["http"], "smtp_gateway_fenced_calls_total", account="acme", reason="lease_lost")
        assert counted == fenced
        assert within_rate([e["at"] for e in accepted(record)]) == []
    finally:
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
        for proc in [*procs, sandbox]:
            kill(proc)


def test_a_paused_instance_that_kept_its_leases_sends_at_the_rate_when_it_wakes(tmp_path: Path) -> None:
    """Paused for less than its lease, A still holds its messages and sends them when it wakes, but at the
    rate: the slots that passed while it was stopped are taken again, not spent all at once."""
    record = tmp_path / "requests.jsonl"
    sandbox, sandbox_url = start_sandbox(record)
    proc = None
    try:
        config = serve_config(
            tmp_path,
            sandbox_url,
            delivery={"inline_budget": 0.5, "lease_seconds": 60.0, "poll_interval": 0.2},
            accounts={"acme": {"rate_limit": RATE, "rate_burst": 1}},
        )
        proc, bound = serve(write(tmp_path / "a.toml", config), tmp_path / "a.log")
        subjects = [f"woken {n}" for n in range(MESSAGES)]
        send_all(bound["plain"], subjects)
        stopped = pause_quiet(proc, {"spool_path": str(tmp_path / "spool.sqlite3")}, record)
        # Until the slots of all the calls left have passed (one every 1/RATE s): every one of them is late.
        threading.Event().wait((MESSAGES - stopped) / RATE + 0.5)
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: len(accepted(record)) == MESSAGES, 30, "A delivering what it kept")
        assert within_rate([e["at"] for e in accepted(record)]) == []
        assert Counter(e["body"]["asunto"] for e in accepted(record)) == Counter(dict.fromkeys(subjects, 1))
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGCONT)
        kill(proc)
        kill(sandbox)


def test_a_call_on_the_wire_when_its_instance_pauses_is_the_counted_window(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """The one window a pause leaves: a call that passed its fencing check and went out, its instance paused
    before recording the answer. The sibling that takes the message over counts it as ambiguous
    (`lease_expired`) and sends it again: the second copy is the logged, counted one, no other."""
    record = tmp_path / "requests.jsonl"
    sandbox, sandbox_url = start_sandbox(record)
    procs: list[subprocess.Popen[bytes]] = []
    paused = None
    try:
        delivery = {
            "queue_url": pg_cluster.new_database(),
            "inline_budget": 0.5,
            "lease_seconds": 2.0,
            "retry_schedule": [0.5],
            "poll_interval": 0.2,
        }
        config = serve_config(tmp_path, sandbox_url, delivery=delivery, http={"port": 0})  # (/metrics)
        logs = [tmp_path / "a.log", tmp_path / "b.log"]
        ports = []
        for name, log in zip("ab", logs, strict=True):
            proc, bound = serve(write(tmp_path / f"{name}.toml", config), log)
            procs.append(proc)
            ports.append(bound)
        # The upstream takes 4 s to answer this one call: it is on the wire, A's lease runs meanwhile.
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"delay": 4.0, "count": 1, "kind": "send"})
        [queue_id] = send_all(ports[0]["plain"], ["on the wire"]).values()
        wait_for(lambda: sending({"queue_url": delivery["queue_url"]}) == 1 or None, 10, "the call on the wire")
        os.kill(procs[0].pid, signal.SIGSTOP)
        paused = procs[0]
        wait_for(lambda: len(accepted(record)) == 2 or None, 30, "the delayed copy and B's")
        os.kill(procs[0].pid, signal.SIGCONT)
        paused = None
        wait_for(lambda: events(logs[0], "settle_fenced") or None, 30, "A's answer, too late to record")
        [ambiguous] = events(logs[1], "delivery_ambiguous")
        assert (ambiguous["queue_id"], ambiguous["cause"], ambiguous["calls"]) == (queue_id, "lease_expired", ["0"])
        # ... and counted where it was logged, once: the window's metric, not only its log line.
        lease_expired = {"account": "acme", "cause": "lease_expired"}
        assert metric(ports[1]["http"], "smtp_gateway_ambiguous_calls_total", **lease_expired) == 1
        assert metric(ports[0]["http"], "smtp_gateway_ambiguous_calls_total", **lease_expired) == 0
        assert not events(logs[0], "delivery_fenced")  # its check had passed: the call was out already
    finally:
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
        for proc in [*procs, sandbox]:
            kill(proc)
