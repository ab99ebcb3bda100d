"""A process's memory: limits.malloc_mmap_threshold (glibc takes it, so a freed multi-megabyte block is not
kept in the heap), and what a serving process does not import.

Each case runs in a fresh interpreter: the allocator's state is per process and glibc's dynamic threshold
depends on what the process freed before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import LimitsSettings
from gateway.ops.memory import MmapThreshold, set_mmap_threshold
from tests.configs import serve_config, write
from tests.procs import kill, serve

# After an 8 MiB block is freed, glibc's dynamic threshold rises to 8 MiB: a 4 MiB block then comes from the
# heap (and stays in the process's RSS when freed, if anything above it is still used). With the threshold
# set (the default: 4 MiB), the 4 MiB block is mmapped: mallinfo2().hblks counts it.
PROBE = """
import ctypes, json, sys
from gateway.ops.memory import set_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
result = set_mmap_threshold(int(sys.argv[1])).value
first = bytearray(8 * 1024 * 1024)
del first
before = libc.mallinfo2().hblks
second = bytearray(4 * 1024 * 1024)
print(json.dumps({"result": result, "mmapped": libc.mallinfo2().hblks - before}))
"""


def probe(threshold: int, **env: str) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold)], env=environ, check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out))


def test_the_threshold_keeps_a_freed_big_block_out_of_the_heap() -> None:
    assert probe(LimitsSettings().malloc_mmap_threshold) == {"result": "set", "mmapped": 1}


def test_zero_leaves_glibcs_dynamic_threshold() -> None:
    assert probe(0) == {"result": "glibc default", "mmapped": 0}


def test_the_environment_variable_wins() -> None:
    # glibc applied it at start (16 MiB: the 4 MiB block comes from the heap); the configured value is not set.
    assert probe(1024 * 1024, MALLOC_MMAP_THRESHOLD_=str(16 * 1024 * 1024)) == {"result": "environment", "mmapped": 0}
    assert probe(1024 * 1024, MALLOC_TRIM_THRESHOLD_=str(16 * 1024 * 1024))["result"] == "environment"


def test_an_empty_environment_variable_is_not_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert set_mmap_threshold(0) is MmapThreshold.GLIBC_DEFAULT


def _imported_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> set[str]:
    """The modules a real `serve` process imported up to its `ready` event (Python's -X importtime lines)."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    log = tmp_path / "gateway.log"
    proc, _ = serve(write(tmp_path / "gateway.toml", serve_config(tmp_path, **overrides)), log)
    kill(proc)
    lines = log.read_text(errors="replace").splitlines()
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:") and "|" in line}


def test_a_process_without_the_operator_endpoint_never_imports_its_web_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's web server and the console's templates cost memory a process that serves only SMTP never
    uses; they come with `http.port`."""
    without = _imported_at_start(tmp_path / "smtp-only", monkeypatch)
    assert "gateway.smtp.server" in without  # the import lines were read
    assert not {"aiohttp.web", "gateway.ops.http", "gateway.ops.api", "jinja2"} & without
    with_endpoint = _imported_at_start(tmp_path / "with-http", monkeypatch, http={"port": 0})
    assert {"aiohttp.web", "gateway.ops.http", "gateway.ops.api"} <= with_endpoint


def test_a_serving_process_imports_neither_other_commands_nor_features_it_has_not_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command imports what only it uses when it runs, and `serve` what a feature needs when the
    configuration enables it (at start-up, never at its first use): without them, `serve` loads neither the
    queue's operator actions, the ledger's lookups, the password prompt, the hints for a mistyped key, nor
    token logins, the API's token checks or check-upstream's reports."""
    imported = _imported_at_start(tmp_path, monkeypatch)
    assert "gateway.smtp.server" in imported  # the import lines were read
    other_commands = {
        "gateway.delivery.admin",  # queue
        "gateway.ledger.query",  # status
        "gateway.ledger.render",
        "gateway.providers.checks",  # check-upstream
        "getpass",  # hash-password
        "difflib",  # a mistyped key's "did you mean"
    }
    not_configured = {
        "gateway.auth.oauth",  # [[oauth.issuers]]
        "gateway.auth.jwks",
        "gateway.ops.apiauth",  # http.port
    }
    assert not (other_commands | not_configured) & imported
