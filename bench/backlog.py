"""Scale of the backlog: after an outage of a busy site, N queued messages drain at the upstream's rate limit
with flat memory and flat claim latency, and fairly between accounts.

    python bench/backlog.py [--messages 100000] [--queue sqlite|postgresql] [--rate 400] [--quiet-rate 100]

1. Outage: the sandbox answers every send with 503; smtp-source sends N 5 KB messages, 90 % through the busy
   account `bench` and 10 % through the account `quiet`, and the gateway queues them (store-and-forward).
2. Recovery: the faults are cleared and the retry worker drains the queue, each account at its `rate_limit`.

Every 10 % of N drained (and at the end) it records: the queued messages per account, the drain rate since
the last record, the gateway's RSS (its process tree), and the mean and largest claim time since the last
record (`smtp_gateway_queue_claim_seconds`, scraped from the operator endpoint). Fair: the quiet account
drains at its own rate while the busy one still has tens of thousands queued. Writes
results/backlog-<queue>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import genmsg
import smtpsource
from gateway_target import APIKEY, PASSWORD, Gateway, check_cli, http_json, password_hash
from procmon import tree_rss
from run import machine_info
from servers import BENCH_DIR, HOST, RUN_DIR_PREFIX, claim, free_port, stop_stale

QUIET = """
[accounts.quiet]
provider = "dmds"
dmdsid = "quiet"
api_base = "{api_base}"
apikey = "{apikey}"
sender_domains = {{ "{domain}" = "dmds-quiet@nl.{domain}" }}
rate_limit = {quiet_rate}
users = [{{ username = "quiet", password_hash = "{hash}", campaign = 2 }}]

[[listeners]]
name = "quiet"
address = "127.0.0.1"
port = {quiet_port}
tls = "none"
trusted_networks = ["127.0.0.0/8"]
trusted_login = "quiet"

[http]
address = "127.0.0.1"
port = {http_port}
"""
_BUCKET = re.compile(r'^smtp_gateway_queue_claim_seconds_(sum|count|bucket)(?:\{le="([^"]+)"\})? ([0-9.e+-]+)$')


def claim_stats(http_port: int) -> dict[str, Any]:
    """The claim histogram's sum, count and cumulative buckets, from /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, Any] = {"sum": 0.0, "count": 0.0, "buckets": {}}
    for line in text.splitlines():
        m = _BUCKET.match(line)
        if m is None:
            continue
        kind, le, value = m.groups()
        if kind == "bucket":
            out["buckets"][le] = float(value)
        else:
            out[kind] = float(value)
    return out


def largest_bucket(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The smallest bucket bound holding every claim of the interval ("+Inf" if beyond the largest)."""
    total = after["count"] - before["count"]
    for le, count in sorted(after["buckets"].items(), key=lambda kv: float(kv[0])):
        if count - before["buckets"].get(le, 0.0) >= total:
            return le
    return "+Inf"


class Depth:
    """Queued (and in-flight) messages per account, read from the queue itself."""

    def __init__(self, sqlite_path: Path | None, pg_url: str) -> None:
        self.sqlite_path, self.pg_url = sqlite_path, pg_url

    def __call__(self) -> dict[str, int]:
        query = "SELECT account, COUNT(*) FROM messages WHERE state IN ('queued', 'inflight') GROUP BY account"
        if self.sqlite_path is not None:
            with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=30) as db:
                return {str(a): int(n) for a, n in db.execute(query)}
        import psycopg

        with psycopg.connect(self.pg_url) as conn:
            return {str(a): int(n) for a, n in conn.execute(query).fetchall()}


def fill(gateway: Gateway, quiet_port: int, count: int) -> list[str]:
    """The outage: every send answered 503; N messages accepted and queued by the gateway. Returns what went
    wrong (smtp-source's error per port)."""
    http_json(f"{gateway.sandbox_url}/_sandbox/faults", method="POST", body={"status": 503, "probability": 1.0})
    path = genmsg.MESSAGES_DIR / f"{genmsg.SMALL_NAME}.eml"
    quiet = count // 10
    runs = [(gateway.port, count - quiet), (quiet_port, quiet)]
    errors: list[str] = []

    def send(port: int, n: int) -> None:
        sent = smtpsource.run(f"{HOST}:{port}", path, 10, n, True, 3600.0, genmsg.SENDER, genmsg.RECIPIENT)
        if sent.error:
            errors.append(f"filling through port {port}: {sent.error}")

    threads = [threading.Thread(target=send, args=run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def failures(fill_errors: list[str], left: int, timeout: float) -> list[str]:
    """What makes the run incomplete: smtp-source's errors while filling, and a queue not drained in time
    (`left` messages still queued at the end)."""
    return fill_errors + ([f"{left} messages still queued after {timeout:.0f} s of draining"] if left else [])


def drain(gateway: Gateway, depth: Depth, http_port: int, count: int, timeout: float) -> list[dict[str, Any]]:
    """Clear the faults and record the drain every 10 % of `count` until the queue is empty."""
    records: list[dict[str, Any]] = []
    start_depth = depth()
    queued = sum(start_depth.values())
    step = max(count // 10, 1)
    next_mark = step
    started = last_t = time.monotonic()
    last_stats = claim_stats(http_port)
    last_left = queued
    record = {"t": 0.0, "drained": 0, "queued": start_depth, "rss_mib": tree_rss(gateway.rss_roots()) / 2**20}
    records.append(record)
    print(f"  drain: {queued} queued {start_depth}", flush=True)
    http_json(f"{gateway.sandbox_url}/_sandbox/faults", method="DELETE")
    while time.monotonic() - started < timeout:
        time.sleep(0.5)
        now_depth = depth()
        left = sum(now_depth.values())
        drained = queued - left
        if drained >= next_mark or left == 0:
            now = time.monotonic()
            stats = claim_stats(http_port)
            claims = stats["count"] - last_stats["count"]
            record = {
                "t": round(now - started, 2),
                "drained": drained,
                "queued": now_depth,
                "rate": round((last_left - left) / (now - last_t), 1),
                "rss_mib": round(tree_rss(gateway.rss_roots()) / 2**20, 1),
                "claims": int(claims),
                "claim_mean_ms": round(1000 * (stats["sum"] - last_stats["sum"]) / claims, 3) if claims else None,
                "claim_max_bucket_s": largest_bucket(last_stats, stats) if claims else None,
            }
            records.append(record)
            print(f"  {record}", flush=True)
            last_t, last_stats, last_left = now, stats, left
            while next_mark <= drained:
                next_mark += step
            # The sandbox keeps every request it answered: forget them, it is not what is measured.
            http_json(f"{gateway.sandbox_url}/_sandbox/requests", method="DELETE")
        if left == 0:
            break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queue", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--rate", type=float, default=400.0, help="the busy account's rate_limit (requests/s)")
    parser.add_argument("--quiet-rate", type=float, default=100.0, help="the quiet account's rate_limit")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up draining after this many s")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or BENCH_DIR / "results" / f"backlog-{args.queue}.json"
    genmsg.write_messages()
    stop_stale()
    workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    claim(workdir)
    quiet_port, http_port = free_port(), free_port()
    gateway = Gateway(workdir, 0, check_cli(), [], queue=args.queue)
    gateway.env = {
        # Due again 2 s after a failure (the outage's attempts are not what is measured); the account's
        # health probe every second.
        "GATEWAY_DELIVERY__RETRY_SCHEDULE": "[2]",
        "GATEWAY_DELIVERY__PROBE_INTERVAL": "1",
        "GATEWAY_DELIVERY__POLL_INTERVAL": "1",
        "GATEWAY_DELIVERY__CONCURRENCY": "8",
        "GATEWAY_ACCOUNTS__BENCH__RATE_LIMIT": str(args.rate),
    }
    gateway.extra_config = QUIET.format(
        api_base="${sandbox_url}",
        apikey=APIKEY,
        domain=genmsg.SENDER_DOMAIN,
        hash=password_hash(PASSWORD),
        quiet_rate=args.quiet_rate,
        quiet_port=quiet_port,
        http_port=http_port,
    )
    started = time.monotonic()
    with gateway:
        assert gateway.tmp is not None
        depth = Depth(gateway.tmp / "spool.sqlite3" if args.queue == "sqlite" else None, gateway.queue_url)
        print(f"filling: {args.messages} messages while the upstream answers 503", flush=True)
        fill_started = time.monotonic()
        fill_errors = fill(gateway, quiet_port, args.messages)
        fill_s = time.monotonic() - fill_started
        print(f"  queued in {fill_s:.0f} s: {depth()}", flush=True)
        records = drain(gateway, depth, http_port, args.messages, args.timeout)
        left = sum(depth().values())  # drain() records every 10 %: its last record may predate a timeout
    result = {
        "machine": machine_info(),
        "queue": args.queue,
        "messages": args.messages,
        "rate_limits": {"bench": args.rate, "quiet": args.quiet_rate},
        "fill_s": fill_s,
        "records": records,
        "duration_s": time.monotonic() - started,
        "loadavg_after": os.getloadavg(),
    }
    failed = failures(fill_errors, left, args.timeout)
    result["failures"] = failed
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        # A scripted run tells an incomplete result by the exit status; the last line says why.
        print(f"FAILED (exit 1): {'; '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
