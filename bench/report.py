"""Markdown and JSON rendering of a benchmark run."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from results_model import Point, RunResult, SetupResult

MIB = 1024 * 1024
README_START = "<!-- bench:latest:start -->"
README_END = "<!-- bench:latest:end -->"


def _rate(point: Point | None) -> str:
    if point is None:
        return "–"
    if point.error:
        return "error"
    return f"{point.msgs_per_s:,.0f}" if point.msgs_per_s >= 100 else f"{point.msgs_per_s:,.1f}"


def find_point(setup: SetupResult | None, message: str, mode: str, sessions: int) -> Point | None:
    """The point of `setup` with that message, connection mode and session count."""
    if setup is None:
        return None
    for point in setup.points:
        if (point.message, point.mode, point.sessions) == (message, mode, sessions):
            return point
    return None


def _sessions(run: RunResult) -> list[int]:
    return sorted({p.sessions for s in run.setups for p in s.points})


def _row_keys(run: RunResult) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for setup in run.setups:
        for point in setup.points:
            if (point.message, point.mode) not in keys:
                keys.append((point.message, point.mode))
    return keys


def throughput_table(run: RunResult) -> list[str]:
    """msgs/s per setup × message × connection mode, one column per session count."""
    sessions = _sessions(run)
    head = "| setup | message | connections | " + " | ".join(f"{s} sess." for s in sessions) + " |"
    lines = [head, "|" + " --- |" * (3 + len(sessions))]
    for setup in run.setups:
        if setup.skipped:
            continue
        for message, mode in _row_keys(run):
            cells = [_rate(find_point(setup, message, mode, s)) for s in sessions]
            lines.append(f"| {setup.name} | {message} | {mode} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(run: RunResult) -> list[str]:
    """gateway ÷ Postfix and gateway ÷ bare aiosmtpd throughput."""
    if not run.ratios:
        return ["(no gateway results)"]
    if all(r.get("vs_postfix") is None and r.get("vs_bare_aiosmtpd") is None for r in run.ratios):
        return ["(no Postfix or bare aiosmtpd results in this run to compare with)"]
    sessions = _sessions(run)
    head = "| gateway setup | message | connections | " + " | ".join(f"{s} sess." for s in sessions) + " |"
    lines = [head, "|" + " --- |" * (3 + len(sessions))]
    rows: dict[tuple[str, str, str], dict[int, str]] = {}
    for ratio in run.ratios:
        key = (str(ratio["setup"]), str(ratio["message"]), str(ratio["mode"]))
        vs_pf, vs_bare = ratio.get("vs_postfix"), ratio.get("vs_bare_aiosmtpd")
        cell = " / ".join(f"{v:.2f}×" if isinstance(v, float) else "–" for v in (vs_pf, vs_bare))
        rows.setdefault(key, {})[int(str(ratio["sessions"]))] = cell
    for (setup, message, mode), cells in rows.items():
        lines.append(f"| {setup} | {message} | {mode} | " + " | ".join(cells.get(s, "–") for s in sessions) + " |")
    return lines


def latency_table(run: RunResult) -> list[str]:
    """Per-transaction latency at one session."""
    lines = [
        "| setup | message | n | p50 ms | p90 ms | p99 ms | mean ms | msgs/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setup in run.setups:
        for lat in setup.latencies:
            if lat.error:
                lines.append(f"| {setup.name} | {lat.message} | {lat.count} | error: {lat.error[:60]} | | | | |")
                continue
            lines.append(
                f"| {setup.name}{' (AUTH)' if lat.auth else ''} | {lat.message} | {lat.count} | "
                f"{lat.p50_ms:.2f} | {lat.p90_ms:.2f} | {lat.p99_ms:.2f} | {lat.mean_ms:.2f} | "
                f"{lat.msgs_per_s:,.1f} |"
            )
    return lines


def _peak_at(setup: SetupResult, message: str, sessions: int) -> str:
    """Peak RSS sum during the persistent-connection point for this message at this session count."""
    for point in setup.points:
        if point.message == message and point.sessions == sessions and point.mode == "persistent":
            return f"{point.peak_rss_bytes / MIB:,.1f}" if point.peak_rss_bytes else "-"
    return "-"


def rss_table(run: RunResult) -> list[str]:
    """Peak RSS of each server's process tree over the whole setup, and at 50 sessions per message.

    A process's RSS rarely shrinks, so a point's peak includes what earlier points left behind;
    the bench runs the 5 KB points before the 1 MB ones, so the 5 KB column is not inflated by them.
    """
    lines = [
        "| setup | peak RSS sum (MiB) | 5KB @ 50 sess. | 1MB @ 50 sess. | peak PSS sum (MiB) | what is counted |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setup in run.setups:
        if not setup.skipped:
            rss, pss = setup.peak_rss_bytes / MIB, setup.peak_pss_bytes / MIB
            lines.append(
                f"| {setup.name} | {rss:,.1f} | {_peak_at(setup, '5KB', 50)} | {_peak_at(setup, '1MB', 50)} "
                f"| {pss:,.1f} | {setup.description} |"
            )
    return lines


def backlog_table(run: RunResult) -> list[str]:
    """Messages a server had only queued when a point's window closed, and their drain time after it."""
    points = [p for s in run.setups for p in s.points if p.backlog is not None and p.drain_s is not None]
    if not points:
        return []
    lines = [
        "Postfix answers 250 once a message is in its queue: its rate counts messages it had not yet relayed."
        " Still queued when the window closed, and the seconds the queue took to drain after it (the gateway"
        " answers 250 after its API call, so it has no such backlog):",
        "",
        "| setup | message | connections | sessions | sent | queued at the window's end | drained after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        lines.append(
            f"| {p.setup} | {p.message} | {p.mode} | {p.sessions} | {p.sent:,} | {p.backlog:,} | {p.drain_s:.1f} s |"
        )
    return lines


def notes(run: RunResult) -> list[str]:
    """Skipped setups, errors and warnings."""
    out = []
    for setup in run.setups:
        if setup.skipped:
            out.append(f"- **{setup.name} skipped**: {setup.skipped}")
        for point in setup.points:
            for kind, text in (("error", point.error), ("warning", point.warning)):
                if text:
                    where = f"{setup.name} {point.message} {point.mode} {point.sessions} sess."
                    out.append(f"- {where}: {kind}: {text[:200]}")
    if run.interrupted:
        out.append("- run was **interrupted**: partial results")
    return out


def machine_line(run: RunResult) -> str:
    """One-line machine description."""
    m = run.machine
    return (
        f"{m['cpu']}, {m['cores']} cores, kernel {m['kernel']}, Python {m['python']}, "
        f"Postfix {m['postfix']}, aiosmtpd {m['aiosmtpd']}, gateway {m['gateway_rev']}"
    )


def tables(run: RunResult) -> list[str]:
    """The Markdown body shared by latest.md and the block in docs/performance.md."""
    backlog = backlog_table(run)
    if backlog:
        backlog.append("")
    lines = [
        f"Run {run.machine['date']}, profile `{run.profile}`, {run.duration_s:.0f} s.",
        "",
        f"Machine: {machine_line(run)}.",
        "",
        "Throughput, msgs/s (smtp-source; persistent = many messages per connection):",
        "",
        *throughput_table(run),
        "",
        "Gateway throughput relative to Postfix / bare aiosmtpd (same message, connections, sessions):",
        "",
        *ratio_table(run),
        "",
        *backlog,
        "Latency of one MAIL..end-of-DATA transaction at 1 session (bench/smtpload.py):",
        "",
        *latency_table(run),
        "",
        "Peak memory of the server process tree while under load (RSS summed over the tree every 100 ms,"
        " which counts shared pages once per process; PSS summed every 1 s, which splits them):",
        "",
        *rss_table(run),
    ]
    extra = notes(run)
    if extra:
        lines += ["", "Notes:", "", *extra]
    return lines


def render_markdown(run: RunResult) -> str:
    """The full latest.md document."""
    return "\n".join(["# smtp-gateway benchmark: latest run", "", *tables(run), ""])


def write_results(run: RunResult, out_dir: Path) -> tuple[Path, Path]:
    """Write latest.json and latest.md atomically; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "latest.json", out_dir / "latest.md"
    for path, text in (
        (json_path, json.dumps(asdict(run), indent=2) + "\n"),
        (md_path, render_markdown(run)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return json_path, md_path


def update_block(page: Path, start_marker: str, end_marker: str, body: str) -> bool:
    """Replace what stands between the two markers in `page` (docs/performance.md) with `body`."""
    text = page.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    page.write_text(text[:start] + "\n".join([start_marker, "", body, "", end_marker]) + text[end + len(end_marker) :])
    return True


def update_readme(run: RunResult, readme: Path) -> bool:
    """Replace the block between the markers (in docs/performance.md) with the latest tables."""
    return update_block(readme, README_START, README_END, "\n".join(tables(run)))
