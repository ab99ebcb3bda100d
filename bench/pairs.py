"""Two versions of the gateway side by side: both started at once, their points taken in turn (A B, B A, ...)
so that a drifting machine moves both alike; 5 KB messages by smtp-source, one per connection by default.

    python bench/pairs.py BASE_TREE [--tree DIR] [--pairs 5] [--sessions 10] [--workers 1] [--mode per-connection]
                                    [--message 5KB]

BASE_TREE (A) and --tree (B, default: this checkout) are source trees with a gateway/ package, e.g. an export of
main (`git archive main | tar -x -C /tmp/main`); both run with this checkout's Python and packages. Prints each
point's throughput and the gateway's CPU time per message (its process tree, every thread: on a shared
machine it moves less than throughput does), and the medians of the B/A ratios with their quartiles and range
(an A/A run differs by a few %: a median whose quartiles straddle 1.0 shows no change). Each side goes first
in half the pairs: an odd --pairs is raised by one. A point with an error (refused messages, or messages
that did not reach the sandbox) stops the run with a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import genmsg
from gateway_target import Gateway, check_cli
from procmon import cpu_seconds, tree
from run import MESSAGES, PROFILES, measure_point, warm_up
from servers import BENCH_DIR, RUN_DIR_PREFIX, claim, stop_stale


def point(server: Gateway, args: argparse.Namespace) -> tuple[float, float]:
    """msgs/s and CPU milliseconds per message of one point."""
    pids = tree(server.rss_roots())
    before = cpu_seconds(pids)
    measured = measure_point(server, "gateway", args.message, args.mode, args.sessions, PROFILES["full"])
    used = cpu_seconds(pids) - before  # after settle(): every accepted message reached the sandbox
    if measured.error:
        raise SystemExit(f"point failed: {measured.error}")
    return measured.msgs_per_s, 1e3 * used / max(measured.sent, 1)


def orders(pairs: int) -> list[tuple[int, int]]:
    """The order of each pair's two points: A B, B A, ... over an even number of pairs, so that each side
    goes first equally often (a machine that drifts, or a first point that is slower, favours neither)."""
    return [(0, 1) if n % 2 == 0 else (1, 0) for n in range(pairs + pairs % 2)]


def summary(ratios: list[float]) -> str:
    """The median of the pairs' ratios, their quartiles (the middle half of the pairs) and their range."""
    ordered = sorted(ratios)
    if len(ordered) < 2:
        return f"{ordered[0]:.3f}" if ordered else "-"
    low, mid, high = statistics.quantiles(ordered, n=4, method="inclusive")
    return f"{mid:.3f}, quartiles {low:.3f}-{high:.3f}, range {ordered[0]:.2f}-{ordered[-1]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path, help="A: the source tree to compare against")
    parser.add_argument("--tree", type=Path, default=BENCH_DIR.parent, help="B: default, this checkout")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="serve --workers")
    parser.add_argument("--mode", choices=("persistent", "per-connection"), default="per-connection")
    parser.add_argument("--message", choices=tuple(MESSAGES), default="5KB", help="the bench's message (run.py)")
    args = parser.parse_args(argv)
    trees = [args.base.resolve(), args.tree.resolve()]
    for source in trees:
        if not (source / "gateway" / "__init__.py").exists():
            parser.error(f"{source}: no gateway/ package")
    genmsg.write_messages()
    cmd = check_cli()
    stop_stale()
    # The workers run `python -m gateway`, which imports from the working directory first: not from here.
    os.chdir(tempfile.gettempdir())
    rates: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    with tempfile.TemporaryDirectory(prefix=RUN_DIR_PREFIX) as tmp, contextlib.ExitStack() as stack:
        claim(Path(tmp))
        servers = []
        for index, source in enumerate(trees):
            workdir = Path(tmp) / str(index)
            workdir.mkdir()
            server = Gateway(workdir, 0, cmd, [], workers=args.workers)
            server.env["PYTHONPATH"] = str(source)  # before the console script's own install
            stack.enter_context(server)
            warm_up(server, PROFILES["full"], [args.message])
            servers.append(server)
        turns = orders(args.pairs)
        if len(turns) != args.pairs:
            print(f"{len(turns)} pairs, not {args.pairs}: each side goes first in half of them", flush=True)
        for n, order in enumerate(turns):
            for index in order:
                rate, per_message = point(servers[index], args)
                rates[index].append(rate)
                cpu[index].append(per_message)
                print(
                    f"pair {n} {'AB'[index]} {rate:8.1f} msgs/s  cpu/msg {per_message:.3f} ms  "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    throughput = [b / a for a, b in zip(rates[0], rates[1], strict=True)]
    per_msg = [b / a for a, b in zip(cpu[0], cpu[1], strict=True)]
    print(f"B/A throughput {summary(throughput)} (" + ", ".join(f"{r:.2f}" for r in throughput) + ")")
    print(f"B/A CPU per message {summary(per_msg)} (" + ", ".join(f"{r:.2f}" for r in per_msg) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
