"""Where a point's CPU goes, process by process, and what that allows on this machine: one message per connection,
5 KB by smtp-source, for Postfix, one gateway process and `serve --workers 2`, taken in turn.

    python bench/cpushare.py [--rounds 3] [--sessions 10] [--mode per-connection]

For each point: msgs/s and CPU milliseconds per message of the server (Postfix: master and every child it reaped;
the gateway: its process tree), of what stands behind it (smtp-sink; the sandbox upstream and the DNS server), of
the load generator (smtp-source and this process), their sum, and how much of the machine's cores the point used.
The sum is what one message costs the machine in this setup: a machine with N cores cannot carry more than
N x 1000 / sum messages a second of it, whatever the server does with its own share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import genmsg
from gateway_target import Gateway, check_cli
from procmon import cpu_seconds, tree
from run import PROFILES, measure_point, preflight, warm_up
from servers import RUN_DIR_PREFIX, PrivatePostfix, Server, claim, stop_stale

PARTS = ("server", "behind", "load", "total")


@dataclass
class Tally:
    """One setup's points: msgs/s, CPU ms per message by part, and the share of the cores used."""

    rates: list[float] = field(default_factory=list)
    per_message: dict[str, list[float]] = field(default_factory=lambda: {part: [] for part in PARTS})
    cores: list[float] = field(default_factory=list)


def _own_and_children() -> float:
    """CPU seconds of this process and of its children that were waited for (smtp-source)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _behind(server: Server) -> list[int]:
    """Pids of what answers behind the server: Postfix's smtp-sink; the gateway's sandbox and DNS server."""
    if isinstance(server, PrivatePostfix):
        return server.sink.rss_roots()
    assert isinstance(server, Gateway)
    return [p.pid for p in (server.sandbox, server.dns) if p is not None]


def point(server: Server, name: str, args: argparse.Namespace) -> tuple[float, dict[str, float], float]:
    """msgs/s, CPU ms per message by part, and cores used, of one point."""
    reaps = isinstance(server, PrivatePostfix)  # master reaps its smtpd/cleanup/smtp: count their time too
    servers, behind = tree(server.rss_roots()), tree(_behind(server))
    before = (cpu_seconds(servers, children=reaps), cpu_seconds(behind), _own_and_children())
    started = time.monotonic()
    measured = measure_point(server, name, "5KB", args.mode, args.sessions, PROFILES["full"])
    # After settle(): every accepted message has reached the sink or the sandbox.
    wall = time.monotonic() - started
    servers |= tree(server.rss_roots())
    after = (cpu_seconds(servers, children=reaps), cpu_seconds(behind), _own_and_children())
    if measured.error:
        raise SystemExit(f"{name}: point failed: {measured.error}")
    sent = max(measured.sent, 1)
    used = [b - a for a, b in zip(before, after, strict=True)]
    parts = dict(zip(PARTS, [*used, sum(used)], strict=True))
    return measured.msgs_per_s, {k: 1e3 * v / sent for k, v in parts.items()}, sum(used) / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="points per setup, taken in turn")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--mode", choices=("persistent", "per-connection"), default="per-connection")
    args = parser.parse_args(argv)
    preflight()  # smtp-source and smtp-sink, installed on a fresh Debian machine
    genmsg.write_messages()
    cmd = check_cli()
    stop_stale()
    os.chdir(tempfile.gettempdir())  # the workers run `python -m gateway`: not from a checkout's directory
    cores = os.cpu_count() or 1
    tallies: dict[str, Tally] = {}
    with tempfile.TemporaryDirectory(prefix=RUN_DIR_PREFIX) as tmp, contextlib.ExitStack() as stack:
        claim(Path(tmp))
        setups: dict[str, Server] = {}
        for name, make in (
            ("postfix", PrivatePostfix),
            ("gateway", lambda w: Gateway(w, 0, cmd, [])),
            ("gateway-x2", lambda w: Gateway(w, 0, cmd, [], workers=2)),
        ):
            workdir = Path(tmp) / name
            workdir.mkdir()
            server = make(workdir)
            stack.enter_context(server)
            warm_up(server, PROFILES["full"], ["5KB"])
            setups[name] = server
            tallies[name] = Tally()
        for n in range(args.rounds):
            order = list(setups) if n % 2 == 0 else list(reversed(setups))
            for name in order:
                rate, per_message, used = point(setups[name], name, args)
                tally = tallies[name]
                tally.rates.append(rate)
                tally.cores.append(used)
                for part, value in per_message.items():
                    tally.per_message[part].append(value)
                print(
                    f"round {n} {name:11s} {rate:8.1f} msgs/s  cpu/msg "
                    + "  ".join(f"{part} {value:.3f}" for part, value in per_message.items())
                    + f" ms  cores {used:.2f}  load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    print(f"\nmedians, {args.mode} 5 KB at {args.sessions} sessions, {cores} cores (CPU ms per message)")
    print("| setup | msgs/s | server | behind it | load generator | sum | cores used | ceiling on this machine |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tally in tallies.items():
        med = {part: statistics.median(values) for part, values in tally.per_message.items()}
        print(
            f"| {name} | {statistics.median(tally.rates):,.0f} | {med['server']:.3f} | {med['behind']:.3f} | "
            f"{med['load']:.3f} | {med['total']:.3f} | {statistics.median(tally.cores):.2f} | "
            f"{cores * 1e3 / med['total']:,.0f} msgs/s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
