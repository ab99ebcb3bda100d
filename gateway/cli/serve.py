"""`smtp-gateway serve`: run the gateway (one process, or --workers N under a supervisor)."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sqlite3
from typing import Any

import structlog

from gateway.cli.common import (
    load,
    queue_findings,
    refuse_on_problems,
    run_loop,
    spool_failure,
    stopped_by,
    with_config,
)
from gateway.config import Settings, preflight
from gateway.core.errors import SpoolUnavailable


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import App, run
    from gateway.ops import logs
    from gateway.ops.signals import Hangups

    # A SIGHUP (systemctl reload) from here on is noted, not fatal: a worker applies it once started; a
    # supervisor has nothing to apply (its workers read the configuration as they start).
    hangups = Hangups()
    hangups.catch_early()
    settings = load(args)
    if args.worker_slot is None:  # a worker's supervisor has checked (and a sibling worker holds the ports)
        findings = preflight.files(settings) + preflight.ports(all_ports(settings, args.workers))
        refuse_on_problems(findings + queue_findings(settings), args)
    logs.configure(settings.log)
    if args.workers > 1 and args.worker_slot is None:
        from gateway.ops.supervisor import Supervisor

        worker_args = ["serve", "--drain-timeout", str(args.drain_timeout), "--unready-delay", str(args.unready_delay)]
        if args.config:
            worker_args += ["--config", args.config]
        supervisor = Supervisor(worker_args, args.workers)
        status = supervisor.run()
        return status or stopped_by(supervisor.received or signal.SIGTERM)
    slot = args.worker_slot
    if args.supervisor_pid is not None:
        from gateway.ops.supervisor import stop_with_supervisor

        stop_with_supervisor(args.supervisor_pid)
    if args.ticket_keys_fd is not None:
        from gateway.smtp import tickets

        tickets.follow(args.ticket_keys_fd)
    if slot is not None:
        settings = as_worker(settings, slot)
        structlog.contextvars.bind_contextvars(worker=slot)

    def source() -> Settings:
        """SIGHUP: the configuration file and environment read again, as this process reads them."""
        fresh = load(args)
        return as_worker(fresh, slot) if slot is not None else fresh

    try:
        sig = run_loop(
            run(
                App(settings, source=source),
                drain_timeout=args.drain_timeout,
                hangups=hangups,
                unready_delay=args.unready_delay,
            ),
            preflight.serve_ports(settings),
        )
    except (sqlite3.DatabaseError, SpoolUnavailable) as exc:
        raise spool_failure(settings, exc) from None
    return stopped_by(sig)


def all_ports(settings: Settings, workers: int) -> list[preflight.Port]:
    """The ports `serve --workers N` binds: the listeners (shared by every worker) and each worker's operator
    endpoint (http.port + k), each checked before any worker starts (a worker that cannot bind its own would
    fail at every start)."""
    if workers == 1:
        return preflight.serve_ports(settings)
    found: dict[tuple[str, int], preflight.Port] = {}
    for slot in range(workers):
        for port in preflight.serve_ports(as_worker(settings, slot)):
            if port.what.startswith("http"):
                port = dataclasses.replace(port, what=f"{port.what} of worker {slot}")
            found.setdefault((port.address, port.port), port)
    return list(found.values())


def as_worker(settings: Settings, slot: int) -> Settings:
    """Worker `slot` of `serve --workers N`: every listener shared (SO_REUSEPORT), and its own operator
    endpoint port (http.port + slot), so each worker's metrics and health can be scraped."""
    listeners = [listener.model_copy(update={"reuse_port": True}) for listener in settings.listeners]
    http = settings.http
    if http.port:
        http = http.model_copy(update={"port": http.port + slot})
    return settings.model_copy(update={"listeners": listeners, "http": http})


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number of processes: give 1 or more (one per core is typical; 1 is the default)"
        )
    return count


def add_parser(sub: Any) -> None:
    p = with_config(sub.add_parser("serve", help="run the gateway"))
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="SECONDS", help="seconds sessions in DATA get on SIGTERM"
    )
    p.add_argument(
        "--unready-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on SIGTERM, seconds /readyz answers 503 while new sessions are still served, before the drain "
        "(a load balancer's health checks notice in that time; a second SIGTERM ends it)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes sharing the listeners (SO_REUSEPORT) and the queue; one per core is typical",
    )
    p.add_argument("--worker-slot", type=int, default=None, help=argparse.SUPPRESS)
    # The supervisor's pid: a worker stops (drains) when it dies (gateway/ops/supervisor.py).
    p.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    # The supervisor's pipe with the workers' shared TLS session-ticket secret (gateway/smtp/tickets.py).
    p.add_argument("--ticket-keys-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
