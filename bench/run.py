"""One-command SMTP benchmark: smtp-sink, bare aiosmtpd, private Postfix and smtp-gateway."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import genmsg
import report
from gateway_target import Gateway, check_cli
from procmon import PeakRss
from results_model import Latency, Point, RunResult, SetupResult
from servers import BENCH_DIR, HOST, BareAiosmtpd, PrivatePostfix, Server, SetupError, SmtpSink

MESSAGES = {"5KB": genmsg.SMALL_NAME, "1MB": genmsg.LARGE_NAME}
MODES = ("persistent", "per-connection")
POINT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Profile:
    """How many messages per point, and how long a point should take when the rate is known."""

    name: str
    target_s: float
    base: dict[str, int]
    latency: dict[str, int]
    warmup: int


PROFILES = {
    "full": Profile("full", 6.0, {"5KB": 3000, "1MB": 300}, {"5KB": 1000, "1MB": 100}, 40),
    "quick": Profile("quick", 1.0, {"5KB": 600, "1MB": 60}, {"5KB": 200, "1MB": 20}, 20),
}


@dataclass(frozen=True)
class SetupSpec:
    """A server setup to measure."""

    name: str
    description: str
    upstream_s: float
    factory: Callable[[Path], Server]


def build_specs(wanted: list[str], gateway_cmd: list[str] | None, gateway_problem: str) -> list[SetupSpec]:
    """The setups to run, in order."""
    specs = [
        SetupSpec("smtp-sink", "smtp-sink process", 0.0, SmtpSink),
        SetupSpec("bare-aiosmtpd", "bare_aiosmtpd.py process", 0.0, BareAiosmtpd),
        SetupSpec(
            "postfix", "master + all its children (smtpd, cleanup, qmgr, smtp, ...)", 0.0, PrivatePostfix
        ),
    ]
    for latency_ms in (0, 50, 200):
        name = "gateway" if latency_ms == 0 else f"gateway+{latency_ms}ms"

        def factory(workdir: Path, ms: int = latency_ms) -> Server:
            if gateway_cmd is None:
                raise SetupError(gateway_problem or "gateway CLI unavailable")
            return Gateway(workdir, ms, gateway_cmd)

        specs.append(
            SetupSpec(name, "smtp-gateway serve process tree (not the sandbox)", latency_ms / 1000, factory)
        )
    return [s for s in specs if _selected(s.name, wanted)]


def _selected(name: str, wanted: list[str]) -> bool:
    return not wanted or name in wanted or name.split("+")[0] in wanted


def plan_count(
    profile: Profile, message: str, sessions: int, upstream_s: float, known: list[tuple[int, float]]
) -> int:
    """Messages for one point: enough for ~target_s at the expected rate, capped by the profile."""
    base = profile.base[message]
    estimate = math.inf
    below = [k for k in known if k[0] <= sessions]
    if below:
        s0, rate0 = max(below)
        estimate = rate0 * sessions / s0
    if upstream_s > 0:
        estimate = min(estimate, sessions / upstream_s)
    if math.isinf(estimate):
        return base
    return int(min(base, max(2 * sessions, 10, estimate * profile.target_s)))


def smtp_source_cmd(port: int, path: Path, sessions: int, count: int, persistent: bool) -> list[str]:
    """The smtp-source command line for one point."""
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    cmd = [binary, "-s", str(sessions), "-m", str(count), "-C", "3", "-M", "client.bench"]
    if persistent:
        cmd.append("-d")
    cmd += ["-F", str(path), "-f", genmsg.SENDER, "-t", genmsg.RECIPIENT, f"{HOST}:{port}"]
    return cmd


def run_smtp_source(port: int, path: Path, sessions: int, count: int, persistent: bool) -> tuple[float, str]:
    """Run smtp-source; return (elapsed seconds, error text or "")."""
    cmd = smtp_source_cmd(port, path, sessions, count, persistent)
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=POINT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, f"smtp-source timed out after {POINT_TIMEOUT_S:.0f}s"
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        return elapsed, (result.stderr or result.stdout).strip().replace("\n", " | ")[-300:] or "failed"
    return elapsed, ""


def measure_point(server: Server, setup: str, message: str, mode: str, sessions: int, count: int) -> Point:
    """One throughput point, with the server tree's peak RSS while it ran."""
    path = genmsg.MESSAGES_DIR / f"{MESSAGES[message]}.eml"
    point = Point(setup, message, mode, sessions, count)
    with PeakRss(server.rss_roots) as rss:
        point.elapsed_s, point.error = run_smtp_source(
            server.port, path, sessions, count, mode == "persistent"
        )
    point.peak_rss_bytes = rss.peak
    if not point.error:
        point.msgs_per_s = count / point.elapsed_s
        point.warning = server.settle(count)
    else:
        server.settle(0)
    return point


def measure_latency(
    server: Server, setup: str, message: str, count: int, auth: tuple[str, str] | None
) -> Latency:
    """Per-transaction latency at one session via smtpload.py."""
    path = genmsg.MESSAGES_DIR / f"{MESSAGES[message]}.eml"
    cmd = [sys.executable, str(BENCH_DIR / "smtpload.py"), f"{HOST}:{server.port}", "-F", str(path)]
    cmd += ["-m", str(count), "-s", "1", "--json"]
    if auth is not None:
        cmd += ["--auth", f"{auth[0]}:{auth[1]}"]
    lat = Latency(setup, message, count, auth=auth is not None)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=POINT_TIMEOUT_S, check=False)
        data = json.loads(result.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        lat.error = f"smtpload failed: {exc}"
        return lat
    ms = data.get("latencies_ms", {})
    lat.msgs_per_s = data["msgs_per_s"]
    lat.p50_ms, lat.p90_ms, lat.p99_ms = ms.get("p50", 0.0), ms.get("p90", 0.0), ms.get("p99", 0.0)
    lat.mean_ms, lat.max_ms = ms.get("mean", 0.0), ms.get("max", 0.0)
    lat.error = f"{data['errors']} errors, first: {data['first_error']}" if data["errors"] else ""
    server.settle(0 if lat.error else count)
    return lat


def warm_up(server: Server, profile: Profile) -> None:
    """Unmeasured messages so caches, pools and worker processes exist; fails fast on a broken setup."""
    path = genmsg.MESSAGES_DIR / f"{genmsg.SMALL_NAME}.eml"
    _elapsed, error = run_smtp_source(server.port, path, 2, profile.warmup, True)
    if error:
        raise SetupError(f"warm-up failed: {error}")
    if warning := server.settle(profile.warmup):
        print(f"    warm-up warning: {warning}", flush=True)


def say(point: Point) -> None:
    """Progress line for a point."""
    what = point.error or f"{point.msgs_per_s:10,.1f} msgs/s"
    print(
        f"  {point.setup:15} {point.message:4} {point.mode:14} {point.sessions:3} sess. n={point.count:<5} "
        f"{what}  ({point.elapsed_s:.1f}s, rss {point.peak_rss_bytes / report.MIB:.0f} MiB)"
        + (f"  WARNING: {point.warning}" if point.warning else ""),
        flush=True,
    )


def measure_throughput(
    server: Server, spec: SetupSpec, args: argparse.Namespace, result: SetupResult
) -> None:
    """All smtp-source points of one setup."""
    profile: Profile = args.profile
    for message in args.messages:
        known: list[tuple[int, float]] = []
        for mode in args.modes:
            for sessions in args.sessions:
                count = plan_count(profile, message, sessions, spec.upstream_s, known)
                point = measure_point(server, spec.name, message, mode, sessions, count)
                result.points.append(point)
                say(point)
                if not point.error:
                    known.append((sessions, point.msgs_per_s))


def measure_latencies(server: Server, spec: SetupSpec, args: argparse.Namespace, result: SetupResult) -> None:
    """One-session latency runs of one setup."""
    profile: Profile = args.profile
    auth = getattr(server, "auth", None)
    for message in args.messages:
        known = [(p.sessions, p.msgs_per_s) for p in result.points if p.message == message and not p.error]
        count = min(profile.latency[message], plan_count(profile, message, 1, spec.upstream_s, known))
        lat = measure_latency(server, spec.name, message, count, auth)
        result.latencies.append(lat)
        shown = lat.error or f"p50 {lat.p50_ms:.2f} ms  p99 {lat.p99_ms:.2f} ms"
        print(f"  {spec.name:15} {message:4} latency n={count:<5} {shown}", flush=True)


def run_setup(spec: SetupSpec, args: argparse.Namespace, workdir: Path) -> SetupResult:
    """Start one server, measure everything on it, stop it (also on errors and Ctrl-C)."""
    result = SetupResult(spec.name, spec.description)
    started = time.monotonic()
    print(f"== {spec.name}", flush=True)
    try:
        with spec.factory(workdir) as server:
            warm_up(server, args.profile)
            measure_throughput(server, spec, args, result)
            if not args.no_latency:
                measure_latencies(server, spec, args, result)
    except SetupError as exc:
        result.skipped = str(exc)
        print(f"  SKIPPED {spec.name}: {exc}", flush=True)
    result.peak_rss_bytes = max((p.peak_rss_bytes for p in result.points), default=0)
    result.duration_s = time.monotonic() - started
    return result


def compute_ratios(setups: list[SetupResult]) -> list[dict[str, object]]:
    """gateway rate ÷ Postfix rate and ÷ bare-aiosmtpd rate, per matching point."""
    by_name = {s.name: s for s in setups}
    ratios: list[dict[str, object]] = []
    for setup in setups:
        if not setup.name.startswith("gateway"):
            continue
        for point in setup.points:
            if point.error:
                continue
            row: dict[str, object] = {
                "setup": setup.name,
                "message": point.message,
                "mode": point.mode,
                "sessions": point.sessions,
            }
            for key, other in (("vs_postfix", "postfix"), ("vs_bare_aiosmtpd", "bare-aiosmtpd")):
                ref = (
                    report._find(by_name[other], point.message, point.mode, point.sessions)
                    if other in by_name
                    else None
                )
                row[key] = (
                    point.msgs_per_s / ref.msgs_per_s if ref and not ref.error and ref.msgs_per_s else None
                )
            ratios.append(row)
    return ratios


def _command_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return ""


def machine_info() -> dict[str, str]:
    """CPU model, cores, kernel, Python and relevant versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from importlib.metadata import version

        aiosmtpd_version = version("aiosmtpd")
    except Exception:
        aiosmtpd_version = "?"
    rev = _command_output(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": _command_output(["postconf", "-h", "mail_version"]) or "?",
        "aiosmtpd": aiosmtpd_version,
        "gateway_rev": rev or "uncommitted",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="small counts (~1-2 min) instead of the full run"
    )
    parser.add_argument(
        "--setups",
        default="",
        help="comma list: smtp-sink,bare-aiosmtpd,postfix,gateway,gateway+50ms,gateway+200ms",
    )
    parser.add_argument("--sessions", default="1,10,50", help="comma list of smtp-source session counts")
    parser.add_argument("--messages", default="5KB,1MB", help="comma list: 5KB,1MB")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list: persistent,per-connection")
    parser.add_argument("--no-latency", action="store_true", help="skip the one-session latency runs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where latest.json/md go")
    parser.add_argument(
        "--update-readme", action="store_true", help="also put the tables into bench/README.md"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the server logs directory")
    args = parser.parse_args(argv)
    args.profile = PROFILES["quick" if args.quick else "full"]
    args.setups = [s for s in args.setups.split(",") if s]
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    args.messages = [m for m in args.messages.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    for message in args.messages:
        if message not in MESSAGES:
            parser.error(f"unknown message {message!r}")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}")
    return args


def resolve_gateway(wanted: list[str]) -> tuple[list[str] | None, str]:
    """The gateway command, or None and the reason it cannot be used."""
    if wanted and not any(w.startswith("gateway") for w in wanted):
        return None, "not selected"
    try:
        return check_cli(), ""
    except SetupError as exc:
        print(f"NOTE: gateway rows will be skipped: {exc}", flush=True)
        return None, str(exc)


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def preflight() -> None:
    """Fail early when the load generator is missing."""
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        sys.exit("smtp-source not found: apt-get install postfix (it ships smtp-source and smtp-sink)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write bench/results/latest.{json,md}."""
    args = parse_args(argv)
    preflight()
    signal.signal(signal.SIGTERM, _sigterm)
    paths = genmsg.write_messages()
    messages = {
        label: {"file": str(paths[name].relative_to(BENCH_DIR)), "bytes": paths[name].stat().st_size}
        for label, name in MESSAGES.items()
    }
    run = RunResult(args.profile.name, machine_info(), messages)
    workdir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    started = time.monotonic()
    print(f"profile {args.profile.name}; logs in {workdir}", flush=True)
    try:
        specs = build_specs(args.setups, *resolve_gateway(args.setups))
        for spec in specs:
            run.setups.append(run_setup(spec, args, workdir))
    except KeyboardInterrupt:
        run.interrupted = True
        print("interrupted: servers stopped, writing partial results", flush=True)
    run.ratios = compute_ratios(run.setups)
    run.duration_s = time.monotonic() - started
    json_path, md_path = report.write_results(run, args.out)
    if args.update_readme and not report.update_readme(run, BENCH_DIR / "README.md"):
        print("README markers not found; README not updated", flush=True)
    print()
    print(report.render_markdown(run))
    print(f"wrote {json_path} and {md_path}")
    failed = any(s.skipped for s in run.setups) or any(p.error for s in run.setups for p in s.points)
    if args.keep_logs or failed:
        print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 130 if run.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
