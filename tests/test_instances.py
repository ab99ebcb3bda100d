"""Several gateway instances on one queue, as operators run them: three `serve` processes on one
PostgreSQL queue (as on three machines) with a flaky upstream and one of them SIGKILLed mid-load, and
`serve --workers 2` on one SQLite file with a worker killed. Checked through the sandbox's records: every
message that got a 250 is delivered, and no recipient gets a second copy outside the ambiguous window."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import httpx

from tests.configs import listener, serve_config, write
from tests.pgserver import PgCluster
from tests.procs import (
    RCPTS,
    ambiguous,
    check_delivery,
    events,
    kill,
    load,
    queue,
    queue_empty,
    recorded,
    serve,
    start_sandbox,
)
from tests.spool_helpers import wait_for

FAST = {
    "inline_budget": 0.5,
    "retry_schedule": [0.2, 0.5],
    "retry_jitter": 0.2,
    "poll_interval": 0.5,
    "concurrency": 8,
    "lease_seconds": 2.0,
    "probe_interval": 0.5,
}


def test_three_instances_on_one_postgresql_queue_survive_a_sigkill(tmp_path: Path, pg_cluster: PgCluster) -> None:
    url = pg_cluster.new_database()
    record = tmp_path / "requests.jsonl"
    logs = [tmp_path / f"gateway-{i}.log" for i in range(3)]
    sandbox, sandbox_url = start_sandbox(record)
    gateways: list[subprocess.Popen[bytes]] = []
    try:
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"status": 500, "probability": 0.33}).raise_for_status()
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"delay": 1.0, "probability": 0.1}).raise_for_status()
        config = serve_config(tmp_path, sandbox_url, delivery={**FAST, "queue_url": url})
        configs = [write(tmp_path / f"gw{i}.toml", config) for i in range(3)]
        ports = []
        for config, log in zip(configs, logs, strict=True):
            proc, bound = serve(config, log)
            gateways.append(proc)
            ports.append(bound["plain"])

        replies: dict[int, str] = {}
        stop = threading.Event()
        threads = [
            threading.Thread(target=load, args=(ports[k % 3], range(k * 100, k * 100 + 100), replies, stop))
            for k in range(6)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(replies) >= 150, 90, "150 accepted messages")
        kill(gateways[0])  # mid-load: its sessions drop, its leases are left to expire
        wait_for(
            lambda: len(replies) >= 300 or not any(t.is_alive() for t in threads[1::3] + threads[2::3]),
            120,
            "the other instances keep taking mail",
        )
        stop.set()
        for t in threads:
            t.join(60)
        httpx.delete(f"{sandbox_url}/_sandbox/faults").raise_for_status()
        wait_for(lambda: queue_empty(configs[1]), 60, "queue drained by the surviving instances")
        for proc in gateways[1:]:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0

        assert len(replies) >= 250
        check_delivery(replies, recorded(record), ambiguous(*logs))
        # The killed instance's leases were reaped by the others, which counted what was in flight.
        reaped = [e for log in logs[1:] for e in events(log, "delivery_ambiguous") if e["cause"] == "lease_expired"]
        killed_inflight = {e["queue_id"] for e in events(logs[0], "message_spooled") if e.get("inflight")}
        assert not killed_inflight or reaped, "in-flight messages of the killed instance must be reaped"
        assert "dead" not in queue(configs[1], "dead").split(":", 1)[1]
    finally:
        for proc in [*gateways, sandbox]:
            kill(proc)


def test_workers_share_one_sqlite_queue_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    record, log = tmp_path / "requests.jsonl", tmp_path / "gateway.log"
    sandbox, sandbox_url = start_sandbox(record)
    supervisor = None
    # The workers share one port (SO_REUSEPORT): this test holds it, bound but not listening, so it stays
    # the workers' for the whole test (and gets none of their connections).
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    try:
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"status": 500, "probability": 0.3}).raise_for_status()
        shared = listener("plain", port=port, reuse_port=True)
        config = write(
            tmp_path / "gateway.toml", serve_config(tmp_path, sandbox_url, listeners=[shared], delivery=FAST)
        )
        supervisor, _ = serve(config, log, "--workers", "2")
        wait_for(
            lambda: len(events(log, "worker_started")) == 2 and len(events(log, "listener_started")) == 2,
            20,
            "two workers listening",
        )
        replies: dict[int, str] = {}
        stop = threading.Event()
        threads = [
            threading.Thread(target=load, args=(port, range(k * 100, k * 100 + 100), replies, stop, 5, True))
            for k in range(4)
        ]
        for t in threads:
            t.start()
        wait_for(lambda: len(replies) >= 60, 60, "60 accepted messages")
        victim = events(log, "worker_started")[0]["pid"]
        kill_pid(victim)
        wait_for(lambda: any(e["pid"] == victim for e in events(log, "worker_died")), 20, "the death noticed")
        wait_for(lambda: len(events(log, "worker_started")) == 3, 20, "a replacement worker")
        for t in threads:
            t.join(120)  # the clients reconnect (to either worker) until their numbers are used up
        httpx.delete(f"{sandbox_url}/_sandbox/faults").raise_for_status()
        wait_for(lambda: queue_empty(config), 60, "queue drained")
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        supervisor = None

        assert len(replies) >= 380  # a few messages cut off with the killed worker's sessions
        check_delivery(replies, recorded(record), ambiguous(log))
    finally:
        kill(supervisor)
        kill(sandbox)
        reserved.close()


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def test_a_sibling_takes_over_a_dead_processs_leases_without_waiting_for_them(tmp_path: Path) -> None:
    """Two `serve` processes of one host on one SQLite queue, leases of an hour: when one dies with messages
    in flight, the other sees that process is gone and takes its messages over at once."""
    record = tmp_path / "requests.jsonl"
    sandbox, sandbox_url = start_sandbox(record)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        delivery = {**FAST, "lease_seconds": 3600.0, "retry_schedule": [3600]}
        # A's calls must still hang when A dies, however slow this machine is.
        config = serve_config(tmp_path, sandbox_url, delivery=delivery, accounts={"acme": {"http_timeout": 300.0}})
        configs = [write(tmp_path / f"gw{i}.toml", config) for i in range(2)]
        logs = [tmp_path / f"gw{i}.log" for i in range(2)]
        ports = []
        for config, log in zip(configs, logs, strict=True):
            proc, bound = serve(config, log)
            procs.append(proc)
            ports.append(bound["plain"])
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"mode": "timeout", "count": None}).raise_for_status()
        replies: dict[int, str] = {}
        load(ports[0], range(5), replies, threading.Event())  # stored in flight: the upstream never answers
        assert len(replies) == 5 and all(len(i) == 16 for i in replies.values())
        kill(procs[0])
        httpx.delete(f"{sandbox_url}/_sandbox/faults").raise_for_status()
        wait_for(
            lambda: all(recorded(record)[(f"load {n}", rcpt.format(n=n))] for n in range(5) for rcpt in RCPTS),
            30,
            "the survivor delivering the dead process's messages to every recipient",
        )
        assert events(logs[1], "queue_dead_owners_expired")
        check_delivery(replies, recorded(record), ambiguous(*logs))
    finally:
        for proc in [*procs, sandbox]:
            kill(proc)
