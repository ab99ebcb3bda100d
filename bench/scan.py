"""A 40 MB scan through the gateway while another session sends small messages: does the scan stall them,
and how much memory does the gateway take for it?

    python bench/scan.py                 # ~1 minute; --size-mb 40 --repeat 3
    python bench/scan.py --kind text     # a plain-text body instead (76-character lines; text-line: one line)
    python bench/scan.py --kind text-amp # a plain-text body of "&" (76-character lines): HTML 5x its size
    python bench/scan.py --kind text-amp --max-large-mb 128 --parallel 4  # four at once against a 128 MiB cap

Reports, for the small-message session: p50/p99/max latency of the transactions that overlapped a scan,
next to the same session's latency without a scan; and the gateway's peak RSS during the scans above its
RSS before them (targets, issue #12: p99 <= 50 ms; peak <= 2x the scan's size above idle). Writes
bench/results/scan.json.

The scans go through a second account whose sandbox upstream is a process of its own: the sandbox reads
each 57 MB JSON body in ~0.1 s, and the small messages must not wait for that (the gateway is measured,
not the sandbox). Each scan is sent by a process of its own: smtplib's dot-stuffing of a 57 MB message holds
its process's GIL for ~0.3 s, which would stall the prober thread here, not the gateway. All of them share
the machine's 2 cores with the gateway.
"""

from __future__ import annotations

import argparse
import json
import math
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import genmsg
from gateway_target import APIKEY, LOGIN, PASSWORD, Gateway, check_cli, gateway_env, password_hash
from procmon import PeakRss, tree_rss
from servers import BENCH_DIR, HOST, free_port, spawn, terminate

MIB = 1024 * 1024
SCAN_ACCOUNT = """
[accounts.scan]
provider = "dmds"
dmdsid = "scan"
api_base = "{api_base}"
apikey = "{apikey}"
sender_domains = {{ "{domain}" = "dmds-scan@nl.{domain}" }}
users = [{{ username = "scanner", password_hash = "{hash}", campaign = 1 }}]
"""
# The scan's client, run as `python -c SEND_SCAN host port password sender recipient file`.
SEND_SCAN = """
import smtplib, sys
host, port, password, sender, recipient, path = sys.argv[1:]
raw = open(path, "rb").read()
with smtplib.SMTP(host, int(port), timeout=300) as client:
    client.login("scanner", password)
    client.mail(sender)
    client.rcpt(recipient)
    code, text = client.data(raw)
    print(code, text.decode())
"""


class Prober(threading.Thread):
    """One session sending the 5 KB bench message in a loop, timing each transaction."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.stop_event = threading.Event()
        self.error = ""

    def run(self) -> None:
        raw = (genmsg.MESSAGES_DIR / f"{genmsg.SMALL_NAME}.eml").read_bytes()
        try:
            with smtplib.SMTP(HOST, self.port, timeout=60) as client:
                client.login(LOGIN, PASSWORD)
                while not self.stop_event.is_set():
                    started = time.monotonic()
                    client.sendmail(genmsg.SENDER, [genmsg.RECIPIENT], raw)
                    self.samples.append((started, time.monotonic() - started))
        except (OSError, smtplib.SMTPException) as exc:
            self.error = str(exc)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    # Nearest rank: the ceil(q * n)-th smallest (int(q * n) as an index was one rank high: the p99 of 100 was the max).
    pick = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.5) * 1000, 2),
        "p99_ms": round(pick(0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=40.0, help="the scan's attachment size")
    parser.add_argument("--repeat", type=int, default=3, help="scans, one after the other")
    parser.add_argument(
        "--kind",
        choices=("pdf", "text", "text-line", "text-amp"),
        default="pdf",
        help="a base64 PDF attachment (default), a plain-text body in 76-character lines, one text line, or"
        " 76-character lines of '&' (the most HTML escaping makes of text)",
    )
    parser.add_argument(
        "--max-large-mb",
        type=float,
        default=None,
        help="limits.max_large_bytes in MiB (default: the gateway's, 256); the replies are in the results",
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="scans sent at once, each repeat (each from a process of its own)"
    )
    args = parser.parse_args(argv)
    size = int(args.size_mb * MIB)
    raw = (
        genmsg.scan_message(size)
        if args.kind == "pdf"
        else genmsg.text_message(size, args.kind == "text-line", ampersands=args.kind == "text-amp")
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    scan_file = workdir / "scan.eml"
    scan_file.write_bytes(raw)
    cmd = check_cli()
    scan_port = free_port()
    scan_sandbox = spawn(
        [*cmd, "sandbox", "--listen", f"{HOST}:{scan_port}", "--apikey", APIKEY, "--quiet"],
        workdir / "scan-sandbox.log",
        env=gateway_env(),
    )
    gateway = Gateway(workdir, 0, cmd, [])
    gateway.extra_config = SCAN_ACCOUNT.format(
        api_base=f"http://{HOST}:{scan_port}", apikey=APIKEY, domain=genmsg.SENDER_DOMAIN, hash=password_hash(PASSWORD)
    )
    max_large = None if args.max_large_mb is None else int(args.max_large_mb * MIB)
    if max_large is not None:
        gateway.env["GATEWAY_LIMITS__MAX_LARGE_BYTES"] = str(max_large)
    gateway.start()
    try:
        prober = Prober(gateway.port)
        prober.start()
        time.sleep(3.0)  # the prober's baseline, and the gateway warm
        baseline_end = time.monotonic()
        idle_rss = tree_rss(gateway.rss_roots())
        windows: list[tuple[float, float]] = []
        replies: list[str] = []
        with PeakRss(gateway.rss_roots, interval_s=0.05) as rss:
            for _ in range(args.repeat):
                started = time.monotonic()
                senders = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            SEND_SCAN,
                            HOST,
                            str(gateway.port),
                            PASSWORD,
                            genmsg.SENDER,
                            genmsg.RECIPIENT,
                            str(scan_file),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(args.parallel)
                ]
                for sender in senders:
                    out, _ = sender.communicate(timeout=600)
                    if sender.returncode:
                        raise subprocess.CalledProcessError(sender.returncode, "SEND_SCAN")
                    replies.append(out.strip())
                windows.append((started, time.monotonic()))
        prober.stop_event.set()
        prober.join(60)
        during = [s for t, s in prober.samples if any(a <= t + s and t <= b for a, b in windows)]
        before = [s for t, s in prober.samples if t + s < baseline_end]
        result = {
            "kind": args.kind,
            "scan_bytes": size,
            "scan_wire_bytes": len(raw),
            "scans": args.repeat,
            "parallel": args.parallel,
            "scan_seconds": [round(b - a, 2) for a, b in windows],
            "scan_replies": replies,
            "max_large_bytes": max_large if max_large is not None else 256 * MIB,
            "small_messages_without_scan": percentiles(before),
            "small_messages_during_scans": percentiles(during),
            "idle_rss_mib": round(idle_rss / MIB, 1),
            "peak_rss_mib": round(rss.peak / MIB, 1),
            "peak_above_idle_mib": round((rss.peak - idle_rss) / MIB, 1),
            "peak_above_idle_per_scan_size": round((rss.peak - idle_rss) / size, 2),
            "peak_above_idle_per_max_large_bytes": round(
                (rss.peak - idle_rss) / (max_large if max_large is not None else 256 * MIB), 2
            ),
            "prober_error": prober.error,
        }
    finally:
        gateway.stop()
        terminate(scan_sandbox)
        scan_file.unlink()  # 57 MB; the logs stay in workdir
    print(json.dumps(result, indent=2))
    name = "scan" if args.kind == "pdf" else f"scan-{args.kind}"
    if max_large is not None:
        name += f"-max{args.max_large_mb:g}"
    if args.parallel > 1:
        name += f"-x{args.parallel}"
    out = BENCH_DIR / "results" / f"{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if prober.error:
        # The prober stops at its first error: the latencies above cover only what it sent before it.
        print(f"prober failed, its latencies are partial: {prober.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
