"""The operator examples in config/: every metric the Grafana dashboard and the alert rules name exists in
gateway/ops/metrics.py or the queue collector (queuestats.py); the files parse; the systemd unit passes
`systemd-analyze verify`; the HAProxy example passes `haproxy -c`; the compose example refers to files that
exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.ops import queuestats  # noqa: F401  (registers the queue's collector)
from gateway.ops.metrics import REGISTRY
from tests.devices_util import require_tool

CONFIG = Path(__file__).resolve().parents[1] / "config"
METRIC = re.compile(r"\bsmtp_gateway_[a-z0-9_]+")


def defined_samples() -> set[str]:
    """Every sample name the registry can produce (counters' _total, histograms' _bucket/_count/_sum)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",),
            "summary": ("_count", "_sum", ""),
        }[family.type]
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def alert_expressions() -> list[str]:
    rules = yaml.safe_load((CONFIG / "prometheus-alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(exprs) >= 8
    return exprs


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_metric_named_exists(source: str) -> None:
    exprs = dashboard_expressions() if source == "dashboard" else alert_expressions()
    named = {name for expr in exprs for name in METRIC.findall(expr)}
    assert named, source
    assert sorted(named - defined_samples()) == []


def test_dashboard_covers_the_operations_metrics() -> None:
    named = {name for expr in dashboard_expressions() for name in METRIC.findall(expr)}
    for wanted in (
        "smtp_gateway_sessions_active",
        "smtp_gateway_sessions_tls_total",
        "smtp_gateway_auth_total",
        "smtp_gateway_refusals_total",
        "smtp_gateway_messages_total",
        "smtp_gateway_upstream_seconds_bucket",
        "smtp_gateway_queue_messages",
        "smtp_gateway_queue_oldest_age_seconds",
        "smtp_gateway_dead_letters_total",
        "smtp_gateway_auth_lockouts_total",
        "smtp_gateway_rate_limit_wait_seconds_bucket",
        "smtp_gateway_deliveries_total",
    ):
        assert wanted in named, wanted
    dashboard = json.loads((CONFIG / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_and_compose_files() -> None:
    prometheus = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["gateway:8080"]
    compose = yaml.safe_load((CONFIG / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"gateway", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source not in ("./gateway.toml", "./tls"):  # the user's own files
                assert (CONFIG / source).exists(), source
    assert (CONFIG.parent / "Dockerfile").exists()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    unit = (CONFIG / "smtp-gateway.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit and "StateDirectory=smtp-gateway" in unit
    for hardening in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "PrivateTmp=yes",
    ):
        assert hardening in unit
    # verify checks that ExecStart's program exists: point it at this Python's gateway.
    local = tmp_path / "smtp-gateway.service"
    local.write_text(unit.replace("/opt/smtp-gateway/.venv/bin/smtp-gateway", f"{sys.executable} -m gateway"))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stderr) == (0, "")


def test_haproxy_example_is_valid(tmp_path: Path) -> None:
    haproxy = require_tool("haproxy", "haproxy")
    config = tmp_path / "haproxy.cfg"
    shutil.copy(CONFIG / "haproxy.cfg", config)
    result = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "send-proxy-v2" in config.read_text()
