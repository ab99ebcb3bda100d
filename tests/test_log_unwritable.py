"""A log that cannot be written (the reader of `serve | tee` died: EPIPE; a full disk under the log file:
ENOSPC) changes no reply and no delivery: its lines are dropped and counted
(smtp_gateway_log_lines_dropped_total), each later line is tried again, and once one is written a line says
how many were lost. Before, every log call raised OSError into the session and the delivery owner: sessions
hung without a reply, queued messages were retried in a hot loop, and a message whose outcome could not be
recorded was delivered twice."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from gateway.ops import logs
from tests.configs import serve_config, write
from tests.ops_util import scraped
from tests.procs import CLI, queue_empty, recorded, spawn, start_sandbox
from tests.spool_helpers import send, wait_for


def test_a_dead_log_pipe_changes_no_reply_and_no_delivery(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    _, url = start_sandbox(record)
    config = serve_config(
        tmp_path,
        url,
        http={"port": 0},
        delivery={
            "spool_path": str(tmp_path / "spool.sqlite3"),
            "retry_schedule": [0.5],
            "retry_jitter": 0.0,
            "poll_interval": 0.2,
            "inline_budget": 2.0,
        },
    )
    cfg = write(tmp_path / "gw.toml", config)
    proc = spawn([*CLI, "serve", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    ready: dict[str, object] = {}
    while not ready:
        line = proc.stdout.readline()
        assert line, "serve exited before ready"
        event = json.loads(line)
        if event.get("event") == "ready":
            ready = event
    proc.stdout.close()  # the log's reader is gone: every write from now on fails with EPIPE
    port = ready["listeners"]["plain"]  # type: ignore[index]
    metrics = f"http://127.0.0.1:{ready['http']}/metrics"

    replies = {}
    for i in range(2):  # delivered at once
        replies[f"inline {i}"] = send(port, f"inline {i}")[0]
    httpx.post(f"{url}/_sandbox/faults", json={"status": 503, "count": None}).raise_for_status()
    for i in range(2):  # queued, delivered by the retry worker once the upstream answers
        replies[f"queued {i}"] = send(port, f"queued {i}")[0]
    httpx.delete(f"{url}/_sandbox/faults").raise_for_status()

    assert set(replies.values()) == {250}, replies
    wait_for(lambda: queue_empty(cfg), 30, "every queued message settled")
    copies = recorded(record)
    assert {subject: copies[(subject, "client@example.com")] for subject in replies} == dict.fromkeys(replies, 1)
    dropped = scraped(httpx.get(metrics, timeout=5).text, "smtp_gateway_log_lines_dropped_total")
    assert dropped >= len(replies)  # at least each message's own line
    assert proc.poll() is None


# Run in a process of its own: logging is configured once per process, on the real stderr (fd 2), which the
# script points at /dev/full (every write: ENOSPC) and then back at a file.
FULL_THEN_FREED = """
import logging, os, sys
import structlog
from gateway.config import LogSettings
from gateway.ops import logs
from gateway.ops.metrics import REGISTRY

log_file = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log_file, 2)
logs.configure(LogSettings(format="json"))
structlog.get_logger().info("before_full")
os.dup2(os.open("/dev/full", os.O_WRONLY), 2)
for i in range(3):
    structlog.get_logger().info("while_full", i=i)
logging.getLogger("somelibrary").warning("library warning while full")
os.dup2(log_file, 2)
structlog.get_logger().info("after_full")
print(REGISTRY.get_sample_value("smtp_gateway_log_lines_dropped_total"), file=sys.__stdout__)
"""


def test_lines_that_cannot_be_written_are_dropped_counted_and_the_log_recovers(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    out = subprocess.run(
        [sys.executable, "-c", FULL_THEN_FREED, str(log)],
        capture_output=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    ).stdout
    assert float(out) == 4.0  # three of ours, one library line
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["before_full", "after_full", "log_lines_dropped"]
    assert (lines[-1]["dropped"], lines[-1]["level"]) == (4, "warning")


def test_a_line_logged_by_a_finalizer_during_a_write_waits_for_it(tmp_path: Path) -> None:
    """A collection can start at any allocation inside the sink's write and run a finalizer that logs on the same
    thread (asyncio's "Future exception was never retrieved"): that line is written after the one being
    written, whole; the thread does not wait for its own lock (before: it hung for good). The collector is made
    to run at the k-th allocation from the write on, for each k, to hit every point of the write."""
    path = tmp_path / "log"
    with path.open("w") as out:
        sink = logs._Sink(out)
        logger = logging.getLogger("asyncio")
        handler = logs._LibraryHandler(sink)
        logger.addHandler(handler)
        loop = asyncio.new_event_loop()
        threshold = gc.get_threshold()

        def write_with_a_collection_at(k: int, done: threading.Event) -> None:
            gc.disable()
            future = loop.create_future()  # an exception nobody retrieved, in a cycle: only a collection frees it
            future.set_exception(RuntimeError("never retrieved"))
            future.cycle = future  # type: ignore[attr-defined]
            del future
            gc.set_threshold(gc.get_count()[0] + k)
            gc.enable()
            sink.write('{"event":"message_accepted"}')
            gc.set_threshold(*threshold)
            done.set()

        hung = None
        try:
            for k in range(40):
                done = threading.Event()
                threading.Thread(target=write_with_a_collection_at, args=(k, done), daemon=True).start()
                if not done.wait(30.0):
                    hung = k
                    break
                gc.set_threshold(*threshold)
                gc.collect()
        finally:
            gc.set_threshold(*threshold)
            gc.enable()
            logger.removeHandler(handler)
            loop.close()
    assert hung is None, f"the thread hung in the sink's write: a finalizer's line took its lock again (k={hung})"
    lines = path.read_text().splitlines()
    assert lines.count('{"event":"message_accepted"}') == 40
    finalizers = [line for line in lines if "never retrieved" in line]
    assert finalizers, "no finalizer logged during a write: the test did not reach the window"
    assert sum("message_accepted" in line for line in lines) == 40  # never cut by a finalizer's line
