"""One message per connection over TLS, the way printers and scanners send: connect, STARTTLS (or TLS from
the first byte), EHLO, AUTH PLAIN (optional), one message, QUIT. smtp-source cannot speak TLS.

    python bench/tlsload.py 127.0.0.1:2525 -F msg.eml -s 10 --duration 5 [--implicit] [--tls 1.2|1.3]
                            [--resume] [--auth user:pw] [--json]

One thread per session: Python's ssl module releases the GIL during handshakes and reads, so the sessions'
handshakes run in parallel. `--resume` offers each session's previous TLS session (a TLS 1.2 session id or
ticket, a TLS 1.3 ticket) on its next connection, as a device's TLS stack does; the result says how many
connections were resumed. The client checks no certificate (both servers use the same self-signed one).
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import ssl
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smtpload import SmtpError, parse_target, prepare_data, summarize

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def client_context(version: str) -> ssl.SSLContext:
    """A client context pinned to one TLS version, checking nothing (the bench's self-signed certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = VERSIONS[version]
    return context


class Conn:
    """A blocking SMTP connection with its own line buffer (plain, then TLS after STARTTLS)."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self, *expected: int) -> int:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SmtpError("connection closed by server")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\n")
            if line[3:4] != b"-":
                code = int(line[:3])
                if expected and code not in expected:
                    raise SmtpError(line.decode(errors="replace").strip())
                return code

    def command(self, line: str, *expected: int) -> int:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply(*expected)


@dataclass
class Result:
    """Outcome of one run."""

    messages: int = 0
    errors: int = 0
    resumed: int = 0
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0
    latencies_ms: dict[str, float] = field(default_factory=dict)  # connect to QUIT's reply, per connection
    first_error: str = ""
    tls_version: str = ""


@dataclass
class Job:
    host: str
    port: int
    data: bytes
    sender: str
    rcpt: str
    auth: tuple[str, str] | None
    implicit: bool
    resume: bool
    context: ssl.SSLContext
    deadline: float
    remaining: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    resumed: int = 0
    version: str = ""

    def take(self) -> bool:
        with self.lock:
            if self.remaining <= 0 or time.perf_counter() >= self.deadline:
                return False
            self.remaining -= 1
            return True


def one_message(job: Job, session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, str]:
    """One connection, one message; the TLS session to offer next time, whether this one was resumed."""
    raw = socket.create_connection((job.host, job.port), timeout=30)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if job.implicit:
            conn = Conn(job.context.wrap_socket(raw, session=session))
            conn.reply(220)
            conn.command("EHLO tlsload.bench", 250)
        else:
            conn = Conn(raw)
            conn.reply(220)
            conn.command("EHLO tlsload.bench", 250)
            conn.command("STARTTLS", 220)
            conn = Conn(job.context.wrap_socket(raw, session=session))
            conn.command("EHLO tlsload.bench", 250)
        tls = conn.sock
        assert isinstance(tls, ssl.SSLSocket)
        if job.auth is not None:
            token = base64.b64encode(f"\0{job.auth[0]}\0{job.auth[1]}".encode()).decode()
            conn.command(f"AUTH PLAIN {token}", 235)
        conn.command(f"MAIL FROM:<{job.sender}>", 250)
        conn.command(f"RCPT TO:<{job.rcpt}>", 250, 251)
        conn.command("DATA", 354)
        tls.sendall(job.data)
        conn.reply(250)
        conn.command("QUIT", 221)
        # Read after the reply: a TLS 1.3 ticket arrives after the handshake and is taken in by reads.
        return tls.session, tls.session_reused, str(tls.version())
    finally:
        raw.close()


def worker(job: Job) -> None:
    session: ssl.SSLSession | None = None
    while job.take():
        started = time.perf_counter()
        try:
            next_session, reused, version = one_message(job, session if job.resume else None)
        except (OSError, SmtpError, ValueError) as exc:
            with job.lock:
                job.errors.append(f"{type(exc).__name__}: {exc}")
            session = None
            continue
        elapsed = time.perf_counter() - started
        session = next_session
        with job.lock:
            job.latencies.append(elapsed)
            job.resumed += reused
            job.version = version


def run(job: Job, sessions: int) -> Result:
    threads = [threading.Thread(target=worker, args=(job,), daemon=True) for _ in range(sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    done = len(job.latencies)
    return Result(
        messages=done,
        errors=len(job.errors),
        resumed=job.resumed,
        elapsed_s=elapsed,
        msgs_per_s=done / elapsed if elapsed > 0 else 0.0,
        latencies_ms=summarize(job.latencies),
        first_error=job.errors[0] if job.errors else "",
        tls_version=job.version,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="HOST:PORT")
    parser.add_argument("--file", "-F", required=True, type=Path)
    parser.add_argument("--sessions", "-s", type=int, default=1)
    parser.add_argument("--messages", "-m", type=int, default=10**9, help="at most this many messages")
    parser.add_argument("--duration", type=float, default=5.0, help="start no new connection after this many s")
    parser.add_argument("--implicit", action="store_true", help="TLS from the first byte (port 465), not STARTTLS")
    parser.add_argument("--tls", choices=sorted(VERSIONS), default="1.3")
    parser.add_argument("--resume", action="store_true", help="offer the previous TLS session on each connection")
    parser.add_argument("--auth", default="", help="USER:PASSWORD for AUTH PLAIN inside TLS")
    parser.add_argument("--from", dest="sender", default="sender@bench.example.com")
    parser.add_argument("--to", dest="rcpt", default="rcpt@example.com")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    host, port = parse_target(args.target)
    user, sep, password = args.auth.partition(":")
    job = Job(
        host=host,
        port=port,
        data=prepare_data(args.file.read_bytes()),
        sender=args.sender,
        rcpt=args.rcpt,
        auth=(user, password) if sep else None,
        implicit=args.implicit,
        resume=args.resume,
        context=client_context(args.tls),
        deadline=time.perf_counter() + args.duration,
        remaining=args.messages,
    )
    result = run(job, args.sessions)
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        lat = " ".join(f"{k}={v:.2f}ms" for k, v in result.latencies_ms.items())
        print(
            f"{result.messages} msgs in {result.elapsed_s:.2f}s = {result.msgs_per_s:.1f} msgs/s"
            f" ({result.tls_version}, {result.resumed} resumed); {lat}"
        )
        if result.errors:
            print(f"{result.errors} errors, first: {result.first_error}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
