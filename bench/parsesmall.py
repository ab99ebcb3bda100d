"""mime.parse alone on the common small messages, microseconds a call; bench/parsebench.py is the large-message
counterpart. No server, no sockets.

    python bench/parsesmall.py                 # this checkout
    python bench/parsesmall.py --tree /tmp/a   # another source tree (e.g. `git archive main | tar -x -C /tmp/a`)
    python bench/parsesmall.py --reference     # this checkout, the feed parser alone (mime.parse(fast=False))

Time: the fastest of --repeat runs of a few thousand calls (timeit), as SMTP delivers the messages (CRLF, a
bytearray). On a shared machine run the trees in turn, more than once.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shapes() -> dict[str, bytes]:
    from bench.genmsg import scan_message

    small = (HERE / "messages" / "multipart-5k.eml").read_bytes().replace(b"\n", b"\r\n")
    text = (
        b"From: Printer <printer@bench.example.com>\r\nTo: rcpt@example.com\r\nSubject: Status report\r\n"
        b"Date: Mon, 02 Jun 2025 10:00:00 +0000\r\nMessage-ID: <p-1@bench.example.com>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + b"".join(b"Line %2d of the device report: toner 42%%, drum 80%%, pages 12345.\r\n" % i for i in range(64))
    )
    return {
        "multipart/alternative, QP (multipart-5k.eml)": small,
        "text/plain, 5 KB": text,
        "multipart/mixed, 20 KB PDF in base64": scan_message(20 * 1024),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=HERE.parent, help="source tree whose gateway/ is measured")
    parser.add_argument("--reference", action="store_true", help="mime.parse(fast=False): the feed parser alone")
    parser.add_argument("--repeat", type=int, default=7, help="timing runs per shape; the fastest is shown")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    messages = shapes()  # from this checkout's bench/, before the measured tree comes first on the path
    sys.path.insert(0, str(args.tree.resolve()))
    from gateway import mime

    parse: Callable[[bytearray], object] = (
        (lambda raw: mime.parse(raw, fast=False)) if args.reference else mime.parse  # type: ignore[call-arg]
    )
    print(f"mime.parse from {Path(mime.__file__).parents[1]}{' (fast=False)' if args.reference else ''}")
    for name, data in messages.items():
        raw = bytearray(data)
        number = max(200, 2_000_000 // len(raw))
        best = min(timeit.repeat(partial(parse, raw), number=number, repeat=args.repeat)) / number
        print(f"{name:48s} {len(raw):7d} bytes {best * 1e6:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
