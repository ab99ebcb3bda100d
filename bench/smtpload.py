"""Small asyncio SMTP load client that times each MAIL..end-of-DATA transaction."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


class SmtpError(Exception):
    """The server answered with an unexpected reply code."""


@dataclass
class LoadResult:
    """Outcome of one load run."""

    messages: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    msgs_per_s: float = 0.0
    latencies_ms: dict[str, float] = field(default_factory=dict)
    first_error: str = ""


def prepare_data(raw: bytes) -> bytes:
    """Return the DATA payload: CRLF line ends, dot-stuffed, terminated by CRLF.CRLF."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(stuffed) + b"\r\n.\r\n"


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty list)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(latencies_s: list[float]) -> dict[str, float]:
    """Latency summary in milliseconds."""
    values = sorted(x * 1000.0 for x in latencies_s)
    if not values:
        return {}
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


class Session:
    """One plain-text SMTP session."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def reply(self, *expected: int) -> tuple[int, str]:
        """Read a (possibly multi-line) reply and check its code."""
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed by server")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                break
        code = int(lines[-1][:3]) if lines[-1][:3].isdigit() else 0
        if expected and code not in expected:
            raise SmtpError(" | ".join(lines))
        return code, "\n".join(lines)

    async def command(self, line: str, *expected: int) -> tuple[int, str]:
        """Send one command line and read its reply."""
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply(*expected)

    async def hello(self, helo: str, auth: tuple[str, str] | None) -> None:
        """Greeting, EHLO and optional AUTH PLAIN."""
        await self.reply(220)
        await self.command(f"EHLO {helo}", 250)
        if auth is not None:
            token = base64.b64encode(f"\0{auth[0]}\0{auth[1]}".encode()).decode()
            await self.command(f"AUTH PLAIN {token}", 235)

    async def transaction(self, sender: str, rcpt: str, data: bytes) -> float:
        """Send one message; return the MAIL..end-of-DATA time in seconds."""
        start = time.perf_counter()
        await self.command(f"MAIL FROM:<{sender}>", 250)
        await self.command(f"RCPT TO:<{rcpt}>", 250, 251)
        await self.command("DATA", 354)
        self.writer.write(data)
        await self.reply(250)
        return time.perf_counter() - start

    async def quit(self) -> None:
        """Polite QUIT and close; errors are ignored."""
        with contextlib.suppress(OSError, SmtpError, TimeoutError):
            await asyncio.wait_for(self.command("QUIT"), 5)
        self.writer.close()


@dataclass
class Job:
    """Shared state of one load run."""

    host: str
    port: int
    data: bytes
    sender: str
    rcpt: str
    auth: tuple[str, str] | None
    per_connection: bool
    remaining: int
    deadline: float = math.inf  # time.perf_counter() after which no new message is started
    helo: str = "smtpload.bench"
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def take(self) -> bool:
        """Claim one message to send; False when all are claimed."""
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True


async def open_session(job: Job) -> Session:
    """Connect and say hello."""
    reader, writer = await asyncio.open_connection(job.host, job.port, limit=1 << 20)
    session = Session(reader, writer)
    await session.hello(job.helo, job.auth)
    return session


async def worker(job: Job) -> None:
    """Send messages until the job is exhausted, reconnecting after errors."""
    session: Session | None = None
    while job.take():
        try:
            if session is None:
                session = await open_session(job)
            job.latencies.append(await session.transaction(job.sender, job.rcpt, job.data))
        except (OSError, SmtpError, asyncio.IncompleteReadError) as exc:
            job.errors.append(f"{type(exc).__name__}: {exc}")
            if session is not None:
                session.writer.close()
            session = None
            continue
        if job.per_connection:
            await session.quit()
            session = None
    if session is not None:
        await session.quit()


async def run_load(job: Job, sessions: int) -> LoadResult:
    """Run `sessions` concurrent workers over the job and summarize."""
    start = time.perf_counter()
    await asyncio.gather(*(worker(job) for _ in range(sessions)))
    elapsed = time.perf_counter() - start
    done = len(job.latencies)
    return LoadResult(
        messages=done,
        errors=len(job.errors),
        elapsed_s=elapsed,
        msgs_per_s=done / elapsed if elapsed > 0 else 0.0,
        latencies_ms=summarize(job.latencies),
        first_error=job.errors[0] if job.errors else "",
    )


def parse_target(target: str) -> tuple[str, int]:
    """Split HOST:PORT."""
    host, _, port = target.rpartition(":")
    return host or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", help="HOST:PORT of the SMTP server")
    parser.add_argument("--file", "-F", required=True, type=Path, help="message file (headers + body)")
    parser.add_argument("--messages", "-m", type=int, default=100)
    parser.add_argument("--sessions", "-s", type=int, default=1)
    parser.add_argument("--from", dest="sender", default="sender@bench.example.com")
    parser.add_argument("--to", dest="rcpt", default="rcpt@example.com")
    parser.add_argument("--auth", default="", help="USER:PASSWORD for AUTH PLAIN (plain session, no TLS)")
    parser.add_argument("--per-connection", action="store_true", help="one message per connection")
    parser.add_argument("--duration", type=float, default=0.0, help="start no new message after this many s")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args = parse_args(argv)
    host, port = parse_target(args.target)
    user, sep, password = args.auth.partition(":")
    job = Job(
        host=host,
        port=port,
        data=prepare_data(args.file.read_bytes()),
        sender=args.sender,
        rcpt=args.rcpt,
        auth=(user, password) if sep else None,
        per_connection=args.per_connection,
        remaining=args.messages,
    )
    if args.duration > 0:
        job.deadline = time.perf_counter() + args.duration
    result = asyncio.run(run_load(job, args.sessions))
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        lat = " ".join(f"{k}={v:.2f}ms" for k, v in result.latencies_ms.items())
        print(f"{result.messages} msgs in {result.elapsed_s:.2f}s = {result.msgs_per_s:.1f} msgs/s; {lat}")
        if result.errors:
            print(f"{result.errors} errors, first: {result.first_error}", file=sys.stderr)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
