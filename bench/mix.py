"""A realistic mix on one gateway process, all at once over STARTTLS with AUTH: scanners sending one scan per
connection (100 KB to 2 MB), applications keeping sessions open for small mail, and now and then a 20-40 MB
scan.

    python bench/mix.py [--duration 30] [--scanners 8] [--apps 2] [--big 1] [--workers 1]

Reports, per class, the messages sent, their rate, the latency of each (a scan: connect to QUIT's reply; an
application's message: MAIL to the reply after its data) at p50 and p99, and errors; and the gateway's peak
RSS (its process tree, sampled every 100 ms) and CPU: over the clients' window (`cpu_s` in `duration_s`), and
up to the moment the sandbox had every message (`cpu_s_settled`, `settle_s` later). Writes results/mix.json;
exits 1 when a client saw an error or the sandbox did not get every message.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import genmsg
from gateway_target import LOGIN, PASSWORD, Gateway, check_cli
from procmon import PeakRss, cpu_seconds, tree
from run import machine_info
from servers import BENCH_DIR, HOST, RUN_DIR_PREFIX, Settled, claim, stop_stale
from smtpload import SmtpError, prepare_data, summarize
from tlsload import Conn, client_context

SCAN_SIZES = (100 * 1024, 250 * 1024, 500 * 1024, 1024 * 1024, 2 * 1024 * 1024)
BIG_SIZES = (20 * 1024 * 1024, 40 * 1024 * 1024)
TOKEN = base64.b64encode(f"\0{LOGIN}\0{PASSWORD}".encode()).decode()


@dataclass
class Klass:
    """One class of clients and what they achieved."""

    name: str
    latencies: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, seconds: float, size: int) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.bytes_sent += size

    def failed(self, exc: BaseException) -> None:
        with self.lock:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def start_tls(port: int, context: ssl.SSLContext) -> Conn:
    raw = socket.create_connection((HOST, port), timeout=300)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Conn(raw)
    conn.reply(220)
    conn.command("EHLO mix.bench", 250)
    conn.command("STARTTLS", 220)
    conn = Conn(context.wrap_socket(raw))
    conn.command("EHLO mix.bench", 250)
    conn.command(f"AUTH PLAIN {TOKEN}", 235)
    return conn


def send(conn: Conn, data: bytes) -> None:
    conn.command(f"MAIL FROM:<{genmsg.SENDER}>", 250)
    conn.command(f"RCPT TO:<{genmsg.RECIPIENT}>", 250)
    conn.command("DATA", 354)
    conn.sock.sendall(data)
    conn.reply(250)


def one_per_connection(port: int, messages: list[bytes], klass: Klass, deadline: float, seed: int) -> None:
    """A scanner: a new connection (STARTTLS, AUTH) for every message, sizes drawn at random."""
    rng, context = random.Random(seed), client_context("1.3")
    while time.monotonic() < deadline:
        data = rng.choice(messages)
        started = time.perf_counter()
        try:
            conn = start_tls(port, context)
            try:
                send(conn, data)
                conn.command("QUIT", 221)
            finally:
                conn.sock.close()
        except (OSError, SmtpError, ValueError) as exc:
            klass.failed(exc)
            continue
        klass.done(time.perf_counter() - started, len(data))


def persistent(port: int, data: bytes, klass: Klass, deadline: float) -> None:
    """An application: one session, small messages one after the other."""
    conn: Conn | None = None
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = start_tls(port, client_context("1.3"))
            started = time.perf_counter()
            send(conn, data)
        except (OSError, SmtpError, ValueError) as exc:
            klass.failed(exc)
            if conn is not None:
                conn.sock.close()
            conn = None
            continue
        klass.done(time.perf_counter() - started, len(data))
    if conn is not None:
        conn.sock.close()


def report(klass: Klass, elapsed: float) -> dict[str, object]:
    return {
        "class": klass.name,
        "messages": len(klass.latencies),
        "msgs_per_s": len(klass.latencies) / elapsed,
        "mbytes_per_s": klass.bytes_sent / elapsed / 1e6,
        "latency_ms": summarize(klass.latencies),
        "errors": len(klass.errors),
        "first_error": klass.errors[0] if klass.errors else "",
    }


def failures(classes: list[Klass], settled: Settled) -> list[str]:
    """What makes a mix run not a clean one: clients' errors, messages not passed on to the sandbox."""
    out = [f"{k.name}: {len(k.errors)} errors, first: {k.errors[0]}" for k in classes if k.errors]
    return [*out, settled.error] if settled.error else out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--scanners", type=int, default=8, help="clients sending one 100 KB-2 MB scan per connection")
    parser.add_argument("--apps", type=int, default=2, help="applications keeping a session for 5 KB messages")
    parser.add_argument("--big", type=int, default=1, help="clients sending 20-40 MB scans, one per connection")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "mix.json")
    args = parser.parse_args(argv)
    genmsg.write_messages()
    scans = [prepare_data(genmsg.scan_message(size, seed=n)) for n, size in enumerate(SCAN_SIZES)]
    bigs = [prepare_data(genmsg.scan_message(size, seed=10 + n)) for n, size in enumerate(BIG_SIZES)]
    small = prepare_data((genmsg.MESSAGES_DIR / f"{genmsg.SMALL_NAME}.eml").read_bytes())
    stop_stale()
    workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    claim(workdir)
    sys.path.insert(0, str(BENCH_DIR.parent))
    from gateway.smtp.tls import write_self_signed

    cert = write_self_signed(workdir / "cert")
    classes = {name: Klass(name) for name in ("scan 100 KB-2 MB", "app 5 KB (persistent)", "scan 20-40 MB")}
    with Gateway(workdir, 0, check_cli(), [], workers=args.workers, tls=cert) as gateway:
        port = gateway.tls_ports["starttls"]
        pids = tree(gateway.rss_roots())
        cpu_before = cpu_seconds(pids)
        deadline = time.monotonic() + args.duration
        threads = [
            threading.Thread(target=one_per_connection, args=(port, scans, classes["scan 100 KB-2 MB"], deadline, n))
            for n in range(args.scanners)
        ]
        threads += [
            threading.Thread(target=persistent, args=(port, small, classes["app 5 KB (persistent)"], deadline))
            for _ in range(args.apps)
        ]
        threads += [
            threading.Thread(target=one_per_connection, args=(port, bigs, classes["scan 20-40 MB"], deadline, 100 + n))
            for n in range(args.big)
        ]
        started = time.perf_counter()
        with PeakRss(gateway.rss_roots) as rss:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        elapsed = time.perf_counter() - started
        # CPU over the same window as the rates (settle below may wait up to 120 s more), then once settled.
        cpu = cpu_seconds(pids | tree(gateway.rss_roots())) - cpu_before
        total = sum(len(k.latencies) for k in classes.values())
        settled = gateway.settle(total, len(threads), timeout=120)
        settle_s = time.perf_counter() - started - elapsed
        cpu_settled = cpu_seconds(pids | tree(gateway.rss_roots())) - cpu_before
    result = {
        "date": machine_info()["date"],
        "machine": machine_info(),
        "duration_s": elapsed,
        "workers": args.workers,
        "clients": {"scanners": args.scanners, "apps": args.apps, "big": args.big},
        "classes": [report(k, elapsed) for k in classes.values()],
        "peak_rss_mib": rss.peak / 2**20,
        "cpu_s": cpu,
        "cpu_s_settled": cpu_settled,
        "settle_s": settle_s,
        "error": settled.error,
        "warning": settled.warning,
        "loadavg_after": os.getloadavg(),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in result["classes"]:  # type: ignore[union-attr]
        lat = row["latency_ms"]
        print(
            f"{row['class']:24} {row['messages']:6} msgs {row['msgs_per_s']:8.1f}/s {row['mbytes_per_s']:6.1f} MB/s"
            f"  p50 {lat.get('p50', 0):8.1f} ms  p99 {lat.get('p99', 0):8.1f} ms  errors {row['errors']}"
        )
    print(
        f"peak RSS {result['peak_rss_mib']:.0f} MiB, CPU {cpu:.1f} s in {elapsed:.1f} s"
        f" ({cpu_settled:.1f} s once the sandbox had every message, {settle_s:.1f} s later); {settled or 'all sent'}"
    )
    print(f"wrote {args.out}")
    failed = failures(list(classes.values()), settled)
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
