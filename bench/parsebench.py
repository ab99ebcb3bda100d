"""mime.parse alone on large messages: time and peak memory with big bodies lifted (gateway/mime/largeparts.py) and
parsed whole, in one run. No server, no sockets.

    python bench/parsebench.py             # the 1 MiB bench message, a 5 MB and a 40 MB scan
    python bench/parsebench.py --runs 3    # fewer timing runs
    python bench/parsebench.py --hostile   # also: the scan alone on messages built to make it work hard

Time: the fastest of --runs calls (perf_counter). Memory: tracemalloc's peak over one call, above what was
allocated before it (the raw message itself not counted). On a shared machine expect ±20 % on times.
"""

from __future__ import annotations

import argparse
import base64
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.genmsg import large_message
from gateway import mime
from gateway.mime import largeparts, parser

MB = 1_000_000


def scan_message(size: int, seed: int = 40) -> bytes:
    """A scan-to-email message of about `size` bytes as devices send it: a short text body and one PDF-like
    attachment (random bytes behind a PDF header), base64 in 76-character lines, CRLF line ends."""
    rng = random.Random(seed)
    content = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + rng.randbytes(size * 3 * 76 // (4 * 78) - 1_000)
    text = base64.b64encode(content)
    body = b"\r\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    return (
        b"From: Scanner <scanner@bench.example.com>\r\nTo: rcpt@example.com\r\nSubject: Scan from MFP-4410\r\n"
        b"Date: Mon, 02 Jun 2025 10:00:00 +0000\r\nMessage-ID: <scan-40@bench.example.com>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="----=_scan_boundary"\r\n\r\n'
        b"------=_scan_boundary\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        b"Scanned document attached.\r\n"
        b'------=_scan_boundary\r\nContent-Type: application/pdf; name="scan0001.pdf"\r\n'
        b'Content-Disposition: attachment; filename="scan0001.pdf"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + body
        + b"\r\n------=_scan_boundary--\r\n"
    )


def hostile_messages() -> dict[str, bytes]:
    """Shapes that make the scan for large bodies search much and lift little (docs/security.md)."""
    head = b"From: a@bench.example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    leaf = b"--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    line = b"QUFB" * 19 + b"\r\n"
    return {
        "false delimiter lines": head + b"--b\r\n\r\n" + b"\n--bX" * 2_000_000 + b"\r\n--b--\r\n",
        "repeated delimiter lines": head + b"--b\r\n" * 1_000_000,
        "40 MB of base64, then junk": head + leaf + b"QUFB" * 10_000_000 + b"!\r\n--b--\r\n",
        "100 base64 parts ending in junk": head + (leaf + line * 500 + b"!\r\n") * 100 + b"--b--\r\n",
        "100 levels deep": b"From: a@bench.example.com\r\n"
        + b"".join(b"Content-Type: multipart/mixed; boundary=d%d\r\n\r\n--d%d\r\n" % (i, i) for i in range(100))
        + leaf[5:]
        + line * 100_000,
        "2,500 parts of 38 KB": head + (leaf + line * 500) * 2_500 + b"--b--\r\n",
    }


def fastest(call: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def peak(call: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--runs", type=int, default=7, help="timing runs per message and way (default 7)")
    cli.add_argument("--hostile", action="store_true", help="also time the scan on hostile shapes")
    args = cli.parse_args()
    messages = {
        "attach-1m (1 MiB PDF, text + html)": large_message(),
        "5 MB scan": scan_message(5 * MB),
        "40 MB scan": scan_message(40 * MB),
    }
    print(f"{'message':38} {'size':>9} {'way':>7} {'time':>10} {'peak memory':>12}")
    for name, raw in messages.items():
        for way, lift_above in (("whole", None), ("lifted", largeparts.THRESHOLD)):
            seconds = fastest(
                lambda raw=raw, lift_above=lift_above: mime.parse(raw, lift_above),
                max(1, args.runs if len(raw) < 10 * MB else args.runs // 2),
            )
            memory = peak(lambda raw=raw, lift_above=lift_above: mime.parse(raw, lift_above))
            print(f"{name:38} {len(raw) / MB:7.1f}MB {way:>7} {seconds * 1000:8.1f}ms {memory / MB:10.1f}MB")
    if args.hostile:
        print(f"\n{'hostile message':38} {'size':>9} {'scan':>10} {'parse whole':>12} {'lifted':>7}")
        for name, raw in hostile_messages().items():
            scan = fastest(lambda raw=raw: largeparts.lift(raw, parser._POLICY), 3)
            whole = fastest(lambda raw=raw: mime.parse(raw, None), 1)
            lifted = largeparts.lift(raw, parser._POLICY)
            count = len(lifted.bodies) if lifted is not None else 0
            print(f"{name:38} {len(raw) / MB:7.1f}MB {scan * 1000:8.1f}ms {whole * 1000:10.1f}ms {count:7}")


if __name__ == "__main__":
    main()
