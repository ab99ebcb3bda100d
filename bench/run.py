"""One-command SMTP benchmark: smtp-sink, bare aiosmtpd, private Postfix and smtp-gateway (DMDS and dEngage)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import genmsg
import report
import smtpsource
from gateway_target import PROVIDERS, Gateway, check_cli
from procmon import PeakRss
from results_model import Latency, Point, RunResult, SetupResult
from servers import (
    BENCH_DIR,
    HOST,
    RUN_DIR_PREFIX,
    BareAiosmtpd,
    PrivatePostfix,
    Server,
    SetupError,
    SmtpSink,
    claim,
    stop_stale,
)
from smtpsource import SourceRun

MESSAGES = {"5KB": genmsg.SMALL_NAME, "1MB": genmsg.LARGE_NAME}
MODES = ("persistent", "per-connection")
# --quick leaves out gateway+50ms (between the two others) to stay near two minutes.
QUICK_SETUPS = [
    "smtp-sink",
    "bare-aiosmtpd",
    "postfix",
    "gateway",
    "gateway+200ms",
    "gateway-x2",
    "gateway-x2-pg",
    "gateway-dengage",
    "gateway-dengage-limited",
]
# The dEngage setups: the account's limiter off (rate_limit = 0), and on at its default 25/s against a
# sandbox enforcing dEngage's 30 requests/s per IP.
DENGAGE_RATE = 25.0


@dataclass(frozen=True)
class Profile:
    """Each point sends up to `max_count` messages and stops after `target_s` seconds."""

    name: str
    target_s: float
    max_count: dict[str, int]
    latency_max: dict[str, int]
    warmup: dict[str, int]


PROFILES = {
    "full": Profile("full", 5.0, {"5KB": 20000, "1MB": 2000}, {"5KB": 5000, "1MB": 500}, {"5KB": 50, "1MB": 10}),
    "quick": Profile("quick", 1.0, {"5KB": 4000, "1MB": 400}, {"5KB": 1000, "1MB": 100}, {"5KB": 10, "1MB": 3}),
}


@dataclass(frozen=True)
class SetupSpec:
    """A server setup to measure."""

    name: str
    description: str
    factory: Callable[[Path], Server]


def install_postfix() -> None:
    """On a fresh Debian machine, as root: install Postfix (smtp-source, smtp-sink) without its
    configuration dialog, so the one bench command works there too. The system Postfix is never started
    by the bench; it runs its own instance."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    print("installing Debian's postfix package (smtp-source, smtp-sink) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], env=env, check=False)


def build_specs(
    wanted: list[str],
    gateway_cmd: list[str] | None,
    gateway_problem: str,
    serve_args: list[str],
    providers: tuple[str, ...] = ("dmds",),
) -> list[SetupSpec]:
    """The setups to run, in order: the baselines, then the gateway's with each provider's upstream."""
    specs = [
        SetupSpec("smtp-sink", "smtp-sink process", SmtpSink),
        SetupSpec("bare-aiosmtpd", "bare_aiosmtpd.py process", BareAiosmtpd),
        SetupSpec("postfix", "master + all its children (smtpd, cleanup, qmgr, smtp, ...)", PrivatePostfix),
    ]
    for latency_ms in (0, 50, 200):
        name = "gateway" if latency_ms == 0 else f"gateway+{latency_ms}ms"

        def factory(workdir: Path, ms: int = latency_ms) -> Server:
            if gateway_cmd is None:
                raise SetupError(gateway_problem or "gateway CLI unavailable")
            return Gateway(workdir, ms, gateway_cmd, serve_args)

        specs.append(SetupSpec(name, "smtp-gateway serve process tree (not the sandbox)", factory))

    for name, queue, what in (
        ("gateway-x2", "sqlite", "one SQLite queue"),
        ("gateway-x2-pg", "postgresql", "one PostgreSQL queue (a private cluster)"),
    ):

        def two_workers(workdir: Path, queue: str = queue) -> Server:
            if gateway_cmd is None:
                raise SetupError(gateway_problem or "gateway CLI unavailable")
            return Gateway(workdir, 0, gateway_cmd, serve_args, workers=2, queue=queue)

        specs.append(SetupSpec(name, f"smtp-gateway serve --workers 2 (SO_REUSEPORT), {what}", two_workers))
    if "dmds" not in providers:
        specs = [s for s in specs if not s.name.startswith("gateway")]
    if "dengage" in providers:
        for name, rate, what in (
            ("gateway-dengage", 0.0, "limiter off"),
            ("gateway-dengage-limited", DENGAGE_RATE, f"limiter {DENGAGE_RATE:g}/s, sandbox enforcing 30/s"),
        ):

            def dengage(workdir: Path, limit: float = rate) -> Server:
                if gateway_cmd is None:
                    raise SetupError(gateway_problem or "gateway CLI unavailable")
                return Gateway(workdir, 0, gateway_cmd, serve_args, provider="dengage", rate_limit=limit)

            specs.append(SetupSpec(name, f"smtp-gateway serve process tree, dEngage account ({what})", dengage))
    return [s for s in specs if _selected(s.name, wanted)]


def _selected(name: str, wanted: list[str]) -> bool:
    return not wanted or name in wanted


def message_path(message: str) -> Path:
    """The .eml file of a message label."""
    return genmsg.MESSAGES_DIR / f"{MESSAGES[message]}.eml"


def source(server: Server, message: str, sessions: int, count: int, persistent: bool, limit: float) -> SourceRun:
    """Run smtp-source against the server."""
    target = f"{HOST}:{server.port}"
    path = message_path(message)
    return smtpsource.run(target, path, sessions, count, persistent, limit, genmsg.SENDER, genmsg.RECIPIENT)


def measure_point(server: Server, setup: str, message: str, mode: str, sessions: int, profile: Profile) -> Point:
    """One throughput point, with the server tree's peak RSS while it ran."""
    count = max(profile.max_count[message], 2 * sessions)
    point = Point(setup, message, mode, sessions, count)
    with PeakRss(server.rss_roots) as rss:
        sent = source(server, message, sessions, count, mode == "persistent", profile.target_s)
    point.sent, point.elapsed_s, point.time_limited = sent.sent, sent.elapsed_s, sent.time_limited
    point.msgs_per_s, point.error = sent.msgs_per_s, sent.error
    point.peak_rss_bytes, point.peak_pss_bytes = rss.peak, rss.peak_pss
    # smtp-source counts a message before its reply: up to one per session may not have been taken.
    settled = server.settle(sent.sent, sessions if sent.time_limited or sent.error else 0)
    # Messages answered 250 but not passed on (or not known to be) make no rate: an error, like a refusal,
    # so that no table, ratio or paired comparison takes the point as valid.
    point.error = "; ".join(text for text in (point.error, settled.error) if text)
    point.warning = settled.warning
    point.backlog, point.drain_s = settled.backlog, settled.drain_s
    return point


def run_smtpload(server: Server, message: str, count: int, limit: float) -> dict[str, object]:
    """One-session smtpload.py run (AUTH PLAIN when the server has credentials); its JSON result."""
    cmd = [sys.executable, str(BENCH_DIR / "smtpload.py"), f"{HOST}:{server.port}", "-F", str(message_path(message))]
    cmd += ["-m", str(count), "-s", "1", "--duration", str(limit), "--json"]
    cmd += ["--from", genmsg.SENDER, "--to", genmsg.RECIPIENT]
    if server.auth is not None:
        cmd += ["--auth", f"{server.auth[0]}:{server.auth[1]}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + 120, check=False)
    try:
        data = json.loads(result.stdout)
    except ValueError:
        raise ValueError(f"smtpload.py failed: {result.stderr.strip()[-300:]}") from None
    assert isinstance(data, dict)
    return data


def measure_latency(server: Server, setup: str, message: str, profile: Profile) -> Latency:
    """Per-transaction latency at one session."""
    lat = Latency(setup, message, 0, auth=server.auth is not None)
    try:
        data = run_smtpload(server, message, profile.latency_max[message], profile.target_s)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        lat.error = str(exc)
        return lat
    ms = data.get("latencies_ms") or {}
    assert isinstance(ms, dict)
    lat.count, lat.msgs_per_s = int(str(data["messages"])), float(str(data["msgs_per_s"]))
    lat.p50_ms, lat.p90_ms, lat.p99_ms = ms.get("p50", 0.0), ms.get("p90", 0.0), ms.get("p99", 0.0)
    lat.mean_ms, lat.max_ms = ms.get("mean", 0.0), ms.get("max", 0.0)
    if data["errors"]:
        lat.error = f"{data['errors']} errors, first: {data['first_error']}"
    # The latency of messages that never reached the upstream is not the gateway's latency of a relay.
    settled = server.settle(lat.count, 1)
    lat.error = "; ".join(text for text in (lat.error, settled.error) if text)
    return lat


def warm_up(server: Server, profile: Profile, messages: list[str]) -> None:
    """Unmeasured messages on one session so caches, pools and processes exist.

    Fails fast (SetupError) on a broken setup, before any point is measured.
    """
    for message in messages:
        count = profile.warmup[message]
        sent = source(server, message, 1, count, True, 120.0)
        if sent.error or sent.time_limited:
            raise SetupError(f"warm-up with the {message} message failed: {sent.error or 'too slow'}")
        settled = server.settle(count)
        if settled.error:
            raise SetupError(f"warm-up with the {message} message: {settled.error}")
        if settled.warning:
            print(f"  warm-up warning: {settled.warning}", flush=True)


def say(point: Point) -> None:
    """Progress line for a point."""
    what = point.error or f"{point.msgs_per_s:10,.1f} msgs/s"
    print(
        f"  {point.setup:15} {point.message:4} {point.mode:14} {point.sessions:3} sess. n={point.sent:<6}"
        f"{what}  ({point.elapsed_s:.1f}s, rss {point.peak_rss_bytes / report.MIB:.0f} MiB)"
        + (f"  {point.backlog} queued, drained {point.drain_s:.1f}s later" if point.drain_s is not None else "")
        + (f"  WARNING: {point.warning}" if point.warning else ""),
        flush=True,
    )


def measure_throughput(server: Server, spec: SetupSpec, args: argparse.Namespace, result: SetupResult) -> None:
    """All smtp-source points of one setup."""
    for message in args.messages:
        for mode in args.modes:
            for sessions in args.sessions:
                point = measure_point(server, spec.name, message, mode, sessions, args.profile)
                result.points.append(point)
                say(point)


def measure_latencies(server: Server, spec: SetupSpec, args: argparse.Namespace, result: SetupResult) -> None:
    """One-session latency runs of one setup."""
    for message in args.messages:
        lat = measure_latency(server, spec.name, message, args.profile)
        result.latencies.append(lat)
        shown = lat.error or f"p50 {lat.p50_ms:.2f} ms  p99 {lat.p99_ms:.2f} ms"
        print(f"  {spec.name:15} {message:4} latency n={lat.count:<6}{shown}", flush=True)


def run_setup(spec: SetupSpec, args: argparse.Namespace, workdir: Path) -> SetupResult:
    """Start one server, measure everything on it, stop it (also on errors and Ctrl-C)."""
    result = SetupResult(spec.name, spec.description)
    started = time.monotonic()
    print(f"== {spec.name}", flush=True)
    try:
        with spec.factory(workdir) as server:
            if server.info:
                result.description += f"; {server.info}"
            warm_up(server, args.profile, args.messages)
            measure_throughput(server, spec, args, result)
            if not args.no_latency:
                measure_latencies(server, spec, args, result)
    except SetupError as exc:
        result.skipped = str(exc)
        print(f"  SKIPPED {spec.name}: {exc}", flush=True)
    result.peak_rss_bytes = max((p.peak_rss_bytes for p in result.points), default=0)
    result.peak_pss_bytes = max((p.peak_pss_bytes for p in result.points), default=0)
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
                ref = report.find_point(by_name.get(other), point.message, point.mode, point.sessions)
                row[key] = point.msgs_per_s / ref.msgs_per_s if ref and not ref.error and ref.msgs_per_s else None
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
        aiosmtpd_version = metadata.version("aiosmtpd")
    except metadata.PackageNotFoundError:
        aiosmtpd_version = "?"
    rev = _command_output(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        # -d: the compiled-in value, so no /etc/postfix/main.cf is needed (the bench runs its own instance)
        "postfix": _command_output(["postconf", "-d", "-h", "mail_version"]) or "?",
        "aiosmtpd": aiosmtpd_version,
        "gateway_rev": rev or "uncommitted",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short points (~2 min) instead of the full run")
    parser.add_argument(
        "--setups",
        default="",
        help="comma list: smtp-sink,bare-aiosmtpd,postfix,gateway,gateway+50ms,gateway+200ms,gateway-x2,gateway-x2-pg",
    )
    parser.add_argument("--sessions", default="1,10,50", help="comma list of smtp-source session counts")
    parser.add_argument("--messages", default="5KB,1MB", help="comma list: 5KB,1MB")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list: persistent,per-connection")
    parser.add_argument("--no-latency", action="store_true", help="skip the one-session latency runs")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where latest.json/md go")
    parser.add_argument("--update-readme", action="store_true", help="also put the tables into docs/performance.md")
    parser.add_argument("--gateway-args", default="", help='extra `smtp-gateway serve` options, e.g. "--aiohttp"')
    parser.add_argument(
        "--providers",
        default="dmds",
        help="comma list of the gateway's upstreams: dmds (gateway, gateway+50ms, gateway+200ms, "
        "gateway-x2, gateway-x2-pg), dengage (gateway-dengage, gateway-dengage-limited)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the server logs directory")
    args = parser.parse_args(argv)
    args.profile = PROFILES["quick" if args.quick else "full"]
    args.setups = [s for s in args.setups.split(",") if s] or (QUICK_SETUPS if args.quick else [])
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    args.messages = [m for m in args.messages.split(",") if m]
    args.modes = [m for m in args.modes.split(",") if m]
    args.providers = tuple(p for p in args.providers.split(",") if p)
    for provider in args.providers:
        if provider not in PROVIDERS:
            parser.error(f"unknown provider {provider!r} (one of {', '.join(PROVIDERS)})")
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
    if smtpsource.binary() is None:
        install_postfix()
    if smtpsource.binary() is None:
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
    stop_stale()
    workdir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    claim(workdir)
    started = time.monotonic()
    print(f"profile {args.profile.name}; logs in {workdir}", flush=True)
    try:
        specs = build_specs(args.setups, *resolve_gateway(args.setups), shlex.split(args.gateway_args), args.providers)
        for spec in specs:
            run.setups.append(run_setup(spec, args, workdir))
    except KeyboardInterrupt:
        run.interrupted = True
        print("interrupted: servers stopped, writing partial results", flush=True)
    run.ratios = compute_ratios(run.setups)
    run.duration_s = time.monotonic() - started
    json_path, md_path = report.write_results(run, args.out)
    if args.update_readme and not report.update_readme(run, BENCH_DIR.parent / "docs" / "performance.md"):
        print("markers not found; docs/performance.md not updated", flush=True)
    print()
    print(report.render_markdown(run))
    print(f"wrote {json_path} and {md_path}")
    failed = failures(run)
    if args.keep_logs or failed:
        print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return exit_status(run, failed)


def failures(run: RunResult) -> list[str]:
    """What makes the run incomplete: each skipped setup, and the points and latency runs with an error."""
    out = [f"{s.name} skipped: {s.skipped}" for s in run.setups if s.skipped]
    out += [
        f"{p.setup} {p.message} {p.mode} {p.sessions} sess.: {p.error}" for s in run.setups for p in s.points if p.error
    ]
    out += [f"{s.name} {lat.message} latency: {lat.error}" for s in run.setups for lat in s.latencies if lat.error]
    return out


def exit_status(run: RunResult, failed: list[str]) -> int:
    """130 after Ctrl-C (or SIGTERM), 1 when a setup was skipped or a point failed, else 0; the last line says
    which, so that a scripted run can tell a complete result from a partial one."""
    if run.interrupted:
        print("INTERRUPTED: partial results (exit 130)", flush=True)
        return 130
    if failed:
        print(f"FAILED (exit 1): {len(failed)} setups or points did not complete, first: {failed[0]}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
