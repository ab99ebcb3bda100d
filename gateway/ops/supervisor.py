"""`smtp-gateway serve --workers N`: N gateway processes sharing the listeners (SO_REUSEPORT: the kernel
spreads connections) and the queue (SQLite or PostgreSQL). A worker that dies is restarted (after a
growing pause if it keeps dying at start); its leases end at once because the new worker sees that the
old process of this host is gone. SIGTERM/SIGINT/SIGHUP are passed on to every worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

import structlog

from gateway.smtp import tickets

log = structlog.get_logger("gateway.supervisor")
QUICK_DEATH = 10.0  # a worker that dies sooner than this after its start is crash-looping
# A worker that died this many times in a row within QUICK_DEATH of its start cannot start (a port, a file,
# the queue): the supervisor stops every worker and exits 1 with the reason, as Postfix's master does not
# hide a daemon that cannot start, rather than restart it for ever behind a service that looks up.
FAILED_STARTS = 3


@dataclass
class _Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    started: float
    backoff: float = 1.0
    failed_starts: int = 0  # quick deaths in a row before this start


class Supervisor:
    def __init__(self, worker_args: Sequence[str], workers: int) -> None:
        self.worker_args = list(worker_args)
        # One TLS session-ticket secret for every worker (gateway/smtp/tickets.py), kept for restarted ones
        # and replaced at each SIGHUP (a rotation), through each worker's pipe (slot -> its write end).
        self.ticket_secret = tickets.new_secret()
        self.ticket_pipes: dict[int, int] = {}
        self.count = workers
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.exit_code = 0
        self.gave_up = False  # a worker could not start: exit 1, whatever the others' statuses
        self.received: signal.Signals | None = None  # the stop signal (SIGTERM or SIGINT) that came first

    def _spawn(self, slot: int, backoff: float = 1.0, failed_starts: int = 0) -> None:
        self._close_pipe(slot)
        given = self.ticket_secret
        secret, pipe = tickets.secret_pipe(given)
        try:
            args = [
                *self.worker_args,
                "--worker-slot",
                str(slot),
                "--ticket-keys-fd",
                str(secret),
                "--supervisor-pid",
                str(os.getpid()),
            ]
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args],
                stdin=subprocess.DEVNULL,
                pass_fds=(secret,),
            )
        except BaseException:
            os.close(pipe)
            raise
        finally:
            os.close(secret)
        self.ticket_pipes[slot] = pipe
        if self.ticket_secret is not given:  # a SIGHUP's rotation came while Popen ran, before this pipe was known
            tickets.send(pipe, self.ticket_secret)
        self.workers[slot] = _Worker(slot, proc, time.monotonic(), backoff, failed_starts)
        log.info("worker_started", worker=slot, pid=proc.pid)
        if self.stopping:
            # A SIGTERM that came while Popen ran was passed on to the workers known then, not to this one: it
            # would never stop, and we would wait for it for ever. (A second SIGTERM changes nothing in a drain.)
            proc.send_signal(signal.SIGTERM)

    def _close_pipe(self, slot: int) -> None:
        pipe = self.ticket_pipes.pop(slot, None)
        if pipe is not None:
            os.close(pipe)

    def _rotate_tickets(self) -> None:
        """A fresh ticket secret, into every worker's pipe before the SIGHUP whose reload takes it."""
        self.ticket_secret = tickets.new_secret()
        for pipe in self.ticket_pipes.values():
            tickets.send(pipe, self.ticket_secret)  # (a worker gone or stuck is restarted with the new one)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            if self.received is None:
                self.received = signal.Signals(signum)
        elif signum == signal.SIGHUP:
            self._rotate_tickets()
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def _stop_all(self) -> None:
        """Stop as on SIGTERM (each worker drains), without a signal of our own."""
        self.stopping = True
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._forward)
        for slot in range(self.count):
            if self.stopping:  # stopped while starting the workers: start no more
                break
            self._spawn(slot)
        restarts: dict[int, tuple[float, float, int]] = {}  # slot -> (when to start it again, backoff, failed starts)
        while self.workers or (restarts and not self.stopping):
            now = time.monotonic()
            for slot, worker in list(self.workers.items()):
                code = worker.proc.poll()
                if code is None:
                    continue
                del self.workers[slot]
                self._close_pipe(slot)
                if self.stopping:
                    # A worker still starting up when our SIGTERM came dies of it: that is a clean stop too, as
                    # is 130, a worker's own Ctrl-C (the terminal sends SIGINT to the whole process group).
                    if code not in (-signal.SIGTERM, 130):
                        self.exit_code = max(self.exit_code, abs(code))
                    log.info("worker_stopped", worker=slot, pid=worker.proc.pid, exit_code=code)
                    continue
                quick = now - worker.started < QUICK_DEATH
                failed = worker.failed_starts + 1 if quick else 0
                if failed >= FAILED_STARTS:
                    # It cannot start: its own output says why (a port in use, a file); restarting it for ever
                    # would hide that behind a supervisor that looks up. Every worker is stopped; exit status 1.
                    log.error(
                        "worker_cannot_start",
                        worker=slot,
                        pid=worker.proc.pid,
                        exit_code=code,
                        failed_starts=failed,
                        action="stopping every worker; the reason is in the worker's own lines above",
                    )
                    self.gave_up = True
                    self._stop_all()
                    continue
                backoff = min(worker.backoff * 2, 30.0) if quick else 1.0
                log.error("worker_died", worker=slot, pid=worker.proc.pid, exit_code=code, restart_in=backoff)
                restarts[slot] = (now + backoff, backoff, failed)
            if not self.stopping:
                for slot, (when, backoff, failed) in list(restarts.items()):
                    if now >= when:
                        del restarts[slot]
                        self._spawn(slot, backoff, failed)
            time.sleep(0.1)
        for slot in list(self.ticket_pipes):
            self._close_pipe(slot)
        return 1 if self.gave_up else self.exit_code


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_supervisor(supervisor: int) -> None:
    """In a worker: SIGTERM (a drain, as on `systemctl stop`) when the supervisor dies, even by SIGKILL, rather
    than serve on unsupervised, holding the ports a new `serve --workers` needs. Linux only (prctl); elsewhere
    nothing changes. The supervisor starts workers from its one thread, as PR_SET_PDEATHSIG requires."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("parent_death_signal_unset", error=os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != supervisor:  # it died before the prctl: nobody would send the signal
        os.kill(os.getpid(), signal.SIGTERM)
