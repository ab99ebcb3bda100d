"""An instance SIGKILLed in the middle of polling: the gateway (a subprocess) reads a large page set from the
sandbox (a subprocess, each page slowed down) and POSTs each event to a slow local webhook receiver; it is
killed mid-window, and restarted. No event is lost (every message's `sent` event reaches the ledger and the
receiver), none is stored twice, none is delivered twice except the deliveries the restarted instance names
as possible duplicates (POSTs under way at the kill), and the poll resumes at the window and page where the
killed instance stopped."""

from __future__ import annotations

import json
import signal
import smtplib
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import configs
from tests.harness import PASSWORD, USER, LoopThread
from tests.procs import events, kill, serve, start_sandbox
from tests.spool_helpers import message, wait_for
from tests.webhook_receiver import Receiver

MESSAGES = 60
EVENTS = {"enabled": True, "interval": 0.3, "lag": 1.0, "overlap": 600, "page_size": 10, "lease": 60}


@pytest.fixture
def receiver(loop_thread: LoopThread) -> Iterator[Receiver]:
    hook = Receiver(delay=0.2)  # slow: deliveries are under way when the instance is killed
    loop_thread.run(hook.start())
    yield hook
    loop_thread.run(hook.stop())


def cursor(spool: Path) -> dict[str, Any] | None:
    """The account's event cursor as the database has it (read while the gateway runs)."""
    if not spool.exists():
        return None
    db = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM event_cursors WHERE name='acme'").fetchone()
        return dict(row) if row else None
    except sqlite3.OperationalError:
        return None  # not migrated yet
    finally:
        db.close()


def stored_events(spool: Path) -> Counter[tuple[str, str]]:
    db = sqlite3.connect(spool, timeout=5)
    try:
        rows = db.execute("SELECT id, kind FROM ledger_events WHERE kind='sent'").fetchall()
        return Counter((r[0], r[1]) for r in rows)
    finally:
        db.close()


def test_a_killed_poller_loses_no_event_and_its_successor_resumes_its_window(
    tmp_path: Path, receiver: Receiver
) -> None:
    record = tmp_path / "sandbox.jsonl"
    sandbox, url = start_sandbox(record)
    gateway = None
    try:
        config = configs.write(
            tmp_path / "gateway.toml",
            configs.serve_config(
                tmp_path,
                url,
                accounts={"acme": {"events": EVENTS}},
                webhooks=[{"name": "app", "url": receiver.url, "secret": "s", "backoff": 0.1, "timeout": 5}],
                return_path={"poll_interval": 0.2},
            ),
        )
        spool = tmp_path / "spool.sqlite3"
        log = tmp_path / "gateway.log"
        gateway, ports = serve(config, log)
        with smtplib.SMTP("127.0.0.1", ports["plain"], timeout=30) as client:
            client.login(USER, PASSWORD)
            for n in range(MESSAGES):
                client.sendmail("billing@acme.example", [f"deliver+{n}@example.com"], message(f"crash {n}"))
        # Each page of events takes 0.4 s: a window of six pages is read for a while.
        httpx.post(f"{url}/_sandbox/faults", json={"delay": 0.4, "probability": 1.0, "kind": "events"})

        def mid_window() -> dict[str, Any] | None:
            found = cursor(spool)
            return found if found and found["window_until"] is not None and found["page"] >= 3 else None

        stopped_at = wait_for(mid_window, 30, "a window read half way")
        gateway.send_signal(signal.SIGKILL)
        gateway.wait(10)
        left = cursor(spool)
        assert left is not None and left["page"] >= stopped_at["page"] and left["window_until"] is not None
        requests_before = sum(1 for _ in record.read_text().splitlines())

        gateway, _ = serve(config, log)
        # The successor goes on with the window the killed instance left, from its next page.
        resumed = wait_for(
            lambda: [
                json.loads(line)["body"]
                for line in record.read_text().splitlines()[requests_before:]
                if json.loads(line)["kind"] == "events"
            ],
            30,
            "the successor's first page",
        )[0]
        assert resumed["pagina"] == left["page"] + 1
        assert resumed["desde"] < resumed["hasta"]

        def all_delivered() -> set[str] | None:
            seen = {r.json["message"]["subject"] for r in receiver.accepted() if r.json["type"] == "sent"}
            return seen if len(seen) == MESSAGES else None

        wait_for(all_delivered, 60, "every message's sent event delivered")
        stored = stored_events(spool)
        assert len(stored) == MESSAGES and set(stored.values()) == {1}  # each event stored once
        ids = Counter(r.json["id"] for r in receiver.accepted())
        twice = {i for i, n in ids.items() if n > 1}
        named = {e["event_id"] for e in events(log, "webhook_redelivery")}
        assert twice <= named, "a delivery seen twice outside the named window"
    finally:
        kill(gateway)
        kill(sandbox)
