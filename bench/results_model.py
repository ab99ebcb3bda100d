"""Data classes for benchmark results, shared by run.py and report.py."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Point:
    """One smtp-source throughput measurement."""

    setup: str
    message: str
    mode: str  # "persistent" | "per-connection"
    sessions: int
    count: int  # at most this many messages were to be sent
    sent: int = 0  # messages completed (250 after DATA)
    elapsed_s: float = 0.0
    time_limited: bool = False  # stopped at the profile's time limit before `count`
    msgs_per_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    error: str = ""
    warning: str = ""
    # Postfix: messages still in its queue when the window closed, and the seconds they took to drain
    # after it (outside the rate's window). None: not measured (the other servers pass each message on
    # before their 250).
    backlog: int | None = None
    drain_s: float | None = None


@dataclass
class Latency:
    """One-session per-transaction latency measured with bench/smtpload.py."""

    setup: str
    message: str
    count: int  # messages timed
    msgs_per_s: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    auth: bool = False
    error: str = ""


@dataclass
class SetupResult:
    """All measurements of one server setup."""

    name: str
    description: str
    skipped: str = ""
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    points: list[Point] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    duration_s: float = 0.0


@dataclass
class RunResult:
    """The whole benchmark run."""

    profile: str
    machine: dict[str, str]
    messages: dict[str, dict[str, object]]
    setups: list[SetupResult] = field(default_factory=list)
    ratios: list[dict[str, object]] = field(default_factory=list)
    duration_s: float = 0.0
    interrupted: bool = False
