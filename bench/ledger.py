"""The message ledger's cost: the same gateway run with `[ledger] enabled = false` and `true`, in pairs
(off, on, off, on, ...) so that a drifting machine moves both alike; 5 KB messages by smtp-source.

    python bench/ledger.py [--pairs 5] [--sessions 10] [--mode persistent] [--queue sqlite|postgresql]
                           [--without-requests | --with-bodies]

Prints each pair's throughput and the gateway process's CPU time per message (user + system, every thread:
on a machine shared with other work, CPU per message moves less than throughput does), and the medians of
the on/off ratios; writes bench/results/ledger.json. `--with-bodies` adds a third point to each pair, the
ledger on with `keep_bodies = true` (the messages' text kept in the requests), with its own ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import genmsg
from gateway_target import Gateway, check_cli
from procmon import cpu_seconds, tree
from run import PROFILES, machine_info, measure_point, warm_up
from servers import BENCH_DIR, RUN_DIR_PREFIX, claim, stop_stale

OFF = "\n[ledger]\nenabled = false\n"


def one(workdir: Path, cmd: list[str], config: str, args: argparse.Namespace) -> tuple[float, float]:
    """msgs/s and CPU microseconds per message of one point with this [ledger] section (a fresh gateway,
    warmed up; the gateway's processes only, not the sandbox)."""
    profile = PROFILES["full"]
    server = Gateway(workdir, 0, cmd, [], queue=args.queue)
    server.extra_config = config
    with server:
        warm_up(server, profile, ["5KB"])
        pids = tree(server.rss_roots())
        before = cpu_seconds(pids)
        point = measure_point(server, "gateway", "5KB", args.mode, args.sessions, profile)
        used = cpu_seconds(pids) - before  # after settle(): the ledger's writes of the point are in
    if point.error:
        raise SystemExit(f"point failed ({config.strip()!r}): {point.error}")
    return point.msgs_per_s, 1e6 * used / max(point.sent, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--mode", choices=("persistent", "per-connection"), default="persistent")
    parser.add_argument("--queue", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--without-requests", action="store_true", help="the ledger on with keep_requests = false")
    parser.add_argument(
        "--with-bodies", action="store_true", help="a third point per pair: the ledger on with keep_bodies = true"
    )
    parser.add_argument("--out", type=Path, default=None, help="default: results/ledger.json (-without-requests)")
    args = parser.parse_args(argv)
    if args.with_bodies and args.without_requests:
        parser.error("--with-bodies keeps the requests")
    on_config = "\n[ledger]\nkeep_requests = false\n" if args.without_requests else ""
    if args.out is None:
        args.out = BENCH_DIR / "results" / ("ledger-without-requests.json" if args.without_requests else "ledger.json")
    genmsg.write_messages()
    cmd = check_cli()
    stop_stale()
    workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    claim(workdir)
    pairs = []
    for n in range(args.pairs):
        off, off_cpu = one(workdir, cmd, OFF, args)
        on, on_cpu = one(workdir, cmd, on_config, args)
        pair = {
            "off": off,
            "on": on,
            "ratio": on / off,
            "off_cpu_us": off_cpu,
            "on_cpu_us": on_cpu,
            "cpu_ratio": on_cpu / off_cpu,
        }
        line = (
            f"pair {n + 1}: ledger off {off:7.1f} msgs/s {off_cpu:6.0f} us CPU/msg;"
            f" on {on:7.1f} msgs/s {on_cpu:6.0f} us CPU/msg; on/off {on / off:.3f} (CPU {on_cpu / off_cpu:.3f})"
        )
        if args.with_bodies:
            bodies, bodies_cpu = one(workdir, cmd, "\n[ledger]\nkeep_bodies = true\n", args)
            pair |= {"bodies": bodies, "bodies_cpu_us": bodies_cpu, "bodies_cpu_ratio": bodies_cpu / off_cpu}
            line += f"; with bodies {bodies:7.1f} msgs/s {bodies_cpu:6.0f} us CPU/msg (CPU {bodies_cpu / off_cpu:.3f})"
        pairs.append(pair)
        print(line, flush=True)
    ratios = sorted(p["ratio"] for p in pairs)
    cpu = sorted(p["cpu_ratio"] for p in pairs)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "message": "5KB",
        "mode": args.mode,
        "sessions": args.sessions,
        "queue": args.queue,
        "keep_requests": not args.without_requests,
        "keep_bodies": False,
        "pairs": pairs,
        "median_ratio": statistics.median(ratios),
        "min_ratio": ratios[0],
        "max_ratio": ratios[-1],
        "median_cpu_ratio": statistics.median(cpu),
        "min_cpu_ratio": cpu[0],
        "max_cpu_ratio": cpu[-1],
        "loadavg_after": os.getloadavg(),
    }
    print(
        f"throughput on/off: median {result['median_ratio']:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f});"
        f" CPU per message on/off: median {result['median_cpu_ratio']:.3f} (min {cpu[0]:.3f}, max {cpu[-1]:.3f})"
    )
    if args.with_bodies:
        bodies = sorted(p["bodies_cpu_ratio"] for p in pairs)
        result |= {"median_bodies_cpu_ratio": statistics.median(bodies), "bodies_cpu_range": [bodies[0], bodies[-1]]}
        print(
            f"CPU per message with bodies/off: median {result['median_bodies_cpu_ratio']:.3f}"
            f" (min {bodies[0]:.3f}, max {bodies[-1]:.3f})"
        )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
