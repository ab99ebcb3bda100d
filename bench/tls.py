"""Printer-shaped load over TLS: one message per connection (connect, STARTTLS or TLS from the first byte,
EHLO, AUTH, one message, QUIT), the gateway next to a private Postfix with the same certificate.

    python bench/tls.py [--quick] [--plan standard|full] [--certs ecdsa,rsa] [--versions 1.2,1.3]
                        [--sessions 1,10,50] [--handshakes full,resumed] [--workers] [--update-readme]

Setups, all started once per certificate and measured in turn, point by point (a drifting machine moves them
alike): `postfix` (STARTTLS offered, TLS from the first byte on a second port, mynetworks: no AUTH; TLS
session tickets and its session cache on), `gateway` (one process; the clients AUTH PLAIN inside TLS),
`gateway-trusted` (the same process, a listener with a trusted network: no AUTH, like Postfix) and, with
`--workers`, `gateway-x2` (`serve --workers 2`, AUTH). The client is bench/tlsload.py (smtp-source has no
TLS). Each setup is warmed up first (10 messages per TLS mode, not reported). Each point: its rate, how many
connections resumed a TLS session, the latency of one connection (connect to QUIT), and the server's CPU time
per message (its whole process tree: every Postfix process, the gateway's workers; not the sandbox). Writes
results/tls.json and results/tls.md; --update-readme also puts the tables into docs/performance.md between its
bench:tls markers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import genmsg
from gateway_target import LOGIN, PASSWORD, Gateway, check_cli
from procmon import cpu_seconds, tree
from report import update_block
from run import machine_info
from servers import BENCH_DIR, HOST, RUN_DIR_PREFIX, PrivatePostfix, Server, SetupError, claim, stop_stale

MESSAGES = {"5KB": genmsg.SMALL_NAME, "300KB": genmsg.SCAN_NAME}
START, END = "<!-- bench:tls:start -->", "<!-- bench:tls:end -->"


@dataclass(frozen=True)
class Shape:
    """What one point sends: the TLS mode, version and handshake, the certificate and message."""

    cert: str  # "ecdsa" (P-256) | "rsa" (2048)
    mode: str  # "starttls" | "implicit"
    version: str  # "1.2" | "1.3"
    handshake: str  # "full" | "resumed"
    message: str  # "5KB" | "300KB"


@dataclass
class TlsPoint:
    setup: str
    shape: Shape
    sessions: int
    messages: int = 0
    msgs_per_s: float = 0.0
    resumed: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_us_per_msg: float = 0.0
    error: str = ""
    warning: str = ""


@dataclass
class TlsRun:
    machine: dict[str, str]
    duration_s: float = 0.0
    points: list[TlsPoint] = field(default_factory=list)
    interrupted: bool = False
    setup_error: str = ""  # a server that would not start or warm up: the points after it were not taken


def plan(args: argparse.Namespace) -> list[Shape]:
    """`standard`: STARTTLS with 5 KB in every combination; implicit TLS with TLS 1.3; the 300 KB scan with a
    full TLS 1.3 handshake. `full`: every combination of everything."""
    shapes: list[Shape] = []
    for cert in args.certs:
        for mode in ("starttls", "implicit"):
            for message in MESSAGES:
                for version in args.versions:
                    for handshake in args.handshakes:
                        shape = Shape(cert, mode, version, handshake, message)
                        if args.plan == "full" or _standard(shape):
                            shapes.append(shape)
    return shapes


def _standard(shape: Shape) -> bool:
    if shape.message == "300KB":
        return shape.mode == "starttls" and shape.version == "1.3" and shape.handshake == "full"
    return shape.mode == "starttls" or shape.version == "1.3"


class Setup:
    """A server to measure, the port and credentials its clients use for a shape."""

    def __init__(self, name: str, server: Server, auth: bool, trusted: bool = False) -> None:
        self.name, self.server, self.auth, self.trusted = name, server, auth, trusted

    def port(self, mode: str) -> int:
        if isinstance(self.server, PrivatePostfix):
            return self.server.port if mode == "starttls" else self.server.tls_port
        assert isinstance(self.server, Gateway)
        return self.server.tls_ports[f"{mode}-trusted" if self.trusted else mode]


def load(setup: Setup, shape: Shape, sessions: int, duration: float, messages: int = 0) -> dict[str, object]:
    """One tlsload.py run: `duration` seconds, or `messages` messages when given."""
    path = genmsg.MESSAGES_DIR / f"{MESSAGES[shape.message]}.eml"
    cmd = [sys.executable, str(BENCH_DIR / "tlsload.py"), f"{HOST}:{setup.port(shape.mode)}", "-F", str(path)]
    cmd += ["-s", str(sessions), "--duration", str(duration), "--tls", shape.version, "--json"]
    if messages:
        cmd += ["--messages", str(messages)]
    cmd += ["--from", genmsg.SENDER, "--to", genmsg.RECIPIENT]
    if shape.mode == "implicit":
        cmd.append("--implicit")
    if shape.handshake == "resumed":
        cmd.append("--resume")
    if setup.auth:
        cmd += ["--auth", f"{LOGIN}:{PASSWORD}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120, check=False)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise ValueError(f"tlsload.py failed: {result.stderr.strip()[-300:]}") from None
    assert isinstance(data, dict)
    return data


def measure(setup: Setup, shape: Shape, sessions: int, duration: float) -> TlsPoint:
    point = TlsPoint(setup.name, shape, sessions)
    pids = tree(setup.server.rss_roots())
    before = cpu_seconds(pids, children=True)
    try:
        data = load(setup, shape, sessions, duration)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        point.error = str(exc)
        return point
    point.messages, point.msgs_per_s = int(str(data["messages"])), float(str(data["msgs_per_s"]))
    point.resumed = int(str(data["resumed"]))
    latencies = data.get("latencies_ms") or {}
    assert isinstance(latencies, dict)
    point.p50_ms, point.p99_ms = latencies.get("p50", 0.0), latencies.get("p99", 0.0)
    if data["errors"]:
        point.error = f"{data['errors']} errors, first: {data['first_error']}"
    settled = setup.server.settle(point.messages, sessions)
    point.error = "; ".join(text for text in (point.error, settled.error) if text)  # not passed on: no rate
    point.warning = settled.warning
    used = cpu_seconds(pids | tree(setup.server.rss_roots()), children=True) - before
    point.cpu_us_per_msg = 1e6 * used / max(point.messages, 1)
    return point


# Unmeasured connections per setup and TLS mode before the first point (as run.py's warm-up): otherwise the
# first point pays the server's first handshakes, its caches filling and its lazy imports.
WARMUP_MESSAGES = 10
WARMUP_LIMIT_S = 60.0


def warm_up(setups: list[Setup], shapes: list[Shape]) -> None:
    """A few messages on one session through each setup and TLS mode of `shapes`, not reported; a setup
    whose warm-up fails (or is not passed on) is a SetupError before any point is measured."""
    for setup in setups:
        for mode in dict.fromkeys(shape.mode for shape in shapes):
            shape = next(shape for shape in shapes if shape.mode == mode)
            try:
                data = load(setup, shape, 1, WARMUP_LIMIT_S, messages=WARMUP_MESSAGES)
            except (subprocess.TimeoutExpired, ValueError) as exc:
                raise SetupError(f"{setup.name} {mode} warm-up failed: {exc}") from exc
            if data["errors"]:
                raise SetupError(f"{setup.name} {mode} warm-up failed: {data['first_error']}")
            settled = setup.server.settle(int(str(data["messages"])))
            if settled.error:
                raise SetupError(f"{setup.name} {mode} warm-up: {settled.error}")


def certificate(workdir: Path, cert: str) -> tuple[Path, Path]:
    sys.path.insert(0, str(BENCH_DIR.parent))
    try:
        from gateway.smtp.tls import write_self_signed
    finally:
        sys.path.remove(str(BENCH_DIR.parent))
    return write_self_signed(workdir / f"cert-{cert}", "localhost", "ec" if cert == "ecdsa" else "rsa")


def servers(workdir: Path, cert: tuple[Path, Path], args: argparse.Namespace, cmd: list[str]) -> list[Setup]:
    postfix = PrivatePostfix(workdir)
    postfix.tls = cert
    gateway = Gateway(workdir, 0, cmd, [], tls=cert)
    setups = [Setup("postfix", postfix, auth=False), Setup("gateway", gateway, auth=True)]
    setups.append(Setup("gateway-trusted", gateway, auth=False, trusted=True))
    if args.workers:
        setups.append(Setup("gateway-x2", Gateway(workdir, 0, cmd, [], workers=2, tls=cert), auth=True))
    return setups


def run_cert(workdir: Path, cert: str, shapes: list[Shape], args: argparse.Namespace, out: TlsRun) -> None:
    setups = servers(workdir, certificate(workdir, cert), args, check_cli())
    started: list[Server] = []
    try:
        for setup in setups:
            if setup.server not in started:
                setup.server.start()
                started.append(setup.server)
        warm_up(setups, shapes)
        for shape in shapes:
            for sessions in args.sessions:
                for setup in setups:
                    point = measure(setup, shape, sessions, args.duration)
                    out.points.append(point)
                    say(point)
    finally:
        for server in started:
            server.stop()


def say(point: TlsPoint) -> None:
    s = point.shape
    what = point.error or (
        f"{point.msgs_per_s:8,.1f} msgs/s resumed {point.resumed}/{point.messages}"
        f" p50 {point.p50_ms:.1f} ms cpu {point.cpu_us_per_msg / 1000:.2f} ms/msg"
    )
    print(
        f"  {s.cert:5} {s.mode:8} TLS{s.version} {s.handshake:7} {s.message:5} {point.sessions:3} sess."
        f" {point.setup:16} {what}" + (f"  WARNING: {point.warning}" if point.warning else ""),
        flush=True,
    )


# -- tables -----------------------------------------------------------------------------------------------

SETUP_LABELS = {
    "postfix": "Postfix (mynetworks)",
    "gateway": "gateway, 1 process (AUTH)",
    "gateway-trusted": "gateway, 1 process (trusted network)",
    "gateway-x2": "gateway, `--workers 2` (AUTH)",
}


def _find(run: TlsRun, setup: str, shape: Shape, sessions: int) -> TlsPoint | None:
    for point in run.points:
        if (point.setup, point.shape, point.sessions) == (setup, shape, sessions):
            return point
    return None


def _cell(point: TlsPoint | None, ref: TlsPoint | None) -> str:
    if point is None:
        return "–"
    if point.error:
        return "error"
    rate = f"{point.msgs_per_s:,.0f}" if point.msgs_per_s >= 100 else f"{point.msgs_per_s:,.1f}"
    if ref is not None and ref is not point and not ref.error and ref.msgs_per_s:
        rate += f" ({point.msgs_per_s / ref.msgs_per_s:.2f}×)"
    return rate


def tables(run: TlsRun) -> list[str]:
    sessions = sorted({p.sessions for p in run.points})
    setups = [s for s in SETUP_LABELS if any(p.setup == s for p in run.points)]
    shapes = list(dict.fromkeys(p.shape for p in run.points))
    m = run.machine
    lines = [
        f"Run {m['date']}, {run.duration_s:.0f} s. Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']},"
        f" Postfix {m['postfix']}, gateway {m['gateway_rev']}.",
        "",
        "One message per connection over TLS (bench/tls.py), msgs/s (× Postfix, same shape and sessions):",
        "",
        "| mode | message | cert | TLS | handshake | setup | " + " | ".join(f"{s} sess." for s in sessions) + " |",
        "|" + " --- |" * (6 + len(sessions)),
    ]
    for shape in shapes:
        for setup in setups:
            cells = [_cell(_find(run, setup, shape, n), _find(run, "postfix", shape, n)) for n in sessions]
            lines.append(
                f"| {shape.mode} | {shape.message} | {shape.cert} | {shape.version} | {shape.handshake} |"
                f" {SETUP_LABELS[setup]} | " + " | ".join(cells) + " |"
            )
    lines += [
        "",
        "Server CPU per message (ms, the whole process tree) and connections resumed, at 10 sessions:",
        "",
        "| mode | message | cert | TLS | handshake | " + " | ".join(SETUP_LABELS[s] for s in setups) + " |",
        "|" + " --- |" * (5 + len(setups)),
    ]
    middle = 10 if 10 in sessions else sessions[len(sessions) // 2]
    for shape in shapes:
        cells = []
        for setup in setups:
            point = _find(run, setup, shape, middle)
            cells.append(
                "–"
                if point is None or point.error
                else f"{point.cpu_us_per_msg / 1000:.2f} ms, {point.resumed}/{point.messages} resumed"
            )
        lines.append(
            f"| {shape.mode} | {shape.message} | {shape.cert} | {shape.version} | {shape.handshake} | "
            + " | ".join(cells)
            + " |"
        )
    notes = [
        f"- {p.setup} {p.shape.cert} {p.shape.mode} TLS{p.shape.version} {p.shape.handshake} {p.shape.message}"
        f" {p.sessions} sess.: {p.error or p.warning}"
        for p in run.points
        if p.error or p.warning
    ]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 s points, ECDSA only, 1 and 10 sessions")
    parser.add_argument("--plan", choices=("standard", "full"), default="standard")
    parser.add_argument("--certs", default="ecdsa,rsa")
    parser.add_argument("--versions", default="1.2,1.3")
    parser.add_argument("--handshakes", default="full,resumed")
    parser.add_argument("--sessions", default="1,10,50")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    parser.add_argument("--workers", action="store_true", help="also `serve --workers 2` (gateway-x2)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--update-readme", action="store_true", help="also put the tables into docs/performance.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.certs, args.sessions, args.duration = "ecdsa", "1,10", 1.0
    args.certs = [c for c in args.certs.split(",") if c]
    args.versions = [v for v in args.versions.split(",") if v]
    args.handshakes = [h for h in args.handshakes.split(",") if h]
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    genmsg.write_messages()
    stop_stale()
    workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    claim(workdir)
    run = TlsRun(machine_info())
    started = time.monotonic()
    shapes = plan(args)
    try:
        for cert in args.certs:
            run_cert(workdir, cert, [s for s in shapes if s.cert == cert], args, run)
    except KeyboardInterrupt:
        run.interrupted = True
    except SetupError as exc:
        print(f"setup failed: {exc}", flush=True)
        run.setup_error = str(exc)
    run.duration_s = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    data = asdict(run)
    data["loadavg_after"] = os.getloadavg()
    (args.out / "tls.json").write_text(json.dumps(data, indent=2) + "\n")
    text = "\n".join(tables(run))
    (args.out / "tls.md").write_text("# smtp-gateway TLS benchmark: latest run\n\n" + text + "\n")
    print("\n" + text)
    if args.update_readme and not update_block(BENCH_DIR.parent / "docs" / "performance.md", START, END, text):
        print("bench:tls markers not found; docs/performance.md not updated", flush=True)
    return exit_status(run)


def exit_status(run: TlsRun) -> int:
    """130 after Ctrl-C, 1 when a setup failed or a point has an error, else 0; the last line says which, so
    that a scripted run can tell a complete result from a partial one."""
    if run.interrupted:
        print("INTERRUPTED: partial results (exit 130)", flush=True)
        return 130
    failed = [f"setup failed: {run.setup_error}"] if run.setup_error else []
    failed += [f"{p.setup} {p.shape.cert} {p.shape.mode} {p.sessions} sess.: {p.error}" for p in run.points if p.error]
    if failed:
        print(f"FAILED (exit 1): {len(failed)} setups or points did not complete, first: {failed[0]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
