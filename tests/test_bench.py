"""The benchmark's own checks (bench/): a point is only published as valid when its messages are known to
have been passed on. No server is started here: the sandbox's port is a closed one, and the load generator
and the servers' settle() are stand-ins."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# bench/ is no package: its scripts import each other as top-level modules.
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import backlog  # noqa: E402
import failover  # noqa: E402
import gateway_target  # noqa: E402
import mix  # noqa: E402
import pairs  # noqa: E402
import report  # noqa: E402
import run as bench_run  # noqa: E402
import scan  # noqa: E402
import servers  # noqa: E402
import smtpsource  # noqa: E402
import tls  # noqa: E402
from results_model import Point, RunResult, SetupResult  # noqa: E402
from servers import Settled  # noqa: E402

MACHINE_KEYS = ("date", "cpu", "cores", "kernel", "python", "postfix", "aiosmtpd", "gateway_rev")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_settle_warns_when_the_sandbox_cannot_be_asked(tmp_path: Path) -> None:
    """The sandbox died: in store-and-forward the gateway queued every message and answered 250. settle()
    cannot tell whether any message reached the upstream, and must say so."""
    gw = gateway_target.Gateway(tmp_path, 0, ["smtp-gateway"], [])
    gw.sandbox_port = _closed_port()  # nothing listens: upstream_requests() == -1
    assert gw.upstream_requests() == -1
    assert "could not be asked" in gw.settle(5000, 0, timeout=0.5).error


class _Undelivered:
    """A server whose settle() finds the messages did not reach the sandbox (as Gateway.settle says)."""

    auth = None
    port = 1

    def rss_roots(self) -> list[int]:
        return []

    def settle(self, expected: int, slack: int = 0) -> Settled:
        return Settled(error=f"sandbox saw 0 API calls for {expected} messages")


@pytest.fixture()
def fast_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """smtp-source "sent" 5000 messages at 1000 msgs/s in a time-limited window."""
    monkeypatch.setattr(bench_run, "source", lambda *a, **k: smtpsource.SourceRun(5000, 5.0, 1000.0, True))


def test_pairs_refuses_a_point_whose_messages_did_not_reach_the_sandbox(fast_source: None) -> None:
    """A version that answers 250 without delivering must not pass as faster and cheaper per message."""
    args = argparse.Namespace(message="5KB", mode="per-connection", sessions=10)
    with pytest.raises(SystemExit, match="0 API calls"):
        pairs.point(_Undelivered(), args)  # type: ignore[arg-type]


def test_run_gives_no_rate_nor_ratio_for_a_point_whose_messages_did_not_reach_the_sandbox(fast_source: None) -> None:
    profile = bench_run.PROFILES["quick"]
    point = bench_run.measure_point(_Undelivered(), "gateway", "5KB", "persistent", 10, profile)  # type: ignore[arg-type]
    gateway = SetupResult("gateway", "")
    gateway.points.append(point)
    postfix = SetupResult("postfix", "")
    postfix.points.append(Point("postfix", "5KB", "persistent", 10, 5000, sent=5000, msgs_per_s=900.0))
    run = RunResult("quick", {}, {}, [postfix, gateway])
    run.ratios = bench_run.compute_ratios(run.setups)
    assert not [r for r in run.ratios if r["vs_postfix"] is not None], run.ratios
    assert "| gateway | 5KB | persistent | error |" in report.throughput_table(run)


def test_latency_of_messages_that_did_not_reach_the_sandbox_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    one_session = {"messages": 1000, "msgs_per_s": 500.0, "latencies_ms": {"p50": 1.0}, "errors": 0}
    monkeypatch.setattr(bench_run, "run_smtpload", lambda *a, **k: one_session)
    lat = bench_run.measure_latency(_Undelivered(), "gateway", "5KB", bench_run.PROFILES["quick"])  # type: ignore[arg-type]
    assert "0 API calls" in lat.error


def test_postfix_backlog_at_the_windows_end_and_its_drain_time_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_source: None
) -> None:
    """Postfix answers 250 once a message is queued: the messages still queued when the window closed are in
    its rate, their relaying after it. The point records both, and the report prints them."""
    postfix = servers.PrivatePostfix(tmp_path)
    postfix.tmp = tmp_path  # not started: no master.pid, so no processes to watch
    left = iter([946, 300, 0])  # the queue as settle() finds it at each look
    monkeypatch.setattr(postfix, "queued", lambda: next(left))
    point = bench_run.measure_point(postfix, "postfix", "5KB", "persistent", 50, bench_run.PROFILES["quick"])
    assert not point.error
    assert point.backlog == 946
    assert point.drain_s is not None and point.drain_s > 0
    setup = SetupResult("postfix", "")
    setup.points.append(point)
    text = "\n".join(report.tables(RunResult("quick", dict.fromkeys(MACHINE_KEYS, "?"), {}, [setup])))
    assert "| postfix | 5KB | persistent | 50 | 5,000 | 946 |" in text


def test_smtp_source_dying_as_the_time_limit_is_reached_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """smtp-source exits non-zero on any refused message; if it does so while the loop sleeps, just as the time
    limit is reached, the run must not come back as a valid time-limited rate."""
    go = tmp_path / "go"
    script = f"printf '1\\r2\\r3\\r'; while [ ! -e {go} ]; do sleep 0.01; done; echo 'fatal: 554 no' >&2; exit 1"
    monkeypatch.setattr(smtpsource, "command", lambda *a: ["sh", "-c", script])
    started: list[subprocess.Popen[bytes]] = []

    class Recorded(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    def sleep(_seconds: float) -> None:  # the loop's sleep: smtp-source dies meanwhile
        go.touch()
        os.waitid(os.P_PID, started[0].pid, os.WEXITED | os.WNOWAIT)  # exited, left for Popen to reap

    monkeypatch.setattr(smtpsource.subprocess, "Popen", Recorded)
    monkeypatch.setattr(smtpsource.time, "sleep", sleep)
    ran = smtpsource.run("127.0.0.1:1", tmp_path / "m.eml", 1, 100, True, 0.0, "a@b.example", "c@d.example")
    assert "554" in ran.error
    assert not ran.time_limited


def test_scan_percentiles_are_nearest_rank() -> None:
    """The p99 of 100 samples is the 99th smallest, not the largest."""
    seconds = [n / 1000 for n in range(1, 101)]
    assert scan.percentiles(seconds)["p99_ms"] == 99.0
    assert scan.percentiles(seconds)["p50_ms"] == 50.0
    assert scan.percentiles([0.004])["p99_ms"] == 4.0


def test_a_mix_run_with_errors_or_undelivered_messages_fails() -> None:
    quiet, noisy = mix.Klass("app 5 KB (persistent)"), mix.Klass("scan 100 KB-2 MB")
    assert mix.failures([quiet], Settled(warning="sandbox answered 3 calls with 429")) == []
    noisy.failed(OSError("connection reset"))
    assert mix.failures([quiet, noisy], Settled()) == ["scan 100 KB-2 MB: 1 errors, first: OSError: connection reset"]
    assert mix.failures([quiet], Settled(error="sandbox saw 9 API calls for 10 messages")) != []


def test_pairs_take_each_side_first_equally_often() -> None:
    for requested in (4, 5, 15):
        turns = pairs.orders(requested)
        assert len(turns) >= requested
        assert turns.count((0, 1)) == turns.count((1, 0))


def test_pairs_give_the_ratios_quartiles_next_to_their_median() -> None:
    assert pairs.summary([0.9, 1.0, 1.1, 1.2, 1.3]) == "1.100, quartiles 1.000-1.200, range 0.90-1.30"


@pytest.fixture()
def no_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """run.main() without a server, a load generator nor a signal handler: each setup is what the test's
    run_setup returns; results go to the returned folder."""
    monkeypatch.setattr(bench_run, "preflight", lambda: None)
    monkeypatch.setattr(bench_run, "stop_stale", lambda: None)
    monkeypatch.setattr(bench_run, "claim", lambda _workdir: None)
    monkeypatch.setattr(bench_run, "machine_info", lambda: dict.fromkeys(MACHINE_KEYS, "?"))
    monkeypatch.setattr(bench_run, "resolve_gateway", lambda _wanted: (None, "not selected"))
    monkeypatch.setattr(bench_run.signal, "signal", lambda *_a: None)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setattr(bench_run.tempfile, "mkdtemp", lambda prefix: str(workdir))
    return tmp_path / "out"


def _setup_with(point_error: str = "", skipped: str = "") -> SetupResult:
    setup = SetupResult("smtp-sink", "", skipped=skipped)
    if not skipped:
        setup.points.append(Point("smtp-sink", "5KB", "persistent", 1, 5000, sent=5000, msgs_per_s=900.0))
        setup.points[0].error = point_error
    return setup


@pytest.mark.parametrize(
    ("setup", "status", "last"),
    [
        (_setup_with(), 0, "wrote "),
        (_setup_with(point_error="sandbox saw 0 API calls"), 1, "FAILED (exit 1): 1 setups or points"),
        (_setup_with(skipped="postfix not installed"), 1, "FAILED (exit 1): 1 setups or points"),
    ],
)
def test_run_exits_1_when_a_point_failed_or_a_setup_was_skipped(
    no_servers: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setup: SetupResult,
    status: int,
    last: str,
) -> None:
    """A scripted run must tell a partial result from a complete one by the exit status and the last line."""
    monkeypatch.setattr(bench_run, "run_setup", lambda *_a: setup)
    argv = ["--quick", "--setups", "smtp-sink", "--messages", "5KB", "--no-latency", "--out", str(no_servers)]
    assert bench_run.main(argv) == status
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(last)


def test_run_exits_130_when_interrupted(no_servers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_a: object) -> SetupResult:
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "run_setup", interrupted)
    assert bench_run.main(["--quick", "--setups", "smtp-sink", "--out", str(no_servers)]) == 130


@pytest.fixture()
def no_tls_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tls.main() without a server: each certificate's points are what the test's run_cert adds."""
    monkeypatch.setattr(tls, "stop_stale", lambda: None)
    monkeypatch.setattr(tls, "claim", lambda _workdir: None)
    monkeypatch.setattr(tls, "machine_info", lambda: dict.fromkeys(MACHINE_KEYS, "?"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setattr(tls.tempfile, "mkdtemp", lambda prefix: str(workdir))


def _tls_point(error: str = "") -> Any:
    return tls.TlsPoint("gateway", tls.Shape("ecdsa", "starttls", "1.3", "full", "5KB"), 1, 10, 10.0, error=error)


@pytest.mark.parametrize(
    ("outcome", "status"),
    [("ok", 0), ("point error", 1), ("setup failed", 1), ("interrupted", 130)],
)
def test_tls_exits_1_when_a_point_failed_or_a_setup_failed(
    tmp_path: Path,
    no_tls_servers: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    outcome: str,
    status: int,
) -> None:
    def run_cert(_workdir: Path, _cert: str, _shapes: object, _args: object, out: Any) -> None:
        out.points.append(_tls_point("3 errors, first: SMTPServerDisconnected" if outcome == "point error" else ""))
        if outcome == "setup failed":
            raise servers.SetupError("gateway did not start")
        if outcome == "interrupted":
            raise KeyboardInterrupt

    monkeypatch.setattr(tls, "run_cert", run_cert)
    assert tls.main(["--quick", "--out", str(tmp_path)]) == status
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith({0: "|", 1: "FAILED (exit 1)", 130: "INTERRUPTED"}[status]), last


def test_backlog_fill_errors_and_an_undrained_queue_fail_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """smtp-source refused while filling, or a queue not drained before --timeout: not a valid backlog figure."""
    monkeypatch.setattr(backlog, "http_json", lambda *a, **k: None)
    refused = smtpsource.SourceRun(12, 1.0, 12.0, False, error="smtp-source: fatal: 451 4.3.0")
    monkeypatch.setattr(backlog.smtpsource, "run", lambda *a, **k: refused)
    gateway = argparse.Namespace(sandbox_url="http://127.0.0.1:1", port=2)
    errors = backlog.fill(gateway, 3, 100)  # type: ignore[arg-type]
    assert sorted(errors) == [f"filling through port {p}: smtp-source: fatal: 451 4.3.0" for p in (2, 3)]
    assert backlog.failures([], 0, 60.0) == []
    assert backlog.failures([], 7, 60.0) == ["7 messages still queued after 60 s of draining"]


@pytest.mark.parametrize(("accepted", "delivered", "status"), [(20, 20, 0), (20, 19, 1), (18, 18, 1)])
def test_failover_exits_1_when_a_scenario_lost_or_refused_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accepted: int, delivered: int, status: int
) -> None:
    result = {"scenario": "?", "accepted": accepted, "delivered": delivered, "seconds_from_kill_to_all_delivered": 1}
    monkeypatch.setattr(failover, "machine_info", lambda: {})
    monkeypatch.setattr(failover, "scenario", lambda name, _workdir: {**result, "scenario": name})
    assert failover.main(["--out", str(tmp_path / "failover.json")]) == status


class _TlsServer(servers.Server):
    """A started server as run_cert sees it: nothing runs, every message passed on."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self) -> None:
        self.events.append("start")

    def stop(self) -> None:
        self.events.append("stop")

    def rss_roots(self) -> list[int]:
        return []


def test_tls_warms_each_setup_and_mode_up_before_its_first_point_and_does_not_report_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first measured point must not pay the server's first handshakes, cache fills and imports."""
    server = _TlsServer()
    setups = [tls.Setup("postfix", server, auth=False), tls.Setup("gateway", server, auth=True)]
    calls: list[tuple[str, str, int]] = []

    def load(setup: Any, shape: Any, sessions: int, duration: float, messages: int = 0) -> dict[str, object]:
        calls.append((setup.name, shape.mode, messages))
        return {"messages": messages or 50, "msgs_per_s": 50.0, "resumed": 0, "errors": 0, "latencies_ms": {}}

    monkeypatch.setattr(tls, "load", load)
    monkeypatch.setattr(tls, "servers", lambda *_a: setups)
    monkeypatch.setattr(tls, "certificate", lambda *_a: (tmp_path / "c", tmp_path / "k"))
    monkeypatch.setattr(tls, "check_cli", lambda: [])
    args = argparse.Namespace(
        certs=["ecdsa"], versions=["1.3"], handshakes=["full"], plan="standard", sessions=[1], duration=1.0
    )
    shapes = tls.plan(args)
    run = tls.TlsRun({})
    tls.run_cert(tmp_path, "ecdsa", shapes, args, run)
    warm = [(name, mode) for name, mode, messages in calls if messages]  # a count, not the points' duration
    assert warm == [(s.name, mode) for s in setups for mode in ("starttls", "implicit")]
    assert all(messages for _name, _mode, messages in calls[: len(warm)]), "warm-up before the first point"
    assert len(run.points) == len(shapes) * len(setups)
    assert all(p.messages == 50 for p in run.points), "a warm-up was reported as a point"
