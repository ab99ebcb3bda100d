"""The real server in a subprocess, a flaky sandbox upstream, SIGKILL mid-load, restart: every message that
got a 250 reaches the upstream, and no recipient gets a copy twice except within the documented window
(a call in flight when the process died: the restarted process logs it as `delivery_ambiguous`).

Each gateway process writes its own log file: a killed process may leave a half-written last line, which
must not run into the first line of the next one (the cause of this test's one flaky run)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx

from tests.configs import serve_config, write
from tests.procs import (
    ambiguous,
    check_delivery,
    kill,
    load,
    queue,
    queue_empty,
    recorded,
    serve,
    start_sandbox,
)
from tests.spool_helpers import wait_for


def test_sigkill_mid_load_loses_nothing(tmp_path: Path) -> None:
    record, first_log, second_log = tmp_path / "requests.jsonl", tmp_path / "gateway-1.log", tmp_path / "gateway-2.log"
    sandbox, sandbox_url = start_sandbox(record)
    gateway = None
    try:
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"status": 500, "probability": 0.3}).raise_for_status()
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"delay": 1.0, "probability": 0.1}).raise_for_status()
        delivery = {
            "inline_budget": 0.5,
            "retry_schedule": [0.2, 0.5],
            "retry_jitter": 0.2,
            "poll_interval": 0.2,
            "concurrency": 8,
        }
        config = write(tmp_path / "gateway.toml", serve_config(tmp_path, sandbox_url, delivery=delivery))
        gateway, ports = serve(config, first_log)
        smtp_port = ports["plain"]

        replies: dict[int, str] = {}
        stop = threading.Event()
        threads = [
            threading.Thread(target=load, args=(smtp_port, range(k * 100, k * 100 + 100), replies, stop))
            for k in range(4)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(replies) >= 150, 60, "150 accepted messages")
        kill(gateway)
        stop.set()
        for t in threads:
            t.join(30)
        accepted_before_kill = len(replies)

        gateway, ports = serve(config, second_log)  # on another free port: the clients are told it anew
        smtp_port = ports["plain"]
        # A few more after the restart, then let the upstream recover so the backlog drains.
        load(smtp_port, range(1000, 1030), replies, threading.Event())
        httpx.delete(f"{sandbox_url}/_sandbox/faults").raise_for_status()
        wait_for(lambda: queue_empty(config), 30, "queue drained")

        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(20) == 0
        gateway = None

        assert accepted_before_kill >= 150 and len(replies) >= accepted_before_kill + 30
        check_delivery(replies, recorded(record), ambiguous(second_log))
        assert "dead" not in queue(config, "dead").split(":", 1)[1]
    finally:
        kill(gateway)
        kill(sandbox)
